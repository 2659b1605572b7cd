"""hm3: merge text classifiers with different label sets into one multi-task model."""

__version__ = "0.1.0"
