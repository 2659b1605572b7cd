"""The base-size zoo: eight experts fine-tuned from all-mpnet-base-v2 (110M parameters), two of
the guard kind users stack (jailbreak, multi-label toxicity), each with its own training recipe.

Experts downloaded from a hub are trained by different people with different recipes; so are
these: learning rate × epochs spans 10× between the gentlest and the hardest fine-tune.
"""

from __future__ import annotations

import os

from hm3.zoo.build import ExpertRecipe, Zoo, ZooSpec, build_zoo
from hm3.zoo.finetune import TrainingConfig
from hm3.zoo.guard_sources import (
    GUARD_LABELS,
    GUARD_TASKS,
    MPNET_FOLDER,
    MULTI_LABEL_TASKS,
    guard_source_versions,
    load_guard_examples,
    mpnet_base_dir,
)
from hm3.zoo.sources import LABELS, SENTIMENT_NEUTRAL_BAND, TASKS, load_examples, source_versions
from hm3.zoo.splits import Example

MPNET_TASKS = TASKS + GUARD_TASKS
MPNET_LABELS = {**LABELS, **GUARD_LABELS}

# Shorter texts, smaller sets and fewer steps than the MiniLM zoo: MPNet costs about eight times
# as much per token. A training step of 16 texts of at most 32 tokens takes about 5 s on 2 idle CPU
# cores: the eight fine-tunes (355 steps) took 49 min on 2 heavily shared cores (4.5-18 s a step;
# benchmarks/RESULTS.md, section 7). Splits are small so that evaluating all eight stays cheap.
MPNET_TRAINING = TrainingConfig(batch_size=16, learning_rate=3e-5, max_length=32, seed=0)
MPNET_SPLIT_SIZES = {"n_validation": 100, "n_test": 200, "n_calibration": 128}
# learning rate × epochs: 3e-5 for the gentlest fine-tunes (spam, tense), 3e-4 for the hardest
# (toxicity, multi-label): a 10x spread, as between experts downloaded from a hub.
MPNET_RECIPES = {
    "spam": ExpertRecipe(max_train=480, epochs=1, learning_rate=3e-5),
    "sentiment": ExpertRecipe(max_train=640, epochs=2, learning_rate=5e-5),
    "topic": ExpertRecipe(max_train=400, epochs=1, learning_rate=6e-5),
    "question": ExpertRecipe(max_train=640, epochs=2, learning_rate=5e-5),
    "jailbreak": ExpertRecipe(max_train=320, epochs=1, learning_rate=4e-5),
    "toxicity": ExpertRecipe(max_train=560, epochs=2, learning_rate=1.5e-4),
    "harm_area": ExpertRecipe(max_train=480, epochs=1, learning_rate=1e-4),
    "tense": ExpertRecipe(max_train=320, epochs=1, learning_rate=3e-5),
}


def _examples(task: str) -> list[Example]:
    return load_guard_examples(task) if task in GUARD_TASKS else load_examples(task)


def _sources() -> dict[str, str]:
    return {**source_versions(), **guard_source_versions()}


MPNET_ZOO = ZooSpec(
    prefix="zoo-mpnet",
    version=1,
    tasks=MPNET_TASKS,
    labels=MPNET_LABELS,
    experts=MPNET_RECIPES,
    training=MPNET_TRAINING,
    split_sizes=MPNET_SPLIT_SIZES,
    sources=_sources,
    examples=_examples,
    base=mpnet_base_dir,
    multi_label=MULTI_LABEL_TASKS,
    extra={"base": MPNET_FOLDER, "sentiment_neutral_band": SENTIMENT_NEUTRAL_BAND},
)


def build_mpnet_zoo(cache_dir: str | os.PathLike | None = None, progress: bool = True,
                    tasks=None) -> Zoo:
    """Build (or reuse from the cache) the base-size zoo; see `build_zoo`. The first build
    unpacks the base and fine-tunes eight experts: 52 min on 2 busy CPU cores."""
    return build_zoo(cache_dir, progress=progress, tasks=tasks, spec=MPNET_ZOO)
