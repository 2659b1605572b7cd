"""hm3: merge text classifiers with different label sets into one multi-task model."""

__version__ = "0.1.0"

from hm3.errors import Hm3Error, Hm3Warning  # noqa: E402
from hm3.model import MultiTaskClassifier, load  # noqa: E402
from hm3.pipeline import merge  # noqa: E402
from hm3.recipe import Recipe, load_recipe, parse_recipe  # noqa: E402

__all__ = ["Hm3Error", "Hm3Warning", "MultiTaskClassifier", "Recipe", "load", "load_recipe",
           "merge", "parse_recipe"]
