"""The pure kernels (sparsifiers, TIES consensus, the registry's combine) on hand-made tensors."""

import re

import pytest
import torch

from hm3.engine.plan import TensorJob, tensor_role
from hm3.errors import Hm3Error
from hm3.methods import METHODS, MergeMethod, get_method, sparsify as sp
from hm3.methods.consensus import agreement_mask, elect_sign
from hm3.methods.packed import Packed
from hm3.methods.registry import _registry


def tensor(*values):
    """tensor(1, 2) and tensor([1, 2]) are vectors; tensor([1, 2], [3, 4]) is a matrix."""
    if len(values) == 1 and isinstance(values[0], list):
        values = values[0]
    return torch.tensor(values, dtype=torch.float32)


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype),
                               rtol=1e-6, atol=1e-6)


def generator(seed):
    return torch.Generator().manual_seed(seed)


# --- magnitude (TIES trim) ---------------------------------------------------------------------

def test_magnitude_keeps_the_largest_entries_by_absolute_value():
    t = tensor([0.1, -0.5], [0.3, -0.05])
    close(sp.magnitude(t, 0.5), [[0.0, -0.5], [0.3, 0.0]])
    close(sp.magnitude(t, 0.75), [[0.1, -0.5], [0.3, 0.0]])


def test_magnitude_keeps_at_least_one_entry():
    t = tensor([0.1, -0.5], [0.3, -0.05])
    close(sp.magnitude(t, 0.1), [[0.0, -0.5], [0.0, 0.0]])


def test_magnitude_at_density_one_returns_the_tensor_unchanged():
    t = tensor([0.1, -0.5], [0.3, -0.05])
    assert torch.equal(sp.magnitude(t, 1.0), t)


def test_magnitude_of_an_empty_tensor_is_empty():
    assert sp.magnitude(torch.zeros(0, 3), 0.5).shape == (0, 3)


_L2 = (0.3525 / 0.34) ** 0.5  # sqrt(sum of all squares / sum of kept squares)


@pytest.mark.parametrize("rule, expected", [
    (None, [[0.0, -0.5], [0.3, 0.0]]),
    ("density", [[0.0, -1.0], [0.6, 0.0]]),               # / 0.5
    ("l1", [[0.0, -0.59375], [0.35625, 0.0]]),            # * 0.95 / 0.8
    ("l2", [[0.0, -0.5 * _L2], [0.3 * _L2, 0.0]]),
    ("linf", [[0.0, -0.5], [0.3, 0.0]]),                  # the largest entry is kept: * 1
])
def test_rescale_rules_after_magnitude_trim(rule, expected):
    t = tensor([0.1, -0.5], [0.3, -0.05])
    close(sp.magnitude(t, 0.5, rescale_rule=rule), expected)


def test_l1_rescale_preserves_the_l1_norm():
    t = tensor([1.0, -2.0, 3.0, -4.0, 0.5, 0.25])
    out = sp.magnitude(t, 0.5, rescale_rule="l1")
    assert out.abs().sum().item() == pytest.approx(t.abs().sum().item())
    assert (out != 0).sum() == 3


def test_rescale_leaves_an_all_zero_tensor_alone():
    zeros = torch.zeros(4)
    assert torch.equal(sp.rescale(zeros, zeros, 0.5, "l1"), zeros)


# --- breadcrumbs ------------------------------------------------------------------------------

def test_breadcrumbs_drops_the_largest_outliers_and_the_smallest_entries():
    # magnitudes 0.1 .. 1.0 in shuffled order, signs mixed
    t = tensor([0.4, -1.0, 0.1, 0.7, -0.3, 0.9, -0.6, 0.2, 0.8, -0.5])
    out = sp.magnitude_outliers(t, 0.5, gamma=0.1)
    # keep 5, drop the top 1 (1.0) and the bottom 4 (0.1 .. 0.4)
    close(out, [0.0, 0.0, 0.0, 0.7, 0.0, 0.9, -0.6, 0.0, 0.8, -0.5])


def test_breadcrumbs_drops_fewer_outliers_when_density_demands_it():
    t = tensor([0.4, -1.0, 0.1, 0.7, -0.3, 0.9, -0.6, 0.2, 0.8, -0.5])
    out = sp.magnitude_outliers(t, 0.8, gamma=0.3)
    # keep 8: only 2 of the 3 requested outliers can go (1.0 and 0.9)
    close(out, [0.4, 0.0, 0.1, 0.7, -0.3, 0.0, -0.6, 0.2, 0.8, -0.5])


def test_breadcrumbs_with_gamma_zero_is_magnitude_pruning():
    t = tensor([0.4, -1.0, 0.1, 0.7, -0.3, 0.9, -0.6, 0.2, 0.8, -0.5])
    close(sp.magnitude_outliers(t, 0.3, gamma=0.0),
          [0.0, -1.0, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.8, 0.0])


def test_breadcrumbs_at_density_one_returns_the_tensor_unchanged():
    t = tensor([0.4, -1.0, 0.1])
    assert torch.equal(sp.magnitude_outliers(t, 1.0, gamma=0.3), t)


# --- DARE (bernoulli) ------------------------------------------------------------------------

def test_bernoulli_survivors_are_rescaled_by_one_over_density():
    t = torch.arange(1, 201, dtype=torch.float32).reshape(10, 20)
    out = sp.bernoulli(t, 0.25, rescale_rule="density", generator=generator(0))
    kept = out != 0
    assert 0 < kept.sum() < t.numel()
    close(out[kept], t[kept] * 4)


def test_bernoulli_without_rescale_keeps_survivors_as_they_are():
    t = torch.arange(1, 201, dtype=torch.float32)
    out = sp.bernoulli(t, 0.5, rescale_rule=None, generator=generator(0))
    kept = out != 0
    assert 0 < kept.sum() < t.numel()
    assert torch.equal(out[kept], t[kept])


def test_bernoulli_is_seeded():
    t = torch.randn(50, 50, generator=generator(1))
    a = sp.bernoulli(t, 0.3, generator=generator(7))
    b = sp.bernoulli(t, 0.3, generator=generator(7))
    c = sp.bernoulli(t, 0.3, generator=generator(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bernoulli_at_density_one_returns_the_tensor_unchanged():
    t = torch.randn(5, 5, generator=generator(1))
    assert torch.equal(sp.bernoulli(t, 1.0, generator=generator(0)), t)


def test_bernoulli_keeps_a_density_fraction_and_its_expectation_is_the_task_vector():
    row = tensor([1.0, -2.0, 3.0, 0.5])
    many = row.expand(50_000, 4).clone()
    out = sp.bernoulli(many, 0.3, rescale_rule="density", generator=generator(3))
    assert (out != 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    # std of each column mean: |x| * sqrt(0.7 / 0.3) / sqrt(50000) <= 0.021
    torch.testing.assert_close(out.mean(dim=0), row, atol=0.09, rtol=0)


def test_bernoulli_keeps_the_input_dtype():
    t = torch.randn(8, 8, generator=generator(0)).to(torch.bfloat16)
    assert sp.bernoulli(t, 0.5, generator=generator(0)).dtype == torch.bfloat16


# --- DELLA -----------------------------------------------------------------------------------

def test_della_keep_probability_runs_from_density_minus_to_plus_epsilon_by_rank():
    # magnitudes rank 2, 0, 4, 1, 3 -> keep probabilities .5, .3, .7, .4, .6 (density .5, eps .2)
    row = tensor([0.3, -0.1, 0.5, 0.2, -0.4])
    probabilities = torch.tensor([0.5, 0.3, 0.7, 0.4, 0.6])
    many = row.expand(40_000, 5).clone()
    out = sp.della_magprune(many, 0.5, epsilon=0.2, rescale_rule="density",
                            generator=generator(5))
    kept = (out != 0).float().mean(dim=0)
    torch.testing.assert_close(kept, probabilities, atol=0.015, rtol=0)
    # survivors are divided by their own keep probability, so the expectation is the input
    expected_survivor = (row / probabilities).expand_as(many)
    mask = out != 0
    close(out[mask], expected_survivor[mask])
    torch.testing.assert_close(out.mean(dim=0), row, atol=0.02, rtol=0)


def test_della_treats_a_vector_as_one_row():
    vector = tensor(*[float(i) for i in range(1, 11)])
    many = torch.stack([sp.della_magprune(vector, 0.5, epsilon=0.4, rescale_rule=None,
                                          generator=generator(s)) for s in range(2000)])
    kept = (many != 0).float().mean(dim=0)
    # rank 0 keeps with p = 0.1, rank 9 with p = 0.9
    assert kept[0].item() == pytest.approx(0.1, abs=0.04)
    assert kept[-1].item() == pytest.approx(0.9, abs=0.04)
    assert (kept.diff() > -0.06).all()


def test_della_ranks_within_each_row_of_a_3d_tensor():
    t = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[40.0, 30.0], [20.0, 10.0]]])
    runs = torch.stack([sp.della_magprune(t, 0.5, epsilon=0.45, rescale_rule=None,
                                          generator=generator(s)) for s in range(3000)])
    kept = (runs != 0).float().mean(dim=0)
    # each leading index is a row of 4 ranked on its own: p = .05, .35, .65, .95 by rank
    expected = torch.tensor([[[0.05, 0.35], [0.65, 0.95]], [[0.95, 0.65], [0.35, 0.05]]])
    torch.testing.assert_close(kept, expected, atol=0.04, rtol=0)


def test_della_at_density_one_returns_the_tensor_unchanged():
    t = torch.randn(4, 4, generator=generator(0))
    assert torch.equal(sp.della_magprune(t, 1.0, epsilon=0.1, generator=generator(0)), t)


# --- TIES sign election and agreement --------------------------------------------------------

def test_sign_election_by_sum_and_by_count_differ():
    deltas = tensor([1.0, 1.0, -5.0], [1.0, 1.0, 1.0], [-4.0, -4.0, 1.0])
    close(elect_sign(deltas, "sum"), [-1.0, -1.0, -1.0])     # sums -2, -2, -3
    close(elect_sign(deltas, "count"), [1.0, 1.0, 1.0])      # votes +1, +1, +1


def test_sign_election_tie_elects_plus_one():
    deltas = tensor([2.0, 0.0, 1.0], [-2.0, 0.0, -1.0])
    close(elect_sign(deltas, "sum"), [1.0, 1.0, 1.0])
    close(elect_sign(deltas, "count"), [1.0, 1.0, 1.0])


def test_sign_election_rejects_an_unknown_rule():
    with pytest.raises(ValueError, match="median"):
        elect_sign(tensor([1.0]), "median")


def test_agreement_mask_excludes_zeros_and_dissenters():
    deltas = tensor([1.0, -2.0, 3.0, 0.0], [3.0, 1.0, -1.0, 0.0])
    # sums 4, -1, 2, 0 -> signs +, -, +, + (tie)
    close(agreement_mask(deltas, "sum"), [[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


# --- the registry's combine ------------------------------------------------------------------

def shared(method, **values):
    return get_method(method).validate_shared(values, where="parameters")


def test_ties_is_a_disjoint_mean_of_the_agreeing_entries():
    base = tensor(10.0, 10.0, 10.0, 10.0)
    deltas = [tensor(1.0, -2.0, 3.0, 0.0), tensor(3.0, 1.0, -1.0, 0.0)]
    out = get_method("ties").combine(base, deltas, [1.0, 1.0], shared("ties"))
    # elected +, -, +, +: means of (1, 3), (-2), (3), nothing
    close(out, [12.0, 8.0, 13.0, 10.0])


def test_ties_weights_the_vote_and_the_mean():
    base = tensor(10.0, 10.0, 10.0, 10.0)
    deltas = [tensor(1.0, -2.0, 3.0, 0.0), tensor(3.0, 1.0, -1.0, 0.0)]
    out = get_method("ties").combine(base, deltas, [1.0, 3.0], shared("ties"))
    # weighted: (1, -2, 3, 0), (9, 3, -3, 0); sums 10, 1, 0, 0 -> all +
    # agreeing sums 10, 3, 3, 0 over weights 4, 3, 1, (1) -> 2.5, 1, 3, 0
    close(out, [12.5, 11.0, 13.0, 10.0])


def test_ties_lambda_and_normalize_off():
    base = tensor(10.0, 10.0)
    deltas = [tensor(1.0, -2.0), tensor(3.0, 1.0)]
    out = get_method("ties").combine(base, deltas, [1.0, 1.0],
                                     shared("ties", normalize=False, **{"lambda": 0.5}))
    # elected +, -: sums of agreeing 4, -2, times 0.5
    close(out, [12.0, 9.0])


def test_ties_passes_disjoint_blocks_untouched():
    base = torch.zeros(4, 2)
    first = torch.zeros(4, 2)
    first[:2] = tensor([0.5, -1.5], [2.0, -0.25])
    second = torch.zeros(4, 2)
    second[2:] = tensor([-3.0, 1.0], [0.75, 4.0])
    out = get_method("ties").combine(base, [first, second], [1.0, 1.0], shared("ties"))
    close(out, first + second)


def test_ties_count_consensus():
    base = torch.zeros(1)
    deltas = [tensor(1.0), tensor(1.0), tensor(-5.0)]
    # count elects + (2 votes to 1), sum would elect -
    close(get_method("ties").combine(base, deltas, [1.0] * 3, shared("ties", consensus="count")),
          [1.0])
    close(get_method("ties").combine(base, deltas, [1.0] * 3, shared("ties")), [-5.0])


@pytest.mark.parametrize("options", [{}, {"consensus": "count"},
                                     {"normalize": False, "lambda": 0.7}])
def test_ties_in_chunks_is_bitwise_the_whole_tensor_merge(monkeypatch, options):
    """The consensus runs CHUNK entries at a time; chunks that split rows, a short last chunk
    and weights of either sign (and zero) must give exactly the one-chunk result."""
    torch.manual_seed(0)
    base = torch.randn(7, 5)
    deltas = [torch.randn(7, 5) * (torch.rand(7, 5) < 0.4) for _ in range(3)]
    deltas.append(torch.randn(7, 5))  # one kept dense, three packed
    weights = [1.0, -0.5, 0.0, 2.0]
    ties = get_method("ties")
    whole = ties.combine(base, deltas, weights, shared("ties", **options))
    monkeypatch.setattr("hm3.methods.registry.CHUNK", 3)
    chunked = ties.combine(base, deltas, weights, shared("ties", **options))
    assert torch.equal(chunked, whole)
    # and by hand, one entry: the disjoint weighted mean of the agreeing deltas
    i = (4, 2)
    w = torch.tensor(weights)
    values = torch.stack([d[i] for d in deltas]) * w
    sign = 1.0 if (values.sum() if options.get("consensus") != "count"
                   else (torch.stack([d[i] for d in deltas]).sign() * w.sign()).sum()) >= 0 \
        else -1.0
    agree = (values.sign() == sign) & (w != 0)
    total = values[agree].sum()
    if options.get("normalize", True):
        total = total / (float(w[agree].sum()) or 1.0)
    expected = base[i] + options.get("lambda", 1.0) * total
    torch.testing.assert_close(chunked[i], expected, rtol=1e-6, atol=1e-6)


def test_packed_gives_back_any_slice_exactly_and_holds_only_the_non_zero_entries():
    torch.manual_seed(1)
    dense = torch.randn(50, 8) * (torch.rand(50, 8) < 0.2)
    dense[3, 4] = -0.0  # a trimmed negative entry: not stored, given back as zero
    packed = Packed(dense)
    assert packed.dense is None and packed.positions.dtype == torch.int32
    assert len(packed.values) == int(torch.count_nonzero(dense)) < 0.3 * dense.numel()
    flat = dense.reshape(-1)
    for start, stop in [(0, 400), (0, 1), (7, 8), (13, 190), (399, 400), (380, 4000)]:
        assert torch.equal(packed.part(start, stop), flat[start:stop])


def test_packed_keeps_a_mostly_non_zero_tensor_as_it_is():
    dense = torch.arange(1.0, 13.0).reshape(3, 4)
    dense[0, 0] = 0.0
    packed = Packed(dense)
    assert packed.positions is None
    assert torch.equal(packed.part(2, 9), dense.reshape(-1)[2:9])


def test_task_arithmetic_scales_the_weighted_sum_by_lambda():
    base = tensor(1.0, 2.0)
    deltas = [tensor(1.0, 1.0), tensor(2.0, -1.0)]
    method = get_method("task_arithmetic")
    out = method.combine(base, deltas, [1.0, 0.5], shared("task_arithmetic", **{"lambda": 2.0}))
    close(out, [5.0, 3.0])                      # 1 + 2 * 2, 2 + 2 * 0.5
    out = method.combine(base, deltas, [1.0, 0.5],
                         shared("task_arithmetic", normalize=True, **{"lambda": 2.0}))
    close(out, [1.0 + 2 * 2 / 1.5, 2.0 + 2 * 0.5 / 1.5])


def test_linear_is_the_weighted_mean_of_the_models():
    base = tensor(1.0, 2.0)
    deltas = [tensor(1.0, 1.0), tensor(2.0, -1.0)]     # models (2, 3) and (3, 1)
    method = get_method("linear")
    close(method.combine(base, deltas, [1.0, 3.0], shared("linear")), [2.75, 1.5])
    close(method.combine(base, deltas, [1.0, 3.0], shared("linear", normalize=False)), [11.0, 6.0])


def test_linear_takes_no_lambda():
    with pytest.raises(Hm3Error, match="lambda"):
        shared("linear", **{"lambda": 2.0})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_gives_back_a_single_expert_at_density_one(name):
    base = torch.randn(3, 4, generator=generator(0))
    delta = torch.randn(3, 4, generator=generator(1))
    method = get_method(name)
    params = method.model_defaults()
    assert params["weight"] == 1.0 and params.get("density", 1.0) == 1.0
    sparse = method.sparsify(delta, params, shared(name), generator(2))
    out = method.combine(base, [sparse], [1.0], shared(name))
    close(out, base + delta)


# --- rescale rule per method -----------------------------------------------------------------

def test_rescale_true_means_one_over_density_for_random_drops():
    method = get_method("dare_linear")
    assert method.rescale_rule(True) == "density"
    t = torch.arange(1, 101, dtype=torch.float32)
    out = method.sparsify(t, {"density": 0.25}, shared("dare_linear"), generator(0))
    kept = out != 0
    close(out[kept], t[kept] * 4)


def test_rescale_true_means_l1_matching_for_magnitude_trim():
    method = get_method("ties")
    assert method.rescale_rule(True) == "l1"
    t = tensor(1.0, -2.0, 3.0, -4.0)
    out = method.sparsify(t, {"density": 0.5}, shared("ties", rescale=True), None)
    close(out, [0.0, 0.0, 3.0 * 10 / 7, -4.0 * 10 / 7])
    # ties rescales nothing by default
    close(method.sparsify(t, {"density": 0.5}, shared("ties"), None), [0.0, 0.0, 3.0, -4.0])


def test_explicit_rescale_rule_overrides_the_method_default():
    method = get_method("dare_linear")
    t = torch.arange(1, 101, dtype=torch.float32)
    out = method.sparsify(t, {"density": 0.25}, shared("dare_linear", rescale="l1"), generator(0))
    assert out.abs().sum().item() == pytest.approx(t.abs().sum().item(), rel=1e-5)
    out = method.sparsify(t, {"density": 0.25}, shared("dare_linear", rescale=False), generator(0))
    kept = out != 0
    assert torch.equal(out[kept], t[kept])


def test_breadcrumbs_method_passes_gamma_to_its_kernel():
    t = tensor([0.4, -1.0, 0.1, 0.7, -0.3, 0.9, -0.6, 0.2, 0.8, -0.5])
    out = get_method("breadcrumbs").sparsify(t, {"density": 0.5, "gamma": 0.1},
                                             shared("breadcrumbs"), None)
    close(out, [0.0, 0.0, 0.0, 0.7, 0.0, 0.9, -0.6, 0.0, 0.8, -0.5])


# --- registry and declared parameters --------------------------------------------------------

def test_registry_holds_the_mergekit_method_names():
    assert set(METHODS) >= {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                            "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                            "magnitude"}
    assert get_method("dare_ties").consensus and get_method("dare_ties").random
    assert not get_method("ties").random
    # sign election exactly where the method's paper has it
    assert {name for name, m in METHODS.items() if m.consensus} == {
        "ties", "dare_ties", "breadcrumbs_ties", "della"}


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(KeyError) as info:
        get_method("slerp")
    assert "slerp" in str(info.value) and "dare_ties" in str(info.value)


def test_a_method_name_registered_twice_is_an_error():
    with pytest.raises(ValueError, match="twice"):
        _registry(MergeMethod("x", "one"), MergeMethod("x", "two"))


@pytest.mark.parametrize("density", [0, 1.5, -0.1, float("nan"), True, "half"])
def test_density_outside_zero_one_is_refused(density):
    with pytest.raises(Hm3Error, match=r"density: expected a number in \(0, 1\]"):
        get_method("ties").validate_model_parameters({"density": density}, where="experts[0]")


def test_per_model_parameter_a_method_does_not_take_is_refused():
    with pytest.raises(Hm3Error, match="takes no `density`"):
        get_method("linear").validate_model_parameters({"density": 0.5}, where="experts[0]")
    with pytest.raises(Hm3Error, match="takes no `gamma`"):
        get_method("ties").validate_model_parameters({"gamma": 0.1}, where="experts[0]")


def test_della_density_plus_minus_epsilon_must_stay_inside_zero_one():
    method = get_method("della")
    with pytest.raises(Hm3Error, match="epsilon"):
        method.validate_model_parameters({"density": 0.1, "epsilon": 0.2}, where="experts[0]")
    method.validate_model_parameters({"density": 0.5, "epsilon": 0.2}, where="experts[0]")


def test_shared_defaults_follow_mergekit():
    assert shared("ties") == {"normalize": True, "lambda": 1.0, "rescale": False,
                              "consensus": "sum"}
    assert shared("dare_ties")["normalize"] is False and shared("dare_ties")["rescale"] is True
    assert shared("linear") == {"normalize": True}


def test_magnitude_breaks_ties_at_the_threshold_by_lowest_index():
    from hm3.methods.sparsify import magnitude

    delta = torch.tensor([0.5, -2.0, 0.5, 0.5, -0.5, 0.1])
    # top 3 of |delta|: 2.0, then two of the four 0.5s: those at indices 0 and 2
    assert torch.equal(magnitude(delta, 0.5), torch.tensor([0.5, -2.0, 0.5, 0.0, 0.0, 0.0]))


# --- what the end-to-end tests do not reach: dtypes, seeds, other rescale rules, ties ----------

@pytest.mark.parametrize("kernel", [sp.magnitude, sp.magnitude_outliers, sp.della_magprune])
def test_sparsifiers_keep_a_half_precision_dtype(kernel):
    t = torch.randn(6, 8, generator=generator(0)).to(torch.bfloat16)
    out = kernel(t, 0.5, generator=generator(0))
    assert out.dtype == torch.bfloat16
    assert 0 < int((out != 0).sum()) < t.numel()


def test_della_is_seeded_by_its_generator():
    t = torch.randn(40, 40, generator=generator(1))
    a = sp.della_magprune(t, 0.5, generator=generator(7))
    assert torch.equal(a, sp.della_magprune(t, 0.5, generator=generator(7)))
    assert not torch.equal(a, sp.della_magprune(t, 0.5, generator=generator(8)))


def test_della_by_default_divides_survivors_by_their_keep_probability():
    row = tensor([0.3, -0.1, 0.5, 0.2, -0.4])  # ranks 2, 0, 4, 1, 3
    out = sp.della_magprune(row.expand(200, 5).clone(), 0.5, epsilon=0.2, generator=generator(3))
    probability = torch.tensor([0.5, 0.3, 0.7, 0.4, 0.6]).expand(200, 5)
    kept = out != 0
    close(out[kept], (row.expand(200, 5) / probability)[kept])


@pytest.mark.parametrize("kernel", [sp.magnitude_outliers, sp.della_magprune])
def test_l1_rescale_of_breadcrumbs_and_della_restores_the_l1_norm(kernel):
    t = torch.randn(8, 16, generator=generator(4))
    out = kernel(t, 0.5, rescale_rule="l1", generator=generator(4))
    assert 0 < int((out != 0).sum()) < t.numel()
    assert out.abs().sum().item() == pytest.approx(t.abs().sum().item(), rel=1e-5)


def test_breadcrumbs_breaks_ties_by_lowest_index():
    # all equal magnitudes: drop the largest 1 (the last index) and the smallest 5 (the first)
    t = torch.ones(10)
    out = sp.magnitude_outliers(t, 0.4, gamma=0.1)
    close(out, [0, 0, 0, 0, 0, 1, 1, 1, 1, 0])


def test_sign_election_and_agreement_keep_the_input_dtype_and_default_to_sum():
    deltas = tensor([1.0, 1.0, -5.0], [1.0, 1.0, 1.0], [-4.0, -4.0, 1.0])
    elected = elect_sign(deltas)
    assert elected.dtype == torch.float32
    close(elected, [-1.0, -1.0, -1.0])  # by sum, not by count
    mask = agreement_mask(deltas)
    assert mask.dtype == torch.float32
    close(mask, [[0, 0, 1], [0, 0, 0], [1, 1, 0]])
    close(agreement_mask(deltas, "count"), [[1, 1, 0], [1, 1, 1], [0, 0, 1]])


@pytest.mark.parametrize("density, epsilon, valid", [
    (0.3, None, True), (0.15, None, False), (0.85, None, False), (0.16, None, True),
    (0.3, 0.35, False), (0.3, 0.29, True), (0.7, 0.3, False), (0.69, 0.3, True),
    (1.0, None, True), (1.0, 0.4, True)])
def test_della_density_and_epsilon_bounds_are_exclusive(density, epsilon, valid):
    params = {"density": density, **({} if epsilon is None else {"epsilon": epsilon})}
    if valid:
        get_method("della_linear").validate_model_parameters(params, where="experts[0]")
    else:
        with pytest.raises(Hm3Error, match="density ± epsilon"):
            get_method("della_linear").validate_model_parameters(params, where="experts[0]")


def test_an_unknown_parameter_error_lists_the_methods_own():
    with pytest.raises(Hm3Error, match="its per-model parameters are weight, density, gamma"):
        get_method("breadcrumbs").validate_model_parameters({"epsilon": 0.1}, where="e")


def test_the_registry_maps_each_name_to_its_method():
    a, b = MergeMethod("a", "one"), MergeMethod("b", "two")
    assert _registry(a, b) == {"a": a, "b": b}


def test_a_zero_weight_expert_neither_votes_nor_stops_the_others():
    base = torch.zeros(3)
    deltas = [tensor(1.0, -1.0, 2.0), tensor(-5.0, -5.0, -5.0), tensor(1.0, 3.0, -1.0)]
    for rule in ("sum", "count"):
        out = get_method("ties").combine(base, deltas, [1.0, 0.0, 1.0],
                                         shared("ties", consensus=rule))
        alone = get_method("ties").combine(base, [deltas[0], deltas[2]], [1.0, 1.0],
                                           shared("ties", consensus=rule))
        close(out, alone)


def test_a_negative_weight_turns_its_vote_in_count_consensus():
    # weights -1 and 1: weighted deltas -1 and +1 vote -1 +1 -1 = -1 per entry, so the elected
    # sign is -; the two agreeing entries are the first expert's (as -1*1) and the third's
    base = torch.zeros(1)
    deltas = [tensor(1.0), tensor(1.0), tensor(-1.0)]
    out = get_method("ties").combine(base, deltas, [-1.0, 1.0, 1.0],
                                     shared("ties", consensus="count", normalize=False))
    close(out, [-2.0])  # (-1 * 1) + (1 * -1); the +1 of the second expert dissents


def test_normalising_without_consensus_divides_by_the_summed_weights():
    base = torch.ones(2)
    deltas = [tensor(1.0, 2.0), tensor(3.0, -1.0)]
    out = get_method("dare_linear").combine(base, deltas, [0.2, 0.3],
                                            shared("dare_linear", normalize=True))
    close(out, base + (0.2 * deltas[0] + 0.3 * deltas[1]) / 0.5)
    # weights that cancel out leave the sum undivided (the merge refuses them beforehand)
    out = get_method("dare_linear").combine(base, deltas, [1.0, -1.0],
                                            shared("dare_linear", normalize=True))
    close(out, base + deltas[0] - deltas[1])


def test_breadcrumbs_with_density_rescale_divides_by_the_density():
    t = torch.arange(1.0, 11.0)
    out = sp.magnitude_outliers(t, 0.5, gamma=0.1, rescale_rule="density")
    close(out, [0, 0, 0, 0, 5 / 0.5, 6 / 0.5, 7 / 0.5, 8 / 0.5, 9 / 0.5, 0])


def test_a_method_sparsifies_with_its_declared_default_when_the_parameter_is_absent():
    t = torch.arange(1.0, 201.0)  # gamma 0.01 drops the 2 largest, then the smallest go
    out = get_method("breadcrumbs").sparsify(t, {"density": 0.5}, shared("breadcrumbs"), None)
    assert torch.equal(out != 0, (t > 98) & (t <= 198))


@pytest.mark.parametrize("name, extra", [("linear", {}), ("dare_linear", {"normalize": True}),
                                         ("ties", {"consensus": "count"}),
                                         ("dare_ties", {"consensus": "count", "normalize": True})])
def test_contributions_add_up_to_combine_for_weights_under_one(name, extra):
    base = tensor(1.0, -1.0, 0.5, 2.0)
    deltas = [tensor(1.0, -2.0, 3.0, 0.0), tensor(3.0, 1.0, -1.0, -2.0),
              tensor(-2.0, 1.0, -1.0, 1.0)]
    weights = [0.2, 0.3, 0.1]  # summing to 0.6: normalising divides by 0.6, not by 1
    method, params = get_method(name), shared(name, **extra)
    parts = method.contributions(base, deltas, weights, params)
    close(base + sum(parts), method.combine(base, deltas, weights, params))


def test_iso_c_divides_tensors_that_are_not_matrices_by_the_weights_sum_even_under_one():
    """iso_c on a bias (role `other`): base + lambda * (sum w_i delta_i) / sum w_i."""
    base = tensor(1.0, 1.0)
    deltas = [tensor(2.0, 0.0), tensor(0.0, 4.0)]
    out = get_method("iso_c").combine(base, deltas, [0.3, 0.3], shared("iso_c", **{"lambda": 1.5}))
    close(out, [1.0 + 1.5 * (0.6 / 0.6), 1.0 + 1.5 * (1.2 / 0.6)])


def test_iso_c_takes_no_normalize_setting():
    with pytest.raises(Hm3Error, match="normalize"):
        shared("iso_c", normalize=True)


def test_tsv_gives_task_vectors_in_orthogonal_subspaces_back_as_their_weighted_sum():
    """Rank-1 task vectors along different axes do not interfere: nothing to decorrelate (and
    the directions each keeps beyond its rank, singular value 0, are left out)."""
    eye = torch.eye(6)
    base = torch.full((6, 6), 0.5)
    deltas = [3.0 * torch.outer(eye[0], eye[4]), -2.0 * torch.outer(eye[1], eye[2])]
    out = get_method("tsv").combine(base, deltas, [1.0, 0.5], shared("tsv"), role="matrix")
    close(out, base + 3.0 * torch.outer(eye[0], eye[4]) - 1.0 * torch.outer(eye[1], eye[2]))


def test_tsv_keeps_each_task_vectors_top_share_of_directions_with_its_singular_values():
    """Two experts of a 4 x 4 matrix: each keeps its top 2 directions (4 // 2), values as they
    were; the first's 3 and 1 are cut."""
    rotation, _ = torch.linalg.qr(torch.arange(16.0).reshape(4, 4).cos())
    first = rotation @ torch.diag(torch.tensor([5.0, 4.0, 3.0, 1.0])) @ rotation.T
    second = torch.diag(torch.tensor([0.0, 0.0, 2.0, 0.5]))
    out = get_method("tsv").combine(torch.zeros(4, 4), [first, second], [1.0, 1.0],
                                    shared("tsv", **{"lambda": 1.0}), role="matrix")
    close(torch.linalg.svdvals(out), [5.0, 4.0, 2.0, 0.5])


def test_tsv_takes_the_weighted_mean_of_tensors_that_are_not_matrices_and_keeps_head_rows():
    base = tensor(1.0, 1.0)
    deltas = [tensor(2.0, 0.0), tensor(0.0, 4.0)]
    method, params = get_method("tsv"), shared("tsv", **{"lambda": 0.5})
    close(method.combine(base, deltas, [1.0, 3.0], params), [1.0 + 0.5 * 0.5, 1.0 + 0.5 * 3.0])
    close(method.combine(base, deltas, [1.0, 3.0], params, role="head"), [3.0, 13.0])


def test_every_method_names_its_paper():
    """Title and arXiv id, so a reader can check the kernel against the paper."""
    for name, method in METHODS.items():
        assert re.search(r"\b(19|20)\d\d, .+, arXiv:\d{4}\.\d{4,5}", method.reference), name
    assert "arXiv:2306.01708" in get_method("ties").reference
    assert "arXiv:2306.01708" in get_method("dare_ties").reference  # DARE's drop, TIES's election


@pytest.mark.parametrize("name, shape, role", [
    ("bert.encoder.layer.0.attention.self.query.weight", (8, 8), "matrix"),
    ("transformer.h.0.attn.c_attn.weight", (8, 24), "matrix"),  # GPT-2's Conv1D, (in, out)
    ("bert.encoder.layer.0.attention.self.query.bias", (8,), "other"),
    ("bert.embeddings.word_embeddings.weight", (50, 8), "other"),
    ("model.embed_tokens.weight", (50, 8), "other"),
    ("transformer.wte.weight", (50, 8), "other"),  # GPT-2's tables do not say `embed`
    ("transformer.wpe.weight", (16, 8), "other"),
])
def test_spectral_methods_merge_weight_matrices_as_a_whole_but_not_embedding_tables(
        name, shape, role):
    assert tensor_role(TensorJob(name, shape, name)) == role
