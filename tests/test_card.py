"""The merged folder's model card (README.md) and recipe YAML."""

from __future__ import annotations

import ast
import contextlib
import io
import re

import torch
import yaml
from safetensors.torch import load_file

from hm3 import load, merge, parse_recipe
from hm3.cli import main

from conftest import classifier_tolerance, recipe_dict


def test_merge_writes_a_card_and_a_recipe_that_reproduces_the_model(family, tmp_path):
    base, experts = family
    out = tmp_path / "merged"
    merge(parse_recipe(recipe_dict(base, experts, parameters={"density": 0.5})), out,
          progress=False)
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "hm3" in front["tags"]
    assert "base_model" not in front  # local paths are not hub ids
    assert "| sentiment | [0:2) | single-label | negative, positive |" in card
    assert "| topic | [2:5) | single-label | news, sport, film |" in card
    assert "method: `ties`" in card
    assert f"- topic: `{experts['topic']}`, parameters `{{\"density\": 0.5}}`" in card

    # the recipe beside config.json merges the same model again
    again = tmp_path / "again"
    assert main(["merge", str(out / "hm3_recipe.yaml"), "-o", str(again), "--no-progress"]) == 0
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)

    # the card's plain-transformers snippet runs and gives hm3's per-task probabilities
    snippet = re.search(r"With plain transformers.*?```python\n(.*?)```", card, re.S).group(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet.replace("PATH_OR_HUB_ID", str(out)).replace('"some text"', '"good film"'),
             {})
    model = load(out, device="cpu")
    want = model.predict(["good film"])[0]
    # float32 rounding of the two runs (conftest), and predict's rounding to 6 decimals
    tolerance = classifier_tolerance(model, ["good film"]) + 1e-6

    # the hm3 snippet returns what its comments say: one text, one dict; a list, a list
    snippet = re.search(r"With hm3.*?```python\n(.*?)```", card, re.S).group(1)
    with contextlib.redirect_stdout(hm3_printed := io.StringIO()):
        exec(snippet.replace("PATH_OR_HUB_ID", str(out)), {})
    one, many = map(ast.literal_eval, hm3_printed.getvalue().splitlines())
    assert list(one) == ["sentiment", "topic"] and set(one["topic"]) == {
        "label", "score", "probabilities"}
    assert isinstance(many, list) and len(many) == 2 and list(many[0]) == list(one)

    lines = printed.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["sentiment", "topic"]
    for line, task in zip(lines, ["sentiment", "topic"]):
        values = yaml.safe_load(line.split(" ", 1)[1])
        for label, p in want[task]["probabilities"].items():
            assert abs(values[label] - p) < tolerance


def test_the_written_recipe_re_creates_a_label_free_merge_bit_for_bit(family, tmp_path):
    """The written recipe keeps what the merge read: the `data:` block (its texts stay out of
    the calibration when merging again; relative paths resolved), the calibration batch size,
    the steps' options."""
    import json

    base, experts = family
    folder = tmp_path / "recipe"
    folder.mkdir()
    words = ["good", "bad", "film", "match", "news", "plot", "score", "goal", "vote", "song"]
    texts = [f"{a} {b} {c}" for a in words for b in words[:4] for c in words[:2]]
    (folder / "traffic.txt").write_text("\n".join(texts) + "\n")
    held = texts[::5]  # also in the traffic: a merge that forgets `data:` calibrates on them
    for task, label in (("sentiment", "positive"), ("topic", "film")):
        (folder / f"{task}.jsonl").write_text(
            "".join(json.dumps({"text": t, "label": label}) + "\n" for t in held))
    raw = recipe_dict(base, experts, parameters={"density": 0.5})
    raw.update({"calibration": {"texts": "traffic.txt", "batch_size": 3},
                "data": {"sentiment": "sentiment.jsonl", "topic": "topic.jsonl"},
                "align_heads": {"ridge": 0.1}, "recentre": True})
    recipe_file = folder / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "merged"
    assert main(["merge", str(recipe_file), "-o", str(out), "--no-progress"]) == 0
    written = yaml.safe_load((out / "hm3_recipe.yaml").read_text())
    assert written["data"]["topic"] == str(folder / "topic.jsonl")
    again = tmp_path / "again"
    assert main(["merge", str(out / "hm3_recipe.yaml"), "-o", str(again), "--no-progress"]) == 0
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_the_card_recipe_keeps_which_experts_an_override_applies_to(family, tmp_path):
    """An override limited to one expert (`experts: [topic]`) stays limited in hm3_recipe.yaml;
    written without it, the recipe would apply the override to every expert."""
    base, experts = family
    out = tmp_path / "merged"
    recipe = parse_recipe(recipe_dict(base, experts, parameters={"density": 0.5}, overrides=[
        {"pattern": "bert.encoder.layer.0.*", "density": 0.9, "experts": ["topic"]}]))
    merge(recipe, out, progress=False)
    written = yaml.safe_load((out / "hm3_recipe.yaml").read_text())
    assert written["overrides"] == [{"pattern": "bert.encoder.layer.0.*", "density": 0.9,
                                     "experts": ["topic"]}]
    assert parse_recipe(written).overrides == recipe.overrides
