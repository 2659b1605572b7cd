"""Predictions written out: one JSON object per text (JSONL), or a table with a column per task
and per probability (CSV / TSV)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Sequence

from hm3.checkpoint import write_text_atomic
from hm3.errors import Hm3Error
from hm3.heads import TaskGroup

FORMATS = (".jsonl", ".ndjson", ".csv", ".tsv")


def check_format(path: str | Path) -> Path:
    """`path` as a Path, or an error when its suffix names no format of `FORMATS`."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise Hm3Error(f"--output {path}: expected a .jsonl, .csv or .tsv file name")
    return path


def prediction_lines(texts: Sequence[str], results: Sequence[dict]) -> str:
    """One JSON object per text: the text, then `MultiTaskClassifier.predict`'s answer."""
    return "".join(json.dumps({"text": text, **result}, ensure_ascii=False) + "\n"
                   for text, result in zip(texts, results))


def prediction_table(groups: Sequence[TaskGroup], texts: Sequence[str], results: Sequence[dict],
                     delimiter: str = ",") -> str:
    """Predictions as CSV/TSV: the text, each task's label (a multi-label task's labels joined by
    `|`), then one column per `task/label` probability (and the logits when asked)."""
    header = ["text", *(g.name for g in groups),
              *(f"{g.name}/{label}" for g in groups for label in g.labels)]
    with_logits = bool(results) and "logits" in results[0]
    if with_logits:
        header += [f"logit/{g.name}/{label}" for g in groups for label in g.labels]
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    for text, result in zip(texts, results):
        labels = [result[g.name]["label"] for g in groups]
        row = [text, *("|".join(x) if isinstance(x, list) else x for x in labels),
               *(result[g.name]["probabilities"][label] for g in groups for label in g.labels)]
        if with_logits:
            row += result["logits"]
        writer.writerow(row)
    return buffer.getvalue()


def format_predictions(path: str | Path, groups: Sequence[TaskGroup], texts: Sequence[str],
                       results: Sequence[dict]) -> str:
    """The predictions in the format the suffix of `path` names (`FORMATS`)."""
    suffix = check_format(path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return prediction_table(groups, texts, results, "\t" if suffix == ".tsv" else ",")
    return prediction_lines(texts, results)


def write_predictions(path: str | Path, groups: Sequence[TaskGroup], texts: Sequence[str],
                      results: Sequence[dict]) -> None:
    """Write the predictions to `path` in the format its suffix names (`FORMATS`)."""
    write_text_atomic(Path(path), format_predictions(path, groups, texts, results))
