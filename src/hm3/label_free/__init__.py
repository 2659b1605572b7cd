"""Label-free steps as an ordered registry (`registry.py`): each step one module that declares
its options and registers itself. A step is a function of what it is handed (the model in
memory, the merge's opened sources, the calibration texts) and imports nothing of the engine,
so the recipe can read every step's options from here. `distill` is the first; the older steps
(LEWIS, RegMean, coefficients, head alignment, re-centring) still live in `hm3.guided`."""

from hm3.label_free import distill  # noqa: F401  (registers the step)
from hm3.label_free.registry import Step, get_step, register, step_names

__all__ = ["Step", "get_step", "register", "step_names"]
