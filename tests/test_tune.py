"""The `tune` step: the whole merged model trained on the experts' logits after the head steps,
on every architecture; what it trains and leaves; the head steps rerun on its body; a shared
sample taught in one pass; its recipe block."""

import pytest
import torch
import yaml
from test_distill import ENCODERS_WITH_HIDDEN_HEAD, TASKS, family_with_texts

from hm3 import Hm3Error, merge, parse_recipe
from hm3.engine import open_sources
from hm3.label_free import get_step, step_names
from hm3.label_free.calibration import expert_classifier, run_batches
from hm3.label_free.stream import NOTHING_TO_CORRECT
from hm3.label_free.tune import TuneOptions, _streams, _taught_by_all
from hm3.pipeline import calibrate

from conftest import recipe_dict
from test_label_free import tensors

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

HEAD_STEPS = {"align_heads": {"ridge": 0.1}, "recentre": True}


def tune_merge(fam, out, method="ties", parameters=None, heads=True, **tune):
    raw = recipe_dict(fam.base, fam.experts, method,
                      parameters={"density": 0.3} if parameters is None else parameters,
                      calibration=fam.calibration, **(HEAD_STEPS if heads else {}),
                      tune={"steps": 8, "lr": 1e-6, **tune})
    return merge(parse_recipe(raw), out, progress=False)


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "deberta-v2", "llama", "gpt2",
                                        *ENCODERS_WITH_HIDDEN_HEAD])
def test_tune_lowers_every_tasks_kl_to_its_expert(tmp_path, model_type):
    fam = family_with_texts(tmp_path, model_type)  # one task multi-label
    spread = model_type in ("bert", *ENCODERS_WITH_HIDDEN_HEAD)
    # a spread head (conftest.spread_head) multiplies the body's changes ~100-fold: smaller steps
    report = tune_merge(fam, tmp_path / "out", lr=1e-6 if spread else 1e-3,
                        heads=model_type not in ("llama", "gpt2"))  # no head bias to recentre
    entry = report.label_free.to_dict()["tune"]
    assert entry["steps"] == 8 and entry["blocks"] == 2 and entry["parameters"] > 0
    assert entry["kl_after"] < entry["kl_before"]
    assert "tune (" in report.label_free.summary()


def test_tuning_one_expert_into_itself_changes_nothing(tmp_path):
    fam = family_with_texts(tmp_path, tasks={"topic": TASKS["topic"]}, multi_label=())
    plain = merge(parse_recipe(recipe_dict(fam.base, fam.experts, "linear")), tmp_path / "plain",
                  progress=False)
    report = tune_merge(fam, tmp_path / "out", method="linear", parameters={}, heads=False)
    entry = report.label_free.to_dict()["tune"]
    # the merged model IS the expert: its KL is at rounding level, and no step is taken (Adam
    # would turn rounding noise into steps of its full learning rate)
    assert entry["kl_before"] < NOTHING_TO_CORRECT and entry["steps"] == 0
    before, after = tensors(plain.path), tensors(report.path)
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("blocks", [1, 0])
def test_tune_trains_the_last_blocks_and_what_follows_them_not_the_embeddings(tmp_path, blocks):
    fam = family_with_texts(tmp_path, multi_label=())
    plain = merge(parse_recipe(recipe_dict(fam.base, fam.experts, "ties",
                                           parameters={"density": 0.3})),
                  tmp_path / "plain", progress=False)
    tuned = tune_merge(fam, tmp_path / "out", heads=False, blocks=blocks)
    assert tuned.label_free.to_dict()["tune"]["blocks"] == (1 if blocks else 2)
    before, after = tensors(plain.path), tensors(tuned.path)

    def changed(prefix: str) -> bool:
        names = [n for n in before if n.startswith(prefix)]
        assert names, prefix
        return any(not torch.equal(before[n], after[n]) for n in names)

    assert not changed("bert.embeddings.")
    assert changed("bert.encoder.layer.0.") == (blocks == 0)
    assert changed("bert.encoder.layer.1.")
    assert changed("bert.pooler.") and changed("classifier.")


def test_the_head_steps_run_again_on_the_tuned_body(tmp_path, monkeypatch):
    fam = family_with_texts(tmp_path, multi_label=())
    ran = []
    for name in ("align_heads", "recentre", "tune"):
        step = get_step(name)
        monkeypatch.setattr(step, "apply", lambda run, options, step=step, real=step.apply: (
            ran.append(step.name), real(run, options))[1])
    report = tune_merge(fam, tmp_path / "out")
    assert ran == ["align_heads", "recentre", "tune", "align_heads", "recentre"]
    # the heads' cross-fitted figures are those of the refit on the tuned body
    assert report.label_free.fidelity["held_out"]["tasks"].keys() == fam.experts.keys()
    assert list(report.label_free.steps) == ["align_heads", "recentre", "tune"]


def test_a_shared_sample_is_one_stream_taught_by_every_expert(tmp_path):
    fam = family_with_texts(tmp_path, shared=True)
    entry = tune_merge(fam, tmp_path / "out").label_free.to_dict()["tune"]
    assert entry["kl_after"] < entry["kl_before"]
    shared = [{"input_ids": torch.zeros(2, 3)}, {"input_ids": torch.zeros(3, 3)}]
    own = [{"input_ids": torch.zeros(4, 3)}]
    groups = [type("G", (), {"name": n})() for n in ("a", "b", "c")]
    logits = {n: torch.zeros(1) for n in "abc"}
    streams = _streams(groups, {"a": shared, "b": own, "c": shared}, logits)
    assert [[g.name for g in s.tasks] for s in streams] == [["a", "c"], ["b"]]
    assert [s.offsets for s in streams] == [[0, 2, 5], [0, 4]]


def test_tune_is_deterministic(tmp_path):
    fam = family_with_texts(tmp_path, multi_label=())
    first = tensors(tune_merge(fam, tmp_path / "a").path)
    second = tensors(tune_merge(fam, tmp_path / "b").path)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_tune_runs_last_and_its_block_round_trips(tmp_path):
    fam = family_with_texts(tmp_path, multi_label=())
    assert step_names()[-1] == "tune" and get_step("tune").stage == "joint"
    recipe = parse_recipe(recipe_dict(fam.base, fam.experts, "ties",
                                      calibration=fam.calibration, tune=True))
    assert recipe.label_free.step("tune") == TuneOptions()
    assert recipe.to_dict()["tune"] == {"steps": 48, "lr": 1e-5, "blocks": 0, "teach": "own"}


@pytest.mark.parametrize("block, message", [
    ({"blocks": -1}, r"tune.blocks: expected a whole number of at least 0, got -1"),
    ({"blocks": 1.5}, r"tune.blocks: expected a whole number of at least 0, got 1.5"),
    ({"lr": 0}, r"tune.lr: expected a positive number"),
    ({"steps": 0}, r"tune.steps: expected a positive integer, got 0"),
    ({"teach": "some"}, r"tune.teach: expected one of own, all, got 'some'"),
])
def test_bad_tune_options_are_named(tmp_path, block, message):
    fam = family_with_texts(tmp_path, multi_label=())
    with pytest.raises(Hm3Error, match=message):
        parse_recipe(recipe_dict(fam.base, fam.experts, "ties", calibration=fam.calibration,
                                 tune=block))


def test_the_body_is_merged_before_the_heads_and_not_again_after_them(tmp_path, monkeypatch):
    """The method merges once, in its stage: the head steps find the merged body, and no later
    stage (joint included, when no step asks for it) merges over what they fitted."""
    fam = family_with_texts(tmp_path, multi_label=())
    plain = tensors(merge(parse_recipe(recipe_dict(fam.base, fam.experts, "ties",
                                                   parameters={"density": 0.3})),
                          tmp_path / "plain", progress=False).path)
    seen = {}
    step = get_step("align_heads")
    monkeypatch.setattr(step, "apply", lambda run, options, real=step.apply: (
        seen.update({k: v.clone() for k, v in run.model.state_dict().items()}),
        real(run, options))[1])
    raw = recipe_dict(fam.base, fam.experts, "ties", parameters={"density": 0.3},
                      calibration=fam.calibration, **HEAD_STEPS)
    after = tensors(merge(parse_recipe(raw), tmp_path / "heads", progress=False).path)
    body = [name for name in plain if not name.startswith("classifier.")]
    assert body and all(torch.equal(seen[name], plain[name]) for name in body)
    assert all(torch.equal(after[name], plain[name]) for name in body)
    assert not torch.equal(after["classifier.weight"], plain["classifier.weight"])


# --- every expert teaching on every task's texts (`teach: all`) -------------------------------

def calibrated_family(fam):
    sources = open_sources(parse_recipe(recipe_dict(fam.base, fam.experts, "ties",
                                                    calibration=fam.calibration, tune=True)))
    return sources, calibrate(sources)


def test_teach_all_gives_every_stream_every_experts_logits_on_its_texts(tmp_path):
    fam = family_with_texts(tmp_path, multi_label=())
    sources, calibrated = calibrated_family(fam)
    own = _streams(sources.groups, calibrated.batches, calibrated.expert_logits)
    streams = _taught_by_all(own, sources, "cpu", progress=False)
    names = [g.name for g in sources.groups]
    assert len(streams) == len(names) == 3
    for stream, task in zip(streams, names):
        assert [g.name for g in stream.tasks] == names
        assert stream.batches is calibrated.batches[task]
        assert stream.targets[task] is calibrated.expert_logits[task]  # not run again
    for spec, checkpoint in zip(sources.recipe.experts, sources.experts):
        expert = expert_classifier(checkpoint)
        with torch.no_grad():
            for stream in streams:
                expected = run_batches(expert, stream.batches)
                assert stream.targets[spec.task].shape == expected.shape
                torch.testing.assert_close(stream.targets[spec.task], expected, rtol=0, atol=0)
    assert [[g.name for g in s.tasks] for s in own] == [[n] for n in names]  # left as they were


def test_teach_all_on_a_shared_sample_runs_no_expert_again(tmp_path, monkeypatch):
    fam = family_with_texts(tmp_path, multi_label=(), shared=True)
    sources, calibrated = calibrated_family(fam)
    own = _streams(sources.groups, calibrated.batches, calibrated.expert_logits)
    monkeypatch.setattr("hm3.label_free.calibration.expert_classifier",
                        lambda *a: pytest.fail("an expert was run again"))
    assert _taught_by_all(own, sources, "cpu", progress=False) is own


def test_teach_all_tunes_on_the_other_tasks_texts_too(tmp_path):
    fam = family_with_texts(tmp_path)  # one task multi-label
    alone = tune_merge(fam, tmp_path / "own", heads=False)
    taught = tune_merge(fam, tmp_path / "all", heads=False, teach="all")
    entry = taught.label_free.to_dict()["tune"]
    assert entry["kl_after"] < entry["kl_before"]
    # the first batches' KL now also counts every expert on the other tasks' texts
    assert entry["kl_before"] != alone.label_free.to_dict()["tune"]["kl_before"]
    first, second = tensors(alone.path), tensors(taught.path)
    assert any(not torch.equal(first[name], second[name]) for name in first)
    written = yaml.safe_load((taught.path / "hm3_recipe.yaml").read_text())
    assert written["tune"]["teach"] == "all"
