"""The `distill` step and the label-free step registry: blocks run one at a time as the model
runs them, the distillation lowers each block's error to the experts on every architecture,
shared samples routed to confident experts, and the recipe's `distill:` block."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hm3 import Hm3Error, merge, parse_recipe
from hm3.data import Dataset
from hm3.label_free import STAGES, get_step, registry, step_names
from hm3.label_free.distill import MIN_ROUTED, NOTHING_TO_CORRECT, DistillOptions, _routed
from hm3.label_free.registry import Step, option, positive, register, saved_report
from hm3.label_free.stream import (
    block_output,
    blocks_replaced,
    find_blocks,
    first_block_calls,
    model_logits,
)
from hm3.pipeline import LabelFreeReport
from hm3.search import SearchConfig, run_search

from conftest import TINY, build_family, random_texts, recipe_dict, spread_head
from test_label_free import tensors  # the label-free tests' reader of a saved model's tensors

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

TASKS = {"sentiment": ["negative", "positive"], "topic": ["news", "sport", "film"],
         "tags": ["urgent", "spam", "personal"]}
ENCODERS_WITH_HIDDEN_HEAD = ("roberta", "mpnet")  # classifier.dense: a head layer the base lacks


def family_with_texts(root: Path, model_type: str = "bert", tasks=TASKS,
                      multi_label=("tags",), noise: float = 0.02, shared: bool = False):
    base, experts = build_family(root, tasks, model_type=model_type, noise=noise,
                                 multi_label=multi_label)
    texts = {}
    for i, (task, folder) in enumerate(experts.items()):
        texts[task] = random_texts(48, seed=10 + i)
        (root / f"{task}.txt").write_text("\n".join(texts[task]) + "\n")
        if model_type in ("bert", *ENCODERS_WITH_HIDDEN_HEAD):
            spread_head(folder, texts[task], seed=i)
    if shared:
        pooled = [t for task in experts for t in texts[task]]
        (root / "shared.txt").write_text("\n".join(pooled) + "\n")
        calibration = {"texts": str(root / "shared.txt"), "batch_size": 8}
    else:
        calibration = {"texts": {task: str(root / f"{task}.txt") for task in experts},
                       "batch_size": 8}
    return SimpleNamespace(root=root, base=base, experts=experts, calibration=calibration)


def distill_merge(fam, out: Path, method="ties", parameters=None, **distill):
    raw = recipe_dict(fam.base, fam.experts, method,
                      parameters={"density": 0.3} if parameters is None else parameters,
                      calibration=fam.calibration, distill={"texts": 24, "steps": 12,
                                                            "batch_size": 8, **distill})
    return merge(parse_recipe(raw), out, progress=False)


# --- the block stream ------------------------------------------------------------------------

def one_expert_and_batch(root: Path, model_type: str):
    """A tiny expert of `model_type` and a tokenised batch of six texts."""
    _, experts = build_family(root, {"topic": ["a", "b", "c"]}, model_type=model_type)
    model = AutoModelForSequenceClassification.from_pretrained(experts["topic"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(experts["topic"])
    return model, dict(tokenizer(random_texts(6, seed=3), padding=True, return_tensors="pt"))


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_blocks_run_one_at_a_time_give_the_models_own_hidden_states(tmp_path, model_type):
    model, batch = one_expert_and_batch(tmp_path, model_type)
    with torch.no_grad():
        expected = model(**batch, output_hidden_states=True).hidden_states
    _, blocks = find_blocks(model)
    assert len(blocks) == TINY[model_type].get("num_hidden_layers",
                                               TINY[model_type].get("n_layers",
                                                                    TINY[model_type].get("n_layer")))
    (call,), _ = first_block_calls(model, blocks, [batch])
    hidden = call.hidden
    assert torch.equal(hidden, expected[0])
    with torch.no_grad():
        # every block but the last: some models normalise the last block's output in place
        for index in range(len(blocks) - 1):
            hidden = block_output(blocks[index], call, hidden)
            # the very calls the model makes, on the same inputs: the same numbers
            assert torch.equal(hidden, expected[index + 1]), index


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_the_tail_on_the_last_blocks_output_gives_the_models_logits(tmp_path, model_type):
    model, batch = one_expert_and_batch(tmp_path, model_type)
    prefix, blocks = find_blocks(model)
    (call,), _ = first_block_calls(model, blocks, [batch])
    with torch.no_grad():
        expected = model_logits(model, batch)
        hidden = call.hidden
        for block in blocks[:-1]:
            hidden = block_output(block, call, hidden)
        raw = block_output(blocks[-1], call, hidden, whole=True)
        with blocks_replaced(model, prefix, raw):
            logits = model_logits(model, batch)
            assert getattr(model.get_submodule(prefix.rpartition(".")[0]),
                           prefix.rpartition(".")[2]) is not blocks
        # ...and the real blocks are back afterwards
        assert find_blocks(model)[1] is blocks
        # and with the last block's output replaced by a different one, different logits
        with blocks_replaced(model, prefix, _perturbed(raw)):
            other = model_logits(model, batch)
    # the very calls the model makes, on the same inputs: the same numbers
    assert torch.equal(logits, expected), (logits - expected).abs().max()
    assert not torch.allclose(other, expected, atol=1e-3)


def _perturbed(raw):
    """The block output plus noise of its own size (not a rescaling: a final norm undoes that)."""
    hidden = raw[0] if isinstance(raw, (tuple, list)) else raw
    noisy = hidden + torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0)) \
        * hidden.std()
    return type(raw)([noisy, *raw[1:]]) if isinstance(raw, (tuple, list)) else noisy


def test_the_blocks_are_the_longest_stack_of_one_module(tmp_path):
    _, experts = build_family(tmp_path, {"topic": ["a", "b"]}, model_type="distilbert")
    model = AutoModelForSequenceClassification.from_pretrained(experts["topic"])
    name, blocks = find_blocks(model)
    assert name == "distilbert.transformer.layer" and len(blocks) == 2
    with pytest.raises(ValueError, match="no stack of transformer blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# --- distillation ----------------------------------------------------------------------------

def test_distilling_one_expert_into_itself_changes_nothing(tmp_path):
    fam = family_with_texts(tmp_path, tasks={"topic": TASKS["topic"]}, multi_label=())
    plain = merge(parse_recipe(recipe_dict(fam.base, fam.experts, "linear")), tmp_path / "plain",
                  progress=False)
    report = distill_merge(fam, tmp_path / "out", method="linear", parameters={}, last="hidden")
    entry = report.label_free.to_dict()["distill"]
    # the merged body IS the expert: nothing to correct, and a zero gradient moves no weight
    assert entry["error_before"] == [0.0, 0.0] and entry["error_after"] == [0.0, 0.0]
    before, after = tensors(plain.path), tensors(report.path)
    assert all(torch.equal(before[name], after[name]) for name in before)
    # matched on the logits: the heads' KL starts at rounding level, and a block with nothing
    # to correct is left as merged (Adam would turn rounding noise into full steps)
    logits = distill_merge(fam, tmp_path / "logits", method="linear", parameters={})
    kl_before, kl_after = logits.label_free.to_dict()["distill"]["logit_error"]
    assert kl_before < NOTHING_TO_CORRECT and kl_after == kl_before
    after = tensors(logits.path)
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "deberta-v2", "llama", "gpt2",
                                        *ENCODERS_WITH_HIDDEN_HEAD])
def test_distill_lowers_every_blocks_error_to_the_experts(tmp_path, model_type):
    fam = family_with_texts(tmp_path, model_type)
    report = distill_merge(fam, tmp_path / "out", last="hidden")  # every block on hidden states
    entry = report.label_free.to_dict()["distill"]
    assert entry["blocks"] == 2 and entry["texts"] == {"sentiment": 24, "topic": 24, "tags": 24}
    assert all(after < before for before, after in zip(entry["error_before"],
                                                       entry["error_after"]))
    assert "distill (" in report.label_free.summary()
    assert "label-free steps: distill on unlabelled" in (report.path / "README.md").read_text()


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "deberta-v2", "llama", "gpt2",
                                        *ENCODERS_WITH_HIDDEN_HEAD])
@pytest.mark.parametrize("last", ["logits", "both"])
def test_the_last_block_matched_on_logits_lowers_the_heads_kl(tmp_path, model_type, last):
    fam = family_with_texts(tmp_path, model_type)
    entry = distill_merge(fam, tmp_path / "out", last=last).label_free.to_dict()["distill"]
    before, after = entry["logit_error"]
    if last == "both":  # what is trained: the last block's relative error plus the heads' KL
        before += entry["error_before"][-1]
        after += entry["error_after"][-1]
    assert after < before
    assert "the heads' KL to the experts" in entry["summary"]


def test_the_last_block_matched_on_logits_differs_from_hidden_states(tmp_path):
    fam = family_with_texts(tmp_path)
    hidden = distill_merge(fam, tmp_path / "hidden", last="hidden")
    logits = distill_merge(fam, tmp_path / "logits")  # the default
    assert hidden.label_free.to_dict()["distill"]["logit_error"] is None
    first, second = tensors(hidden.path), tensors(logits.path)
    prefix, last = "bert.encoder.layer.", "bert.encoder.layer.1."
    # the blocks before the last are distilled alike; the last one differently
    assert all(torch.equal(first[n], second[n]) for n in first
               if n.startswith(prefix) and not n.startswith(last))
    assert any(not torch.equal(first[n], second[n]) for n in first if n.startswith(last))


@pytest.mark.parametrize("train", ["weights", "elementwise", "rows", "tensor"])
def test_every_trained_form_lowers_the_error(tmp_path, train):
    fam = family_with_texts(tmp_path)
    report = distill_merge(fam, tmp_path / "out", train=train, last="hidden")
    entry = report.label_free.to_dict()["distill"]
    assert entry["train"] == train
    assert all(after < before for before, after in zip(entry["error_before"],
                                                       entry["error_after"]))


def test_distill_is_deterministic(tmp_path):
    fam = family_with_texts(tmp_path)
    first = tensors(distill_merge(fam, tmp_path / "a").path)
    second = tensors(distill_merge(fam, tmp_path / "b").path)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_a_shared_sample_is_routed_to_the_experts_confident_on_each_text(tmp_path):
    fam = family_with_texts(tmp_path, shared=True)
    entry = distill_merge(fam, tmp_path / "routed", confidence=0.6).label_free.to_dict()["distill"]
    # the shared stream holds texts-per-task x tasks texts; each expert teaches the confident
    assert entry["texts"] == {"sentiment": 72, "topic": 72, "tags": 72}
    assert set(entry["routed"]) == set(TASKS)
    assert all(MIN_ROUTED <= n <= 72 for n in entry["routed"].values())
    assert len(set(entry["routed"].values())) > 1  # the experts are confident on different texts
    everything = distill_merge(fam, tmp_path / "all", route="all").label_free.to_dict()["distill"]
    assert everything["routed"] is None
    assert all(after < before for before, after in zip(everything["error_before"],
                                                       everything["error_after"]))


def test_routing_keeps_confident_texts_and_at_least_the_most_confident():
    confident = torch.tensor([[5.0, 0.0]] * MIN_ROUTED)
    logits = torch.cat([torch.tensor([[3.0, 0.0], [0.1, 0.0], [0.0, 4.0]]), confident])
    # top probabilities 0.95, 0.52, 0.98: the unsure text is left out
    assert _routed(logits, False, 0.9).tolist()[:3] == [True, False, True]
    unsure = torch.zeros(MIN_ROUTED + 4, 2)
    unsure[0, 0] = 5.0
    kept = _routed(unsure, False, 0.9)  # one confident text: the MIN_ROUTED most confident
    assert int(kept.sum()) == MIN_ROUTED and bool(kept[0])
    # multi-label: each label's on/off decision must be confident
    tags = torch.cat([torch.tensor([[4.0, -4.0], [4.0, 0.2]]), torch.full((MIN_ROUTED, 2), 5.0)])
    assert _routed(tags, True, 0.9).tolist()[:2] == [True, False]


# --- the recipe and the registry --------------------------------------------------------------

def recipe_with(fam, **extra):
    return recipe_dict(fam.base, fam.experts, "ties", calibration=fam.calibration, **extra)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return family_with_texts(tmp_path_factory.mktemp("small"), multi_label=())


def test_distill_true_takes_the_declared_defaults_and_round_trips(small):
    recipe = parse_recipe(recipe_with(small, distill=True))
    assert recipe.label_free.step("distill") == DistillOptions()
    written = recipe.to_dict()
    assert written["distill"] == {"train": "weights", "texts": 64, "steps": 24, "lr": 0.02,
                                  "pull": 0.0, "batch_size": 8, "route": "confident",
                                  "confidence": 0.9, "last": "logits"}
    custom = parse_recipe(recipe_with(small, distill={"train": "rows", "steps": 3}))
    assert parse_recipe({**custom.to_dict(), "calibration": small.calibration}
                        ).label_free == custom.label_free


@pytest.mark.parametrize("block, message", [
    ({"train": "everything"}, r"distill.train: expected one of weights, elementwise, rows, "
                              r"tensor, got 'everything'"),
    ({"steps": 0}, r"distill.steps: expected a positive integer, got 0"),
    ({"lr": -1}, r"distill.lr: expected a positive number"),
    ({"confidence": 2}, r"distill.confidence: expected a number in \[0, 1\]"),
    ({"epochs": 3}, r"distill: unknown option\(s\) epochs; allowed: train, texts"),
    ("yes", r"distill: expected true or a mapping of its options"),
])
def test_bad_distill_options_are_named(small, block, message):
    with pytest.raises(Hm3Error, match=message):
        parse_recipe(recipe_with(small, distill=block))


def test_distill_without_calibration_texts_says_what_to_add(small):
    raw = recipe_dict(small.base, small.experts, "ties", distill=True)
    with pytest.raises(Hm3Error, match=r"distill: needs unlabelled texts: add a `calibration:`"):
        parse_recipe(raw)


def test_the_search_refuses_a_step_it_would_rerun_on_every_trial(small, tmp_path):
    recipe = parse_recipe(recipe_with(small, distill=True))
    data = [Dataset(task, ["good film"], [labels[0]]) for task, labels in TASKS.items()
            if task in small.experts]
    with pytest.raises(Hm3Error, match="distill would run again on every trial"):
        run_search(recipe, data, None, tmp_path / "search", SearchConfig(trials=1),
                   progress=False)


def test_the_registry_refuses_a_second_step_of_one_name():
    assert "distill" in step_names() and get_step("distill").reference.startswith("https://")

    class Again(Step):
        name = "distill"
        options = DistillOptions

    with pytest.raises(ValueError, match="already registered"):
        register(Again())
    with pytest.raises(KeyError, match="unknown label-free step 'nothing'"):
        get_step("nothing")


def test_the_steps_run_stage_by_stage_in_registration_order():
    assert STAGES == ("densities", "merge", "body", "heads", "joint")
    assert step_names() == ("lewis", "coefficients", "regmean", "distill", "align_heads",
                            "recentre", "tune")
    assert [get_step(name).stage for name in step_names()] == [
        "densities", "merge", "body", "body", "heads", "heads", "joint"]
    assert step_names("heads") == ("align_heads", "recentre")


@dataclasses.dataclass(frozen=True)
class ProbeOptions:
    scale: float = option(1.0, positive, "a number the probe records")


@dataclasses.dataclass
class ProbeReport:
    scale: float
    stages_before: list[str]

    def summary(self) -> str:
        return f"probe: scale {self.scale} after {', '.join(self.stages_before)}"


class Probe(Step):
    """A body step that records which steps ran before it (the registry's run order)."""

    name = "probe"
    options = ProbeOptions
    report = ProbeReport
    stage = "body"
    ran: list[str] = []

    def apply(self, run, options: ProbeOptions) -> ProbeReport:
        assert run.model is not None and run.sources.recipe.label_free.step("probe") == options
        return ProbeReport(options.scale, [n for n in step_names() if n in Probe.ran])


def test_a_new_step_is_its_declaration_and_registration_alone(small, tmp_path, monkeypatch):
    """A step the pipeline and the recipe know nothing of runs in its stage, its block is read
    and written from its declaration, and its report lands in config.json with its summary."""
    monkeypatch.setitem(registry._STEPS, "probe", Probe())
    for name in ("lewis", "align_heads"):  # record what ran before the probe
        step = get_step(name)
        monkeypatch.setattr(step, "apply", lambda run, options, step=step, real=step.apply: (
            Probe.ran.append(step.name), real(run, options))[1])
    Probe.ran.clear()
    recipe = parse_recipe(recipe_with(small, lewis=True, align_heads=True, probe={"scale": 2}))
    assert recipe.to_dict()["probe"] == {"scale": 2.0}
    with pytest.raises(Hm3Error, match=r"probe.scale: expected a positive number"):
        parse_recipe(recipe_with(small, probe={"scale": 0}))
    report = merge(recipe, tmp_path / "out", progress=False)
    assert report.label_free.steps["probe"] == ProbeReport(2.0, ["lewis"])  # before the heads
    assert list(report.label_free.steps) == ["lewis", "probe", "align_heads"]
    assert "  probe: scale 2.0 after lewis" in report.label_free.summary()
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["hm3"]["label_free"]
    assert saved["probe"] == {"scale": 2.0, "stages_before": ["lewis"],
                              "summary": "probe: scale 2.0 after lewis"}


def test_what_earlier_versions_saved_under_guided_is_still_read():
    old = {"heads": "whole", "calibration": {"spam": {"texts": 3, "sources": []}},
           "recentre": {"spam": {"shift": [0.1, -0.1], "target": [0.5, 0.5],
                                 "before": [1.0, 0.0], "after": [0.5, 0.5]}},
           "regmean": {"alpha": 1.0, "layers": 12}, "seconds": 4.0}
    assert saved_report({"guided": old}) is old and saved_report({}) is None
    summary = LabelFreeReport.from_dict(old).summary()
    assert "regmean: 12 linear layers (alpha 1.0)" in summary
    assert "recentre spam: largest label-share gap to the expert 50.0% -> 0.0%" in summary


# --- the recommended recipe -------------------------------------------------------------------

def test_the_label_free_preset_expands_and_the_recipes_own_keys_win(small):
    from hm3.recipe import PRESETS

    own = recipe_with(small, parameters={"lambda": 0.5})
    del own["method"]  # the preset's
    recipe = parse_recipe({"preset": "label-free", **own})
    preset = PRESETS["label-free"]
    assert recipe.method == preset["method"] == "tsv"
    assert recipe.parameters["lambda"] == 0.5 and preset["parameters"] == {"lambda": 1.0}
    assert parse_recipe({"preset": "label-free", **recipe_with(small)}).method == "ties"
    assert recipe.label_free.heads == preset["heads"]
    assert recipe.label_free.step("recentre") is not None
    assert recipe.label_free.step("align_heads").others == preset["align_heads"]["others"] > 0
    assert recipe.label_free.step("distill") == DistillOptions()
    without = parse_recipe({"preset": "label-free", **recipe_with(small, distill=False)})
    assert without.label_free.step("distill") is None
    written = recipe.to_dict()
    assert "preset" not in written and written["distill"] == get_step("distill").to_dict(
        recipe.label_free.step("distill"))
    # what the merged model records re-creates the same recipe without the preset
    again = parse_recipe({**written, "calibration": small.calibration})
    assert again.label_free == recipe.label_free and again.experts == recipe.experts


@pytest.mark.parametrize("raw, message", [
    ({"preset": "fast"}, r"preset: expected one of label-free, got 'fast'"),
    ({"preset": "label-free", "calibration": None},
     r"preset label-free runs label-free steps that read unlabelled texts: add a `calibration:`"),
])
def test_a_bad_preset_is_named(small, raw, message):
    base = recipe_with(small)
    if raw.get("calibration", True) is None:
        base.pop("calibration")
        raw = {"preset": raw["preset"]}
    with pytest.raises(Hm3Error, match=message):
        parse_recipe({**base, **raw})


def test_the_fidelity_from_the_head_inputs_is_that_of_a_forward_pass(small):
    from hm3.engine import build_model, open_sources
    from hm3.pipeline import calibrate, calibration_fidelity, merge_in_memory

    recipe = parse_recipe(recipe_with(small, align_heads=True, recentre=True))
    sources = open_sources(recipe)
    calibrated = calibrate(sources)
    model = build_model(sources)
    inputs: dict = {}
    sources, _ = merge_in_memory(model, sources, calibrated, head_inputs=inputs)
    assert set(inputs) == set(small.experts)
    fast = calibration_fidelity(model, sources, calibrated, inputs)["tasks"]
    slow = calibration_fidelity(model, sources, calibrated)["tasks"]
    for task, entry in slow.items():
        assert fast[task]["agreement"] == entry["agreement"]
        # float64 products of the head inputs against the model's float32 head: logits differ
        # by float32 rounding of a 33-term dot product (< 1e-5 here), probabilities by less
        assert fast[task]["mean_abs_dp"] == pytest.approx(entry["mean_abs_dp"], abs=1e-5)
