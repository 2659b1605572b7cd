"""Label-free steps: each a module that declares its options and registers itself in the ordered
registry (`registry.py`); `steps.py` imports them in their run order. A step is a function of
what the pipeline hands it (the model in memory, the merge's opened sources, the calibration
texts and what was computed on them, `calibration.py`). This package's `__init__` imports only
the registry, so the recipe can read it without the steps (which import the engine)."""

from hm3.label_free.registry import STAGES, Step, StepRun, get_step, register, step_names

__all__ = ["STAGES", "Step", "StepRun", "get_step", "register", "step_names"]
