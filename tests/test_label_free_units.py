"""The label-free steps' small pieces against values computed by hand: transformer blocks of the
coefficients, the per-group KL, re-centring's report, LEWIS overrides, the calibration batches and
the input statistics behind LEWIS and RegMean (padding left out, means over tokens), and the
head steps cross-fitted over folds of the calibration texts."""

from __future__ import annotations

import fnmatch
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from hm3.errors import Hm3Error, Hm3Warning
from hm3.heads import TaskGroup
from hm3.label_free import (
    align_heads,
    calibration,
    coefficients,
    heads_stage,
    lewis,
    recentre,
    regmean,
    stream,
)
from hm3.pipeline import shared_tasks, warn_low_held_out
from hm3.recipe import Override

from conftest import build_family, recipe_dict, write_tokenizer


@pytest.mark.parametrize("name, block", [
    ("bert.encoder.layer.3.attention.self.query.weight", "layer.3"),
    ("layer.07.output.dense.bias", "layer.7"),
    ("model.layers.12.mlp.up_proj.weight", "layer.12"),
    ("transformer.h.0.attn.c_attn.weight", "layer.0"),
    ("encoder.block.2.layer.0.weight", "layer.2"),
    ("blocks.5.norm.weight", "layer.5"),
    ("bert.embeddings.word_embeddings.weight", "embeddings"),
    ("wte.weight", "embeddings"),
    ("transformer.wte.weight", "embeddings"),
    ("transformer.wpe.weight", "embeddings"),
    ("model.embed_tokens.weight", "embeddings"),
    ("bert.pooler.dense.weight", "other"),
    ("classifier.weight", "other"),
    ("bert.encoder.layernorm.weight", "other"),
])
def test_each_tensor_belongs_to_its_transformer_block(name, block):
    assert coefficients.block_of(name) == block


def test_blocks_are_ordered_embeddings_then_layers_by_number_then_the_rest():
    blocks = ["other", "layer.10", "layer.2", "embeddings", "layer.0"]
    assert sorted(blocks, key=coefficients._block_order) == [
        "embeddings", "layer.0", "layer.2", "layer.10", "other"]


def test_logit_kl_is_the_kl_from_the_expert_softmax_averaged_over_the_rows_that_count():
    logits = torch.tensor([[0.0, math.log(3)], [0.0, 0.0], [9.0, -9.0]])
    target = torch.tensor([[0.0, 0.0], [math.log(9), 0.0], [0.0, 0.0]])  # p [.5 .5], [.9 .1]
    # merged p: [1/4, 3/4] and [1/2, 1/2]; KL(expert || merged) per row, mean over counted rows
    first = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    second = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    counted = torch.tensor([True, True, False])
    got = stream.logit_kl(logits, target, counted, multi_label=False)
    assert float(got) == pytest.approx((first + second) / 2, rel=1e-5)
    every = stream.logit_kl(logits, target, None, multi_label=False)
    assert float(every) > float(got)  # the third row's KL counts only without `rows`


def test_logit_kl_of_a_multi_label_group_sums_bernoulli_kls_over_labels():
    logits = torch.tensor([[0.0, math.log(4)], [0.0, 0.0]])
    target = torch.tensor([[math.log(4), math.log(4)], [-30.0, 0.0]])  # p .8 .8; ~0 .5
    bernoulli = lambda t, p: t * math.log(t / p) + (1 - t) * math.log((1 - t) / (1 - p))  # noqa
    rows = [bernoulli(0.8, 0.5) + bernoulli(0.8, 0.8), bernoulli(1 / (1 + math.exp(30)), 0.5)]
    got = stream.logit_kl(logits, target, None, multi_label=True)
    assert float(got) == pytest.approx(sum(rows) / 2, rel=1e-5)


def test_logit_kl_over_no_counted_row_is_zero_and_keeps_the_graph():
    logits = torch.zeros(2, 3, requires_grad=True)
    got = stream.logit_kl(logits, torch.ones(2, 3), torch.tensor([False, False]), False)
    assert float(got.detach()) == 0.0 and got.requires_grad


def test_recentre_reports_target_before_and_after_for_a_single_label_group():
    group = TaskGroup("t", ("a", "b"), 0)
    merged = np.array([[2.0, 0.0], [1.5, 0.0], [1.0, 0.0], [0.5, 0.0]])  # all say a
    expert = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # half a, half b
    result = recentre.recentre(merged, expert, group)
    assert result["target"] == [0.5, 0.5] and result["before"] == [1.0, 0.0]
    assert result["after"] == [0.5, 0.5]
    shift = np.array(result["shift"])
    assert shift.sum() == pytest.approx(0, abs=1e-9)
    assert recentre.histogram(merged + shift).tolist() == [0.5, 0.5]


def test_recentre_of_a_multi_label_group_matches_the_experts_rates_at_its_threshold():
    group = TaskGroup("t", ("a", "b"), 0, multi_label=True, threshold=0.8)
    cut = math.log(4)
    merged = np.array([[-1.0, 5.0], [0.0, 6.0], [1.0, 7.0], [2.0, 8.0]])
    expert = np.array([[cut + 1, cut - 1], [cut + 1, cut - 1], [cut - 1, cut - 1],
                       [cut - 1, cut + 1]])  # a on for 2 of 4, b for 1 of 4
    result = recentre.recentre(merged, expert, group)
    assert result["target"] == [0.5, 0.25]
    assert result["before"] == [0.25, 1.0]  # only 2.0 > log 4 = 1.386 in column a
    assert result["after"] == [0.5, 0.25]
    # the cut falls halfway between the m-th and (m+1)-th largest logits
    assert result["shift"] == pytest.approx([cut - 0.5, cut - 7.5])


def test_sigmoid_shift_puts_the_cut_just_outside_when_no_or_every_text_is_on():
    logits = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    shifts = recentre.sigmoid_shift(logits, np.array([0.0, 1.0]), 0.5)
    assert shifts == pytest.approx([-(3.0 + 1e-3), -(1.0 - 1e-3)])


def test_histogram_counts_argmax_classes_including_empty_ones():
    assert recentre.histogram(np.array([[0.0, 1.0, 0.0], [2.0, 1.0, 0.0]])).tolist() == [
        0.5, 0.5, 0.0]


def test_lewis_overrides_name_each_layers_tensors_literally_for_their_expert():
    table = {"spam": {"enc.l[0]*": 0.3, "enc.l1": 0.6}, "topic": {"enc.l1": 0.9}}
    names = {"enc.l[0]*.weight", "enc.l[0]*.bias", "enc.l1.weight", "enc.l[0]x.weight"}
    got = lewis.overrides(table, names)
    assert [(o.parameters, o.experts) for o in got] == [
        ({"density": 0.3}, ("spam",)), ({"density": 0.3}, ("spam",)),
        ({"density": 0.6}, ("spam",)), ({"density": 0.9}, ("topic",))]
    assert all(isinstance(o, Override) for o in got)
    matched = [sorted(n for n in names if fnmatch.fnmatchcase(n, o.pattern)) for o in got]
    assert matched == [["enc.l[0]*.weight"], ["enc.l[0]*.bias"], ["enc.l1.weight"],
                       ["enc.l1.weight"]]


def test_align_agreement_is_argmax_or_each_labels_side_of_the_threshold():
    single = TaskGroup("t", ("a", "b"), 0)
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 2.0], [3.0, 0.0]])
    target = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 5.0], [0.0, 1.0]])
    assert align_heads._agreement(logits, target, single) == 0.5
    multi = TaskGroup("t", ("a", "b"), 0, multi_label=True, threshold=0.8)  # logit cut log 4
    assert align_heads._agreement(logits, target, multi) == 5 / 8


def test_ridge_toward_solves_the_regularised_normal_equations():
    gram = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    cross = torch.tensor([[2.0], [8.0]], dtype=torch.float64)  # least squares alone: w = [1, 2]
    start = torch.tensor([[3.0, 6.0]], dtype=torch.float64)
    # s = mean diagonal = 3; ridge 1/3 adds 1 * I: w = [(2 + 3) / 3, (8 + 6) / 5]
    got = regmean.ridge_toward(gram, cross, start, 1 / 3)
    torch.testing.assert_close(got, torch.tensor([[5 / 3, 14 / 5]], dtype=torch.float64))
    torch.testing.assert_close(regmean.ridge_toward(gram, cross, start, 0.0),
                               torch.tensor([[1.0, 2.0]], dtype=torch.float64))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_calibration_batches_group_texts_by_length_in_a_fixed_order(tokenizer):
    texts = ["good bad awful", "good", "win money hello today", "bad"]
    batches = calibration.tokenize(tokenizer, texts, max_length=5, batch_size=3)
    assert [b["attention_mask"].sum(1).tolist() for b in batches] == [[3, 3, 5], [5]]
    # by length: bad, good, good bad awful | win money hello today (cut to 5 tokens)
    words = [[tokenizer.decode(row, skip_special_tokens=True) for row in b["input_ids"]]
             for b in batches]
    assert words == [["bad", "good", "good bad awful"], ["win money hello"]]


class Stats(torch.nn.Module):
    """Two linear layers reading the token rows directly, so their inputs are known."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(2, 2)
        self.second = torch.nn.Linear(2, 1)

    def forward(self, x, attention_mask):
        return SimpleNamespace(logits=self.second(self.first(x) * 0 + x)[:, 0])


def test_layer_input_means_average_over_real_tokens_only():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [99.0, 99.0]],
                      [[5.0, 6.0], [99.0, 99.0], [99.0, 99.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    batches = [{"x": x, "attention_mask": mask}, {"x": torch.tensor([[[7.0, 8.0]]]),
                                                  "attention_mask": torch.tensor([[1]])}]
    means = calibration.layer_input_means(Stats(), batches, lambda rows: rows.pow(2).sum(0),
                                          skip=("second",))
    assert list(means) == ["first"]
    # the real tokens: (1,2) (3,4) (5,6) (7,8): mean squares (1+9+25+49)/4, (4+16+36+64)/4
    torch.testing.assert_close(means["first"], torch.tensor([21.0, 30.0], dtype=torch.float64))
    grams = calibration.layer_input_means(Stats(), batches, lambda rows: rows.T @ rows)
    cross = (1 * 2 + 3 * 4 + 5 * 6 + 7 * 8) / 4
    expected = torch.tensor([[21.0, cross], [cross, 30.0]], dtype=torch.float64)
    torch.testing.assert_close(grams["first"], expected)
    torch.testing.assert_close(grams["second"], expected)  # it reads x as well


def test_a_layer_no_token_reaches_has_zero_statistics():
    model = Stats()
    padding_only = [{"x": torch.ones(1, 2, 2), "attention_mask": torch.zeros(1, 2)}]
    means = calibration.layer_input_means(model, padding_only, lambda rows: rows.T @ rows)
    assert means["first"].tolist() == [[0.0, 0.0], [0.0, 0.0]]


# --- models on a tiny family --------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from hm3 import parse_recipe
    from hm3.engine import open_sources

    root = tmp_path_factory.mktemp("units")
    base, experts = build_family(root, {"mood": ["sad", "glad"], "topic": ["a", "b", "c"]})
    return open_sources(parse_recipe(recipe_dict(base, experts)))


def test_the_base_as_a_classifier_has_the_bases_body_and_a_zero_head(sources):
    model = calibration.base_as_classifier(sources)
    state = model.state_dict()
    assert state["classifier.weight"].shape == (5, 32)
    assert not state["classifier.weight"].any() and not state["classifier.bias"].any()
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(state[name], sources.base.tensor("encoder.layer.0.attention.self.query"
                                                        ".weight"))
    assert calibration.head_modules(sources) == ["classifier"]


@pytest.mark.parametrize("enabled", [True, False])
def test_loading_an_expert_leaves_the_progress_bar_setting_as_it_was(sources, enabled):
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    try:
        (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
        model = calibration.expert_classifier(sources.experts[1])
        assert logging.is_progress_bar_enabled() is enabled
        assert model.config.num_labels == 3 and not model.training
    finally:
        (logging.enable_progress_bar if was else logging.disable_progress_bar)()


def test_calibration_batches_need_a_calibration_block(sources):
    with pytest.raises(Hm3Error, match=r"^this needs unlabelled texts: add a `calibration:` block"):
        calibration.calibration_batches(sources)


def test_coefficient_parameters_are_the_base_plus_each_experts_share_times_its_coefficient():
    """theta_b = theta_0 + sum_i lambda_{i,b} share_{i,b}, per block b; fixed tensors as given."""
    merge = object.__new__(coefficients.CoefficientMerge)
    base = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}
    merge.base = base
    merge.shares = {"a": [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])],
                    "b": [torch.tensor([[2.0]]), torch.tensor([[-1.0]])]}
    merge.index = {"a": 0, "b": 1}
    merge.fixed = {"head": torch.tensor([7.0])}
    lam = torch.tensor([[0.5, 2.0], [1.5, 0.25]])  # experts x blocks
    got = merge.parameters(lam)
    torch.testing.assert_close(got["a"], torch.tensor([1.0 + 0.5 * 1.0, 2.0 + 1.5 * 3.0]))
    torch.testing.assert_close(got["b"], torch.tensor([[0.5 + 2.0 * 2.0 - 0.25 * 1.0]]))
    assert torch.equal(got["head"], torch.tensor([7.0]))


def test_calibration_texts_are_cut_at_the_calibration_blocks_max_length(sources, tmp_path):
    from hm3 import parse_recipe
    from hm3.engine import with_recipe

    long_text = " ".join(["good bad awful win money hello today"] * 4)  # 28 words
    (tmp_path / "t.txt").write_text(f"{long_text}\nhello\n")
    raw = recipe_dict(sources.base.path, {"mood": sources.experts[0].path,
                                          "topic": sources.experts[1].path},
                      calibration={"texts": str(tmp_path / "t.txt"), "max_length": 6})
    _, _, batches = calibration.calibration_batches(with_recipe(sources, parse_recipe(raw)))
    widths = [b["input_ids"].shape[1] for task in batches for b in batches[task]]
    assert max(widths) == 6  # [CLS] + 4 words + [SEP]


# --- cross-fitted head steps ----------------------------------------------------------------------

def _features(n: int, columns: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, columns, generator=g, dtype=torch.float64)
    return torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)


def fold_steps(ridge: float | None = None, recentred: bool = False) -> list:
    """The head steps as `cross_fitted_logits` takes them: align_heads with `ridge` (None:
    without), then recentre if `recentred`."""
    steps = []
    if ridge is not None:
        steps.append((align_heads.AlignHeads(), align_heads.AlignHeadsOptions(ridge),
                      align_heads.AlignHeadsReport(ridge, {"t": {}})))
    if recentred:
        steps.append((recentre.Recentre(), recentre.RecentreOptions(),
                      recentre.RecentreReport({})))
    return steps


def test_cross_fitted_logits_of_a_text_come_from_rows_fitted_without_its_fold():
    group = TaskGroup("t", ("a", "b", "c"), 0)
    x = _features(23, 6)
    g = torch.Generator().manual_seed(1)
    target = x @ torch.randn(3, 7, generator=g, dtype=torch.float64).T \
        + 0.3 * torch.randn(23, 3, generator=g, dtype=torch.float64)
    start = torch.randn(3, 7, generator=g, dtype=torch.float64)
    out = heads_stage.cross_fitted_logits([group], {"t": x}, {"t": target}, {"t": start},
                                          fold_steps(ridge=0.1), folds=5)["t"]
    for fold in range(5):
        held = torch.zeros(23, dtype=torch.bool)
        held[fold::5] = True
        rows = align_heads.fit_rows(x[~held], target[~held], start, 0.1)
        assert torch.allclose(out[held], x[held] @ rows.T, atol=1e-10)
    # not the rows fitted on every text: those predict their own texts more closely
    everything = x @ align_heads.fit_rows(x, target, start, 0.1).T
    assert (everything - target).pow(2).mean() < (out - target).pow(2).mean()


def test_cross_fitted_recentre_shifts_by_what_the_other_folds_ask():
    group = TaskGroup("t", ("a", "b"), 0)
    x = _features(10, 3)
    target = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5, dtype=torch.float64)
    start = torch.zeros(2, 4, dtype=torch.float64)
    start[0, -1] = 2.0  # label a always wins before the shift
    out = heads_stage.cross_fitted_logits([group], {"t": x}, {"t": target}, {"t": start},
                                          fold_steps(recentred=True), folds=2)["t"]
    for fold in range(2):
        held = torch.zeros(10, dtype=torch.bool)
        held[fold::2] = True
        shift = recentre.recentre((x[~held] @ start.T).numpy(), target[~held].numpy(),
                                  group)["shift"]
        assert torch.allclose(out[held], x[held] @ start.T + torch.tensor(shift), atol=1e-12)


def test_with_more_columns_than_texts_the_fit_is_perfect_on_its_texts_but_not_held_out():
    group = TaskGroup("t", ("a", "b"), 0)
    x = _features(30, 60)
    g = torch.Generator().manual_seed(2)
    target = torch.randn(30, 2, generator=g, dtype=torch.float64)  # nothing to learn
    start = torch.zeros(2, 61, dtype=torch.float64)
    fitted = x @ align_heads.fit_rows(x, target, start, 1e-6).T
    held = heads_stage.cross_fitted_logits([group], {"t": x}, {"t": target}, {"t": start},
                                           fold_steps(ridge=1e-6))["t"]
    agree = lambda z: float((z.argmax(1) == target.argmax(1)).double().mean())  # noqa: E731
    assert agree(fitted) == 1.0
    assert agree(held) < 0.8


def test_a_task_with_one_text_has_no_cross_fitted_logits():
    group = TaskGroup("t", ("a", "b"), 0)
    x = _features(1, 3)
    out = heads_stage.cross_fitted_logits([group], {"t": x}, {"t": torch.zeros(1, 2)},
                                          {"t": torch.zeros(2, 4, dtype=torch.float64)},
                                          fold_steps(recentred=True))
    assert out == {}


def test_a_task_under_the_minimum_held_out_agreement_is_warned_about():
    held_out = {"tasks": {"spam": {"agreement": 0.95}, "sentiment": {"agreement": 0.874}}}
    with pytest.warns(Hm3Warning, match=r"less than 90% of calibration texts for sentiment "
                                        r"87\.4%: more"):
        warn_low_held_out(held_out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_low_held_out(held_out, minimum=0.85)  # nothing under 85%
        warn_low_held_out(held_out, shared={"sentiment"})  # a shared sample spans other domains


def test_a_shared_sample_task_far_under_is_warned_about_with_its_own_bar():
    held_out = {"tasks": {"spam": {"agreement": 0.95}, "sentiment": {"agreement": 0.5}}}
    with pytest.warns(Hm3Warning, match=r"less than 60% of the shared calibration sample for "
                                        r"sentiment 50\.0%: texts outside") as record:
        warn_low_held_out(held_out, shared={"sentiment"})
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_low_held_out(held_out, shared={"sentiment"}, shared_minimum=0.5)  # 50% is not < 50%


def test_shared_tasks_are_those_reading_a_shared_sample_with_texts_in_it():
    provenance = {"a": {"sources": [{"path": "t.txt", "shared": True, "texts": 8}]},
                  "b": {"sources": [{"path": "b.txt", "shared": False, "texts": 8},
                                    {"path": "t.txt", "shared": True, "texts": 0}]},
                  "c": {"texts": 3}}
    assert shared_tasks(provenance) == {"a"}
