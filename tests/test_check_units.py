"""`hm3 check`'s pieces without a model: verdicts against thresholds, the printed table and
lines, which expert answers which task, the calibration overlap and the expert's labels, all on
hand-written reports."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from hm3.check import (
    CALIBRATION_TEXTS,
    calibration_overlap,
    check,
    check_expert_groups,
    check_model,
    compare_logits,
    compare_task,
    expert_paths,
    format_check,
    parse_thresholds,
    verdicts,
)
from hm3.data.calibration import text_hash
from hm3.errors import Hm3Error
from hm3.heads import TaskGroup
from hm3.model import MultiTaskClassifier


def _report() -> dict:
    return {"texts": 12, "unchecked": [], "tasks": {
        "a": {"n": 12, "multi_label": False, "agreement": 0.8, "drift": 0.2, "mean_abs_dp": 0.05,
              "confident_agreement": 0.95, "confident_n": 10, "weighted_agreement": None,
              "surest_agreement": 0.7, "surest_n": 3,
              "expert_shares": {"x": 0.5, "y": 0.5}, "merged_shares": {"x": 0.75, "y": 0.25},
              "flips": [{"from": "y", "to": "x", "count": 3}]},
        "b": {"n": 12, "multi_label": True, "agreement": 0.9, "drift": 0.1, "mean_abs_dp": 0.125,
              "confident_agreement": None, "confident_n": 0, "weighted_agreement": 0.96,
              "surest_agreement": None, "surest_n": 3,
              "label_agreement": {"p": 1.0, "q": 0.9}, "exact_agreement": 0.875,
              "expert_shares": {"p": 0.25, "q": 0.5}, "merged_shares": {"p": 0.25, "q": 0.4},
              "flips": [{"label": "q", "on_to_off": 1, "off_to_on": 0}]}}}


def test_every_text_counts_by_default_and_a_task_at_its_minimum_passes():
    report = verdicts(_report(), {"a": 0.9, "b": 0.9})
    a, b = report["tasks"]["a"], report["tasks"]["b"]
    assert report["counted"] == "all" and report["passed"] is False
    assert a["passed"] is False and a["reasons"] == ["agreement 80.0% < 90.0%"]
    assert a["verdict_agreement"] == 0.8 and a["min_agreement"] == 0.9
    assert b["passed"] is True and b["reasons"] == []  # 0.9 is not below 0.9
    assert "max_drift" not in a


def test_confident_weighted_and_surest_counts_fall_back_to_all_where_there_is_none():
    confident = verdicts(_report(), {"a": 0.9, "b": 0.95}, count="confident")
    assert confident["tasks"]["a"]["verdict_agreement"] == 0.95
    assert confident["tasks"]["a"]["passed"] is True
    assert confident["tasks"]["b"]["reasons"] == ["agreement 90.0% < 95.0%"]  # none: all texts
    weighted = verdicts(_report(), {"a": 0.9, "b": 0.97}, count="weighted")
    assert weighted["tasks"]["a"]["reasons"] == ["agreement 80.0% < 90.0%"]
    assert weighted["tasks"]["b"]["reasons"] == [
        "agreement weighted by the expert's confidence 96.0% < 97.0%"]
    surest = verdicts(_report(), {"a": 0.75, "b": 0.95}, count="surest")
    assert surest["tasks"]["a"]["reasons"] == [
        "agreement on the 3 texts the expert is surest of 70.0% < 75.0%"]
    assert surest["tasks"]["b"]["verdict_agreement"] == 0.9
    sure = verdicts(_report(), {"a": 0.99, "b": 0.5}, count="confident")
    assert sure["tasks"]["a"]["reasons"] == [
        "agreement on the 10 texts the expert is sure of 95.0% < 99.0%"]
    assert sure["passed"] is False and sure["counted"] == "confident"


def test_per_label_verdicts_take_the_per_label_agreement_of_the_texts_counted():
    report = _report()
    report["tasks"]["a"].update(balanced_agreement=0.7, domain_n=5, domain_agreement=1.0,
                                domain_balanced_agreement=0.85)
    report["tasks"]["b"].update(balanced_agreement=0.92, domain_n=0, domain_agreement=None,
                                domain_balanced_agreement=None)
    every = verdicts(report, {"a": 0.75, "b": 0.9}, per_label=True)
    assert every["per_label"] is True and every["counted"] == "all"
    assert every["tasks"]["a"]["reasons"] == ["agreement per label 70.0% < 75.0%"]
    assert every["tasks"]["a"]["verdict_counted"] == "per label on all 12 texts"
    assert every["tasks"]["b"]["verdict_agreement"] == 0.92 and every["tasks"]["b"]["passed"]
    out = format_check(every)
    assert "a: the verdict counted per label on all 12 texts: 70.0%\n" in out
    assert "verdict (per label the expert gives, on every text): FAIL (a)" in out
    domain = verdicts(report, {"a": 0.9, "b": 0.95}, count="domain", per_label=True)
    a, b = domain["tasks"]["a"], domain["tasks"]["b"]
    assert a["reasons"] == ["agreement per label on the 5 texts in the task's domain 85.0% "
                            "< 90.0%"]
    assert a["verdict_counted"] == "per label on the 5 texts in the task's domain"
    # no text in b's domain: the per-label agreement of every text
    assert b["verdict_agreement"] == 0.92 and b["reasons"] == ["agreement per label 92.0% < 95.0%"]
    assert verdicts(report, {"a": 0.9, "b": 0.9}, count="domain")["tasks"]["a"]["passed"]
    with pytest.raises(Hm3Error, match="^--per-label works with --count all, typical, domain, "
                                       "not --count surest "):
        verdicts(report, {"a": 0.9, "b": 0.9}, count="surest", per_label=True)


def test_all_tasks_passing_pass_the_report():
    assert verdicts(_report(), {"a": 0.8, "b": 0.0})["passed"] is True


def test_drift_fails_a_task_only_above_the_largest_allowed():
    report = verdicts(_report(), {"a": 0.0, "b": 0.0}, max_drift=0.1)
    a, b = report["tasks"]["a"], report["tasks"]["b"]
    assert a["reasons"] == ["drift 0.200 > 0.100"] and a["max_drift"] == 0.1
    assert b["passed"] is True and b["max_drift"] == 0.1  # 0.1 is not above 0.1
    both = verdicts(_report(), {"a": 0.9, "b": 0.0}, max_drift=0.15)["tasks"]["a"]
    assert both["reasons"] == ["agreement 80.0% < 90.0%", "drift 0.200 > 0.150"]


def test_an_unknown_count_is_refused():
    with pytest.raises(Hm3Error, match="^--count: expected one of all, confident, weighted, "
                                       "surest, typical, domain, got 'most'$"):
        verdicts(_report(), {"a": 0.9, "b": 0.9}, count="most")


def test_check_model_refuses_a_bad_count_before_it_reads_any_model(tmp_path):
    missing = tmp_path / "no-model-here"  # reading it would fail with another error
    with pytest.raises(Hm3Error, match="^--count: expected one of"):
        check_model(missing, ["a text"], count="most")
    with pytest.raises(Hm3Error, match="^--per-label works with .* not --count weighted "):
        check_model(missing, ["a text"], count="weighted", per_label=True)


def test_the_printed_check_has_a_row_per_task_its_flips_shares_and_the_verdict():
    report = verdicts(_report(), {"a": 0.9, "b": 0.9})
    report["unchecked"] = ["c", "d"]
    report["calibration_figures"] = {"a": {"agreement": 0.99}}
    report["calibration_held_out"] = {"b": {"agreement": 0.875}}
    lines = format_check(report).splitlines()
    assert re.split(r"\s{2,}", lines[0]) == [
        "task", "texts", "agreement", "where expert >= 90% (texts)", "weighted by confidence",
        "surest 25% (texts)", "minimum", "verdict", "drift", "mean |dp|",
        "on calibration (optimistic)", "held out (k-fold)"]  # no typical or domain figures
    assert lines[1].split() == ["a", "12", "80.0%", "95.0%", "(10)", "-", "70.0%", "(3)",
                                "90.0%", "FAIL", "0.200", "0.050", "99.0%", "-"]
    assert lines[2].split() == ["b", "12", "90.0%", "-", "96.0%", "-", "90.0%", "pass",
                                "0.100", "0.125", "-", "87.5%"]
    report["tasks"]["b"].update(typical_agreement=0.5, typical_n=4)  # one task's figure: shown
    header = re.split(r"\s{2,}", format_check(report).splitlines()[0])
    assert header[6] == "typical of the task (texts)" and "in its domain (texts)" not in header
    assert lines[3:] == [
        "a: flips y->x 3; shares expert->merged x 50%->75%, y 50%->25%",
        "a: FAIL: agreement 80.0% < 90.0%",
        "b: worst label q 90.0%, all labels as the expert on 87.5% of texts",
        "b: flips q on->off 1, off->on 0; shares expert->merged p 25%->25%, q 50%->40%",
        "not checked (no expert given): c, d",
        "verdict (on every text): FAIL (a): 1 of 2 tasks keep their expert's decisions within "
        "the thresholds"]


def test_a_passing_check_without_flips_says_none_and_which_texts_counted():
    report = _report()
    report["tasks"]["a"]["flips"] = []
    for count, said in (("confident", "on the texts each expert is sure of"),
                        ("weighted", "each text weighted by its expert's confidence"),
                        ("surest", "on the 25% of texts each expert is surest of")):
        text = format_check(verdicts(dict(report), {"a": 0.0, "b": 0.0}, count=count))
        assert "a: flips none; shares expert->merged" in text
        assert text.splitlines()[-1] == (f"verdict ({said}): pass: 2 of 2 tasks keep their "
                                         "expert's decisions")
        assert "not checked" not in text


def test_only_the_six_commonest_flips_of_a_single_label_task_are_printed():
    report = verdicts(_report(), {"a": 0.0, "b": 0.0})
    report["tasks"]["a"]["flips"] = [{"from": "x", "to": f"l{i}", "count": 9 - i}
                                     for i in range(8)]
    line = next(x for x in format_check(report).splitlines() if x.startswith("a: flips"))
    assert line.startswith("a: flips x->l0 9; x->l1 8; x->l2 7; x->l3 6; x->l4 5; x->l5 4; "
                           "shares")


BLOCK = {"sources": [{"task": "tone", "model": "org/tone"}, {"task": "tags", "model": "/m/tags"}]}


def test_without_items_the_recorded_sources_answer_in_the_models_task_order():
    assert expert_paths(None, BLOCK, ["tags", "tone"]) == {"tags": "/m/tags", "tone": "org/tone"}
    assert list(expert_paths([], BLOCK, ["tone", "tags"])) == ["tone", "tags"]
    with pytest.raises(Hm3Error, match="^the model records no expert for x, y; name them with "
                                       r"--experts TASK=PATH \.\.\.$"):
        expert_paths(None, BLOCK, ["tone", "x", "y"])


def test_items_are_matched_by_task_by_recorded_source_or_by_folder_name(tmp_path):
    (tmp_path / "tags").mkdir()
    assert expert_paths(["tone=/new/tone"], BLOCK, ["tone", "tags"]) == {"tone": "/new/tone"}
    assert expert_paths(["org/tone"], BLOCK, ["tone", "tags"]) == {"tone": "org/tone"}
    assert expert_paths([str(tmp_path / "tags") + "/"], BLOCK, ["tone", "tags"]) == {
        "tags": str(tmp_path / "tags") + "/"}
    # the same folder spelled another way is the recorded source
    recorded = {"sources": [{"task": "tone", "model": str(tmp_path / "tags")}]}
    spelled = str(tmp_path / "tags" / ".." / "tags")
    assert expert_paths([spelled], recorded, ["tone", "tags"]) == {"tone": spelled}


@pytest.mark.parametrize("items, message", [
    (["/x/other"], r"^--experts /x/other: cannot tell which task it is the expert of \(tasks: "
                   r"tone, tags\); write TASK=/x/other$"),
    (["mood=/x"], r"^--experts mood=/x: no task 'mood'; tasks are tone, tags$"),
    (["tone=/a", "tone=/b"], r"^--experts: two experts for task 'tone'; give one per task$"),
])
def test_items_that_name_no_task_or_one_twice_are_refused(items, message):
    with pytest.raises(Hm3Error, match=message):
        expert_paths(items, BLOCK, ["tone", "tags"])


def test_an_expert_with_other_labels_or_kind_or_several_tasks_is_refused():
    group = TaskGroup("tone", ("neg", "pos"), 4)
    check_expert_groups(group, [TaskGroup("whatever", ("neg", "pos"), 0)])  # same labels: fine
    with pytest.raises(Hm3Error, match="^expert for 'tone' has 2 tasks; give the single-task "
                                       "classifier that was merged$"):
        check_expert_groups(group, [group, group])
    with pytest.raises(Hm3Error, match=r"^expert for 'tone' has labels pos, neg \(single-label\); "
                                       r"the merged task has neg, pos \(single-label\): is it the "
                                       r"right expert\?$"):
        check_expert_groups(group, [TaskGroup("tone", ("pos", "neg"), 0)])
    with pytest.raises(Hm3Error, match=r"has labels neg, pos \(multi-label\); the merged task "
                                       r"has neg, pos \(single-label\)"):
        check_expert_groups(group, [TaskGroup("tone", ("neg", "pos"), 0, multi_label=True)])


def test_the_overlap_counts_each_tasks_calibration_texts_among_the_check_texts(tmp_path):
    assert calibration_overlap(tmp_path, ["a"]) is None
    record = {"tasks": {"tone": [text_hash("a"), text_hash("b")], "tags": [text_hash("c")]}}
    (tmp_path / CALIBRATION_TEXTS).write_text(json.dumps(record))
    assert calibration_overlap(tmp_path, ["a", "b", "b", "z"]) == {"tone": 2, "tags": 0}
    assert calibration_overlap(str(tmp_path), []) == {"tone": 0, "tags": 0}


def test_compare_logits_turns_each_tasks_own_logits_into_probabilities():
    """Logits of a task's own labels (offset 0 there, whatever its offset in the model): a
    softmax per text, or a sigmoid per label."""
    tone = TaskGroup("tone", ("neg", "pos"), 5)
    tags = TaskGroup("tags", ("p", "q"), 7, multi_label=True, threshold=0.5)
    expert = {"tone": np.array([[2.0, 0.0], [0.0, 1.0]]), "tags": np.array([[1.0, -1.0]])}
    merged = {"tone": np.array([[0.0, 2.0], [0.0, 3.0]]), "tags": np.array([[-1.0, -2.0]])}
    out = compare_logits([tone, tags], expert, merged)
    assert list(out) == ["tone", "tags"]
    assert out["tone"]["agreement"] == 0.5
    # softmax([2, 0]) = (.8808, .1192); softmax([0, 2]) the reverse; [0,1] .2689/.7311,
    # [0,3] .0474/.9526: mean |dp| = (2 * .7616 + 2 * .2215) / 4
    assert out["tone"]["mean_abs_dp"] == pytest.approx((2 * 0.76159 + 2 * 0.22153) / 4, abs=1e-4)
    assert out["tags"]["label_agreement"] == {"p": 0.0, "q": 1.0}
    want = compare_task(tags, 1 / (1 + np.exp(-expert["tags"])), 1 / (1 + np.exp(-merged["tags"])))
    assert out["tags"]["mean_abs_dp"] == pytest.approx(want["mean_abs_dp"])


@pytest.mark.parametrize("expert, merged, message", [
    (np.zeros((2, 3)), np.zeros((2, 3)), r"must both be \(n, 2\), got \(2, 3\) and \(2, 3\)"),
    (np.zeros((2, 2)), np.zeros((3, 2)), r"got \(2, 2\) and \(3, 2\)"),
    (np.zeros(2), np.zeros(2), r"got \(2,\) and \(2,\)"),
    (np.zeros((0, 2)), np.zeros((0, 2)), "^task 'tone': no texts to compare on$"),
])
def test_probabilities_of_the_wrong_shape_or_none_are_refused(expert, merged, message):
    with pytest.raises(Hm3Error, match=message):
        compare_task(TaskGroup("tone", ("neg", "pos"), 0), expert, merged)


# --- check(): models given as objects or as loaders, stand-ins with fixed probabilities --------

class Fixed(MultiTaskClassifier):
    """A classifier whose probabilities are given: `probs` task -> (n, K) rows, one per text."""

    def __init__(self, groups, probs):
        self.groups, self.probs, self.calls = groups, probs, []

    def predict_proba(self, texts, batch_size=32):
        self.calls.append((list(texts), batch_size))
        return {task: np.asarray(rows[:len(texts)], float) for task, rows in self.probs.items()}


TONE = TaskGroup("tone", ("neg", "pos"), 0)
TAGS = TaskGroup("tags", ("p", "q"), 2, multi_label=True)
EXTRA = TaskGroup("extra", ("a", "b"), 4)
TEXTS = ["one", "two", "three"]


def _merged() -> Fixed:
    return Fixed([TONE, TAGS, EXTRA], {"tone": [[.9, .1], [.2, .8], [.6, .4]],
                                       "tags": [[.9, .1], [.2, .7], [.6, .6]],
                                       "extra": [[.5, .5]] * 3})


def test_check_compares_each_expert_in_the_models_task_order_and_lists_the_rest():
    tone = Fixed([TaskGroup("tone", ("neg", "pos"), 0)], {"tone": [[.8, .2], [.3, .7], [.3, .7]]})
    tags = Fixed([TaskGroup("tags", ("p", "q"), 0, multi_label=True)],
                 {"tags": [[.9, .1], [.2, .7], [.6, .6]]})
    merged = _merged()
    loaded = []
    report = check(merged, {"tags": tags, "tone": lambda: loaded.append(1) or tone}, TEXTS,
                   batch_size=5)
    assert list(report) == ["texts", "tasks", "unchecked"]
    assert report["texts"] == 3 and report["unchecked"] == ["extra"]
    assert list(report["tasks"]) == ["tone", "tags"]
    assert report["tasks"]["tone"]["agreement"] == pytest.approx(2 / 3)  # the third text flips
    assert report["tasks"]["tags"]["agreement"] == 1.0
    assert loaded == [1]
    assert merged.calls == [(TEXTS, 5)] and tone.calls == [(TEXTS, 5)] and tags.calls == [
        (TEXTS, 5)]


def test_check_refuses_no_texts_an_unknown_task_and_wrong_experts_before_running_the_model():
    merged = _merged()
    with pytest.raises(Hm3Error, match=r"^no texts to check on; give a file with one text per "
                                       r"line \(or a table\)$"):
        check(merged, {}, [])
    with pytest.raises(Hm3Error, match=r"^expert for 'mood': the merged model has no such task; "
                                       r"its tasks are tone, tags, extra$"):
        check(merged, {"mood": Fixed([TONE], {})}, TEXTS)
    wrong = Fixed([TaskGroup("tone", ("pos", "neg"), 0)], {"tone": [[.5, .5]] * 3})
    with pytest.raises(Hm3Error, match="^expert for 'tone' has labels pos, neg"):
        check(merged, {"tone": wrong}, TEXTS)
    assert merged.calls == []  # refused before any forward pass
    with pytest.raises(Hm3Error, match="^expert for 'tone' has labels pos, neg"):
        check(merged, {"tone": lambda: wrong}, TEXTS)  # a loaded expert is checked too


def test_an_expert_exactly_at_the_confidence_level_is_sure():
    tone = TaskGroup("tone", ("neg", "pos"), 0)
    out = compare_task(tone, np.array([[0.9, 0.1], [0.6, 0.4]]), np.array([[0.2, 0.8]] * 2))
    assert (out["confident_n"], out["confident_agreement"]) == (1, 0.0)
    tags = TaskGroup("tags", ("p",), 0, multi_label=True)
    out = compare_task(tags, np.array([[0.9], [0.6]]), np.array([[0.2], [0.7]]))
    assert (out["confident_n"], out["confident_agreement"]) == (1, 0.0)


def test_a_label_the_expert_is_never_sure_of_weighs_nothing_in_the_weighted_agreement():
    """q at 0.5 on every text: weight |2p - 1| = 0, left out (not 0/0); p: weights .8 and .2,
    the first text agrees: 0.8 / 1.0."""
    tags = TaskGroup("tags", ("q", "p"), 0, multi_label=True)
    expert = np.array([[0.5, 0.9], [0.5, 0.6]])
    merged = np.array([[0.9, 0.8], [0.1, 0.4]])
    assert compare_task(tags, expert, merged)["weighted_agreement"] == pytest.approx(0.8)
    assert compare_task(tags, np.full((2, 2), 0.5), merged)["weighted_agreement"] is None


def test_a_report_without_its_count_says_every_text_and_names_every_failed_task():
    report = verdicts(_report(), {"a": 1.0, "b": 1.0})
    del report["counted"]
    assert format_check(report).splitlines()[-1] == (
        "verdict (on every text): FAIL (a, b): 0 of 2 tasks keep their expert's decisions "
        "within the thresholds")


@pytest.mark.parametrize("expert, merged", [
    # sureness |2p - 1|: .9 .2 .4 .6, the first text (sure it is off) is the surest; it flips
    ([0.05, 0.6, 0.7, 0.8], [0.9, 0.6, 0.7, 0.8]),
    # .4 .2 .98 .6: the third (sure it is on); it flips
    ([0.3, 0.6, 0.99, 0.2], [0.3, 0.6, 0.1, 0.2]),
])
def test_the_surest_texts_of_a_label_are_those_farthest_from_one_half(expert, merged):
    tags = TaskGroup("tags", ("p",), 0, multi_label=True)
    out = compare_task(tags, np.array(expert)[:, None], np.array(merged)[:, None])
    assert (out["surest_n"], out["surest_agreement"]) == (1, 0.0)


@pytest.mark.parametrize("expert, merged", [(0.5, 0.4), (0.4, 0.5)])
def test_a_probability_exactly_at_the_threshold_is_off(expert, merged):
    tags = TaskGroup("tags", ("p",), 0, multi_label=True, threshold=0.5)
    out = compare_task(tags, np.array([[expert]]), np.array([[merged]]))
    assert out["surest_agreement"] == 1.0 and out["agreement"] == 1.0


def test_one_text_the_expert_is_fairly_sure_of_gives_a_weighted_agreement():
    """Weight (0.8 - 1/2) / (1 - 1/2) = 0.6: under one in all, still a figure."""
    tone = TaskGroup("tone", ("neg", "pos"), 0)
    out = compare_task(tone, np.array([[0.8, 0.2]]), np.array([[0.7, 0.3]]))
    assert out["weighted_agreement"] == 1.0


def test_label_shares_are_reported_to_four_decimals():
    tone = TaskGroup("tone", ("neg", "pos"), 0)
    out = compare_task(tone, np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]]),
                       np.array([[0.8, 0.2]] * 3))
    assert out["expert_shares"] == {"neg": 0.3333, "pos": 0.6667}
    assert out["merged_shares"] == {"neg": 1.0, "pos": 0.0}


def test_flips_are_listed_most_frequent_first():
    group = TaskGroup("s", ("a", "b"), 0)
    a, b = [0.9, 0.1], [0.1, 0.9]
    out = compare_task(group, np.array([b, a, a, a]), np.array([a, b, b, a]))
    assert out["flips"] == [{"from": "a", "to": "b", "count": 2},
                            {"from": "b", "to": "a", "count": 1}]


def test_an_expert_path_may_hold_an_equals_sign_and_a_block_may_record_no_sources():
    assert expert_paths(["tone=/m/a=b"], BLOCK, ["tone"]) == {"tone": "/m/a=b"}
    with pytest.raises(Hm3Error, match="^the model records no expert for tone;"):
        expert_paths(None, {}, ["tone"])
    assert expert_paths(["tone=/m/t"], {}, ["tone"]) == {"tone": "/m/t"}


def test_a_threshold_for_an_unknown_task_lists_the_tasks():
    with pytest.raises(Hm3Error, match=r"^--min-agreement c=0\.5: no task 'c'; tasks are a, b$"):
        parse_thresholds(["c=0.5"], ["a", "b"])
