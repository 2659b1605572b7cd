"""The recipe's `data:` block (labelled validation / test data per task) and `calibration:` block
(unlabelled texts per task): validated before anything is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hm3.data.tables import Dataset, check_limit, load_dataset
from hm3.errors import Hm3Error

DATA_FIELDS = ("path", "subset", "split", "text_column", "label_column", "limit", "expect",
               "validation")
# What a `validation:` entry may set; the rest (expect) is the task entry's.
_SOURCE_FIELDS = ("path", "subset", "split", "text_column", "label_column", "limit")


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
    check_limit(entry.get("limit"), f"{where}.limit")


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


SOURCE_FIELDS = ("path", "text_column", "subset", "split")
# Texts per task the label-free steps read at most: at base size the heads' refit needs several
# hundred per task (448-768 beat 128 by 4.8 points on the MPNet zoo, benchmarks/RESULTS.md §7);
# a user's texts are not cut below that.
DEFAULT_LIMIT = 1024


@dataclass(frozen=True)
class CalibrationSpec:
    """Where each task's unlabelled texts come from (labels, if any, are ignored): a source of
    its own, one shared by every task (a user's traffic), or both; a task reads its own source
    first, then the shared one, until it has `limit` texts."""

    sources: dict[str, dict[str, Any]]  # task -> {path, text_column[, subset, split]}
    limit: int = DEFAULT_LIMIT
    max_length: int = 128
    batch_size: int = 32
    shared: dict[str, Any] | None = None  # {path, text_column[, subset, split]} for every task

    def sources_of(self, task: str) -> list[dict[str, Any]]:
        """The task's sources in reading order: its own, then the shared one."""
        return [s for s in (self.sources.get(task), self.shared) if s is not None]

    def all_sources(self) -> list[dict[str, Any]]:
        return [*self.sources.values(), *([self.shared] if self.shared else [])]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.sources:
            out["texts"] = self.sources
        if self.shared:
            out["shared"] = self.shared
        return {**out, "limit": self.limit, "max_length": self.max_length,
                "batch_size": self.batch_size}


CALIBRATION_FORM = ("expected {texts: FILE} (the same unlabelled texts for every task), "
                    "{texts: {TASK: FILE, ...}} (a source per task) or both, {shared: FILE, "
                    "texts: {TASK: FILE}}; a FILE is a .txt file (one text per line), a CSV / "
                    "JSONL / Parquet table, or a hub dataset {path: ID, split: train}")


def parse_calibration_block(raw: Any, tasks: list[str]) -> CalibrationSpec | None:
    """Validate a recipe's `calibration:` block (None when absent) for these tasks. `texts` is one
    source (shared by every task) or a mapping of task to source; `shared` adds one source for
    every task beside the per-task ones."""
    if raw is None:
        return None
    where = "calibration"
    if not isinstance(raw, dict) or ("texts" not in raw and "shared" not in raw):
        raise Hm3Error(f"{where}: {CALIBRATION_FORM}")
    unknown = sorted(set(raw) - {"texts", "shared", "limit", "max_length", "batch_size"})
    if unknown:
        raise Hm3Error(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: texts, shared, "
                       "limit, max_length, batch_size")
    texts, shared = raw.get("texts"), None
    if "shared" in raw:
        shared = _source(raw["shared"], f"{where}.shared")
    if _is_one_source(texts, tasks):
        if shared is not None:
            raise Hm3Error(f"{where}: `texts` is one source for every task and `shared` another; "
                           "give the shared texts once (`shared:`), and per-task sources as "
                           "`texts: {TASK: FILE}`")
        shared, texts = _source(texts, f"{where}.texts"), {}
    elif texts is None:
        texts = {}
    elif not isinstance(texts, dict):
        raise Hm3Error(f"{where}.texts: {CALIBRATION_FORM}")
    extra = sorted(map(str, set(texts) - set(tasks)))
    if extra:
        raise Hm3Error(f"{where}.texts: unknown task(s) {', '.join(extra)}; tasks are "
                       f"{', '.join(tasks)} (for texts every task reads, use `shared: FILE`)")
    missing = [t for t in tasks if t not in texts]
    if missing and shared is None:
        raise Hm3Error(f"{where}.texts: needs texts for every task (missing: "
                       f"{', '.join(missing)}); give each task a source, or add `shared: FILE` "
                       "(texts every task reads, e.g. your traffic)")
    sources = {task: _source(texts[task], f"{where}.texts.{task}") for task in tasks
               if task in texts}
    limit = positive_int(raw.get("limit", DEFAULT_LIMIT), f"{where}.limit")
    max_length = positive_int(raw.get("max_length", 128), f"{where}.max_length")
    if max_length < 2:
        raise Hm3Error(f"{where}.max_length: expected at least 2 tokens, got {max_length}")
    batch_size = positive_int(raw.get("batch_size", 32), f"{where}.batch_size")
    return CalibrationSpec(sources, limit, max_length, batch_size, shared)


def _is_one_source(texts: Any, tasks: list[str]) -> bool:
    """Whether `texts` names one source rather than mapping tasks to sources (a mapping with a
    `path` that is not a task name is a source)."""
    return isinstance(texts, str) or (isinstance(texts, dict) and "path" in texts
                                      and "path" not in tasks)


def _source(entry: Any, where: str) -> dict[str, Any]:
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
        raise Hm3Error(f"{where}: expected a file path, {{path: FILE, text_column: text}} or a "
                       "hub dataset {path: ID, subset: ..., split: train}")
    bad = sorted(map(str, set(entry) - set(SOURCE_FIELDS)))
    if bad:
        raise Hm3Error(f"{where}: unknown field(s) {', '.join(bad)}; allowed: "
                       f"{', '.join(SOURCE_FIELDS)}")
    for key in ("text_column", "subset", "split"):
        if key in entry and not isinstance(entry[key], str):
            raise Hm3Error(f"{where}.{key}: expected a string, got {entry[key]!r}")
    return {"path": entry["path"], "text_column": entry.get("text_column", "text"),
            **{k: entry[k] for k in ("subset", "split") if k in entry}}


def positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Hm3Error(f"{where}: expected a positive integer, got {value!r}")
    return value
