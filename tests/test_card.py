"""The merged folder's model card (README.md) and recipe YAML."""

from __future__ import annotations

import contextlib
import io
import re

import yaml
from safetensors.torch import load_file

from conftest import recipe_dict

from hm3 import load, merge, parse_recipe
from hm3.cli import main


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
    want = load(out, device="cpu").predict(["good film"])[0]
    lines = printed.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["sentiment", "topic"]
    for line, task in zip(lines, ["sentiment", "topic"]):
        values = yaml.safe_load(line.split(" ", 1)[1])
        for label, p in want[task]["probabilities"].items():
            assert abs(values[label] - p) < 1e-5
