"""The label-free step registry: each step declares its name, its options (one frozen dataclass
whose fields carry their defaults and checks), what it needs, where in the merge it runs and
whether a search may run it per trial; the recipe reads and writes its block from that one
declaration, and the pipeline runs the registered steps in the order of `STAGES`.

A new step is one module that subclasses `Step` and calls `register`, plus its import in
`hm3/label_free/__init__.py`. This module imports nothing of hm3's but its errors and
hm3.data's integer check, so the recipe (at the bottom of the layers) can read the steps'
options.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

from hm3.data.blocks import positive_int  # noqa: F401  (re-exported: the steps import it from here)
from hm3.errors import Hm3Error

# Where a step runs in the merge: after the body is merged (and RegMean), before the heads'
# refit; more stages come as steps move here from hm3.guided.
STAGES = ("body",)


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


def fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise Hm3Error(f"{where}: expected a number in [0, 1], got {value!r}")
    return float(value)


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

class Step:
    """A label-free step. Subclasses set the class attributes and implement `apply`.

    name : the recipe key (`distill: {...}`).
    options : a frozen dataclass of the step's options, each declared with `option(...)`.
    stage : where it runs, one of `STAGES`.
    needs_expert_logits : whether it reads the experts' logits on the calibration texts.
    per_trial : whether a search may run it on every trial (False: too slow; the search refuses
        a recipe with it, and the user adds it to the best recipe afterwards).
    reference : the paper or page the step follows.
    """

    name: ClassVar[str]
    options: ClassVar[type]
    stage: ClassVar[str] = "body"
    needs_expert_logits: ClassVar[bool] = False
    per_trial: ClassVar[bool] = False
    reference: ClassVar[str] = ""

    def apply(self, model, sources, calibrated, options, progress: bool = False):
        """Change `model` in place; return a report (a dataclass with `summary()`)."""
        raise NotImplementedError

    def parse(self, raw: Any) -> Any:
        """The step's options from its recipe block (`true` or a mapping), checked."""
        if raw is True:
            return self.options()
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
    def to_dict(options: Any) -> dict[str, Any]:
        return dataclasses.asdict(options)


_STEPS: dict[str, Step] = {}


def register(step: Step) -> Step:
    """Add a step to the registry; a second step of the same name is an error."""
    if step.name in _STEPS:
        raise ValueError(f"a label-free step named {step.name!r} is already registered")
    if step.stage not in STAGES:
        raise ValueError(f"step {step.name}: stage {step.stage!r} is not one of {STAGES}")
    _STEPS[step.name] = step
    return step


def get_step(name: str) -> Step:
    try:
        return _STEPS[name]
    except KeyError:
        raise KeyError(f"unknown label-free step {name!r}; known: {', '.join(_STEPS)}") from None


def step_names() -> tuple[str, ...]:
    """Registered steps in the order they run (by stage, then registration)."""
    return tuple(name for stage in STAGES for name, step in _STEPS.items()
                 if step.stage == stage)
