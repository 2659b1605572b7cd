"""Deduplicate labelled texts and split them deterministically into
train/validation/test/calibration."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence

from sklearn.model_selection import train_test_split

from hm3.data.calibration import text_key

SPLITS = ("train", "validation", "test", "calibration")

# (text, label name), or (text, tuple of label names) for a multi-label task
Example = tuple[str, str | tuple[str, ...]]


def deduplicate(examples: Iterable[Example]) -> list[Example]:
    """Keep the first occurrence of each text; drop empty texts and texts seen with two labels.

    A text with conflicting labels cannot be scored fairly whichever label it keeps.
    """
    first: dict[str, Example] = {}
    labels: dict[str, set[str]] = {}
    for text, label in examples:
        key = text_key(text)
        if key:
            first.setdefault(key, (text, label))
            labels.setdefault(key, set()).add(label)
    return [example for key, example in first.items() if len(labels[key]) == 1]


def split_examples(
    examples: Sequence[Example],
    seed: int,
    *,
    n_validation: int = 300,
    n_test: int = 300,
    n_calibration: int = 256,
    max_train: int | None = None,
) -> dict[str, list[Example]]:
    """Split examples into disjoint train, validation, test and calibration sets.

    - `examples`: deduplicated (text, label) pairs.
    - `seed`: the same seed always gives the same split.
    - `n_validation`, `n_test`, `n_calibration`: requested sizes; each is cut to a fifth of the
    data when the data is too small, so that training keeps the larger part.
    - `max_train`: cap on the training set (a stratified sample of what remains); None keeps all.

    Returns a dict with keys `SPLITS`, each a list of (text, label). Draws are stratified by
    label where every label has at least two examples. Calibration is meant for label-free
    methods; it keeps its labels only so that every split has one format.
    """
    cap = len(examples) // 5
    test, pool = _draw(list(examples), min(n_test, cap), seed)
    validation, pool = _draw(pool, min(n_validation, cap), seed)
    calibration, pool = _draw(pool, min(n_calibration, cap), seed)
    train, _ = _draw(pool, len(pool) if max_train is None else max_train, seed)
    return {"train": train, "validation": validation, "test": test, "calibration": calibration}


def _draw(pool: list[Example], n: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Take `n` seeded-random examples out of `pool`; return (taken, rest)."""
    if n <= 0:
        return [], pool
    if n >= len(pool):
        taken = list(pool)
        random.Random(seed).shuffle(taken)
        return taken, []
    labels = [_stratum(label) for _, label in pool]
    counts = Counter(labels)
    # sklearn can stratify only when each side can hold at least one example of every label.
    can_stratify = min(counts.values()) >= 2 and len(counts) <= n <= len(pool) - len(counts)
    rest, taken = train_test_split(
        pool, test_size=n, random_state=seed, stratify=labels if can_stratify else None
    )
    return taken, rest


def _stratum(label: str | tuple[str, ...]) -> str:
    # A multi-label example is stratified by its first label ("" for none): label sets are too
    # many and too rare to stratify on whole.
    if isinstance(label, tuple):
        return label[0] if label else ""
    return label
