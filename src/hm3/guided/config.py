"""The recipe's label-free blocks: `heads`, `calibration`, `recentre`, `lewis`, `regmean`,
`coefficients`. Validated with the rest of the recipe, before any tensor is read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hm3.errors import Hm3Error

HEAD_MODES = ("whole", "merge")
DEFAULT_HEADS = "whole"  # measured at least as good as merging the rows (benchmarks/RESULTS.md)
KEYS = ("heads", "calibration", "recentre", "lewis", "regmean", "coefficients", "align_heads")


SOURCE_FIELDS = ("path", "text_column", "subset", "split")


@dataclass(frozen=True)
class CalibrationSpec:
    """Where each task's unlabelled texts come from (labels, if any, are ignored): a source of
    its own, one shared by every task (a user's traffic), or both; a task reads its own source
    first, then the shared one, until it has `limit` texts."""

    sources: dict[str, dict[str, Any]]  # task -> {path, text_column[, subset, split]}
    limit: int = 256
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
        return {**out, "limit": self.limit, "max_length": self.max_length}


@dataclass(frozen=True)
class Lewis:
    """LEWIS layer-wise densities, min-max scaled into [gamma, epsilon]."""

    gamma: float = 0.3
    epsilon: float = 0.8


@dataclass(frozen=True)
class RegMean:
    """RegMean for linear layers; `alpha` scales the Grams' off-diagonal entries (1 keeps them:
    measured best on the zoo, against 0.9 and 0.5)."""

    alpha: float = 1.0


@dataclass(frozen=True)
class AlignHeads:
    """Closed-form refit of each task's head rows toward its expert's logits (ridge to the rows
    as merged)."""

    ridge: float = 0.1  # measured better than 1.0 on the zoo


@dataclass(frozen=True)
class Coefficients:
    """AdaMerging-style coefficients, one per expert per block, fitted by matching the experts."""

    steps: int = 40
    lr: float = 0.05
    low: float = 0.0
    high: float = 1.5
    batch_size: int = 16


@dataclass(frozen=True)
class Guided:
    """The label-free steps a recipe asks for."""

    heads: str = DEFAULT_HEADS
    calibration: CalibrationSpec | None = None
    recentre: bool = False
    lewis: Lewis | None = None
    regmean: RegMean | None = None
    coefficients: Coefficients | None = None
    align_heads: AlignHeads | None = None

    @property
    def needs_model(self) -> bool:
        """Whether the merge must run the model on calibration texts (in memory)."""
        return bool(self.recentre or self.lewis or self.regmean or self.coefficients
                    or self.align_heads)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"heads": self.heads}
        if self.calibration:
            out["calibration"] = self.calibration.to_dict()
        if self.recentre:
            out["recentre"] = True
        for name in ("lewis", "regmean", "coefficients", "align_heads"):
            block = getattr(self, name)
            if block is not None:
                out[name] = dict(block.__dict__)
        return out


def parse_guided(raw: dict, tasks: list[str]) -> Guided:
    """Read the label-free blocks of a recipe mapping (absent ones keep their defaults)."""
    heads = raw.get("heads", DEFAULT_HEADS)
    if heads not in HEAD_MODES:
        raise Hm3Error(f"heads: expected 'whole' (copy each task's head rows from its expert) or "
                       f"'merge' (merge them like the body), got {heads!r}")
    recentre = raw.get("recentre", False)
    if not isinstance(recentre, bool):
        raise Hm3Error(f"recentre: expected true or false, got {recentre!r}")
    lewis = _block(raw, "lewis", Lewis, {"gamma": _unit, "epsilon": _unit})
    if lewis and not lewis.gamma <= lewis.epsilon:
        raise Hm3Error(f"lewis: gamma ({lewis.gamma}) must not exceed epsilon ({lewis.epsilon}); "
                       "densities are scaled into [gamma, epsilon]")
    if lewis and lewis.gamma <= 0:
        raise Hm3Error("lewis.gamma: expected a density in (0, 1], got 0; a layer needs to keep "
                       "some of its task vector")
    regmean = _block(raw, "regmean", RegMean, {"alpha": _unit})
    coefficients = _block(raw, "coefficients", Coefficients,
                          {"steps": _positive_int, "lr": _positive, "low": _finite,
                           "high": _finite, "batch_size": _positive_int})
    if coefficients and not coefficients.low < coefficients.high:
        raise Hm3Error(f"coefficients: low ({coefficients.low}) must be below high "
                       f"({coefficients.high})")
    align_heads = _block(raw, "align_heads", AlignHeads, {"ridge": _positive})
    if regmean and coefficients:
        raise Hm3Error("regmean and coefficients cannot be combined: RegMean solves the linear "
                       "layers in closed form, which leaves no task vectors to weigh; keep one")
    calibration = _calibration(raw.get("calibration"), tasks)
    guided = Guided(heads, calibration, recentre, lewis, regmean, coefficients, align_heads)
    if guided.needs_model and calibration is None:
        wanted = [k for k in ("recentre", "lewis", "regmean", "coefficients", "align_heads")
                  if raw.get(k)]
        raise Hm3Error(f"{', '.join(wanted)}: needs unlabelled texts: add a `calibration:` block, "
                       "e.g. `calibration: {texts: traffic.txt}` (the same texts for every "
                       "task) or `{texts: {TASK: texts.txt, ...}}` (a file per task)")
    return guided


CALIBRATION_FORM = ("expected {texts: FILE} (the same unlabelled texts for every task), "
                    "{texts: {TASK: FILE, ...}} (a source per task) or both, {shared: FILE, "
                    "texts: {TASK: FILE}}; a FILE is a .txt file (one text per line), a CSV / "
                    "JSONL / Parquet table, or a hub dataset {path: ID, split: train}")


def _calibration(raw: Any, tasks: list[str]) -> CalibrationSpec | None:
    """The `calibration` block. `texts` is one source (shared by every task) or a mapping of
    task to source; `shared` adds one source for every task beside the per-task ones."""
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
    limit = _positive_int(raw.get("limit", 256), f"{where}.limit")
    max_length = _positive_int(raw.get("max_length", 128), f"{where}.max_length")
    if max_length < 2:
        raise Hm3Error(f"{where}.max_length: expected at least 2 tokens, got {max_length}")
    batch_size = _positive_int(raw.get("batch_size", 32), f"{where}.batch_size")
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


def _block(raw: dict, name: str, cls, checks: dict) -> Any:
    value = raw.get(name)
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if not isinstance(value, dict):
        raise Hm3Error(f"{name}: expected true or a mapping of its options "
                       f"({', '.join(checks)})")
    unknown = sorted(set(value) - set(checks))
    if unknown:
        raise Hm3Error(f"{name}: unknown option(s) {', '.join(unknown)}; allowed: "
                       f"{', '.join(checks)}")
    return cls(**{key: checks[key](v, f"{name}.{key}") for key, v in value.items()})


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Hm3Error(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _unit(value: Any, where: str) -> float:
    value = _finite(value, where)
    if not 0 <= value <= 1:
        raise Hm3Error(f"{where}: expected a number in [0, 1], got {value!r}")
    return value


def _positive(value: Any, where: str) -> float:
    value = _finite(value, where)
    if value <= 0:
        raise Hm3Error(f"{where}: expected a positive number, got {value!r}")
    return value


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Hm3Error(f"{where}: expected a positive integer, got {value!r}")
    return value
