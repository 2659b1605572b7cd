"""A `data:` block from command-line items: `TASK=FILE` (a task's labelled data) and
`TASK:OTHER=LABEL` (a cross-check: TASK's texts should get LABEL on OTHER's head)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from hm3.errors import Hm3Error


def data_block(data: Sequence[str] = (), expect: Sequence[str] = (), text_column: str = "text",
               label_column: str = "label", block: Mapping[str, Any] | None = None,
               limit: int | None = None) -> dict[str, Any]:
    """`block` (a recipe's `data:` block, or none) with the tasks of `data` added or replaced,
    the cross-checks of `expect` added, and every task cut to its first `limit` examples.

    - `data`: `TASK=FILE` items; FILE is a CSV / JSONL / Parquet file or hub dataset id.
    - `expect`: `TASK:OTHER=LABEL` items; TASK must be in `block` or `data`.
    - `text_column`, `label_column`: the columns of the files `data` names.
    """
    out: dict[str, Any] = dict(block or {})
    for item in data:
        task, sep, spec = item.partition("=")
        if not sep or not task or not spec:
            raise Hm3Error(f"--data expects TASK=FILE, got {item!r}")
        out[task] = {"path": spec, "text_column": text_column, "label_column": label_column}
    for item in expect:
        task, other, label = parse_expectation(item)
        if task not in out:
            raise Hm3Error(f"--expect {item}: no --data for task {task!r}")
        entry = _entry(out[task])
        out[task] = {**entry, "expect": {**entry.get("expect", {}), other: label}}
    if limit is not None:
        out = {task: {**_entry(e), "limit": limit} for task, e in out.items()}
    return out


def check_expected_heads(expect: Sequence[str], tasks: Sequence[str]) -> None:
    """Every head `expect` names is one of the model's `tasks`: named on the command line, a typo
    must not pass as "no such head"."""
    for item in expect:
        other = parse_expectation(item)[1]
        if other not in tasks:
            raise Hm3Error(f"--expect {item}: the model has no task {other!r}; its tasks are "
                           f"{', '.join(tasks)}")


def _entry(entry: Any) -> dict[str, Any]:
    """A `data:` entry as a mapping (the block also takes a bare path or hub id)."""
    return {"path": entry} if isinstance(entry, str) else dict(entry)


def parse_expectation(item: str) -> tuple[str, str, str]:
    """`TASK:OTHER=LABEL` as (TASK, OTHER, LABEL)."""
    head, sep, label = item.partition("=")
    task, colon, other = head.partition(":")
    if not (sep and colon and task and other and label):
        raise Hm3Error(f"--expect expects TASK:OTHER=LABEL, got {item!r}")
    return task, other, label
