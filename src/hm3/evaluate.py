"""Scoring classifiers on labelled data: macro-F1, accuracy, per-class scores and cross-checks."""

from __future__ import annotations

import json
import numbers
import warnings
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from hm3.data.tables import Dataset
from hm3.errors import Hm3Error, Hm3Warning
from hm3.heads import TaskGroup
from hm3.table import format_table

# --- metrics -------------------------------------------------------------------------------------

def label_indices(group: TaskGroup, labels: Sequence[Any], where: str = "") -> np.ndarray:
    """Truth in the form the metrics take: class ids (n,) for a single-label task, a 0/1 matrix
    (n, K) for a multi-label one. Names are matched exactly; an integer that is not a name is read
    as an id, unless the task's label names are themselves integers (then it would be ambiguous)."""
    lookup = {name: i for i, name in enumerate(group.labels)}
    ids_allowed = not any(_as_int(name) is not None for name in group.labels)

    def index(value: Any, row: int) -> int:
        if isinstance(value, str) and value in lookup:
            return lookup[value]
        number = _as_int(value) if ids_allowed else None
        if number is not None and 0 <= number < len(group.labels):
            return number
        ids = f", or ids 0..{len(group.labels) - 1}" if ids_allowed else ""
        raise Hm3Error(f"{_at(where, row)}: label {value!r} is not a label of task {group.name!r}; "
                       f"its labels are {', '.join(group.labels)}{ids}")

    if not group.multi_label:
        return np.array([index(value, row) for row, value in enumerate(labels)], dtype=np.int64)
    truth = np.zeros((len(labels), len(group.labels)), dtype=np.int64)
    for row, value in enumerate(labels):
        for item in _label_list(value, lookup, where, row):
            truth[row, index(item, row)] = 1
    return truth


def predictions(group: TaskGroup, probabilities: np.ndarray) -> np.ndarray:
    """What the model says, in the form of `label_indices`: argmax for a single-label task, every
    label over the group's threshold for a multi-label one (as `MultiTaskClassifier.predict`)."""
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(group.labels):
        raise Hm3Error(f"task {group.name!r}: expected probabilities of shape (n, "
                       f"{len(group.labels)}), got {probabilities.shape}")
    if group.multi_label:
        return (probabilities > group.threshold).astype(np.int64)
    return probabilities.argmax(axis=1)


def score_task(group: TaskGroup, labels: Sequence[Any], probabilities: np.ndarray,
               where: str = "") -> dict:
    """The one metrics function: n, accuracy, macro-F1 and per-class precision/recall/F1/support.

    Macro-F1 averages over EVERY label of the task, so a label that is never true nor predicted
    counts as 0 (as the zoo scores its experts); score on data that covers all labels. For a
    multi-label task these are computed on the 0/1 label matrix: accuracy is subset accuracy
    (all of a text's labels right), macro-F1 the mean of the per-label F1.
    """
    truth = label_indices(group, labels, where)
    predicted = predictions(group, probabilities)
    if len(predicted) != len(truth):
        raise Hm3Error(f"task {group.name!r}: {len(truth)} labels but {len(predicted)} predictions")
    every = list(range(len(group.labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=every, zero_division=0)
    return {
        "n": len(truth),
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, labels=every, average="macro",
                                   zero_division=0)),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(group.labels)},
    }


def agreement(group: TaskGroup, expected: Any, probabilities: np.ndarray) -> float:
    """Cross-check: the share of texts whose prediction on `group` is `expected` (for a
    multi-label task, exactly the expected set of labels)."""
    n = len(probabilities)
    return float(accuracy_score(label_indices(group, [expected] * n, f"expect.{group.name}"),
                                predictions(group, probabilities)))


# --- evaluation ----------------------------------------------------------------------------------

def evaluate(model, datasets: Sequence[Dataset], batch_size: int = 32) -> dict:
    """Score `model` on each dataset's task and on its declared cross-checks.

    `model` is a `MultiTaskClassifier` (a merged model, or one expert loaded with
    `hm3.load(path, task=NAME)`) or anything with `.groups` and `.predict_proba(texts, batch_size)`;
    `.count_truncated(texts)` and `.max_length` are reported when present. Each dataset takes one
    forward pass; its cross-checks read the other heads of that same pass. Cross-checks on tasks
    the model lacks (e.g. when scoring a single expert) are listed under `skipped_cross_checks`.

    Returns a JSON-able dict: {"max_length", "mean_macro_f1", "tasks": {task: {"source", "n",
    "truncated", "multi_label", "accuracy", "macro_f1", "per_class", "cross_checks":
    {other: {"expected", "agreement", "n"}}}}}.
    """
    groups = {group.name: group for group in model.groups}
    _check(datasets, groups)
    tasks = {}
    for data in datasets:
        group = groups[data.task]
        probabilities = model.predict_proba(data.texts, batch_size=batch_size)
        count_truncated = getattr(model, "count_truncated", None)
        entry = {"source": data.source,
                 "truncated": int(count_truncated(data.texts)) if count_truncated else None,
                 "multi_label": group.multi_label,
                 **score_task(group, data.labels, probabilities[data.task], data.source)}
        checks, skipped = {}, []
        for other, expected in data.expect.items():
            if other not in groups:
                skipped.append(other)
                continue
            checks[other] = {"expected": _names(groups[other], expected),
                             "agreement": agreement(groups[other], expected, probabilities[other]),
                             "n": len(data.texts)}
        entry["cross_checks"] = checks
        if skipped:
            entry["skipped_cross_checks"] = skipped
        tasks[data.task] = entry
    scores = [entry["macro_f1"] for entry in tasks.values()]
    return {"max_length": getattr(model, "max_length", None),
            "mean_macro_f1": float(np.mean(scores)) if scores else None,
            "tasks": tasks}



def own_datasets(groups: Sequence[TaskGroup], datasets: Sequence[Dataset],
                 model: str = "the model") -> list[Dataset]:
    """The datasets a model of `groups` can be scored on: a single expert scores its own task
    (with a warning naming the others' data it leaves out); a merged model, every dataset."""
    if len(groups) != 1:
        return list(datasets)
    own = [d for d in datasets if d.task == groups[0].name]
    if own and len(own) < len(datasets):
        skipped = sorted(d.task for d in datasets if d.task != groups[0].name)
        warnings.warn(f"{model} has one task ({groups[0].name}); the data for "
                      f"{', '.join(skipped)} was not scored (use --task to name the model's "
                      "task)", Hm3Warning, stacklevel=2)
    return own or list(datasets)


def _check(datasets: Sequence[Dataset], groups: dict[str, TaskGroup]) -> None:
    # Every task and label is checked before the first forward pass: a typo must not cost a run.
    seen = set()
    for data in datasets:
        if data.task not in groups:
            raise Hm3Error(f"{data.source or data.task}: the model has no task {data.task!r}; "
                           f"its tasks are {', '.join(groups)}")
        if data.task in seen:
            raise Hm3Error(f"two datasets for task {data.task!r}; give one per task")
        seen.add(data.task)
        label_indices(groups[data.task], data.labels, data.source)
        for other, expected in data.expect.items():
            if other in groups:
                check_expected_label(groups[other], expected,
                                     f"{data.source or data.task}: expect {other}={expected}")


def check_expected_label(group: TaskGroup, expected: Any, where: str) -> None:
    """A cross-check's label is one of `group`'s (a name, an id, or for a multi-label task a
    list of them); `where` names the cross-check in the error."""
    try:
        label_indices(group, [expected])
    except Hm3Error:
        raise Hm3Error(f"{where}: unknown label {expected!r} for task {group.name} (labels: "
                       f"{', '.join(group.labels)})") from None


def _names(group: TaskGroup, expected: Any) -> str | list[str]:
    """The expected label(s) by name, for the report."""
    truth = label_indices(group, [expected])[0]
    if group.multi_label:
        return [group.labels[i] for i in np.flatnonzero(truth)]
    return group.labels[int(truth)]


def format_report(report: dict, per_class: bool = True) -> str:
    """The report of `evaluate` as aligned plain-text tables."""
    rows = []
    for task, entry in report["tasks"].items():
        checks = [f"{other}={_label_text(c['expected'])} {100 * c['agreement']:.1f}%"
                  for other, c in entry["cross_checks"].items()]
        checks += [f"{other}: no such head" for other in entry.get("skipped_cross_checks", [])]
        rows.append([task, entry["n"], entry["macro_f1"], entry["accuracy"], entry["truncated"],
                     ", ".join(checks) or "-"])
    parts = [format_table(["task", "n", "macro-F1", "accuracy", "truncated", "cross-checks"], rows)]
    if len(report["tasks"]) > 1:
        parts.append(f"mean macro-F1 over {len(report['tasks'])} tasks: "
                     f"{report['mean_macro_f1']:.4f}")
    if report.get("max_length") and any(e["truncated"] for e in report["tasks"].values()):
        parts.append(f"truncated: texts longer than {report['max_length']} tokens, cut to fit")
    if per_class:
        for task, entry in report["tasks"].items():
            rows = [[label, c["precision"], c["recall"], c["f1"], c["support"]]
                    for label, c in entry["per_class"].items()]
            parts.append(f"\n{task}" + (f" ({entry['source']})" if entry["source"] else "") + "\n"
                         + format_table(["label", "precision", "recall", "F1", "support"], rows,
                                        indent="  "))
    return "\n".join(parts)


def _label_text(expected: str | list[str]) -> str:
    return expected if isinstance(expected, str) else "[" + ",".join(expected) + "]"


def _as_int(value: Any) -> int | None:
    """An integer label id, from an int, an integral float or a string of digits; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _label_list(value: Any, lookup: dict[str, int], where: str, row: int) -> list:
    """A multi-label entry as a list: a list, a name, a JSON list as text, comma-separated names
    or "" for none."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    if not isinstance(value, str) or value in lookup:
        return [value]
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            raise Hm3Error(f"{_at(where, row)}: labels {value!r} are not a JSON list") from None
        return list(items)
    return [item.strip() for item in text.split(",") if item.strip()]


def _at(where: str, row: int) -> str:
    return f"{where} row {row + 1}" if where else f"row {row + 1}"
