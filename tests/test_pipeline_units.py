"""The pipeline's bookkeeping without a merge: the label-free report as config.json holds it and
as the command line prints it, the held-out texts a recipe names, where the steps run."""

from __future__ import annotations

import json

import pytest

from hm3.label_free.recentre import RecentreReport
from hm3.pipeline import LabelFreeReport, merge_in_memory, recipe_held_out, step_device
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
