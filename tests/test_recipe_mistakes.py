"""Mistakes a user makes in a recipe, made loud (an error naming the field, or a warning), and
recipe rules checked against values computed here: later overrides win, a recipe's own test
data never calibrates its merge."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from safetensors import safe_open

import hm3
from hm3 import Hm3Error, Hm3Warning, merge, parse_recipe
from hm3.cli import main

from conftest import WORDS, build_family, recipe_dict
from test_method_reference import ref_magnitude

TASKS = {"sentiment": ["negative", "positive"], "topic": ["news", "sport", "film"]}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistakes")
    base, experts = build_family(root, TASKS)
    return root, base, experts


def read(folder) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({k: handle.get_tensor(k).double().numpy() for k in handle.keys()})
    return out


def test_later_overrides_win(fam, tmp_path):
    _, base, experts = fam
    name = "bert.encoder.layer.1.output.dense.weight"
    raw = recipe_dict(base, experts, "magnitude", overrides=[
        {"pattern": "bert.encoder.layer.1.*", "density": 0.1},
        {"pattern": "*.output.dense.weight", "density": 0.6},
        {"pattern": "bert.encoder.layer.0.*", "density": 0.3}])
    merge(parse_recipe(raw), tmp_path / "out", progress=False)
    got = read(tmp_path / "out")
    theta0 = read(base)[name.partition(".")[2]]
    want = theta0 + sum(ref_magnitude(read(folder)[name] - theta0, 0.6)
                        for folder in experts.values())
    np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-6)
    other = "bert.encoder.layer.1.attention.self.query.weight"  # only the first matches
    theta0 = read(base)[other.partition(".")[2]]
    want = theta0 + sum(ref_magnitude(read(folder)[other] - theta0, 0.1)
                        for folder in experts.values())
    np.testing.assert_allclose(got[other], want, rtol=0, atol=1e-6)


def test_an_override_that_matches_no_tensor_is_an_error(fam, tmp_path):
    _, base, experts = fam
    raw = recipe_dict(base, experts, "ties", overrides=[{"pattern": "encoder.layer.*",
                                                         "density": 0.2}])
    with pytest.raises(Hm3Error, match=r"overrides\[0\].pattern 'encoder.layer.\*' matches no "
                                       r"tensor.*bert\.encoder"):
        merge(parse_recipe(raw), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_weights_that_sum_to_zero_under_normalisation_are_an_error(fam, tmp_path, method):
    _, base, experts = fam
    raw = recipe_dict(base, experts, method, parameters={"normalize": True})
    raw["experts"][0]["weight"], raw["experts"][1]["weight"] = 1.0, -1.0
    with pytest.raises(Hm3Error, match="sum of the experts' weights, which is 0.*normalize"):
        merge(parse_recipe(raw), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    raw["parameters"]["normalize"] = False  # a plain difference is a valid merge
    merge(parse_recipe(raw), tmp_path / "out", progress=False)


def test_the_same_expert_under_two_task_names_is_warned_about(fam):
    _, base, experts = fam
    raw = recipe_dict(base, {"topic": experts["topic"], "topic2": experts["topic"]}, "ties")
    with pytest.warns(Hm3Warning, match="listed twice, as tasks topic and topic2"):
        parse_recipe(raw)


def test_a_calibration_block_no_step_uses_is_warned_about(fam, tmp_path):
    root, base, experts = fam
    texts = root / "texts.txt"
    texts.write_text("good film\nfree money\n")
    raw = recipe_dict(base, experts, "ties",
                      calibration={"texts": {task: str(texts) for task in TASKS}})
    with pytest.warns(Hm3Warning, match=r"^the recipe's `calibration:` texts are not used: no "
                                        r"step reads them \(add lewis, coefficients, regmean, "
                                        r"distill, align_heads, recentre or tune, or drop the "
                                        r"block\)$"):
        merge(parse_recipe(raw), tmp_path / "out", progress=False)


def test_merge_keeps_the_recipes_own_test_data_out_of_calibration_and_says_so(fam, tmp_path):
    root, base, experts = fam
    calibration = [f"{a} {b} {c}" for a in WORDS[:5] for b in WORDS[5:10] for c in WORDS[10:12]]
    (tmp_path / "calibration.txt").write_text("\n".join(calibration) + "\n")
    test = [{"text": calibration[i], "label": "news"} for i in range(0, 30, 3)]  # 10 shared
    validation = [{"text": calibration[31], "label": "sport"}, {"text": "vote", "label": "film"}]
    for name, rows in (("test.jsonl", test), ("validation.jsonl", validation)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = recipe_dict(base, experts, "ties", lewis={},
                      calibration={"texts": {t: "calibration.txt" for t in TASKS}},
                      data={"topic": {"path": "test.jsonl", "validation": "validation.jsonl"}})
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    with pytest.warns(Hm3Warning, match="calibration texts of topic: 11 also appear in the "
                                        "held-out"):
        report = merge(hm3.load_recipe(recipe_path), tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "lewis_densities.png").exists()  # the step's own file
    provenance = report.label_free.to_dict()["calibration"]
    assert provenance["topic"]["held_out_removed"] == 11
    assert provenance["topic"]["texts"] == len(calibration) - 11
    # a text any task is scored on is held out of every task's calibration
    assert provenance["sentiment"]["held_out_removed"] == 11


def test_load_prints_nothing(fam, tmp_path, capfd):
    from transformers.utils import logging

    _, base, experts = fam
    was_enabled = logging.is_progress_bar_enabled()
    logging.enable_progress_bar()  # as in a fresh interpreter (the CLI's tests turn bars off)
    try:
        capfd.readouterr()
        model = hm3.load(experts["topic"], device="cpu")
        assert model.predict(["good film"])[0]["topic"]["label"] in TASKS["topic"]
        captured = capfd.readouterr()
        assert captured.out == "" and captured.err == ""
        assert logging.is_progress_bar_enabled()  # ... and leaves the setting as it was
    finally:
        if not was_enabled:
            logging.disable_progress_bar()


def test_label_free_steps_show_progress_from_their_first_step(fam, tmp_path, capsys):
    root, base, experts = fam
    texts = root / "texts.txt"
    texts.write_text("good film\nfree money win\nwho won the vote\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(
        base, experts, "ties", lewis={}, recentre=True,
        calibration={"texts": {task: str(texts) for task in TASKS}})))
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "experts on calibration texts" in err and "lewis importance" in err
    assert err.index("experts on calibration texts") < err.index("merging")


# --- messages that name the field to write ------------------------------------------------------

@pytest.mark.parametrize("raw, message", [
    (None, r"^the recipe is empty: write at least `base: MODEL` and `experts: \[\{model: MODEL, "
           r"task: NAME\}, \.\.\.\]`$"),
    ({"experts": [{"model": "a", "task": "spam"}]},
     r"^base: missing; give the model the experts were fine-tuned from, e\.g\. "
     r"`base: bert-base-uncased`$"),
    ({"model": "b", "experts": [{"model": "a", "task": "spam"}]},
     r"^base: missing; the model the experts were fine-tuned from is `base:`, not `model:` "
     r"\(`model:` names each expert\), e\.g\. `base: bert-base-uncased`$"),
    ({"base": {"revision": "main"}, "experts": [{"model": "a", "task": "spam"}]},
     r"^base: expected a local path or hub id, e\.g\. `base: bert-base-uncased` or "
     r"`base: \{model: bert-base-uncased, revision: main\}`, got \{'revision': 'main'\}$"),
    ({"base": "b", "experts": [{"model": "a", "task": "spam"}, {"model": "c/d"}]},
     r"^experts\[1\] \(c/d\): no `task:`; add `task: NAME`, the name of its group of labels in "
     r"the merged model \(e\.g\. `task: d`\)$"),
    ({"base": "b", "experts": [{"task": "spam"}]},
     r"^experts\[0\] \(task spam\): no `model:`; add `model: PATH_OR_HUB_ID`, the expert's "
     r"folder or hub id$"),
    ({"base": "b", "experts": [{"model": "a", "task": "x/y"}]},
     r"^experts\[0\]\.task: expected a non-empty name without '/', got 'x/y'$"),
    ({"base": "b", "experts": ["a"]},
     r"^experts\[0\]: expected a mapping such as `\{model: a, task: NAME\}`, got 'a'$"),
    ({"base": "b", "experts": [{"model": "a", "task": "spam"}], "method": "TIES"},
     r"^method: unknown merge method 'TIES'; choose one of linear, .*iso_c, tsv \(did you mean "
     r"'ties'\?\)$"),
    ({"base": "b", "experts": [{"model": "a", "task": "spam"}], "method": "dare-ties"},
     r"^method: unknown merge method 'dare-ties'; .* \(did you mean 'dare_ties'\?\)$"),
    ({"base": "b", "experts": [{"model": "a", "task": "spam"}], "head": "classifier"},
     r"^head: expected \{weight: TENSOR_NAME, bias: TENSOR_NAME\}, got 'classifier'$"),
    ({"base": "b", "experts": [{"model": "a", "task": "spam", "head": {"bias": "c.bias"}}]},
     r"^experts\[0\]\.head: expected \{weight: TENSOR_NAME, bias: TENSOR_NAME\}, got "),
    ({"base": "b", "experts": [{"model": "a", "task": "spam"}],
      "overrides": {"pattern": "*.layer.0.*", "density": 0.3}},
     r"^overrides: expected a list of \{pattern: GLOB, density: \.\.\., weight: \.\.\.\}, "
     r"got a mapping; write it as `overrides: \[\{pattern: \.\.\.\}\]`$"),
])
def test_a_missing_or_malformed_field_is_named_with_what_to_write(raw, message):
    with pytest.raises(Hm3Error, match=message):
        parse_recipe(raw)
