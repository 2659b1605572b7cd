"""The model card's text from a hand-written `hm3` config block: no merge, every line checked."""

from __future__ import annotations

import pytest
import yaml

from hm3.card import RECIPE_FILE, _hub_id, model_card, write_card


def _block(**extra) -> dict:
    block = {
        "version": "9.9",
        "base": "org/base-model",
        "method": "ties",
        "parameters": {"density": 0.5},
        "seed": 7,
        "tasks": [
            {"name": "tone", "offset": 0, "labels": ["neg", "pos"], "multi_label": False},
            {"name": "tags", "offset": 2, "labels": ["a", "b", "c"], "multi_label": True,
             "threshold": 0.3},
        ],
        "sources": [{"task": "tone", "model": "org/tone-expert"},
                    {"task": "tags", "model": "/local/tags"}],
        "recipe": {"experts": [
            {"model": "org/tone-expert", "task": "tone", "revision": "main", "head": "classifier",
             "weight": 0.7},
            {"model": "/local/tags", "task": "tags"},
        ]},
    }
    block.update(extra)
    return block


def _front(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---")[1])


def test_the_front_matter_names_the_hub_models_only():
    front = _front(model_card(_block()))
    assert front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "text-classification"
    assert front["tags"] == ["hm3", "merge", "multi-task", "text-classification"]
    assert front["base_model"] == ["org/base-model", "org/tone-expert"]


def test_no_hub_model_leaves_base_model_out():
    block = _block(base="/local/base", sources=[{"task": "tone", "model": "./tone"}])
    assert "base_model" not in _front(model_card(block))


def test_each_task_row_gives_its_logit_slice_kind_labels_and_expert():
    card = model_card(_block())
    assert "# 2-task classifier merged with hm3" in card
    assert "One model that answers 2 classification tasks" in card
    assert "merged training-free by hm3 9.9 (HM3" in card
    assert "| tone | [0:2) | single-label | neg, pos | org/tone-expert |" in card
    assert "| tags | [2:5) | multi-label (threshold 0.3) | a, b, c | /local/tags |" in card


def test_a_multi_label_task_without_a_threshold_is_shown_at_one_half():
    block = _block()
    del block["tasks"][1]["threshold"]
    assert "| tags | [2:5) | multi-label (threshold 0.5) |" in model_card(block)


def test_a_task_without_a_source_has_an_empty_expert_cell():
    card = model_card(_block(sources=[]))
    assert "| tone | [0:2) | single-label | neg, pos |  |" in card


def test_the_method_lines_give_base_method_parameters_seed_and_each_experts_own_parameters():
    card = model_card(_block(task_vector_norms={"tone": 0.12345}))
    lines = card.splitlines()
    assert "- base: `org/base-model`" in lines
    assert '- method: `ties`, parameters `{"density": 0.5}`, seed 7' in lines
    # model, task, revision and head are not merge parameters; the norm as a share of the base's
    assert ('- tone: `org/tone-expert`, parameters `{"weight": 0.7}`, '
            "task vector 12.35% of the base's norm") in lines
    assert "- tags: `/local/tags`, parameters `{}`" in lines


def test_label_free_steps_are_listed_in_their_running_order_with_the_texts_each_task_used():
    report = {"recentre": {}, "lewis": {}, "calibration": {"tone": {"texts": 40},
                                                          "tags": {"texts": 12}},
              "fidelity": {"held_out": {"folds": 4, "tasks": {"tone": {"agreement": 0.9251},
                                                              "tags": {"agreement": 0.5}}}}}
    lines = model_card(_block(label_free=report)).splitlines()
    assert ("- label-free steps: lewis, recentre on unlabelled calibration texts "
            "(tone 40, tags 12); figures in config.json under `hm3.label_free`") in lines
    assert ("- agreement with each expert on the calibration texts, each scored by head steps "
            "fitted without it (4-fold): tone 92.5%, tags 50.0%") in lines


def test_a_report_under_the_old_key_is_still_shown_and_no_held_out_figures_no_line():
    card = model_card(_block(guided={"calibration": {"tone": {"texts": 3}}, "fidelity": {}}))
    assert ("- label-free steps: none on unlabelled calibration texts (tone 3); "
            "figures in config.json under `hm3.label_free`") in card.splitlines()
    assert "agreement with each expert" not in card


def test_without_label_free_steps_there_is_no_label_free_line():
    assert "label-free steps" not in model_card(_block())


def test_scores_get_a_table_with_four_decimals_and_none_no_section():
    card = model_card(_block(), scores={"tone": 0.87654, "tags": 0.5})
    assert ("## Scores\n\n| task | macro-F1 |\n| --- | --- |\n| tone | 0.8765 |\n"
            "| tags | 0.5000 |\n") in card
    assert "## Scores" not in model_card(_block())
    assert "## Scores" not in model_card(_block(), scores={})


def test_the_pipeline_warning_names_the_first_task():
    assert "(e.g. `tone`'s probabilities would not sum to 1)" in model_card(_block())


@pytest.mark.parametrize("name, hub", [
    ("org/model", True), ("org/model/extra", False), ("model", False), ("org/", False),
    ("/org/model", False), ("./org/model", False), ("~/model", False), ("", False),
    (None, False)])
def test_hub_ids_are_owner_slash_name_and_not_a_path(name, hub):
    assert _hub_id(name) is hub


def test_a_folder_that_exists_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert _hub_id("org/model") is False


def test_write_card_writes_the_recipe_as_yaml_in_its_order_and_the_card(tmp_path):
    recipe = {"method": "ties", "base": "org/b", "experts": [{"model": "x/é", "task": "t"}]}
    block = _block(recipe=recipe)
    write_card(tmp_path, {"hm3": block}, scores={"tone": 1.0})
    text = (tmp_path / RECIPE_FILE).read_text(encoding="utf-8")
    assert text.splitlines()[:2] == ["method: ties", "base: org/b"]  # not sorted
    assert "x/é" in text  # unicode kept as written
    assert yaml.safe_load(text) == recipe
    assert (tmp_path / "README.md").read_text() == model_card(block, {"tone": 1.0})


def test_the_card_tells_how_to_read_the_logits():
    """The one instruction a user of the plain model needs, stated where it is read."""
    text = " ".join(model_card(_block()).split())
    assert ("Its logits are one block per task: take a softmax per block (a sigmoid per label "
            "for multi-label tasks), never one softmax over all of them.") in text


def test_the_front_matter_is_tight_and_every_heading_stands_in_its_own_paragraph():
    lines = model_card(_block(), scores={"tone": 0.5}).splitlines()
    close = lines.index("---", 1)
    assert lines[0] == "---" and all(line.strip() for line in lines[1:close])
    assert lines[close + 1] == ""
    headings = [i for i, line in enumerate(lines) if line.startswith("#")]
    assert [lines[i] for i in headings] == [
        "# 2-task classifier merged with hm3", "## Tasks", "## Method", "## Scores", "## Use"]
    for i in headings:
        assert lines[i - 1] == "" and lines[i + 1] == ""


def test_a_block_without_sources_or_version_still_makes_a_card():
    block = _block()
    del block["sources"], block["version"]
    card = model_card(block)
    assert "| tone | [0:2) | single-label | neg, pos |  |" in card
    assert "None" not in card
    assert _front(card)["base_model"] == ["org/base-model"]


def test_the_tables_are_markdown_tables_with_their_header_rows():
    lines = model_card(_block(), scores={"tone": 0.5}).splitlines()
    tasks = lines.index("## Tasks")
    assert lines[tasks + 2:tasks + 4] == ["| task | logits | kind | labels | merged from |",
                                          "| --- | --- | --- | --- | --- |"]
    assert lines[tasks + 4].startswith("| tone |") and lines[tasks + 6] == ""
    scores = lines.index("## Scores")
    assert lines[scores + 2:scores + 5] == ["| task | macro-F1 |", "| --- | --- |",
                                           "| tone | 0.5000 |"]


def test_a_minimal_block_of_an_earlier_version_still_makes_a_card():
    """Only the tasks: no sources, parameters, recipe, norms; a label-free report without
    calibration or fidelity figures (the card reads each with a default)."""
    block = {"tasks": [{"name": "tone", "offset": 0, "labels": ["neg", "pos"]}],
             "label_free": {"recentre": {}}}
    lines = model_card(block).splitlines()
    assert "- method: `None`, parameters `{}`, seed None" in lines
    assert ("- label-free steps: recentre on unlabelled calibration texts (); figures in "
            "config.json under `hm3.label_free`") in lines
    assert not any(line.startswith("- tone:") for line in lines)  # no experts recorded


def test_each_paragraph_and_code_block_of_the_card_stands_apart():
    lines = model_card(_block(), scores={"tone": 0.5}).splitlines()
    starts = ("The full recipe is in `hm3_recipe.yaml`", "With hm3 (", "Serve it: `hm3 serve ",
              "With plain transformers", "A text-classification pipeline", "```python")
    for start in starts:
        at = next(i for i, line in enumerate(lines) if line.startswith(start))
        assert lines[at - 1] == "", start
    for at in (i for i, line in enumerate(lines) if line == "```"):  # each block's end
        assert lines[at + 1] == ""
    assert lines.count("```python") == 2 and lines.count("```") == 2
    # the command and the route are hm3's own: `hm3 serve MODEL --port N`, POST /v1/classify
    assert "Serve it: `hm3 serve PATH --port 8000` (POST /v1/classify)." in lines
    assert model_card(_block()).endswith(".\n")
