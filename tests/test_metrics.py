"""Scoring's small rules against hand-written cases: how a label is read (names, ids, lists),
predictions at the threshold, shape and length errors, and what the printed report shows."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from hm3.data import Dataset
from hm3.errors import Hm3Error
from hm3.evaluate import (
    _as_int,
    _label_list,
    agreement,
    evaluate,
    format_report,
    label_indices,
    predictions,
    score_task,
)
from hm3.heads import TaskGroup

SPAM = TaskGroup("spam", ("ham", "spam"), 0)
TOXIC = TaskGroup("toxic", ("insult", "threat", "obscene"), 2, multi_label=True)


@pytest.mark.parametrize("value, expected", [
    (3, 3), (np.int64(2), 2), (2.0, 2), (" 7 ", 7), ("12", 12),
    (True, None), (False, None), (2.5, None), ("-1", None), ("x", None), (None, None),
    ("1.0", None), ([1], None),
])
def test_as_int_reads_integral_ids_only(value, expected):
    assert _as_int(value) == expected


def test_label_list_reads_every_multi_label_spelling():
    lookup = {"insult": 0, "a, b": 1}
    assert _label_list(["insult", 1], lookup, "", 0) == ["insult", 1]
    assert _label_list(("threat",), lookup, "", 0) == ["threat"]
    assert _label_list(np.array([0, 2]), lookup, "", 0) == [0, 2]
    assert _label_list(1, lookup, "", 0) == [1]
    assert _label_list("a, b", lookup, "", 0) == ["a, b"]  # a label name with a comma wins
    assert _label_list(' ["insult", 2] ', lookup, "", 0) == ["insult", 2]
    assert _label_list("insult, threat ,, obscene", lookup, "", 0) == ["insult", "threat",
                                                                      "obscene"]
    assert _label_list(" ", lookup, "", 0) == []
    with pytest.raises(Hm3Error, match=r"^x.csv row 3: labels '\[insult' are not a JSON list$"):
        _label_list("[insult", lookup, "x.csv", 2)


def test_multi_label_truth_is_a_zero_one_matrix_from_names_or_ids():
    truth = label_indices(TOXIC, [["insult", 2], "threat", "", "0,1,2", [1, "threat"]])
    assert truth.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]]
    assert truth.dtype == np.int64


def test_ids_must_lie_in_range_and_the_error_says_where():
    with pytest.raises(Hm3Error) as error:
        label_indices(SPAM, ["ham", 2], "d.csv")
    assert str(error.value) == ("d.csv row 2: label 2 is not a label of task 'spam'; its labels "
                                "are ham, spam, or ids 0..1")
    with pytest.raises(Hm3Error, match=r"^row 1: label -1 is not"):
        label_indices(SPAM, [-1])
    assert label_indices(SPAM, [1, 0, "1"]).tolist() == [1, 0, 1]


def test_predictions_are_argmax_or_strictly_over_the_threshold():
    probabilities = np.array([[0.5, 0.2, 0.51], [0.3, 0.3, 0.1]])
    assert predictions(TOXIC, probabilities).tolist() == [[0, 0, 1], [0, 0, 0]]
    low = TaskGroup("toxic", TOXIC.labels, 2, multi_label=True, threshold=0.25)
    assert predictions(low, probabilities).tolist() == [[1, 0, 1], [1, 1, 0]]
    assert predictions(SPAM, np.array([[0.4, 0.6], [0.7, 0.3]])).tolist() == [1, 0]


def test_probabilities_of_the_wrong_shape_or_count_are_refused():
    with pytest.raises(Hm3Error, match=r"^task 'spam': expected probabilities of shape \(n, 2\), "
                                       r"got \(2, 3\)$"):
        predictions(SPAM, np.zeros((2, 3)))
    with pytest.raises(Hm3Error, match=r"got \(2,\)$"):
        predictions(SPAM, np.zeros(2))
    with pytest.raises(Hm3Error, match=r"^task 'spam': 3 labels but 2 predictions$"):
        score_task(SPAM, ["ham", "ham", "spam"], np.array([[0.9, 0.1], [0.2, 0.8]]))


def test_agreement_with_an_expected_set_of_labels_needs_exactly_that_set():
    probabilities = np.array([[0.9, 0.1, 0.1], [0.9, 0.9, 0.1], [0.1, 0.1, 0.1], [0.9, 0.2, 0.3]])
    assert agreement(TOXIC, ["insult"], probabilities) == 0.5
    assert agreement(TOXIC, [], probabilities) == 0.25
    assert agreement(SPAM, "spam", np.array([[0.2, 0.8], [0.9, 0.1], [0.4, 0.6]])) == 2 / 3


class Fixed:
    """Probabilities from a table per text; counts truncated texts like a real classifier."""

    groups = [SPAM, TOXIC]
    max_length = 8

    def __init__(self, table, long=()):
        self.table, self.long = table, set(long)

    def predict_proba(self, texts, batch_size=32):
        return {"spam": np.array([self.table[t][0] for t in texts]),
                "toxic": np.array([self.table[t][1] for t in texts])}

    def count_truncated(self, texts):
        return sum(t in self.long for t in texts)


TABLE = {"a": ([0.9, 0.1], [0.9, 0.8, 0.1]), "b": ([0.2, 0.8], [0.1, 0.1, 0.1]),
         "c": ([0.6, 0.4], [0.9, 0.1, 0.1])}


def test_report_counts_truncated_texts_and_prints_each_table():
    spam = Dataset("spam", ["a", "b", "c"], ["ham", "spam", "spam"], source="sms.csv",
                   expect={"toxic": ["insult"]})
    report = evaluate(Fixed(TABLE, long={"b", "c"}), [spam])
    entry = report["tasks"]["spam"]
    assert report["max_length"] == 8 and entry["truncated"] == 2
    assert entry["multi_label"] is False and "skipped_cross_checks" not in entry
    # predicted ham spam ham: accuracy 2/3; ham P 1/2 R 1 F1 2/3, spam P 1 R 1/2 F1 2/3
    assert entry["macro_f1"] == pytest.approx(2 / 3)
    assert entry["cross_checks"] == {"toxic": {"expected": ["insult"], "agreement": 1 / 3,
                                               "n": 3}}
    assert report["mean_macro_f1"] == pytest.approx(2 / 3)
    text = format_report(report)
    assert text.splitlines() == [
        "task  n  macro-F1  accuracy  truncated  cross-checks",
        "spam  3    0.6667    0.6667          2  toxic=[insult] 33.3%",
        "truncated: texts longer than 8 tokens, cut to fit",
        "",
        "spam (sms.csv)",
        "  label  precision  recall      F1  support",
        "  ham       0.5000  1.0000  0.6667        1",
        "  spam      1.0000  0.5000  0.6667        2",
    ]
    assert format_report(report, per_class=False).splitlines() == text.splitlines()[:3]


def test_report_of_two_tasks_gives_the_mean_and_no_truncation_line_when_none_was_cut():
    spam = Dataset("spam", ["a", "b"], ["ham", "spam"])
    toxic = Dataset("toxic", ["a", "b", "c"], [["insult", "threat"], "", "threat"],
                    expect={"spam": "ham"})
    report = evaluate(Fixed(TABLE), [spam, toxic])
    assert report["tasks"]["toxic"]["multi_label"] is True
    # toxic predicted {insult, threat}, {}, {insult}: subset accuracy 2/3;
    # insult P 1/2 R 1 F1 2/3, threat P 1 R 1/2 F1 2/3, obscene 0 -> macro 4/9
    assert report["tasks"]["toxic"]["macro_f1"] == pytest.approx(4 / 9)
    assert report["mean_macro_f1"] == pytest.approx((1 + 4 / 9) / 2)
    lines = format_report(report, per_class=False).splitlines()
    assert lines[1:] == ["spam   2    1.0000    1.0000          0  -",
                         "toxic  3    0.4444    0.6667          0  spam=ham 66.7%",
                         "mean macro-F1 over 2 tasks: 0.7222"]
    assert "\ntoxic\n" in format_report(report)  # no source: no parentheses


def test_a_model_without_datasets_has_no_mean():
    assert evaluate(Fixed(TABLE), []) == {"max_length": 8, "mean_macro_f1": None, "tasks": {}}


def test_report_lists_every_cross_check_and_each_expected_label():
    spam = Dataset("spam", ["a", "b", "c"], ["ham", "spam", "spam"],
                   expect={"toxic": ["insult", "threat"], "topic": "news"})
    report = evaluate(Fixed(TABLE), [spam])
    # toxic {insult, threat} only for a: 1 of 3; the model has no topic head
    assert format_report(report, per_class=False).splitlines()[1] == (
        "spam  3    0.6667    0.6667          0  toxic=[insult,threat] 33.3%, topic: no such head")


def test_errors_name_the_row_and_where_it_came_from():
    with pytest.raises(Hm3Error, match=r"^row 1: label 'eggs' is not a label of task 'spam'"):
        score_task(SPAM, ["eggs"], np.array([[0.9, 0.1]]))
    with pytest.raises(Hm3Error, match=r"^expect\.spam row 1: label 'eggs' is not a label"):
        agreement(SPAM, "eggs", np.array([[0.9, 0.1]]))
    with pytest.raises(Hm3Error, match=r"^d\.csv row 2: label 'eggs' is not a label"):
        evaluate(Fixed(TABLE), [Dataset("spam", ["a", "b"], ["ham", "eggs"], source="d.csv")])
    with pytest.raises(Hm3Error, match=r"^mood: the model has no task 'mood'"):
        evaluate(Fixed(TABLE), [Dataset("mood", ["a"], ["sad"])])
    with pytest.raises(Hm3Error, match=r"^m\.csv: the model has no task 'mood'"):
        evaluate(Fixed(TABLE), [Dataset("mood", ["a"], ["sad"], source="m.csv")])


def test_labels_never_true_nor_predicted_score_zero_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = score_task(TOXIC, [["insult"], ["insult"]], np.array([[0.9, 0.1, 0.1]] * 2))
    assert scores["macro_f1"] == pytest.approx(1 / 3)
    assert scores["per_class"]["obscene"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                              "support": 0}


class Recording(Fixed):
    def predict_proba(self, texts, batch_size=32):
        self.batch_sizes = [*getattr(self, "batch_sizes", []), batch_size]
        return super().predict_proba(texts, batch_size)


def test_evaluate_runs_at_the_batch_size_asked_and_checks_every_head_it_has():
    model = Recording(TABLE)
    data = Dataset("spam", ["a", "b"], ["ham", "spam"],
                   expect={"mood": "sad", "toxic": ["insult", "threat"]})
    entry = evaluate(model, [data], batch_size=4)["tasks"]["spam"]
    assert model.batch_sizes == [4]
    assert entry["skipped_cross_checks"] == ["mood"]
    assert entry["cross_checks"] == {"toxic": {"expected": ["insult", "threat"],
                                               "agreement": 0.5, "n": 2}}


def test_multi_label_truth_errors_point_at_their_row_and_predictions_are_integers():
    with pytest.raises(Hm3Error, match=r"^t\.csv row 2: labels '\[bad' are not a JSON list$"):
        label_indices(TOXIC, ["insult", "[bad"], "t.csv")
    assert predictions(TOXIC, np.array([[0.9, 0.1, 0.6]])).dtype == np.int64
