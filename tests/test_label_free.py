"""Label-free merging: heads kept whole, bias re-centring, LEWIS, RegMean, learned coefficients,
calibration texts, and the recipe checks of their blocks."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hm3
from hm3 import Hm3Error, Hm3Warning, merge, parse_recipe
from hm3.cli import main
from hm3.data import CalibrationSpec, load_calibration
from hm3.engine import build_model, open_sources
from hm3.label_free import align_heads, calibration as calibration_module, lewis, recentre, regmean
from hm3.methods import METHODS
from hm3.pipeline import calibrate, merge_in_memory

from conftest import build_family, random_texts, recipe_dict, spread_head

TASKS = {"sentiment": ["negative", "positive"], "topic": ["news", "sport", "film"],
         "tags": ["urgent", "spam", "personal"]}
MULTI_LABEL = ("tags",)
HEAD = ("classifier.weight", "classifier.bias")
TEXTS_PER_TASK = 40


# --- helpers ---------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@torch.no_grad()
def expert_logits(folder: Path, texts: list[str]) -> torch.Tensor:
    """An expert's logits, run with plain transformers (independent of hm3)."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.float()


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """Base and three experts (two single-label, one multi-label) with spread heads, and a
    calibration file of distinct texts per task."""
    root = tmp_path_factory.mktemp("label-free")
    base, experts = build_family(root, TASKS, multi_label=MULTI_LABEL)
    texts = {}
    for i, (task, folder) in enumerate(experts.items()):
        texts[task] = random_texts(TEXTS_PER_TASK, seed=i)
        (root / f"{task}.txt").write_text("\n".join(texts[task]) + "\n")
        spread_head(folder, texts[task], seed=i)
    calibration = {"texts": {task: str(root / f"{task}.txt") for task in experts},
                   "batch_size": 8}
    return SimpleNamespace(root=root, base=base, experts=experts, texts=texts,
                           calibration=calibration)


def run_merge(fam, out: Path, method: str = "ties", experts: dict | None = None, **extra):
    """Merge `fam` (or some of its experts) with the calibration block; returns the report."""
    experts = experts or fam.experts
    calibration = {**fam.calibration,
                   "texts": {task: fam.calibration["texts"][task] for task in experts}}
    recipe = recipe_dict(fam.base, experts, method, calibration=calibration, **extra)
    return merge(parse_recipe(recipe), out, progress=False)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def linear_weights(folder: Path) -> list[str]:
    """Weights of the body's linear layers (matrices that are neither embeddings nor the head)."""
    return [name for name, tensor in tensors(folder).items()
            if name.endswith(".weight") and tensor.dim() == 2 and "embeddings" not in name
            and not name.startswith("classifier")]


def label_free_block(folder: Path) -> dict:
    """What a merged model's config records of its label-free steps."""
    return json.loads((folder / "config.json").read_text())["hm3"]["label_free"]


def label_rates(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """Fraction of texts given each label: argmax counts, or logit > 0 (probability > 0.5)."""
    logits = np.asarray(logits)
    if multi_label:
        return (logits > 0).mean(0)
    return np.bincount(logits.argmax(1), minlength=logits.shape[1]) / len(logits)


# --- re-centring -----------------------------------------------------------------------------

@pytest.mark.parametrize("target", [[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.3, 0.2],
                                    [0.0, 0.0, 0.0, 1.0]])
def test_softmax_shift_reproduces_the_target_histogram(target):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2000, 4)) + np.array([0.0, 0.0, 4.0, 0.0])  # class 2 dominates
    assert recentre.histogram(logits)[2] > 0.9
    shift = recentre.softmax_shift(logits, np.array(target))
    assert shift.shape == (4,)
    assert abs(shift.mean()) < 1e-9
    np.testing.assert_allclose(recentre.histogram(logits + shift), target, atol=0.01)


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_sigmoid_shift_gives_the_requested_positive_rates(threshold):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(301, 5)) * np.array([1.0, 3.0, 0.2, 1.0, 1.0]) + 2.0
    rates = np.array([0.0, 0.1, 0.37, 0.9, 1.0])
    shift = recentre.sigmoid_shift(logits, rates, threshold)
    cut = np.log(threshold / (1 - threshold))
    got = (logits + shift > cut).mean(0)
    assert np.all(np.abs(got - rates) <= 1 / len(logits) + 1e-12), got


def test_recentred_merge_predicts_each_label_as_often_as_its_expert(fam, tmp_path):
    out = tmp_path / "recentred"
    extra = dict(parameters={"density": 0.5})
    report = run_merge(fam, out, recentre=True, **extra)
    plain = tmp_path / "plain"
    run_merge(fam, plain, **extra)
    record = label_free_block(out)["recentre"]["tasks"]
    assert report.label_free.steps["recentre"].tasks == record
    model = hm3.load(out, device="cpu")
    collapsed = 0
    for task, folder in fam.experts.items():
        texts, multi = fam.texts[task], task in MULTI_LABEL
        group = model.group(task)
        want = label_rates(expert_logits(folder, texts).numpy(), multi)
        got = label_rates(model.logits(texts)[:, group.offset:group.stop], multi)
        np.testing.assert_allclose(got, want, atol=1 / len(texts) + 1e-6, err_msg=task)
        entry = record[task]
        assert set(entry) >= {"before", "after", "target", "shift"}
        assert all(len(entry[key]) == len(TASKS[task]) for key in entry)
        np.testing.assert_allclose(entry["target"], want, atol=1e-4, err_msg=task)
        np.testing.assert_allclose(entry["after"], want, atol=1 / len(texts) + 1e-4, err_msg=task)
        collapsed += np.abs(np.array(entry["before"]) - want).max() > 1 / len(texts)
    assert collapsed, "the merge kept every histogram, so re-centring was not exercised"
    # re-centring moves the head biases by the recorded shift, and nothing else
    shifted, unshifted = tensors(out), tensors(plain)
    for name in unshifted:
        if name != "classifier.bias":
            assert torch.equal(shifted[name], unshifted[name]), name
    shift = np.concatenate([record[task]["shift"] for task in fam.experts])
    np.testing.assert_allclose(shifted["classifier.bias"] - unshifted["classifier.bias"], shift,
                               atol=1e-4)


# --- LEWIS -----------------------------------------------------------------------------------

def test_lewis_densities_follow_how_far_each_layer_moved():
    base = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0}
    expert = {"a": 1.5, "b": 0.5, "c": 3.1, "d": 6.5, "e": 5.0}  # moves .5 1.5 .1 2.5 0
    densities = lewis.scale_densities(base, expert, gamma=0.2, epsilon=0.9)
    assert set(densities) == set(base)
    assert all(0.2 <= d <= 0.9 for d in densities.values())
    assert densities["d"] == pytest.approx(0.9) and densities["e"] == pytest.approx(0.2)
    moves = np.array([abs(expert[k] - base[k]) for k in base])
    assert list(np.argsort(moves)) == list(np.argsort([densities[k] for k in base]))
    # min-max scaling is linear in the move
    assert densities["a"] == pytest.approx(0.2 + 0.7 * 0.5 / 2.5)


def test_lewis_equal_moves_give_the_midpoint():
    densities = lewis.scale_densities({"a": 1.0, "b": 2.0}, {"a": 1.5, "b": 1.5}, 0.3, 0.8)
    assert densities == {"a": pytest.approx(0.55), "b": pytest.approx(0.55)}


def test_lewis_merge_uses_its_densities_per_layer_and_expert(fam, tmp_path, monkeypatch):
    computed = {}  # the unrounded densities handed to the merge (the report rounds them)
    to_overrides = lewis.overrides

    def spy(table, *args):
        computed.update(table)
        return to_overrides(table, *args)

    monkeypatch.setattr(lewis, "overrides", spy)
    out = tmp_path / "lewis"
    run_merge(fam, out, parameters={"density": 0.5}, lewis={"gamma": 0.3, "epsilon": 0.8})
    assert (out / "lewis_densities.png").stat().st_size > 0
    block = label_free_block(out)["lewis"]
    assert (block["gamma"], block["epsilon"]) == (0.3, 0.8)
    table = block["densities"]
    assert set(table) == set(fam.experts)
    linear = {name.removesuffix(".weight") for name in linear_weights(fam.experts["topic"])}
    for task, densities in table.items():
        assert set(densities) == linear, task  # every linear layer but the head
        assert all(0.3 <= d <= 0.8 for d in densities.values()), task
        assert min(densities.values()) == 0.3 and max(densities.values()) == 0.8, task
        assert densities == {k: round(v, 4) for k, v in computed[task].items()}
    # the same merge, spelled as per-expert overrides on a plain recipe, gives the same model
    overrides = [{"pattern": f"{layer}.{part}", "density": density, "experts": [task]}
                 for task, densities in computed.items() for layer, density in densities.items()
                 for part in ("weight", "bias")]
    spelled = tmp_path / "overrides"
    merge(parse_recipe(recipe_dict(fam.base, fam.experts, "ties", parameters={"density": 0.5},
                                   overrides=overrides)), spelled, progress=False)
    plain = tmp_path / "plain"
    merge(parse_recipe(recipe_dict(fam.base, fam.experts, "ties", parameters={"density": 0.5})),
          plain, progress=False)
    got, want, at_recipe_density = tensors(out), tensors(spelled), tensors(plain)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    moved = [name for name in want if not torch.equal(got[name], at_recipe_density[name])]
    assert moved and all(name.rsplit(".", 1)[0] in linear for name in moved)


# --- RegMean ---------------------------------------------------------------------------------

def _gram(rows: int, width: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    return x.T @ x / rows


def _weights(n: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 6, generator=generator) for _ in range(n)]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_regmean_with_equal_grams_is_the_plain_mean(alpha):
    gram, weights = _gram(40, 6, 0), _weights(3, 1)
    got = regmean.solve([gram] * 3, weights, alpha)
    torch.testing.assert_close(got, torch.stack(weights).mean(0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_regmean_of_one_expert_is_its_weight(alpha):
    weight = _weights(1, 2)[0]
    torch.testing.assert_close(regmean.solve([_gram(40, 6, 3)], [weight], alpha), weight,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_regmean_with_different_grams_solves_the_regression(alpha):
    grams, weights = [_gram(40, 6, 4), 5 * _gram(9, 6, 5)], _weights(2, 6)
    got = regmean.solve(grams, weights, alpha)
    assert not torch.allclose(got, torch.stack(weights).mean(0), atol=1e-2)
    regular = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in grams]
    by_hand = torch.linalg.solve(sum(regular),
                                 sum(g @ w.double().T for g, w in zip(regular, weights))).T
    torch.testing.assert_close(got, by_hand.float(), rtol=0, atol=1e-5)
    # the normal equations of min_W sum_i |X_i W^T - X_i W_i^T|^2 hold at the solution
    residual = sum(g @ (got.double() - w.double()).T for g, w in zip(regular, weights))
    assert residual.abs().max() < 1e-5


def test_regmean_keeps_the_experts_mean_where_no_input_reaches():
    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(4, 5, generator=generator, dtype=torch.float64) for _ in range(2)]
    grams = []
    for _ in weights:
        x = torch.randn(50, 5, generator=generator, dtype=torch.float64)
        x[:, 4] = 0  # no text ever lights input 4: the Gram has rank 4
        grams.append(x.T @ x)
    for alpha in (1.0, 0.9):
        merged = regmean.solve(grams, weights, alpha).double()
        torch.testing.assert_close(merged[:, 4], (weights[0][:, 4] + weights[1][:, 4]) / 2,
                                   rtol=0, atol=1e-5)
        assert merged[:, :4].sub((weights[0][:, :4] + weights[1][:, :4]) / 2).abs().max() > 1e-3


def test_regmean_merge_of_one_expert_returns_its_linear_weights(fam, tmp_path):
    one = {"topic": fam.experts["topic"]}
    out = tmp_path / "regmean"
    report = run_merge(fam, out, experts=one, parameters={"density": 0.5}, regmean=True)
    got, want = tensors(out), tensors(fam.experts["topic"])
    linear = linear_weights(fam.experts["topic"])
    assert len(linear) == report.label_free.to_dict()["regmean"]["layers"] == 13
    for name in linear:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    # everything else kept the recipe's merge: at density 0.5 a layer norm is trimmed
    name = "bert.encoder.layer.0.output.LayerNorm.weight"
    assert not torch.allclose(got[name], want[name], atol=1e-4)


# --- learned coefficients --------------------------------------------------------------------

def test_coefficients_lower_the_objective_and_leave_the_heads_whole(fam, tmp_path):
    extra = dict(heads="whole", parameters={"density": 0.5})
    fitted = tmp_path / "fitted"
    run_merge(fam, fitted, coefficients={"steps": 15, "lr": 0.05}, **extra)
    plain = tmp_path / "plain"
    run_merge(fam, plain, **extra)
    block = label_free_block(fitted)["coefficients"]
    assert block["objective_after"] < block["objective_before"]
    assert set(block["coefficients"]) == set(fam.experts)
    assert all(len(row) == len(block["blocks"]) for row in block["coefficients"].values())
    values = [v for row in block["coefficients"].values() for v in row]
    assert all(0.0 <= v <= 1.5 for v in values) and any(v != 1.0 for v in values)
    got, without = tensors(fitted), tensors(plain)
    for name in HEAD:
        assert torch.equal(got[name], without[name]), name
        rows = torch.cat([tensors(folder)[name] for folder in fam.experts.values()])
        assert torch.equal(got[name], rows), name
    assert any(not torch.allclose(got[n], without[n]) for n in without if n not in HEAD)


def test_coefficients_fit_every_block_when_the_checkpoints_hold_a_tensor_the_model_does_not(
        fam, tmp_path):
    """Older BERT checkpoints store `embeddings.position_ids`, a buffer today's model does not
    keep: it is passed over, and every block after it is still fitted, with the same result."""
    import shutil

    from safetensors.torch import save_file

    copies = {}
    for name, folder in [("base", fam.base), *fam.experts.items()]:
        copies[name] = tmp_path / "old" / name
        shutil.copytree(folder, copies[name])
        stored = tensors(copies[name])
        prefix = "bert." if any(k.startswith("bert.") for k in stored) else ""
        stored[f"{prefix}embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
        save_file(stored, copies[name] / "model.safetensors", metadata={"format": "pt"})
    old = SimpleNamespace(**{**vars(fam), "base": copies["base"],
                             "experts": {t: copies[t] for t in fam.experts}})
    settings = dict(coefficients={"steps": 2, "lr": 0.05}, parameters={"density": 0.5})
    run_merge(old, tmp_path / "with", **settings)
    run_merge(fam, tmp_path / "without", **settings)
    with_buffer = label_free_block(tmp_path / "with")["coefficients"]
    without = label_free_block(tmp_path / "without")["coefficients"]
    assert len(without["blocks"]) > 3
    assert with_buffer["blocks"] == without["blocks"]
    assert with_buffer["coefficients"] == without["coefficients"]


def test_coefficients_stay_within_their_bounds(fam, tmp_path):
    out = tmp_path / "bounded"
    report = run_merge(fam, out, experts={t: fam.experts[t] for t in ("sentiment", "topic")},
                       coefficients={"steps": 2, "lr": 1.0, "low": 0.9, "high": 1.1})
    values = [v for row in report.label_free.steps["coefficients"].coefficients.values()
              for v in row]
    assert all(0.9 <= v <= 1.1 for v in values)
    assert any(v in (0.9, 1.1) for v in values)  # a step of lr 1 must have hit a bound


@pytest.mark.parametrize("step", [{"regmean": True}, {"coefficients": {"steps": 1}}],
                         ids=["regmean", "coefficients"])
def test_label_free_merges_record_task_vector_norms_like_a_plain_merge(fam, tmp_path, step):
    # The coefficient path builds its own shares of the merge; it must still measure the norms.
    two = {t: fam.experts[t] for t in ("sentiment", "topic")}
    plain = run_merge(fam, tmp_path / "plain", experts=two)
    guided = run_merge(fam, tmp_path / "guided", experts=two, **step)
    assert set(plain.task_vector_norms) == set(two)
    assert guided.task_vector_norms == pytest.approx(plain.task_vector_norms)
    recorded = json.loads((tmp_path / "guided" / "config.json").read_text())
    assert recorded["hm3"]["task_vector_norms"] == pytest.approx(plain.task_vector_norms,
                                                                 abs=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if not m.spectral))
@pytest.mark.parametrize("weights", [[0.7, 1.3, 0.5], [1.0, -1.0, 0.0]])
def test_contributions_add_up_to_the_combined_merge(name, normalize, weights):
    method = METHODS[name]
    shared = method.validate_shared({"normalize": normalize} if method.mean_of_models
                                    else {"normalize": normalize, "lambda": 0.8}, "parameters")
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=generator)
    deltas = []
    for _ in weights:  # sparse task vectors, with entries where no expert is left
        delta = torch.randn(6, 5, generator=generator)
        deltas.append(delta * (torch.rand(6, 5, generator=generator) > 0.4))
    deltas[0][0] = 0.0
    deltas[1][0] = 0.0
    shares = method.contributions(base, deltas, weights, shared)
    assert len(shares) == len(deltas)
    torch.testing.assert_close(base + sum(shares), method.combine(base, deltas, weights, shared),
                               rtol=0, atol=1e-5)


# --- heads -----------------------------------------------------------------------------------

@pytest.mark.parametrize("guided", [{}, {"lewis": True}], ids=["streamed", "in-memory"])
def test_whole_heads_are_the_experts_rows_even_at_low_density(fam, tmp_path, guided):
    two = {t: fam.experts[t] for t in ("sentiment", "topic")}
    whole = tensors(run_merge(fam, tmp_path / "whole", experts=two, heads="whole",
                              parameters={"density": 0.2}, **guided).path)
    merged = tensors(run_merge(fam, tmp_path / "merged", experts=two, heads="merge",
                               parameters={"density": 0.2}, **guided).path)
    default = tensors(run_merge(fam, tmp_path / "default", experts=two,
                                parameters={"density": 0.2}, **guided).path)
    for name in HEAD:
        rows = torch.cat([tensors(two[task])[name] for task in two])
        assert torch.equal(whole[name], rows), name
        assert torch.equal(default[name], whole[name]), name  # whole is the default
    assert not torch.equal(merged["classifier.weight"], whole["classifier.weight"])


# --- bad input -------------------------------------------------------------------------------

BAD = {
    "recentre without calibration": ({"recentre": True}, "recentre.*add a `calibration:` block"),
    "regmean with coefficients": ({"regmean": True, "coefficients": True}, "cannot be combined"),
    "calibration missing a task": ({"lewis": True, "drop_task": "topic"}, "missing: topic"),
    "gamma above epsilon": ({"lewis": {"gamma": 0.9, "epsilon": 0.5}}, "must not exceed"),
    "unknown block option": ({"lewis": {"gama": 0.3}}, "unknown option.*gama.*allowed: gamma"),
    "unknown heads mode": ({"heads": "bogus"}, "heads: expected 'whole'.*'merge'.*'bogus'"),
    "coefficients with iso_c": ({"coefficients": True, "method": "iso_c"},
                                "coefficients scale each expert's share.*iso_c has none"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_label_free_blocks_are_refused_before_anything_is_written(fam, tmp_path, case):
    extra, message = BAD[case]
    extra = dict(extra)
    drop = extra.pop("drop_task", None)
    method = extra.pop("method", "ties")
    experts = {t: fam.experts[t] for t in ("sentiment", "topic")}
    if "recentre" not in extra:
        texts = {t: p for t, p in fam.calibration["texts"].items() if t in experts and t != drop}
        extra["calibration"] = {"texts": texts}
    out = tmp_path / "out"
    with pytest.raises(Hm3Error, match=message):
        merge(parse_recipe(recipe_dict(fam.base, experts, method, **extra)), out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_label_free_steps_run_on_the_device_asked_for(fam, tmp_path):
    """`device` moves the experts and the merged model, not the result: on the CPU named
    explicitly the weights are those of the default; a device this machine lacks, or no device
    at all, is refused before anything is written; on a CUDA GPU the weights match the CPU's."""
    experts = {t: fam.experts[t] for t in ("sentiment", "topic")}
    steps = {"heads": "whole", "regmean": True, "align_heads": {"ridge": 0.1}, "recentre": True}
    calibration = {"texts": {t: fam.calibration["texts"][t] for t in experts}}
    recipe = parse_recipe(recipe_dict(fam.base, experts, "ties", calibration=calibration, **steps))
    merge(recipe, tmp_path / "default", progress=False)
    merge(recipe, tmp_path / "cpu", progress=False, device="cpu")
    default, cpu = tensors(tmp_path / "default"), tensors(tmp_path / "cpu")
    assert all(torch.equal(default[name], cpu[name]) for name in default)
    with pytest.raises(Hm3Error, match="'gpu0' is not a device"):
        merge(recipe, tmp_path / "bad", progress=False, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(Hm3Error, match="no CUDA GPU"):
            merge(recipe, tmp_path / "cuda", progress=False, device="cuda")
        assert not (tmp_path / "cuda").exists() and not (tmp_path / "bad").exists()
        return
    merge(recipe, tmp_path / "cuda", progress=False, device="cuda")
    on_gpu = tensors(tmp_path / "cuda")
    for name in default:
        torch.testing.assert_close(on_gpu[name], default[name], rtol=1e-3, atol=1e-4)


def test_missing_calibration_file_fails_the_merge_and_leaves_no_output(fam, tmp_path):
    experts = {t: fam.experts[t] for t in ("sentiment", "topic")}
    texts = {"sentiment": fam.calibration["texts"]["sentiment"],
             "topic": str(tmp_path / "nowhere.txt")}
    recipe = parse_recipe(recipe_dict(fam.base, experts, "ties", recentre=True,
                                      calibration={"texts": texts}))
    out = tmp_path / "out"
    with pytest.raises(Hm3Error, match="nowhere.txt does not exist"):
        merge(recipe, out, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


# --- calibration texts -----------------------------------------------------------------------

def test_calibration_drops_duplicates_and_held_out_texts_and_keeps_the_limit(tmp_path):
    lines = ["good film", "free money", "Good  FILM", "awful meeting", "free money",
             "win call", "who votes", "hello today", "sport news", "market phone"]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n\n")
    (tmp_path / "b.txt").write_text("good film\nbad film\n")
    sources = {task: {"path": str(tmp_path / f"{task}.txt"), "text_column": "text"}
               for task in ("a", "b")}
    held_out = {"a": ["awful meeting", "hello today"], "b": ["bad film"]}
    with pytest.warns(Hm3Warning, match="left out"):
        calibration = load_calibration(CalibrationSpec(sources, limit=4), ["a", "b"], held_out)
    # "Good  FILM" repeats "good film"; "awful meeting" is held out; the limit stops at 4
    assert calibration.texts["a"] == ["good film", "free money", "win call", "who votes"]
    assert calibration.provenance["a"]["held_out_removed"] == 1
    assert calibration.provenance["a"]["texts"] == 4
    assert calibration.texts["b"] == ["good film"]
    assert calibration.provenance["b"]["held_out_removed"] == 1
    with pytest.warns(Hm3Warning, match="2 also appear"):
        everything = load_calibration(CalibrationSpec(sources, limit=100), ["a"], held_out)
    assert "hello today" not in everything.texts["a"]
    assert len(everything.texts["a"]) == 6
    assert everything.provenance["a"]["held_out_removed"] == 2


def test_calibration_reads_a_labelled_table_ignoring_its_labels(tmp_path):
    (tmp_path / "t.csv").write_text("body,label\ngood film,pos\nawful meeting,neg\n")
    sources = {"a": {"path": str(tmp_path / "t.csv"), "text_column": "body"}}
    assert load_calibration(CalibrationSpec(sources), ["a"]).texts["a"] == ["good film",
                                                                           "awful meeting"]
    sources["a"]["split"] = "train"
    with pytest.raises(Hm3Error, match="subset and split apply to Hugging Face datasets only"):
        load_calibration(CalibrationSpec(sources), ["a"])
    sources["a"] = {"path": str(tmp_path / "t.csv"), "text_column": "text"}
    with pytest.raises(Hm3Error, match="no column 'text'.*body, label"):
        load_calibration(CalibrationSpec(sources), ["a"])


# --- head alignment ----------------------------------------------------------------------------

def test_fit_rows_recovers_an_exact_linear_map_and_shrinks_toward_the_start():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    truth = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    start = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    targets = features @ truth.T
    torch.testing.assert_close(align_heads.fit_rows(features, targets, start, 1e-10), truth,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(align_heads.fit_rows(features, targets, start, 1e8), start,
                               rtol=0, atol=1e-5)
    middle = align_heads.fit_rows(features, targets, start, 1.0)
    assert 0 < float((middle - truth).norm()) < float((start - truth).norm())


def test_aligned_heads_match_the_experts_logits_better_and_touch_only_the_head(fam, tmp_path):
    two = {t: fam.experts[t] for t in ("sentiment", "topic")}
    extra = dict(experts=two, parameters={"density": 0.5})
    report = run_merge(fam, tmp_path / "aligned", align_heads={"ridge": 0.01}, **extra)
    plain = run_merge(fam, tmp_path / "plain", **extra)
    for task, entry in report.label_free.to_dict()["align_heads"]["tasks"].items():
        assert entry["mse_after"] < entry["mse_before"], task
        assert entry["agreement_after"] >= entry["agreement_before"], task
    aligned, merged = tensors(report.path), tensors(plain.path)
    changed = {name for name in merged if not torch.equal(aligned[name], merged[name])}
    assert changed == set(HEAD)
    model = hm3.load(report.path, device="cpu")
    for task, folder in two.items():
        group = model.group(task)
        got = torch.from_numpy(model.logits(fam.texts[task])[:, group.offset:group.stop])
        want = expert_logits(folder, fam.texts[task])
        before = hm3.load(plain.path, device="cpu").logits(fam.texts[task])
        before = torch.from_numpy(before[:, group.offset:group.stop])
        assert (got - want).pow(2).mean() < (before - want).pow(2).mean(), task


def test_cli_merge_and_inspect_summarise_the_label_free_steps(fam, tmp_path, capsys):
    recipe = recipe_dict(fam.base, fam.experts, "ties", calibration=fam.calibration,
                         align_heads=True, recentre=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(path), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    merged = capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "out")]) == 0
    inspected = capsys.readouterr().out
    for text in (merged, inspected):
        assert "label-free steps" in text and "calibration texts: sentiment 40" in text
        for task in fam.experts:
            assert f"recentre {task}: largest label-share gap to the expert" in text
            assert f"align_heads {task}: agreement with the expert" in text
    held_out = json.loads((tmp_path / "out" / "config.json").read_text())[
        "hm3"]["label_free"]["fidelity"]["held_out"]
    shares = ", ".join(f"{task} {held_out['tasks'][task]['agreement']:.1%}" for task in fam.experts)
    assert f"head steps fitted without each text (5-fold): {shares}" in merged
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"each scored by head steps fitted without it (5-fold): {shares}" in card


def test_align_heads_needs_a_positive_ridge(fam, tmp_path):
    for bad in (0, "automatic"):
        with pytest.raises(Hm3Error, match="align_heads.ridge: expected a positive number"):
            run_merge(fam, tmp_path / "out", align_heads={"ridge": bad})
    assert not (tmp_path / "out").exists()


def numpy_cv_error(x: np.ndarray, z: np.ndarray, start: np.ndarray, ridge: float,
                   folds: int) -> float:
    """k-fold error of the ridge refit, written out once more: fold j holds texts j, j+k, ...;
    rows fitted on the rest minimise |X W^T - Z|^2 + ridge * s * |W - W0|^2 with s the mean
    diagonal of the rest's X^T X."""
    total = 0.0
    for j in range(folds):
        held = np.zeros(len(x), dtype=bool)
        held[j::folds] = True
        a, b = x[~held], z[~held]
        s = np.trace(a.T @ a) / a.shape[1]
        rows = np.linalg.solve(a.T @ a + ridge * s * np.eye(a.shape[1]),
                               a.T @ b + ridge * s * start.T).T
        total += ((x[held] @ rows.T - z[held]) ** 2).sum()
    return total / z.size


@pytest.mark.parametrize("texts, features, strong", [(40, 120, True), (2000, 12, False)],
                         ids=["fewer-texts-than-features", "many-texts"])
def test_ridge_auto_cross_validates_on_the_calibration_texts(texts, features, strong):
    """With fewer texts than features and noisy targets a strong ridge predicts unseen texts
    best; with many texts the weakest does. The errors are those of an independent k-fold
    computation."""
    rng = np.random.default_rng(texts)
    x = rng.normal(size=(texts, features))
    start = np.zeros((3, features))
    z = x @ (0.3 * rng.normal(size=(3, features))).T + 0.5 * rng.normal(size=(texts, 3))
    chosen, errors = align_heads.choose_ridge(torch.from_numpy(x), torch.from_numpy(z),
                                        torch.from_numpy(start))
    assert list(errors) == list(align_heads.RIDGES)
    for ridge in (0.01, 1.0):
        assert errors[ridge] == pytest.approx(numpy_cv_error(x, z, start, ridge, align_heads.FOLDS),
                                              rel=1e-9)
    assert errors[chosen] == min(errors.values())
    assert (chosen >= 0.3) if strong else (chosen == min(align_heads.RIDGES))


def test_ridge_auto_records_each_tasks_choice(fam, tmp_path, capsys):
    two = {t: fam.experts[t] for t in ("sentiment", "topic")}
    report = run_merge(fam, tmp_path / "auto", experts=two, align_heads={"ridge": "auto"})
    block = report.label_free.to_dict()["align_heads"]
    assert block["ridge"] == "auto"
    for task, entry in block["tasks"].items():
        assert entry["ridge"] in align_heads.RIDGES
        errors = {float(r): e for r, e in entry["cv_mse"].items()}
        assert errors[entry["ridge"]] == min(errors.values()), task
    fixed = run_merge(fam, tmp_path / "fixed", experts=two,
                      align_heads={"ridge": block["tasks"]["topic"]["ridge"]})
    torch.testing.assert_close(tensors(report.path)["classifier.weight"][2:],
                               tensors(fixed.path)["classifier.weight"][2:], rtol=0, atol=1e-6)


# --- each head fitted on the other tasks' texts too (`align_heads: {others: w}`) -------------

def gaps_on_other_tasks_texts(fam, folder: Path, tasks) -> dict[str, float]:
    """Per task, the mean squared gap between the merged model's logits and its expert's (run
    by plain transformers) on the other tasks' calibration texts."""
    model = hm3.load(folder, device="cpu")
    out = {}
    for task in tasks:
        group = model.group(task)
        texts = [text for other in tasks if other != task for text in fam.texts[other]]
        got = torch.from_numpy(model.logits(texts)[:, group.offset:group.stop])
        out[task] = float((got - expert_logits(fam.experts[task], texts)).pow(2).mean())
    return out


def test_heads_fitted_on_the_other_tasks_texts_follow_their_experts_there(fam, tmp_path, capsys):
    own = run_merge(fam, tmp_path / "own", align_heads={"ridge": 0.01})
    both = run_merge(fam, tmp_path / "both", align_heads={"ridge": 0.01, "others": 1.0})
    gap_own = gaps_on_other_tasks_texts(fam, own.path, list(fam.experts))
    gap_both = gaps_on_other_tasks_texts(fam, both.path, list(fam.experts))
    for task in fam.experts:
        assert gap_both[task] < gap_own[task], task
    block = both.label_free.to_dict()["align_heads"]
    assert block["others"] == 1.0 and "extra" not in block and block["others_seconds"] > 0
    assert own.label_free.to_dict()["align_heads"]["others_seconds"] is None
    for task, entry in block["tasks"].items():
        others = sum(len(fam.texts[t]) for t in fam.experts if t != task)
        assert entry["other_texts"] == others
        assert 0 <= entry["others_agreement_before"] <= 1
        assert 0 <= entry["others_agreement_after"] <= 1
    fitted = f"on {entry['other_texts']} texts of the other tasks (fitted on them)"
    assert fitted in block["summary"]
    assert "other_texts" not in json.dumps(own.label_free.to_dict()["align_heads"])
    first, second = tensors(own.path), tensors(both.path)
    assert {name for name in first if not torch.equal(first[name], second[name])} == set(HEAD)
    written = yaml.safe_load((both.path / "hm3_recipe.yaml").read_text())
    assert written["align_heads"] == {"ridge": 0.01, "others": 1.0, "other_texts": 64}
    few = run_merge(fam, tmp_path / "few", align_heads={"ridge": 0.01, "others": 1.0,
                                                         "other_texts": 8})
    for task, entry in few.label_free.to_dict()["align_heads"]["tasks"].items():
        assert entry["other_texts"] == 8 * (len(fam.experts) - 1), task


def test_a_sample_of_a_tasks_texts_is_the_texts_at_those_rows(fam):
    """The sampled batches hold exactly the texts of the full batches at the sampled rows (the
    rows a head's inputs are cut to), whatever the batch boundaries."""
    sources = open_sources(parse_recipe(recipe_dict(
        fam.base, fam.experts, "ties", calibration={**fam.calibration, "batch_size": 3},
        align_heads=True)))
    calibrated = calibrate(sources, expert_logits=False)
    spec = sources.recipe.label_free.calibration

    def token_rows(batches):
        return [ids[mask.bool()].tolist() for batch in batches
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]

    for task in fam.experts:
        full = token_rows(calibrated.batches[task])
        rows = calibration_module.spread_rows(len(full), 7)
        assert len(rows) <= 7 and rows[0] == 0 and rows == sorted(set(rows))
        sample = token_rows(calibration_module.sample_batches(calibrated, task, rows, spec))
        assert sample == [full[r] for r in rows]
    assert calibration_module.spread_rows(5, 64) == [0, 1, 2, 3, 4]


def test_heads_on_one_shared_sample_have_no_other_texts_to_add(fam, tmp_path, monkeypatch):
    pooled = tmp_path / "shared.txt"
    pooled.write_text("\n".join(t for task in fam.experts for t in fam.texts[task]) + "\n")
    runs = []
    real = calibration_module.expert_classifier
    monkeypatch.setattr(calibration_module, "expert_classifier",
                        lambda *a, **k: runs.append(1) or real(*a, **k))

    def shared_merge(out: Path, **align):
        recipe = recipe_dict(fam.base, fam.experts, "ties", align_heads={"ridge": 0.01, **align},
                             calibration={"texts": str(pooled), "batch_size": 8})
        return merge(parse_recipe(recipe), out, progress=False)

    plain = shared_merge(tmp_path / "plain")
    expert_runs = len(runs)
    others = shared_merge(tmp_path / "others", others=1.0)
    assert len(runs) == 2 * expert_runs == 2 * len(fam.experts)  # no expert ran once more
    first, second = tensors(plain.path), tensors(others.path)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_other_tasks_logits_are_computed_once_for_every_trial(fam, monkeypatch):
    sources = open_sources(parse_recipe(recipe_dict(
        fam.base, fam.experts, "ties", calibration=fam.calibration,
        align_heads={"ridge": 0.01, "others": 0.5})))
    calibrated = calibrate(sources)
    runs = []
    real = calibration_module.expert_classifier
    monkeypatch.setattr(calibration_module, "expert_classifier",
                        lambda *a, **k: runs.append(1) or real(*a, **k))
    heads = []
    for _ in range(2):  # as a search runs the head steps on every trial
        model = build_model(sources)
        merge_in_memory(model, sources, calibrated)
        heads.append(model.state_dict()["classifier.weight"].clone())
    assert len(runs) == len(fam.experts)
    assert set(calibrated.other_logits[64]) == set(fam.experts)
    torch.testing.assert_close(heads[0], heads[1], rtol=0, atol=0)


def test_align_heads_others_must_be_a_weight_of_at_least_zero(fam, tmp_path):
    for bad in (-0.5, "all", True):
        with pytest.raises(Hm3Error, match="align_heads.others: expected a number of at least 0"):
            run_merge(fam, tmp_path / "out", align_heads={"others": bad})
    for bad in (0, 2.5):
        with pytest.raises(Hm3Error, match="align_heads.other_texts: expected a positive"):
            run_merge(fam, tmp_path / "out", align_heads={"others": 1, "other_texts": bad})
    assert not (tmp_path / "out").exists()


def test_ridge_auto_with_other_texts_keeps_them_in_every_fold(fam, tmp_path):
    """`ridge: auto` cross-validates on the task's own texts, the other tasks' texts fitted in
    every fold: with them the chosen ridge's error is the least of its errors, and those errors
    differ from the own-texts-only ones (the other texts are in the fits)."""
    two = {t: fam.experts[t] for t in ("sentiment", "topic")}
    alone = run_merge(fam, tmp_path / "alone", experts=two, align_heads={"ridge": "auto"})
    both = run_merge(fam, tmp_path / "both", experts=two,
                     align_heads={"ridge": "auto", "others": 1.0})
    first = alone.label_free.to_dict()["align_heads"]["tasks"]
    for task, entry in both.label_free.to_dict()["align_heads"]["tasks"].items():
        errors = {float(r): e for r, e in entry["cv_mse"].items()}
        assert errors[entry["ridge"]] == min(errors.values()), task
        assert entry["cv_mse"] != first[task]["cv_mse"], task
        other = "topic" if task == "sentiment" else "sentiment"
        assert entry["other_texts"] == len(fam.texts[other])
