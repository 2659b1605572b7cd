"""MPNet end to end on a tiny model: every label-free step, with a multi-label expert, through the
RoBERTa-like head (`classifier.dense` + `classifier.out_proj`)."""

import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hm3
from hm3 import merge, parse_recipe

from conftest import WORDS, build_family, classifier_tolerance, recipe_dict, spread_head

TASKS = {"sentiment": ["negative", "positive"], "topic": ["news", "sport", "film"],
         "tags": ["urgent", "spam", "personal"]}
MULTI_LABEL = ("tags",)
OUT_PROJ = ("classifier.out_proj.weight", "classifier.out_proj.bias")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpnet")
    base, experts = build_family(root, TASKS, model_type="mpnet", multi_label=MULTI_LABEL)
    texts = {}
    for i, (task, folder) in enumerate(experts.items()):
        rng = random.Random(i)
        texts[task] = list(dict.fromkeys(" ".join(rng.choices(WORDS, k=rng.randint(2, 8)))
                                         for _ in range(60)))[:40]
        (root / f"{task}.txt").write_text("\n".join(texts[task]) + "\n")
        spread_head(folder, texts[task], seed=i)
    return root, base, experts, texts


@torch.no_grad()
def expert_logits(folder, texts):
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()


def rates(logits, multi_label):
    if multi_label:
        return (logits > 0).mean(0)
    return np.bincount(logits.argmax(1), minlength=logits.shape[1]) / len(logits)


def tensors(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def test_every_label_free_step_runs_on_mpnet_with_a_multi_label_expert(family, tmp_path):
    root, base, experts, texts = family
    calibration = {"texts": {task: str(root / f"{task}.txt") for task in experts}, "batch_size": 8}
    recipe = recipe_dict(base, experts, "ties", parameters={"density": 0.5}, heads="whole",
                         coefficients={"steps": 10, "lr": 0.05}, align_heads={"ridge": 0.1},
                         recentre=True, calibration=calibration)
    report = merge(parse_recipe(recipe), tmp_path / "merged", progress=False)
    label_free = report.label_free.to_dict()

    coefficients = label_free["coefficients"]
    assert coefficients["objective_after"] < coefficients["objective_before"]
    for task, entry in label_free["align_heads"]["tasks"].items():
        assert entry["mse_after"] < entry["mse_before"], task

    collapsed = [task for task, entry in label_free["recentre"]["tasks"].items()
                 if np.abs(np.subtract(entry["before"], entry["target"])).max() > 1 / 40]
    assert collapsed, "no label share moved in the merge, so re-centring was not exercised"

    model = hm3.load(tmp_path / "merged", device="cpu")
    assert [(g.name, g.multi_label) for g in model.groups] == [
        ("sentiment", False), ("topic", False), ("tags", True)]
    for task, folder in experts.items():
        multi = task in MULTI_LABEL
        group = model.group(task)
        got = rates(model.logits(texts[task])[:, group.offset:group.stop], multi)
        want = rates(expert_logits(folder, texts[task]), multi)
        # re-centring, run last, gives each label the expert's share of the texts
        np.testing.assert_allclose(got, want, atol=1 / len(texts[task]) + 1e-6, err_msg=task)
    # the hidden head layer (classifier.dense) is merged like the body; the final projection
    # carries one block of rows per expert
    merged = tensors(tmp_path / "merged")
    assert merged["classifier.out_proj.weight"].shape == (8, 32)
    assert merged["classifier.dense.weight"].shape == (32, 32)
    prediction = model.predict(["good news today"])[0]
    assert set(prediction) == set(TASKS)
    assert isinstance(prediction["tags"]["label"], list)  # multi-label: the labels over threshold
    assert prediction["topic"]["label"] in prediction["topic"]["probabilities"]


@pytest.mark.numeric
def test_plain_merge_of_one_mpnet_expert_reproduces_it(family, tmp_path):
    _, base, experts, texts = family
    merge(parse_recipe(recipe_dict(base, {"tags": experts["tags"]}, "ties")), tmp_path / "one",
          progress=False)
    model = hm3.load(tmp_path / "one", device="cpu")
    # the standardised head (spread_head) sums terms of ~500 into logits of ~3: its float32
    # rounding is that of the terms (conftest.float32_tolerance), not of the logits
    np.testing.assert_allclose(model.logits(texts["tags"]),
                               expert_logits(experts["tags"], texts["tags"]),
                               rtol=0, atol=classifier_tolerance(model, texts["tags"]))
    assert model.groups[0].multi_label
