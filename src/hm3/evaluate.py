"""Scoring classifiers on labelled data: macro-F1, accuracy, per-class scores and cross-checks."""

from __future__ import annotations

import csv
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from hm3.errors import Hm3Error
from hm3.heads import TaskGroup
from hm3.table import format_table

FILE_TYPES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
DATA_FIELDS = ("path", "subset", "split", "text_column", "label_column", "limit", "expect",
               "validation")
# What a `validation:` entry may set; the rest (expect) is the task entry's.
_SOURCE_FIELDS = ("path", "subset", "split", "text_column", "label_column", "limit")
INSTALL_DATA = "pip install 'hm3[data]'"


@dataclass
class Dataset:
    """Labelled texts for one task.

    `labels` holds label names (or integer ids into the task's labels); for a multi-label task each
    entry is a list of them, a JSON list as text, comma-separated names, or "" for none.
    `expect` maps other tasks to the label every text should get on their heads (cross-checks).
    """

    task: str
    texts: list[str]
    labels: list[Any]
    source: str = ""
    expect: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.texts, self.labels = list(self.texts), list(self.labels)
        if not self.texts:
            raise Hm3Error(f"{self.source or self.task}: no examples to score")
        if len(self.texts) != len(self.labels):
            raise Hm3Error(f"{self.source or self.task}: {len(self.texts)} texts but "
                           f"{len(self.labels)} labels")
        if self.task in self.expect:
            raise Hm3Error(f"{self.source or self.task}: `expect` names the dataset's own task "
                           f"{self.task!r}; its labels already say what to expect there")


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
                label_indices(groups[other], [expected], f"{data.source} expect.{other}")


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


# --- data ----------------------------------------------------------------------------------------

def load_dataset(spec: str | Path, task: str, text_column: str = "text",
                 label_column: str = "label", split: str | None = None, limit: int | None = None,
                 expect: dict[str, Any] | None = None, subset: str | None = None) -> Dataset:
    """Labelled texts from a local file or a Hugging Face dataset.

    Parameters
    ----------
    spec : a .csv / .tsv / .jsonl / .json (list of objects) / .parquet file, or a hub dataset id
        (needs `datasets`; `subset` is its configuration, `split` defaults to "test").
    task : the task the labels belong to.
    text_column, label_column : where the text and the label are. Labels are names (or integer
        ids) of the task's labels; a hub ClassLabel column is turned into names.
    limit : keep only the first `limit` examples.
    expect : cross-checks, {other_task: label every text should get there}.
    """
    _check_limit(limit, "limit")
    path = Path(spec).expanduser()
    if path.suffix.lower() in FILE_TYPES or path.exists():
        if split is not None or subset is not None:
            raise Hm3Error(f"{spec}: split and subset apply to Hugging Face datasets only; "
                           "split a local file into one file per split")
        texts, labels = _columns(read_table(path)[:limit], text_column, label_column, str(spec))
    else:
        texts, labels = _hub_columns(str(spec), subset, split or "test", text_column,
                                     label_column, limit)
    return Dataset(task=task, texts=texts, labels=labels, source=str(spec),
                   expect=dict(expect or {}))


def read_texts(path: str | Path, column: str = "text") -> list[str]:
    """The texts of a file, labels (if any) ignored: a .txt file holds one per line; a .jsonl
    file one JSON string or object (with `column`) per line; any other table its `column`."""
    path = Path(path)
    if not path.is_file():
        raise Hm3Error(f"text file {path} does not exist; give a .txt file (one text per line) "
                       f"or a table ({', '.join(FILE_TYPES)})")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise Hm3Error(f"{path}:{number} is not JSON; expected one JSON string or "
                               "object per line") from None
            if isinstance(item, dict) and isinstance(item.get(column), str):
                texts.append(item[column])
            elif isinstance(item, str):
                texts.append(item)
            else:
                raise Hm3Error(f"{path}:{number} has no text field {column!r}; name the column "
                               "that holds the text (--text-column / text_column)")
        return texts
    rows = read_table(path)
    if rows and column not in rows[0]:
        raise Hm3Error(f"{path} has no column {column!r} (columns: {', '.join(map(str, rows[0]))});"
                       " name the column that holds the text (--text-column / text_column)")
    return [str(row[column]) for row in rows]


def read_table(path: str | Path) -> list[dict]:
    """The rows of a .csv / .tsv / .jsonl / .json / .parquet file as dicts."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise Hm3Error(f"{path} is a folder; give a data file ({', '.join(FILE_TYPES)})"
                       if path.is_dir() else f"data file {path} does not exist")
    if suffix not in FILE_TYPES:
        raise Hm3Error(f"{path}: unknown file type {suffix or '(none)'}; use one of "
                       f"{', '.join(FILE_TYPES)}")
    if suffix in (".csv", ".tsv"):
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".parquet":
        try:
            import pandas
            return pandas.read_parquet(path).to_dict("records")
        except ImportError:
            raise Hm3Error(f"reading {path} needs pandas and pyarrow: {INSTALL_DATA}") from None
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except ValueError:
            rows = None  # many .json files are really JSON lines
        if rows is not None:
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise Hm3Error(f"{path}: expected a JSON list of objects, or JSON lines")
            return rows
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise Hm3Error(f"{path}:{number} is not JSON; expected one object per line") from None
        if not isinstance(row, dict):
            raise Hm3Error(f"{path}:{number}: expected a JSON object with text and label fields")
        rows.append(row)
    return rows


def parse_data_block(data: Any, tasks: Sequence[str] | None = None,
                     part: str = "test") -> dict[str, dict]:
    """Validate a recipe's `data:` block without reading any file.

    The block maps a task to a path / hub id, or to {path, subset, split, text_column,
    label_column, limit, expect, validation}. `path` is the held-out data that `hm3 eval` scores;
    `validation` is the data `hm3 search` scores its trials on: a path / hub id (columns and
    limit carry over, subset and split do not), or a mapping that overrides the entry's fields
    (`{split: validation}` for a hub dataset). Returns `load_dataset` keyword arguments per task
    for `part`, "test" (`path`) or "validation". With `tasks`, every task named (also in
    `expect`) must be one of them.
    """
    if part not in ("test", "validation"):
        raise ValueError(f"part must be 'test' or 'validation', got {part!r}")
    if not isinstance(data, dict):
        raise Hm3Error("data: expected a mapping of task name to dataset, e.g. "
                       "`data: {spam: splits/spam/test.jsonl}`")
    known = set(tasks) if tasks is not None else None
    specs = {}
    for task, entry in data.items():
        where = f"data.{task}"
        if not isinstance(task, str) or not task:
            raise Hm3Error(f"{where}: expected a task name as the key")
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise Hm3Error(f"{where}: expected a path or hub id, or a mapping with `path`")
        unknown = sorted(set(entry) - set(DATA_FIELDS))
        if unknown:
            raise Hm3Error(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; "
                           f"allowed: {', '.join(DATA_FIELDS)}")
        _check_source_fields(entry, where)
        validation = _validation_overlay(entry.get("validation"), f"{where}.validation")
        expect = entry.get("expect") or {}
        if not isinstance(expect, dict) or not all(isinstance(v, (str, int, list))
                                                   and not isinstance(v, bool)
                                                   for v in expect.values()):
            raise Hm3Error(f"{where}.expect: expected a mapping of other task to a label, "
                           "e.g. `expect: {spam: ham}`")
        if known is not None:
            for name, at in [(task, where), *((t, f"{where}.expect") for t in expect)]:
                if name not in known:
                    raise Hm3Error(f"{at}: unknown task {name!r}; known tasks are "
                                   f"{', '.join(sorted(known))}")
        source = {key: value for key, value in entry.items() if key in _SOURCE_FIELDS}
        if part == "validation":
            if validation is None:
                raise Hm3Error(f"{where}: no `validation` data; a search scores its trials on "
                               f"a validation split, e.g. `{task}: {{path: test.jsonl, "
                               "validation: validation.jsonl}`")
            if "path" in validation:  # another source: the test data's subset/split do not apply
                source = {k: v for k, v in source.items() if k not in ("subset", "split")}
            source.update(validation)
        options = {key: value for key, value in source.items() if key != "path"}
        specs[task] = {"spec": source["path"], "task": task, **options, "expect": dict(expect)}
    return specs


def _check_source_fields(entry: dict, where: str) -> None:
    for key in ("subset", "split", "text_column", "label_column"):
        if key in entry and not isinstance(entry[key], str):
            raise Hm3Error(f"{where}.{key}: expected a string, got {entry[key]!r}")
    _check_limit(entry.get("limit"), f"{where}.limit")


def _validation_overlay(validation: Any, where: str) -> dict | None:
    """A task entry's `validation:` as the fields it overrides (None when absent)."""
    if validation is None:
        return None
    if isinstance(validation, str):
        validation = {"path": validation}
    if not isinstance(validation, dict) or not validation or (
            "path" in validation and not isinstance(validation["path"], str)):
        raise Hm3Error(f"{where}: expected a path or hub id, or a mapping such as "
                       "`{split: validation}`")
    unknown = sorted(set(validation) - set(_SOURCE_FIELDS))
    if unknown:
        raise Hm3Error(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; "
                       f"allowed: {', '.join(_SOURCE_FIELDS)}")
    _check_source_fields(validation, where)
    return dict(validation)


def load_data_block(data: Any, root: str | Path | None = None,
                    tasks: Sequence[str] | None = None, part: str = "test") -> list[Dataset]:
    """Validate a recipe's `data:` block (see `parse_data_block`), then load every dataset of
    `part` ("test" or "validation"). Relative paths are taken from `root` (the recipe's folder)
    when the file exists there."""
    specs = parse_data_block(data, tasks, part)
    datasets = []
    for spec in specs.values():
        if root is not None and not Path(spec["spec"]).is_absolute():
            candidate = Path(root) / spec["spec"]
            if candidate.exists():
                spec = {**spec, "spec": str(candidate)}
        datasets.append(load_dataset(**spec))
    return datasets


def _check_limit(limit: Any, where: str) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise Hm3Error(f"{where}: expected a positive integer, got {limit!r}")


def _columns(rows: list[dict], text_column: str, label_column: str,
             source: str) -> tuple[list[str], list[Any]]:
    if not rows:
        raise Hm3Error(f"{source} has no rows")
    for column, option in ((text_column, "text_column"), (label_column, "label_column")):
        if column not in rows[0]:
            raise Hm3Error(f"{source} has no column {column!r} (columns: "
                           f"{', '.join(map(str, rows[0]))}); name the right one with {option}")
    texts, labels = [], []
    for number, row in enumerate(rows, 1):
        text, label = row.get(text_column), row.get(label_column)
        if not isinstance(text, str):
            raise Hm3Error(f"{source} row {number}: {text_column!r} is {text!r}, not a text")
        if label is None or (isinstance(label, float) and math.isnan(label)):
            raise Hm3Error(f"{source} row {number}: no label in {label_column!r}")
        texts.append(text)
        labels.append(label)
    return texts, labels


def _hub_split(name: str, subset: str | None, split: str):
    """One split of a Hugging Face dataset (needs the `datasets` extra and the hub)."""
    try:
        import datasets
    except ImportError:
        raise Hm3Error(f"{name} is not a local file ({', '.join(FILE_TYPES)}); reading it as a "
                       f"Hugging Face dataset needs `datasets`: {INSTALL_DATA}") from None
    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # datasets raises many types for a bad id, split or network
        raise Hm3Error(f"cannot load Hugging Face dataset {name} (split {split}): {exc}") from None


def hub_texts(name: str, subset: str | None, split: str, text_column: str) -> list[str]:
    """The texts of one split of a Hugging Face dataset, its labels ignored."""
    data = _hub_split(name, subset, split)
    if text_column not in data.column_names:
        raise Hm3Error(f"{name} has no column {text_column!r} (columns: "
                       f"{', '.join(data.column_names)}); name the right one with text_column")
    return [str(text) for text in data[text_column]]


def _hub_columns(name: str, subset: str | None, split: str, text_column: str, label_column: str,
                 limit: int | None) -> tuple[list[str], list[Any]]:
    data = _hub_split(name, subset, split)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    for column, option in ((text_column, "text_column"), (label_column, "label_column")):
        if column not in data.column_names:
            raise Hm3Error(f"{name} has no column {column!r} (columns: "
                           f"{', '.join(data.column_names)}); name the right one with {option}")
    labels = _class_names(data.features[label_column], data[label_column])
    rows = [{text_column: text, label_column: label}
            for text, label in zip(data[text_column], labels)]
    return _columns(rows, text_column, label_column, name)


def _class_names(feature, values: list) -> list:
    """Hub labels by name: ClassLabel ids (or lists of them) become their names."""
    if hasattr(feature, "int2str"):
        return [feature.int2str(v) for v in values]
    inner = getattr(feature, "feature", None)
    if hasattr(inner, "int2str"):
        return [[inner.int2str(v) for v in row] for row in values]
    return values


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
