"""Build the zoo once into a cache keyed by its recipe: data splits, then one fine-tuned expert per task."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

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
    """How much of a task's data to train on, and for how long (sized to the CPU time budget)."""

    max_train: int
    epochs: int


# Sized for a first build of about 6-7 minutes on 2 idle CPU cores (training ~0.6 s per batch of
# 32 short texts, ~1 s at the full 64 tokens). More sentiment data buys ~0.1 macro-F1 there; the
# other three are near their ceiling at these sizes.
EXPERT_RECIPES = {
    "spam": ExpertRecipe(max_train=1200, epochs=2),
    "sentiment": ExpertRecipe(max_train=3000, epochs=2),
    "topic": ExpertRecipe(max_train=1000, epochs=2),
    "question": ExpertRecipe(max_train=2000, epochs=2),
}


@dataclass(frozen=True)
class Zoo:
    """A built zoo.

    Attributes
    ----------
    base : directory of the base encoder every expert was fine-tuned from (θ_0).
    experts : task -> Hugging Face model directory (loads with AutoModelForSequenceClassification).
    splits : task -> split name -> JSONL file with one {"text", "label"} object per line.
    labels : task -> label names in head order.
    scores : task -> {"validation": {...}, "test": {...}, "train_seconds": s}; each split holds the
        expert's macro_f1, accuracy and n, measured when it was built.
    """

    base: Path
    experts: dict[str, Path]
    splits: dict[str, dict[str, Path]]
    labels: dict[str, tuple[str, ...]]
    scores: dict[str, dict]


def zoo_recipe() -> dict:
    """Everything that determines the zoo's contents; its hash names the cache folder."""
    return {
        "zoo_version": ZOO_VERSION,
        "seed": SEED,
        "sources": source_versions(),
        "labels": {task: list(LABELS[task]) for task in TASKS},
        "sentiment_neutral_band": SENTIMENT_NEUTRAL_BAND,
        "split_sizes": SPLIT_SIZES,
        "training": asdict(TRAINING),
        "experts": {task: asdict(EXPERT_RECIPES[task]) for task in TASKS},
    }


def zoo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache folder of the current recipe: `cache_dir`, else $HM3_CACHE, else ~/.cache/hm3."""
    root = Path(cache_dir or os.environ.get("HM3_CACHE") or Path.home() / ".cache" / "hm3")
    recipe_json = json.dumps(zoo_recipe(), sort_keys=True)
    return root.expanduser() / f"zoo-{hashlib.sha256(recipe_json.encode()).hexdigest()[:12]}"


def build_zoo(
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    tasks: Iterable[str] = TASKS,
) -> Zoo:
    """Build (or reuse from the cache) the data splits and fine-tuned experts of `tasks`.

    Parameters
    ----------
    cache_dir : where zoos are kept; see `zoo_dir`. Only what is missing is built.
    progress : show a progress bar while fine-tuning.
    tasks : subset of `TASKS` to build; all by default.

    Returns
    -------
    Zoo with the paths of everything built. Each split folder and each expert folder is written
    under a temporary name and renamed into place when complete, so an interrupted build leaves
    nothing that looks finished.
    """
    tasks = tuple(tasks)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; expected a subset of {TASKS}")
    root = zoo_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    recipe_file = root / "recipe.json"  # a readable record of what the folder's hash stands for
    if not recipe_file.exists():
        partial = root / f".recipe.json.tmp-{os.getpid()}"
        partial.write_text(json.dumps(zoo_recipe(), indent=2, sort_keys=True))
        os.replace(partial, recipe_file)
    base = base_model_dir()

    splits, experts, scores = {}, {}, {}
    for task in tasks:
        split_dir = root / "splits" / task
        if not split_dir.is_dir():
            with atomic_directory(split_dir, overwrite=True) as tmp:
                _write_splits(task, tmp)
        splits[task] = {name: split_dir / f"{name}.jsonl" for name in SPLITS}

        experts[task] = root / "experts" / task
        if not experts[task].is_dir():
            with atomic_directory(experts[task], overwrite=True) as tmp:
                _train_expert(task, base, splits[task], tmp, progress)
        scores[task] = json.loads((experts[task] / SCORES_FILE).read_text())
    return Zoo(base=base, experts=experts, splits=splits, labels={t: LABELS[t] for t in tasks}, scores=scores)


def read_split(path: str | os.PathLike) -> list[Example]:
    """(text, label) pairs of one split file written by `build_zoo`."""
    with open(path, encoding="utf-8") as file:
        return [(row["text"], row["label"]) for row in map(json.loads, file)]


def _write_splits(task: str, folder: Path) -> None:
    parts = split_examples(
        load_examples(task), SEED, max_train=EXPERT_RECIPES[task].max_train, **SPLIT_SIZES
    )
    for name, examples in parts.items():
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as file:
            for text, label in examples:
                file.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


def _train_expert(task: str, base: Path, split_files: dict[str, Path], folder: Path, progress: bool) -> None:
    labels = LABELS[task]
    config = replace(TRAINING, epochs=EXPERT_RECIPES[task].epochs)
    started = time.perf_counter()
    model, tokenizer = finetune(
        base, read_split(split_files["train"]), labels, config, progress=progress, description=f"zoo: {task}"
    )
    train_seconds = time.perf_counter() - started
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    classifier = MultiTaskClassifier(model, tokenizer, [TaskGroup(task, labels, 0)], config.max_length)
    scores = {}
    for split in ("validation", "test"):
        examples = read_split(split_files[split])
        probabilities = classifier.predict_proba([text for text, _ in examples], batch_size=128)
        scores[split] = score_task(classifier.groups[0], [label for _, label in examples], probabilities[task])
    scores["train_seconds"] = round(train_seconds, 1)
    (folder / SCORES_FILE).write_text(json.dumps(scores, indent=2))
    if progress:
        tqdm.write(
            f"zoo: {task} expert validation macro-F1 {scores['validation']['macro_f1']:.3f}, "
            f"test {scores['test']['macro_f1']:.3f}"
        )
