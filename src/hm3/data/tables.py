"""The one reader of texts and labelled tables: local files (CSV, TSV, JSONL, JSON, Parquet,
plain text) and Hugging Face hub datasets."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hm3.errors import Hm3Error

FILE_TYPES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
INSTALL_DATA = "pip install 'hm3[data]'"
STDIN = "-"  # read_texts' name for standard input
# how the column options are named, on the command line and in a recipe
COLUMN_OPTIONS = {"text_column": "--text-column (text_column: in a recipe)",
                  "label_column": "--label-column (label_column: in a recipe)"}


def looks_like_path(reference: str) -> bool:
    """Whether `reference` is meant as a local path rather than a hub id: it starts with ./ ../ /
    or ~, or has a separator a hub id (`org/name`) cannot have. Such a reference that does not
    exist is a typo to report, not a name to look up on the hub."""
    return (reference.startswith((".", "/", "~")) or reference.count("/") > 1
            or (os.sep != "/" and os.sep in reference))


def read_utf8(path: str | Path) -> str:
    """The text of a UTF-8 file (a byte-order mark dropped); any other encoding is an error
    saying how to convert it."""
    path = Path(path)
    return _decode(path.read_bytes(), str(path))


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Hm3Error(f"{name} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                       f"{exc.start}); convert it to UTF-8 first, e.g. `iconv -f latin1 -t utf-8`"
                       ) from None


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


def load_dataset(spec: str | Path, task: str, text_column: str = "text",
                 label_column: str = "label", split: str | None = None, limit: int | None = None,
                 expect: dict[str, Any] | None = None, subset: str | None = None) -> Dataset:
    """Labelled texts from a local file or a Hugging Face dataset.

    - `spec`: a .csv / .tsv / .jsonl / .json (list of objects) / .parquet file, or a hub dataset
    id (needs `datasets`; `subset` is its configuration, `split` defaults to "test").
    - `task`: the task the labels belong to.
    - `text_column`, `label_column`: where the text and the label are. Labels are names (or
    integer ids) of the task's labels; a hub ClassLabel column is turned into names.
    - `limit`: keep only the first `limit` examples.
    - `expect`: cross-checks, {other_task: label every text should get there}.
    """
    check_limit(limit, "limit")
    path = Path(spec).expanduser()
    if path.suffix.lower() in FILE_TYPES or path.exists() or looks_like_path(str(spec)):
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
    file one JSON string or object (with `column`) per line; any other table its `column`.
    `-` reads one text per line from standard input. No texts at all is an error."""
    if str(path) == STDIN:
        stream = getattr(sys.stdin, "buffer", None)
        text = _decode(stream.read(), "standard input") if stream else sys.stdin.read()
        return _some_texts(_lines(text), "standard input (--input -)")
    path = Path(path)
    if not path.is_file():
        raise Hm3Error(f"text file {path} does not exist; give a .txt file (one text per line) "
                       f"or a table ({', '.join(FILE_TYPES)})")
    return _some_texts(_file_texts(path, column), str(path))


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _some_texts(texts: list[str], name: str) -> list[str]:
    if not texts:
        raise Hm3Error(f"{name} has no texts (it is empty or holds only blank lines); give a "
                       "file with at least one text")
    return texts


def _file_texts(path: Path, column: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _lines(read_utf8(path))
    if suffix == ".jsonl":
        texts = []
        for number, line in enumerate(read_utf8(path).splitlines(), 1):
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
                               f"that holds the text with {COLUMN_OPTIONS['text_column']}")
        return texts
    rows = read_table(path)
    if rows and column not in rows[0]:
        raise Hm3Error(f"{path} has no column {column!r} (columns: {', '.join(map(str, rows[0]))});"
                       f" name the column that holds the text with {COLUMN_OPTIONS['text_column']}")
    texts = []
    for number, row in enumerate(rows, 1):
        if column not in row:  # JSON rows need not share their keys
            raise Hm3Error(f"{path} row {number} has no field {column!r} (its fields: "
                           f"{', '.join(map(str, row)) or 'none'}); give every row its text")
        text = row[column]
        # a null (JSON null, a Parquet or pandas missing value, a short CSV row) is no text:
        # str() would make it the text "None" or "nan"
        if text is None or (isinstance(text, float) and math.isnan(text)):
            raise Hm3Error(f"{path} row {number}: {column!r} is empty (null); fill in the text "
                           "or remove the row")
        texts.append(str(text))
    return texts


def read_table(path: str | Path) -> list[dict]:
    """The rows of a .csv / .tsv / .jsonl / .json / .parquet file as dicts."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise Hm3Error(f"{path} is a folder; give a data file ({', '.join(FILE_TYPES)})"
                       if path.is_dir() else f"data file {path} does not exist; check the path")
    if suffix not in FILE_TYPES:
        raise Hm3Error(f"{path}: unknown file type {suffix or '(none)'}; use one of "
                       f"{', '.join(FILE_TYPES)}")
    if suffix in (".csv", ".tsv"):
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        handle = io.StringIO(read_utf8(path), newline="")
        return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".parquet":
        try:
            import pandas  # lazy: an optional extra, needed only for Parquet
            return pandas.read_parquet(path).to_dict("records")
        except ImportError:
            raise Hm3Error(f"reading {path} needs pandas and pyarrow: {INSTALL_DATA}") from None
    text = read_utf8(path)
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


def check_limit(limit: Any, where: str) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise Hm3Error(f"{where}: expected a positive integer, got {limit!r}")


def _columns(rows: list[dict], text_column: str, label_column: str,
             source: str) -> tuple[list[str], list[Any]]:
    if not rows:
        raise Hm3Error(f"{source} has no rows")
    for column, option in ((text_column, "text_column"), (label_column, "label_column")):
        if column not in rows[0]:
            raise Hm3Error(f"{source} has no column {column!r} (columns: "
                           f"{', '.join(map(str, rows[0]))}); name the right one with "
                           f"{COLUMN_OPTIONS[option]}")
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
        import datasets  # lazy: an optional extra, needed only for hub datasets
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
                           f"{', '.join(data.column_names)}); name the right one with "
                           f"{COLUMN_OPTIONS[option]}")
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
