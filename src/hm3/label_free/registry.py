"""The label-free step registry: each step declares its name, its options (one frozen dataclass
whose fields carry their defaults and checks), what it needs, where in the merge it runs and
whether a search may run it per trial; the recipe reads and writes its block from that one
declaration, and the pipeline runs the registered steps stage by stage, in the order of `STAGES`.

A new step is one module that subclasses `Step` and calls `register`, plus its import in
`hm3/label_free/steps.py` (the order of those imports is the order of the steps within a stage).
This module imports nothing of hm3's but its errors and hm3.data's integer check, so the recipe
(at the bottom of the layers) can read the steps' options; the steps themselves sit above the
engine and register when `hm3` is imported.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from hm3.data.blocks import positive_int  # noqa: F401  (re-exported: the steps import it from here)
from hm3.errors import Hm3Error

# Where a step runs in the merge, in this order:
# - densities: before the body is merged, setting per-tensor merge parameters (LEWIS);
# - merge: the body merge itself, in place of the recipe method's (learned coefficients); the
#   method merges when no step of this stage is asked for;
# - body: on the merged body (RegMean, distill);
# - heads: on each task's head rows, from one pass over the calibration texts (align_heads,
#   recentre); the pipeline then cross-fits them to report held-out figures (`heads_stage.py`);
# - joint: on the whole model with its heads fitted (tune); the heads steps then run again on
#   what it left.
STAGES = ("densities", "merge", "body", "heads", "joint")
# What a step may need computed before it runs (`hm3.pipeline.calibrate`): the experts' logits on
# the calibration texts, LEWIS's layer importances.
NEEDS = ("expert_logits", "lewis_scores")
# Where a merged model's config.json records what the label-free steps did (under `hm3`);
# models merged by earlier versions have it under `guided`.
CONFIG_KEY = "label_free"
_OLD_CONFIG_KEYS = ("guided",)


def saved_report(block: dict | None) -> dict | None:
    """What the label-free steps did, from a merged model's `hm3` config block (None: none ran)."""
    block = block or {}
    for key in (CONFIG_KEY, *_OLD_CONFIG_KEYS):
        if block.get(key):
            return block[key]
    return None


# --- option checks: each takes (value, where) and returns the value or raises ----------------
# (`positive_int` is the calibration block's, from hm3.data.blocks)

def positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise Hm3Error(f"{where}: expected a positive number, got {value!r}")
    return float(value)


def non_negative(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise Hm3Error(f"{where}: expected a number of at least 0, got {value!r}")
    return float(value)


def finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Hm3Error(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise Hm3Error(f"{where}: expected a number in [0, 1], got {value!r}")
    return float(value)


def non_negative_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Hm3Error(f"{where}: expected a whole number of at least 0, got {value!r}")
    return value


def one_of(*choices: str) -> Callable[[Any, str], str]:
    def check(value: Any, where: str) -> str:
        if value not in choices:
            raise Hm3Error(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
        return value
    return check


def option(default: Any, check: Callable[[Any, str], Any], help: str) -> Any:
    """A step option: its default, the check a recipe's value passes, one line of help."""
    return dataclasses.field(default=default, metadata={"check": check, "help": help})


# --- steps ----------------------------------------------------------------------------------------

@dataclass
class StepRun:
    """What the pipeline hands a step: the model in memory (the merged model, once the body is
    merged), the merge's opened sources, the calibration (`hm3.pipeline.Calibrated`), and, for
    the steps that need them, where the merge records each expert's task-vector size
    (`squares`) and the head's inputs on each task's texts (`head_inputs`, heads stage). A
    densities step may replace `sources` (the recipe with its per-tensor parameters)."""

    model: Any
    sources: Any
    calibrated: Any
    progress: bool = False
    squares: Any = None
    head_inputs: dict | None = None


@dataclass
class HeadFit:
    """One task's head as the heads steps leave it in a cross-fitting fold: its rows
    (rows x columns [+ 1 for the bias], float64) and a shift added to its logits (or None)."""

    rows: Any
    shift: Any = None


class Step:
    """A label-free step. Subclasses set the class attributes and implement `apply`.

    - `name`: the recipe key (`distill: {...}`).
    - `options`: a frozen dataclass of the step's options, each declared with `option(...)`.
    - `report`: the dataclass `apply` returns; it has `summary()` (a line, or lines, for the
    command line) and is written to config.json by `report_dict`.
    - `stage`: where it runs, one of `STAGES`.
    - `needs`: what of `NEEDS` it reads.
    - `per_trial`: whether a search may run it on every trial (False: the search refuses a recipe
    with it, saying `search_refusal`).
    - `conflicts`: other steps it cannot run with, each with the reason.
    - `reference`: the paper or page the step follows.
    """

    name: ClassVar[str]
    options: ClassVar[type]
    report: ClassVar[type]
    stage: ClassVar[str] = "body"
    needs: ClassVar[tuple[str, ...]] = ()
    per_trial: ClassVar[bool] = False
    search_refusal: ClassVar[str] = ("would run again on every trial (minutes each); search "
                                     "without it, then add it to the best recipe (best.json) and "
                                     "run `hm3 merge`")
    conflicts: ClassVar[dict[str, str]] = {}
    reference: ClassVar[str] = ""

    def apply(self, run: StepRun, options: Any) -> Any:
        """Change `run.model` in place (a densities step: `run.sources`); return a report."""
        raise NotImplementedError

    def check(self, sources: Any, options: Any) -> None:
        """Fail before any work when the step cannot run on these sources (head, method)."""

    def refit_fold(self, options: Any, report: Any, group: Any, inputs: Any, targets: Any,
                   train: Any, fit: HeadFit) -> None:
        """Heads stage: the step fitted on the texts `train` (a mask) only, applied to `fit` in
        place; `inputs` the head's inputs on the task's texts, `targets` its expert's logits,
        `report` what `apply` did (e.g. the ridge it chose)."""
        raise NotImplementedError

    def parse(self, raw: Any) -> Any:
        """The step's options from its recipe block (`true` or a mapping), checked."""
        if raw is True:
            return self.validate(self.options())
        if not isinstance(raw, dict):
            raise Hm3Error(f"{self.name}: expected true or a mapping of its options "
                           f"({', '.join(self.option_names())})")
        unknown = sorted(set(raw) - set(self.option_names()))
        if unknown:
            raise Hm3Error(f"{self.name}: unknown option(s) {', '.join(map(str, unknown))}; "
                           f"allowed: {', '.join(self.option_names())}")
        fields = {f.name: f for f in dataclasses.fields(self.options)}
        values = {key: fields[key].metadata["check"](value, f"{self.name}.{key}")
                  for key, value in raw.items()}
        return self.validate(self.options(**values))

    def validate(self, options: Any) -> Any:
        """Checks across options (override to add some); returns the options."""
        return options

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options)]

    @staticmethod
    def to_dict(options: Any) -> Any:
        """The step's recipe block for `options`."""
        return dataclasses.asdict(options)

    def report_dict(self, report: Any) -> dict[str, Any]:
        """The report as written to config.json: its fields and its summary."""
        return {**dataclasses.asdict(report), "summary": report.summary()}

    def write_files(self, report: Any, folder: Any) -> None:
        """Files the step adds to the merged model's folder (a plot, say); none by default."""

    def read_report(self, entry: dict[str, Any]) -> Any:
        """A report from what `report_dict` wrote (for `hm3 inspect`)."""
        names = {f.name for f in dataclasses.fields(self.report)}
        return self.report(**{key: value for key, value in entry.items() if key in names})


_STEPS: dict[str, Step] = {}


def register(step: Step) -> Step:
    """Add a step to the registry; a second step of the same name is an error."""
    if step.name in _STEPS:
        raise ValueError(f"a label-free step named {step.name!r} is already registered")
    if step.stage not in STAGES:
        raise ValueError(f"step {step.name}: stage {step.stage!r} is not one of {STAGES}")
    if set(step.needs) - set(NEEDS):
        raise ValueError(f"step {step.name}: needs {step.needs}, not all of {NEEDS}")
    _STEPS[step.name] = step
    return step


def get_step(name: str) -> Step:
    try:
        return _STEPS[name]
    except KeyError:
        raise KeyError(f"unknown label-free step {name!r}; known: {', '.join(_STEPS)}") from None


def step_names(stage: str | None = None) -> tuple[str, ...]:
    """Registered steps in the order they run (by stage, then registration); with `stage`,
    that stage's only."""
    return tuple(name for each in STAGES if stage in (None, each)
                 for name, step in _STEPS.items() if step.stage == each)
