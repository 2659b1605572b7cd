"""hm3: merge text classifiers with different label sets into one multi-task model."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module that defines it. Imported on first use (PEP 562), so that `import hm3`
# (and with it `hm3 --help`) does not pay for torch and transformers until something needs them.
_EXPORTS = {"Hm3Error": "hm3.errors", "Hm3Warning": "hm3.errors",
            "MultiTaskClassifier": "hm3.model", "load": "hm3.model", "merge": "hm3.pipeline",
            "Recipe": "hm3.recipe", "load_recipe": "hm3.recipe", "parse_recipe": "hm3.recipe"}

__all__ = ["Hm3Error", "Hm3Warning", "MultiTaskClassifier", "Recipe", "load", "load_recipe",
           "merge", "parse_recipe"]

if TYPE_CHECKING:  # what type checkers and editors see
    from hm3.errors import Hm3Error, Hm3Warning
    from hm3.model import MultiTaskClassifier, load
    from hm3.pipeline import merge
    from hm3.recipe import Recipe, load_recipe, parse_recipe


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hm3' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
