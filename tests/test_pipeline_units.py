"""The pipeline's bookkeeping without a merge: the label-free report as config.json holds it and
as the command line prints it, the held-out texts a recipe names, where the steps run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from hm3 import pipeline
from hm3.label_free.recentre import RecentreReport
from hm3.pipeline import (
    LabelFreeReport,
    StepsDone,
    check_steps,
    head_steps,
    merge_in_memory,
    recipe_held_out,
    step_device,
)
from hm3.recipe import parse_recipe

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
