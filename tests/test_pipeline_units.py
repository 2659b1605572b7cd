"""The pipeline's bookkeeping: the label-free report as config.json holds it and as the command
line prints it, the held-out texts a recipe names, where the steps run; the stages in order with
stand-in steps (what merges when, what each step is handed); and, on a tiny model, the head steps
alone against the merge's own, `calibrate` and what `label_free_model` reports."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from hm3 import pipeline
from hm3.check import CALIBRATION_TEXTS
from hm3.data.calibration import Calibration, text_hash
from hm3.engine import TaskVectorSquares, build_model, merge_into, open_sources
from hm3.errors import Hm3Error, Hm3Warning
from hm3.label_free.heads_stage import FOLDS
from hm3.label_free.lewis import LewisScores
from hm3.label_free.recentre import RecentreReport
from hm3.pipeline import (
    LabelFreeReport,
    StepsDone,
    calibrate,
    calibration_fidelity,
    check_steps,
    head_steps,
    label_free_model,
    merge,
    merge_in_memory,
    recipe_held_out,
    step_device,
    warn_low_held_out,
)
from hm3.recipe import parse_recipe

from conftest import WORDS, build_family, logits_tolerance, random_texts, recipe_dict

CALIBRATION = {"tone": {"texts": 40, "sources": [
                   {"path": "tone.txt", "shared": False, "texts": 30},
                   {"path": "traffic.txt", "shared": True, "texts": 10}]},
               "tags": {"texts": 12, "sources": [
                   {"path": "traffic.txt", "shared": True, "texts": 12},
                   {"path": "empty.txt", "shared": True, "texts": 0}]}}
RECENTRE = RecentreReport({"tone": {"before": [0.9, 0.1], "after": [0.55, 0.45],
                                    "target": [0.5, 0.5], "shift": [0.1, -0.1]}})
FIDELITY = {"tasks": {"tone": {"agreement": 0.9251}, "tags": {"agreement": 0.5}},
            "held_out": {"folds": 4, "tasks": {"tone": {"agreement": 0.875},
                                               "tags": {"agreement": 0.25}}}}


def test_the_summary_gives_the_texts_the_shared_sample_each_step_and_both_agreements():
    report = LabelFreeReport("whole", CALIBRATION, 64, {"recentre": RECENTRE}, FIDELITY,
                             cpu_seconds=3.0, seconds=12.4)
    assert report.summary().splitlines() == [
        "label-free steps (12s): heads whole; calibration texts: tone 40, tags 12",
        "  shared calibration sample (read by every task): traffic.txt",
        "  recentre tone: largest label-share gap to the expert 40.0% -> 5.0%",
        "  agreement with the experts on the calibration texts (optimistic, fitted there; run "
        "`hm3 check` on other texts): tone 92.5%, tags 50.0%",
        "  the same with the head steps fitted without each text (4-fold): tone 87.5%, "
        "tags 25.0%"]


def test_a_summary_without_shared_texts_steps_or_figures_is_one_line():
    own = {"tone": {"texts": 5, "sources": [{"path": "tone.txt", "shared": False, "texts": 5}]}}
    report = LabelFreeReport("merge", own, 32, {}, None, seconds=0.4)
    assert report.summary() == "label-free steps (0s): heads merge; calibration texts: tone 5"
    no_held_out = LabelFreeReport("merge", own, 32, {}, {"tasks": {"tone": {"agreement": 1.0}}})
    assert no_held_out.summary().splitlines()[1:] == [
        "  agreement with the experts on the calibration texts (optimistic, fitted there; run "
        "`hm3 check` on other texts): tone 100.0%"]


def test_the_report_as_config_json_holds_it_and_back():
    report = LabelFreeReport("whole", CALIBRATION, 64, {"recentre": RECENTRE}, FIDELITY,
                             cpu_seconds=3.0, seconds=12.4, calibration_hashes={"tone": ["ab"]})
    entry = json.loads(json.dumps(report.to_dict()))
    assert list(entry) == ["heads", "calibration", "max_length", "recentre", "fidelity",
                           "cpu_seconds", "seconds"]
    assert entry["recentre"] == {"tasks": RECENTRE.tasks, "summary": RECENTRE.summary()}
    assert (entry["heads"], entry["max_length"], entry["cpu_seconds"], entry["seconds"]) == (
        "whole", 64, 3.0, 12.4)
    back = LabelFreeReport.from_dict(entry)
    assert back == LabelFreeReport("whole", CALIBRATION, 64, {"recentre": RECENTRE}, FIDELITY,
                                   3.0, 12.4)
    assert back.calibration_hashes == {}  # written beside config.json, not in it
    without = LabelFreeReport("merge", {}, 8, {}).to_dict()
    assert without == {"heads": "merge", "calibration": {}, "max_length": 8,
                       "cpu_seconds": 0.0, "seconds": 0.0}


def test_a_report_of_an_earlier_version_reads_with_defaults():
    assert LabelFreeReport.from_dict({}) == LabelFreeReport("whole", {}, 0, {}, None, 0.0, 0.0)


def test_the_held_out_texts_are_each_tasks_test_and_validation_texts(tmp_path):
    rows = lambda texts: "".join(json.dumps({"text": t, "label": "x"}) + "\n"  # noqa: E731
                                 for t in texts)
    (tmp_path / "a.jsonl").write_text(rows(["a test 1", "a test 2"]))
    (tmp_path / "a-dev.jsonl").write_text(rows(["a dev"]))
    (tmp_path / "b.jsonl").write_text(rows(["b test"]))
    recipe = parse_recipe({"base": "org/base", "experts": [
        {"model": "org/a", "task": "a"}, {"model": "org/b", "task": "b"}],
        "data": {"a": {"path": "a.jsonl", "validation": "a-dev.jsonl"}, "b": "b.jsonl"}},
        root=tmp_path)
    assert recipe_held_out(recipe) == {"a": ["a test 1", "a test 2", "a dev"], "b": ["b test"]}
    assert recipe_held_out(parse_recipe({"base": "org/base", "experts": [
        {"model": "org/a", "task": "a"}]})) == {}


def test_the_steps_run_on_the_cpu_unless_a_device_is_named():
    assert step_device(None) == "cpu"
    assert step_device("cpu") == "cpu"
    with pytest.raises(Exception, match="nope"):
        step_device("nope")


def test_label_free_steps_without_calibration_are_a_programming_error():
    recipe = parse_recipe({"base": "org/base", "experts": [{"model": "org/a", "task": "a"}],
                           "recentre": True, "calibration": {"texts": "t.txt"}})

    class Sources:
        pass

    sources = Sources()
    sources.recipe = recipe
    with pytest.raises(ValueError, match=r"^the recipe's label-free steps need "
                                         r"`calibrate\(sources\)` first$"):
        merge_in_memory(None, sources, None)


# --- the stages, with stand-in steps: what runs when, on what ------------------------------------

class StandIn:
    """A registered step's stand-in: records each call in `events` and returns a report naming
    itself; a densities stand-in replaces the sources, as LEWIS does."""

    def __init__(self, name: str, stage: str, events: list, replaces=None):
        self.name, self.stage, self.events, self.replaces = name, stage, events, replaces

    def check(self, sources, options):
        self.events.append(("check", self.name, sources.tag, options))

    def apply(self, run, options):
        self.events.append((self.name, run.model, run.sources.tag, options, run.progress,
                            run.squares, run.head_inputs))
        if self.replaces is not None:
            run.sources = self.replaces
        return f"{self.name} report"


def stand_ins(monkeypatch, stages: dict[str, str]):
    """Sources whose recipe asks for a stand-in step per (name: stage), in that order, with the
    merge, the head inputs and the cross-fitting recorded instead of run; returns (sources, the
    sources a densities step replaces them with, the events list)."""
    events: list = []

    def recipe_sources(tag):
        label_free = SimpleNamespace(steps=tuple((name, f"{name} options") for name in stages))
        return SimpleNamespace(recipe=SimpleNamespace(label_free=label_free), tag=tag,
                               groups=[SimpleNamespace(name="t")])

    sources, overridden = recipe_sources("as given"), recipe_sources("with overrides")
    steps = {name: StandIn(name, stage, events, overridden if stage == "densities" else None)
             for name, stage in stages.items()}
    monkeypatch.setattr(pipeline, "get_step", lambda name: steps[name])
    monkeypatch.setattr(pipeline, "merge_into", lambda model, sources, progress, squares:
                        events.append(("merge", model, sources.tag, progress, squares)))
    monkeypatch.setattr(pipeline, "head_inputs", lambda model, sources, batches: (
        events.append(("head inputs", model, sources.tag, batches)),
        {"t": f"inputs {len(events)}"})[1])
    monkeypatch.setattr(pipeline, "head_rows", lambda model, sources, group: (
        events.append(("rows before", model, sources.tag, group.name)), "rows")[1])
    monkeypatch.setattr(pipeline, "held_out_figures", lambda groups, inputs, logits, starts, ran,
                        folds: (events.append(("cross-fit", [g.name for g in groups], inputs,
                                               logits, starts, [r[2] for r in ran], folds)),
                                {"folds": folds})[1])
    return sources, overridden, events


CALIBRATED = SimpleNamespace(batches="batches", expert_logits="logits")


def test_the_stages_run_in_order_and_the_method_merges_once_between_densities_and_body(
        monkeypatch):
    """Steps run by stage whatever their order in the recipe; the method merges once, after the
    densities step (with its overrides) and before the body step, and no stage without steps
    merges again over what the head steps fitted."""
    sources, overridden, events = stand_ins(monkeypatch, {
        "heads 1": "heads", "body": "body", "densities": "densities", "heads 2": "heads"})
    squares, inputs = object(), {}
    final, done = merge_in_memory("model", sources, CALIBRATED, progress=True, held_out_folds=3,
                                  head_inputs=inputs, squares=squares)
    ran = lambda name, on, head_inputs=None: (  # noqa: E731
        name, "model", on, f"{name} options", True, squares, head_inputs)
    assert events == [ran("densities", "as given"),
                      ("merge", "model", "with overrides", True, squares),
                      ran("body", "with overrides"),
                      ("head inputs", "model", "with overrides", "batches"),
                      ("rows before", "model", "with overrides", "t"),
                      ran("heads 1", "with overrides", {"t": "inputs 4"}),
                      ran("heads 2", "with overrides", {"t": "inputs 4"}),
                      ("cross-fit", ["t"], {"t": "inputs 4"}, "logits", {"t": "rows"},
                       ["heads 1 report", "heads 2 report"], 3)]
    assert final is overridden
    assert list(done.reports) == ["densities", "body", "heads 1", "heads 2"]
    assert done.reports["body"] == "body report"
    assert done.held_out == {"folds": 3}
    assert inputs == {"t": "inputs 4"}


def test_without_head_steps_or_folds_nothing_is_cross_fitted_and_the_merge_is_quiet(monkeypatch):
    sources, _, events = stand_ins(monkeypatch, {"body": "body", "heads": "heads"})
    _, done = merge_in_memory("model", sources, CALIBRATED)
    assert [e[0] for e in events] == ["merge", "body", "head inputs", "heads"]
    assert events[0] == ("merge", "model", "as given", False, None)
    assert events[1][4:6] == (False, None)  # progress off, no squares asked for
    assert done.held_out is None
    sources, _, events = stand_ins(monkeypatch, {})
    _, done = merge_in_memory("model", sources, None)  # no steps: no calibration needed
    assert events == [("merge", "model", "as given", False, None)] and done.reports == {}


def test_a_merge_stage_step_merges_the_body_instead_of_the_method(monkeypatch):
    sources, _, events = stand_ins(monkeypatch, {"heads": "heads", "coefficients": "merge",
                                                 "body": "body"})
    merge_in_memory("model", sources, CALIBRATED)
    assert [e[0] for e in events] == ["coefficients", "body", "head inputs", "heads"]


def test_after_a_joint_step_the_head_steps_run_again_and_only_then_are_cross_fitted(
        monkeypatch):
    sources, _, events = stand_ins(monkeypatch, {"heads": "heads", "tune": "joint"})
    inputs = {}
    _, done = merge_in_memory("model", sources, CALIBRATED, held_out_folds=4,
                              head_inputs=inputs)
    assert [e[0] for e in events] == ["merge", "head inputs", "heads", "tune", "head inputs",
                                      "rows before", "heads", "cross-fit"]
    assert events[-1][-1] == 4
    assert inputs == {"t": "inputs 5"}  # what the heads read on the body the joint step left
    assert list(done.reports) == ["heads", "tune"] and done.held_out == {"folds": 4}


def test_head_steps_run_only_the_head_stage_on_the_model_as_it_is(monkeypatch):
    sources, _, events = stand_ins(monkeypatch, {
        "densities": "densities", "body": "body", "heads 1": "heads", "tune": "joint",
        "heads 2": "heads"})
    done = head_steps("model", sources, CALIBRATED)
    assert [e[0] for e in events] == ["head inputs", "heads 1", "heads 2"]
    assert events[1][1:3] == ("model", "as given")
    assert list(done.reports) == ["heads 1", "heads 2"] and done.held_out is None
    events.clear()
    inputs = {}
    done = head_steps("model", sources, CALIBRATED, held_out_folds=2, inputs_out=inputs)
    assert [e[0] for e in events] == ["head inputs", "rows before", "heads 1", "heads 2",
                                      "cross-fit"]
    assert events[-1][-1] == 2 and done.held_out == {"folds": 2}
    assert inputs == {"t": "inputs 1"}
    sources, _, events = stand_ins(monkeypatch, {"body": "body"})
    assert head_steps("model", sources, CALIBRATED) == StepsDone() and events == []


def test_each_step_checks_its_own_options_before_any_work(monkeypatch):
    sources, _, events = stand_ins(monkeypatch, {"lewis": "densities", "recentre": "heads"})
    check_steps(sources)
    assert events == [("check", "lewis", "as given", "lewis options"),
                      ("check", "recentre", "as given", "recentre options")]


# --- the steps on a tiny model ----------------------------------------------------------------

TASKS = {"sentiment": ["negative", "positive"], "topic": ["news", "sport", "film"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny family and a recipe with both head steps: sentiment reads 12 texts of its own (the
    limit), topic 12 of a shared sample; heads merged like the body, texts cut at 24 tokens."""
    root = tmp_path_factory.mktemp("pipeline")
    base, experts = build_family(root, TASKS)
    texts = random_texts(36, seed=5)
    (root / "own.txt").write_text("\n".join(texts[:12]) + "\n")
    (root / "traffic.txt").write_text("\n".join(texts[12:]) + "\n")
    raw = recipe_dict(base, experts, "ties", parameters={"density": 0.5}, heads="merge",
                      align_heads=True, recentre=True,
                      calibration={"texts": {"sentiment": str(root / "own.txt")},
                                   "shared": str(root / "traffic.txt"), "limit": 12,
                                   "max_length": 24, "batch_size": 5})
    return SimpleNamespace(root=root, base=base, experts=experts, texts=texts, raw=raw)


def test_head_steps_on_the_merged_model_do_what_the_merge_in_memory_does(tiny, one_thread):
    sources = open_sources(parse_recipe(tiny.raw))
    with pytest.warns(Hm3Warning, match="only 12"):  # few texts: fine for a tiny model
        calibrated = calibrate(sources)
    by_hand = build_model(sources)
    merge_into(by_hand, sources)
    merged = {name: tensor.clone() for name, tensor in by_hand.state_dict().items()}
    inputs_by_hand: dict = {}
    by_hand_done = head_steps(by_hand, sources, calibrated, held_out_folds=3,
                              inputs_out=inputs_by_hand)
    model, inputs = build_model(sources), {}
    _, done = merge_in_memory(model, sources, calibrated, held_out_folds=3, head_inputs=inputs)
    assert list(done.reports) == ["align_heads", "recentre"]
    assert by_hand_done.reports == done.reports and by_hand_done.held_out == done.held_out
    assert done.held_out["folds"] == 3 and set(done.held_out["tasks"]) == set(TASKS)
    assert set(inputs) == set(TASKS)
    assert all(torch.equal(inputs_by_hand[task], inputs[task]) for task in TASKS)
    state = model.state_dict()
    assert all(torch.equal(by_hand.state_dict()[name], state[name]) for name in state)
    head = sources.heads[0]
    assert not torch.equal(state[head.weight], merged[head.weight])  # the steps refitted it
    assert all(torch.equal(state[name], merged[name]) for name in state
               if not name.startswith("classifier."))  # ... and nothing of the body
    # the fidelity block: from the head inputs as from a pass of the whole model, the experts'
    # logits recomputed when not kept
    from_inputs = calibration_fidelity(model, sources, calibrated, inputs)
    assert {key: from_inputs[key] for key in ("texts", "optimistic", "note")} == {
        "texts": "calibration", "optimistic": True,
        "note": "measured on the texts the label-free steps were fitted to, so optimistic; run "
                "`hm3 check` on texts the merge has not seen"}
    whole_pass = calibration_fidelity(model, sources, replace(calibrated, expert_logits=None))
    for task in TASKS:
        assert from_inputs["tasks"][task]["n"] == 12
        assert from_inputs["tasks"][task] == pytest.approx(whole_pass["tasks"][task], abs=1e-5)


def test_calibrate_reads_given_texts_with_the_experts_tokenizer_and_runs_only_what_is_asked(
        tiny, one_thread, capfd):
    from transformers import AutoModelForSequenceClassification

    sources = open_sources(parse_recipe(tiny.raw))
    expert = AutoModelForSequenceClassification.from_pretrained(tiny.experts["sentiment"]).eval()
    given = Calibration({"sentiment": ["good film", "bad film today", "free money"],
                         "topic": ["sport news"]}, {"sentiment": {"texts": 3},
                                                    "topic": {"texts": 1}})
    capfd.readouterr()
    calibrated = calibrate(sources, calibration=given, device="cpu:0")
    assert capfd.readouterr().err == ""  # no progress bars unless asked for
    assert calibrated.calibration is given and calibrated.device == "cpu:0"
    vocabulary = {word: i for i, word in enumerate(WORDS, start=5)}
    assert calibrated.tokenizer("good film")["input_ids"] == [
        2, vocabulary["good"], vocabulary["film"], 3]
    assert [len(b["input_ids"]) for b in calibrated.batches["sentiment"]] == [3]
    assert calibrated.lewis is None  # no step of the recipe needs LEWIS's importances
    # the logits come in the batches' order: the texts by length
    encoded = calibrated.tokenizer(["good film", "free money", "bad film today"], padding=True,
                                   return_tensors="pt")
    with torch.no_grad():
        expected = expert(**encoded).logits
    assert calibrated.expert_logits["sentiment"].shape == (3, 2)
    assert calibrated.expert_logits["topic"].shape == (1, 3)
    assert torch.allclose(calibrated.expert_logits["sentiment"], expected,
                          atol=logits_tolerance(expert, **encoded), rtol=0)
    bare = calibrate(sources, calibration=given, expert_logits=False)
    assert bare.expert_logits is None and bare.lewis is None and bare.device == "cpu"
    scored = calibrate(sources, calibration=given, expert_logits=False, lewis_scores=True)
    assert isinstance(scored.lewis, LewisScores) and scored.expert_logits is None
    with_lewis = open_sources(parse_recipe({**tiny.raw, "lewis": {}}))
    assert isinstance(calibrate(with_lewis, calibration=given, expert_logits=False).lewis,
                      LewisScores)  # the recipe's steps need them: measured by default
    assert capfd.readouterr().err == ""
    with pytest.warns(Hm3Warning, match="1 also appear"):
        read = calibrate(sources, held_out={"sentiment": [tiny.texts[12].upper()]},
                         expert_logits=False)
    assert read.calibration.texts["topic"] == tiny.texts[13:25]  # held out of every task


def test_label_free_model_reports_the_recipe_the_calibration_and_the_task_vectors(
        tiny, one_thread, monkeypatch, capfd):
    """The report holds the recipe's head mode and max_length, where each task's texts came from
    and their hashes; the held-out warning is told which tasks read the shared sample; the task
    vectors' sizes reach the caller as a plain merge measures them."""
    sources = open_sources(parse_recipe(tiny.raw))
    told = []
    monkeypatch.setattr(pipeline, "warn_low_held_out",
                        lambda held_out, shared: told.append((held_out, shared)))
    squares = TaskVectorSquares.zeros(2)
    capfd.readouterr()
    started = time.process_time(), time.perf_counter()
    with pytest.warns(Hm3Warning, match="only 12"):
        model, final, report = label_free_model(sources, squares=squares,
                                                held_out={"topic": [tiny.texts[12]]})
    cpu, wall = time.process_time() - started[0], time.perf_counter() - started[1]
    assert capfd.readouterr().err == ""  # no progress bars unless asked for
    # the seconds recorded, to a tenth, are those of the call
    assert isinstance(report.cpu_seconds, float) and isinstance(report.seconds, float)
    assert 0 < report.cpu_seconds <= cpu + 0.05 and 0 < report.seconds <= wall + 0.05
    assert report.cpu_seconds == round(report.cpu_seconds, 1)
    assert report.seconds == round(report.seconds, 1)
    assert final.recipe == sources.recipe
    assert (report.heads, report.max_length) == ("merge", 24)
    own, traffic = str(tiny.root / "own.txt"), str(tiny.root / "traffic.txt")
    assert {task: (entry["path"], entry["texts"], entry["sources"])
            for task, entry in report.calibration.items()} == {
        "sentiment": (own, 12, [{"path": own, "shared": False, "texts": 12},
                                {"path": traffic, "shared": True, "texts": 0}]),
        "topic": (traffic, 12, [{"path": traffic, "shared": True, "texts": 12}])}
    assert report.calibration["topic"]["held_out_removed"] == 1
    assert report.calibration_hashes == {
        "sentiment": [text_hash(t) for t in tiny.texts[:12]],
        "topic": [text_hash(t) for t in tiny.texts[13:25]]}
    assert list(report.steps) == ["align_heads", "recentre"]
    assert report.fidelity["held_out"]["folds"] == FOLDS
    assert told == [(report.fidelity["held_out"], {"topic"})]
    plain = TaskVectorSquares.zeros(2)
    merge_into(build_model(sources), sources, squares=plain)
    assert squares.tau == pytest.approx(plain.tau) and squares.base == pytest.approx(plain.base)
    assert min(squares.tau) > 0
    given = Calibration({"sentiment": tiny.texts[:6], "topic": tiny.texts[6:12]},
                        {"sentiment": {"texts": 6}, "topic": {"texts": 6}})
    told.clear()
    _, _, report = label_free_model(sources, calibration=given)
    assert report.calibration == given.provenance
    assert report.calibration_hashes["topic"] == [text_hash(t) for t in tiny.texts[6:12]]
    assert told[0][1] == set()  # no task read a shared sample


# --- reports of earlier versions, the held-out warnings' words, a recipe's own tasks -------------

def test_a_report_of_an_earlier_version_without_sources_reads_and_summarises():
    report = LabelFreeReport.from_dict({"heads": "merge", "calibration": {"tone": {"texts": 5}},
                                        "max_length": 32})
    assert (report.heads, report.max_length) == ("merge", 32)
    assert report.summary() == "label-free steps (0s): heads merge; calibration texts: tone 5"


def test_the_held_out_warnings_name_every_low_task_with_its_bar_and_what_to_do():
    held_out = {"tasks": {"tone": {"agreement": 0.8}, "spam": {"agreement": 0.5},
                          "topic": {"agreement": 0.7}, "tags": {"agreement": 0.55},
                          "lang": {"agreement": 0.95}}}
    with pytest.warns(Hm3Warning) as record:
        warn_low_held_out(held_out, shared={"topic", "tags", "lang"})
    assert [str(w.message) for w in record] == [
        "held out from the head steps, the merged model agrees with the expert on less than "
        "90% of calibration texts for tone 80.0%, spam 50.0%: more calibration texts of those "
        "tasks' own domain may help; run `hm3 check` on other texts before deploying",
        "held out from the head steps, the merged model agrees with the expert on less than "
        "60% of the shared calibration sample for tags 55.0%: texts outside a task's domain "
        "count there too, but this is low; run `hm3 check` on texts of those tasks' own domain "
        "before deploying, or calibrate them on such texts (`texts: {TASK: FILE}`)"]


def test_a_recipe_changed_in_code_has_its_data_tasks_checked_again(tmp_path):
    """`recipe_held_out` reads the data block against the recipe's tasks: a block naming another
    task (put there after parsing) is an error, not texts held out for nobody."""
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "c test", "label": "x"}) + "\n")
    recipe = parse_recipe({"base": "org/base", "experts": [
        {"model": "org/a", "task": "a"}, {"model": "org/b", "task": "b"}]}, root=tmp_path)
    with pytest.raises(Hm3Error, match=r"^data\.c: unknown task 'c'; known tasks are a, b$"):
        recipe_held_out(replace(recipe, data={"c": "c.jsonl"}))


def test_merge_writes_the_steps_model_and_reports_what_it_wrote(tiny, tmp_path, one_thread,
                                                                  capfd):
    """A label-free merge writes the model its steps left (the body as the plain merge's, the
    head refitted), the hashes of its calibration texts, and reports its folder, tensor count,
    seconds and each expert's task-vector size as the plain merge measures it."""
    steps = ("align_heads", "recentre", "calibration")
    plain_recipe = parse_recipe({k: v for k, v in tiny.raw.items() if k not in steps})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no calibration block, nothing to warn about
        plain = merge(plain_recipe, tmp_path / "plain", progress=False)
    capfd.readouterr()
    started = time.perf_counter()
    with pytest.warns(Hm3Warning, match="only 12"):
        report = merge(parse_recipe(tiny.raw), tmp_path / "steps", progress=False)
    wall = time.perf_counter() - started
    assert capfd.readouterr().err == ""
    assert report.path == (tmp_path / "steps").resolve() and 0 < report.seconds <= wall
    written = load_file(str(tmp_path / "steps" / "model.safetensors"))
    assert report.tensors == plain.tensors == len(written)
    plain_written = load_file(str(tmp_path / "plain" / "model.safetensors"))
    sources = open_sources(parse_recipe(tiny.raw))
    with pytest.warns(Hm3Warning, match="only 12"):
        model, _, _ = label_free_model(sources)
    head = sources.heads[0]
    assert torch.equal(written[head.weight], model.state_dict()[head.weight])
    assert not torch.equal(written[head.weight], plain_written[head.weight])
    assert all(torch.equal(written[name], plain_written[name]) for name in written
               if not name.startswith("classifier."))
    # |expert - base| / |base| over the base's tensors, from the files
    base = load_file(str(tiny.base / "model.safetensors"))
    by_hand = {}
    for task, folder in tiny.experts.items():
        expert = load_file(str(folder / "model.safetensors"))
        tau = sum(float((expert[f"bert.{name}"] - base[name]).double().pow(2).sum())
                  for name in base)
        by_hand[task] = (tau / sum(float(t.double().pow(2).sum()) for t in base.values())) ** 0.5
    assert plain.task_vector_norms == pytest.approx(by_hand, rel=1e-4)
    assert report.task_vector_norms == pytest.approx(by_hand, rel=1e-4)
    assert json.loads((tmp_path / "steps" / CALIBRATION_TEXTS).read_text()) == {
        "hash": "sha256 of the case-folded, whitespace-collapsed text, first 16 hex digits",
        "tasks": report.label_free.calibration_hashes}
    with pytest.raises(Hm3Error, match="already exists"):
        merge(plain_recipe, tmp_path / "plain", progress=False)
    capfd.readouterr()
    again = merge(plain_recipe, tmp_path / "plain", overwrite=True)
    assert again.task_vector_norms == plain.task_vector_norms
    assert "merging" in capfd.readouterr().err  # progress shown unless turned off
