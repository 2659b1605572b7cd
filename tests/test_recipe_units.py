"""The recipe schema's small pieces, each on hand-written input: reading a recipe file, YAML
errors on one line, hub ids against paths, overrides limited to experts, the `data:`-only file
of `hm3 eval --recipe`, and the label-free steps' lookup."""

from __future__ import annotations

import warnings

import pytest
import yaml

from hm3.errors import Hm3Error, Hm3Warning
from hm3.label_free import get_step
from hm3.recipe import (
    LabelFree,
    Override,
    _yaml_problem,
    load_data_recipe,
    load_recipe,
    parse_recipe,
    resolve_data_paths,
)

EXPERTS = [{"model": "org/tone", "task": "tone"}, {"model": "org/tags", "task": "tags"}]


def _recipe(**extra) -> dict:
    return {"base": "org/base", "experts": [dict(e) for e in EXPERTS], **extra}


def test_a_relative_model_path_under_the_recipes_folder_is_read_from_there(tmp_path):
    """docs/recipe.md: "A relative path (of the base, an expert, ...) that exists under the
    recipe's own folder is read from there; otherwise it is taken as given". `owner/name` and a
    bare name are such paths too when the folder is there (a recipe beside `experts/tone`)."""
    (tmp_path / "experts" / "tone" / "v1").mkdir(parents=True)
    (tmp_path / "experts" / "tags").mkdir(parents=True)
    (tmp_path / "base").mkdir()
    raw = _recipe(base="base")
    raw["experts"][0]["model"] = "experts/tone/v1"
    raw["experts"][1]["model"] = "experts/tags"
    recipe = parse_recipe(raw, root=tmp_path)
    assert recipe.base == str(tmp_path / "base")
    assert recipe.experts[0].model == str(tmp_path / "experts" / "tone" / "v1")
    assert recipe.experts[1].model == str(tmp_path / "experts" / "tags")
    raw = _recipe(base="./base")
    raw["experts"][0]["model"] = "./missing"
    recipe = parse_recipe(raw, root=tmp_path)
    assert recipe.base == str(tmp_path / "base")
    assert recipe.experts[0].model == "./missing"  # not there: left for the loader to report


def test_a_hub_id_that_is_also_a_folder_name_elsewhere_stays_a_hub_id(tmp_path):
    recipe = parse_recipe(_recipe(), root=tmp_path)
    assert recipe.base == "org/base" and recipe.experts[0].model == "org/tone"


def test_an_override_for_one_expert_applies_to_that_experts_tensors_only():
    recipe = parse_recipe(_recipe(method="ties", parameters={"density": 0.5}, overrides=[
        {"pattern": "*.layer.0.*", "density": 0.9, "experts": "tags"},
        {"pattern": "*.bias", "weight": 2.0}]))
    assert recipe.overrides == (
        Override(pattern="*.layer.0.*", parameters={"density": 0.9}, experts=("tags",)),
        Override(pattern="*.bias", parameters={"weight": 2.0}, experts=None))
    tone, tags = recipe.experts
    assert recipe.model_parameters("enc.layer.0.w", tags) == {"weight": 1.0, "density": 0.9}
    assert recipe.model_parameters("enc.layer.0.w", tone) == {"weight": 1.0, "density": 0.5}
    assert recipe.model_parameters("enc.layer.0.bias", tone) == {"weight": 2.0, "density": 0.5}
    assert recipe.model_parameters("enc.layer.1.w", tags) == {"weight": 1.0, "density": 0.5}


def test_an_override_pattern_matches_the_whole_name_case_sensitively():
    override = Override(pattern="enc.*.w", parameters={})
    assert override.applies("enc.layer.w", "t")
    assert not override.applies("Enc.layer.w", "t")
    assert not override.applies("x.enc.layer.w", "t")


@pytest.mark.parametrize("item, message", [
    ("*.bias", r"^overrides\[0\]: expected \{pattern: GLOB, density: \.\.\., weight: \.\.\.\}$"),
    ({"density": 0.5}, r"^overrides\[0\]: expected \{pattern"),
    ({"pattern": "*", "experts": ["tone", "nope", "also"]},
     r"^overrides\[0\]\.experts: unknown task\(s\) also, nope; known tasks are tags, tone$"),
    ({"pattern": "*", "colour": 1}, r"^overrides\[0\]: unknown field\(s\) colour; allowed: "),
])
def test_a_bad_override_names_its_index_and_what_is_wrong(item, message):
    with pytest.raises(Hm3Error, match=message):
        parse_recipe(_recipe(overrides=[item]))


def test_a_bad_override_value_is_named_by_the_override_and_the_field():
    with pytest.raises(Hm3Error, match=r"^overrides\[0\]\.density: expected a number in "
                                       r"\(0, 1\], got 1\.5$"):
        parse_recipe(_recipe(overrides=[{"pattern": "*", "density": 1.5}]))
    with pytest.raises(Hm3Error, match=r"^overrides\[1\]\.weight: expected a finite number"):
        parse_recipe(_recipe(overrides=[{"pattern": "*"}, {"pattern": "*", "weight": "x"}]))


def test_the_second_bad_override_is_named_by_its_own_index():
    with pytest.raises(Hm3Error, match=r"^overrides\[1\]\.experts: unknown task\(s\) x;"):
        parse_recipe(_recipe(overrides=[{"pattern": "*"}, {"pattern": "*", "experts": "x"}]))


def test_yaml_errors_are_one_line_with_the_place_counted_from_one(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("base: a\n  experts: b\n")
    with pytest.raises(Hm3Error) as caught:
        load_recipe(path)
    assert str(caught.value) == (f"recipe {path} is not valid YAML: mapping values are not "
                                 "allowed here at line 2, column 10")


def test_a_yaml_error_without_a_place_is_its_message_on_one_line():
    assert _yaml_problem(yaml.YAMLError("first line\n   second   line ")) == \
        "first line second line"
    # a mark but no problem: the whole message, on one line
    marked = yaml.MarkedYAMLError(context="while here", problem="",
                                  problem_mark=yaml.Mark("x", 0, 3, 4, None, None))
    assert _yaml_problem(marked) == 'while here in "x", line 4, column 5'


def test_a_missing_recipe_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(Hm3Error, match="^recipe .*nope.yaml does not exist; pass the path of a "
                                       "YAML recipe file$"):
        load_recipe(path)
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(Hm3Error, match="does not exist"):
        load_recipe(tmp_path / "folder.yaml")


def test_a_recipe_file_reads_relative_paths_from_its_folder(tmp_path):
    (tmp_path / "base").mkdir()
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(base="./base")))
    recipe = load_recipe(path)
    assert recipe.base == str(tmp_path / "base") and recipe.data_root == str(tmp_path)


def test_a_data_only_file_is_its_validated_data_block(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("data:\n  tone: tone.jsonl\n  tags: {path: tags.csv, limit: 5}\n")
    assert load_data_recipe(path) == {"tone": "tone.jsonl", "tags": {"path": "tags.csv",
                                                                     "limit": 5}}
    path.write_text("data:\n  tone: {path: tone.jsonl, colour: red}\n")
    with pytest.raises(Hm3Error, match=r"^data\.tone: unknown field\(s\) colour"):
        load_data_recipe(path)


def test_a_whole_recipe_gives_its_data_block_checked_against_its_tasks(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(data={"tone": "t.jsonl"})))
    assert load_data_recipe(path) == {"tone": "t.jsonl"}
    path.write_text(yaml.safe_dump(_recipe(data={"other": "t.jsonl"})))
    with pytest.raises(Hm3Error, match="other"):
        load_data_recipe(path)
    path.write_text("data: {tone: t.jsonl}\nseed: 1\n")  # not data alone: a recipe, no base
    with pytest.raises(Hm3Error, match="^base: missing"):
        load_data_recipe(path)
    path.write_text("- data\n")
    with pytest.raises(Hm3Error, match="^recipe must be a mapping"):
        load_data_recipe(path)


def test_relative_data_paths_that_exist_under_the_root_are_made_absolute(tmp_path):
    for name in ("t.jsonl", "v.jsonl", "w.jsonl"):
        (tmp_path / name).write_text("{}\n")
    data = {"a": "t.jsonl", "b": {"path": "missing.jsonl", "validation": "v.jsonl"},
            "c": {"path": "/abs/x.jsonl", "validation": {"path": "w.jsonl", "split": "x"}},
            "d": {"path": "t.jsonl", "validation": {"split": "validation"}}}
    assert resolve_data_paths(data, str(tmp_path)) == {
        "a": str(tmp_path / "t.jsonl"),
        "b": {"path": "missing.jsonl", "validation": str(tmp_path / "v.jsonl")},
        "c": {"path": "/abs/x.jsonl",
              "validation": {"path": str(tmp_path / "w.jsonl"), "split": "x"}},
        "d": {"path": str(tmp_path / "t.jsonl"), "validation": {"split": "validation"}}}
    assert resolve_data_paths(data, None) == data


def test_a_step_not_asked_for_is_none_and_with_step_keeps_the_run_order():
    align = get_step("align_heads").parse({"ridge": 0.1})
    recentre = get_step("recentre").parse(True)
    lewis = get_step("lewis").parse(True)
    steps = LabelFree(heads="merge", steps=(("align_heads", align), ("recentre", recentre)))
    assert steps.step("lewis") is None and steps.step("recentre") == recentre
    added = steps.with_step("lewis", lewis)
    assert added.steps == (("lewis", lewis), ("align_heads", align), ("recentre", recentre))
    assert added.heads == "merge" and added.calibration is None
    changed = added.with_step("align_heads", get_step("align_heads").parse({"ridge": 0.5}))
    assert [name for name, _ in changed.steps] == ["lewis", "align_heads", "recentre"]
    assert changed.step("align_heads") == get_step("align_heads").parse({"ridge": 0.5})
    assert steps.steps == (("align_heads", align), ("recentre", recentre))  # a new one each time


def test_with_step_keeps_the_calibration_block():
    recipe = parse_recipe(_recipe(recentre=True, calibration={"texts": "traffic.txt",
                                                               "limit": 9}))
    added = recipe.label_free.with_step("align_heads", get_step("align_heads").parse(True))
    assert added.calibration == recipe.label_free.calibration and added.calibration.limit == 9
    assert [name for name, _ in added.steps] == ["align_heads", "recentre"]


@pytest.mark.parametrize("value, size", [
    (1048576, 1048576), ("1048576", 1048576), ("2GB", 2 * 10**9), ("500MB", 5 * 10**8),
    (" 2gb ", 2 * 10**9), ("1.5GB", 15 * 10**8), ("3KB", 3000), ("10B", 10), ("1KiB", 1024),
    ("2MiB", 2 * 2**20), ("1GiB", 2**30), ("2 GB", 2 * 10**9)])
def test_shard_sizes_in_bytes_or_with_a_unit(value, size):
    assert parse_recipe(_recipe(max_shard_size=value)).max_shard_size == size


@pytest.mark.parametrize("value", [0, -5, True, "0", "GB", "2TB", "0.5B", "two", None, 1.5])
def test_a_shard_size_that_is_not_a_positive_size_is_refused(value):
    with pytest.raises(Hm3Error, match=r"^max_shard_size: expected a positive size such as 2GB "
                                       rf"or 500MB, got {value!r}$".replace("(", r"\(")):
        parse_recipe(_recipe(max_shard_size=value))


def test_the_default_shard_size_is_two_gigabytes():
    assert parse_recipe(_recipe()).max_shard_size == 2 * 10**9


def test_the_head_mode_is_read_whole_by_default_and_checked():
    assert parse_recipe(_recipe()).label_free.heads == "whole"
    assert parse_recipe(_recipe(heads="merge")).label_free.heads == "merge"
    assert parse_recipe(_recipe(heads="merge")).to_dict()["heads"] == "merge"
    with pytest.raises(Hm3Error, match=r"^heads: expected 'whole' \(copy each task's head rows "
                                       r"from its expert\) or 'merge' \(merge them like the "
                                       r"body\), got 'sum'$"):
        parse_recipe(_recipe(heads="sum"))


def test_label_free_steps_need_a_calibration_block_and_no_conflicting_step():
    with pytest.raises(Hm3Error, match=r"^align_heads, recentre: needs unlabelled texts: add a "
                                       r"`calibration:` block, e\.g\. `calibration: \{texts: "
                                       r"traffic\.txt\}`"):
        parse_recipe(_recipe(recentre=True, align_heads=True))
    with pytest.raises(Hm3Error, match=r"^regmean and coefficients cannot be combined: RegMean "
                                       r"solves the linear layers in closed form, which leaves no "
                                       r"task vectors to weigh; keep one$"):
        parse_recipe(_recipe(regmean=True, coefficients=True,
                             calibration={"texts": "t.txt"}))


def test_head_names_for_every_expert_or_one_and_their_bias_checked():
    from hm3.recipe import HeadNames

    raw = _recipe(head={"weight": "out.w"})
    raw["experts"][1]["head"] = {"weight": "cls.w", "bias": "cls.b"}
    recipe = parse_recipe(raw)
    assert recipe.experts[0].head == HeadNames("out.w", None)
    assert recipe.experts[1].head == HeadNames("cls.w", "cls.b")
    assert parse_recipe(recipe.to_dict()).experts == recipe.experts
    raw["experts"][1]["head"] = {"weight": "cls.w", "bias": 3}
    with pytest.raises(Hm3Error, match=r"^experts\[1\]\.head\.bias: expected a tensor name or "
                                       "nothing$"):
        parse_recipe(raw)
    with pytest.raises(Hm3Error, match=r"^head: expected \{weight: TENSOR_NAME, bias: "
                                       r"TENSOR_NAME\}, got \{'bias': 'b'\}$"):
        parse_recipe(_recipe(head={"bias": "b"}))


def test_a_preset_fills_in_what_the_recipe_leaves_out():
    recipe = parse_recipe(_recipe(preset="label-free", calibration={"texts": "t.txt"},
                                  parameters={"lambda": 0.5}))
    assert recipe.method == "tsv" and recipe.label_free.heads == "whole"
    assert recipe.parameters["lambda"] == 0.5  # the recipe's own key wins
    assert [name for name, _ in recipe.label_free.steps] == ["distill", "align_heads",
                                                             "recentre"]
    assert parse_recipe(_recipe(preset="label-free", calibration={"texts": "t.txt"})
                        ).parameters["lambda"] == 1.0
    ties = parse_recipe(_recipe(preset="label-free", calibration={"texts": "t.txt"},
                                method="ties", parameters={"density": 0.2}))
    assert ties.method == "ties" and ties.experts[0].parameters["density"] == 0.2
    assert ties.label_free == recipe.label_free
    with pytest.raises(Hm3Error, match=r"^parameters\.density: preset label-free merges the "
                                       r"body with `method: tsv`, which takes no `density` "
                                       r"\(its parameters: lambda, weight\); .* `method: ties`"):
        parse_recipe(_recipe(preset="label-free", calibration={"texts": "t.txt"},
                             parameters={"density": 0.2}))
    assert "preset" not in recipe.to_dict()  # the expansion is recorded, not the name
    with pytest.raises(Hm3Error, match="^preset: expected one of label-free, got 'fast'$"):
        parse_recipe(_recipe(preset="fast", calibration={"texts": "t.txt"}))
    with pytest.raises(Hm3Error, match="^preset label-free runs label-free steps that read "
                                       "unlabelled texts: add a `calibration:` block"):
        parse_recipe(_recipe(preset="label-free"))


def test_a_shard_size_of_one_byte_is_one_byte():
    assert parse_recipe(_recipe(max_shard_size=1)).max_shard_size == 1
    assert parse_recipe(_recipe(max_shard_size="1B")).max_shard_size == 1


def test_a_model_that_is_not_a_path_or_hub_id_is_named_by_its_field():
    with pytest.raises(Hm3Error, match=r"^base: expected a local path or hub id, e\.g\. `base: "
                                       r"bert-base-uncased` or .*, got 3$"):
        parse_recipe(_recipe(base=3))
    raw = _recipe()
    raw["experts"][1]["model"] = " "
    with pytest.raises(Hm3Error, match=r"^experts\[1\]\.model: expected a local path or hub id, "
                                       r"e\.g\. `model: bert-base-uncased`, got ' '$"):
        parse_recipe(raw)


def test_every_unknown_field_is_listed_with_the_allowed_ones():
    with pytest.raises(Hm3Error, match=r"^recipe: unknown field\(s\) colour, size; allowed: "
                                       r"align_heads, allow_pickle, base, calibration,"):
        parse_recipe(_recipe(size=1, colour=2))


@pytest.mark.parametrize("change, message", [
    ({"experts": "org/tone"}, r"^experts: expected a non-empty list of \{model: PATH_OR_HUB_ID, "
                              r"task: NAME\}$"),
    ({"experts": []}, r"^experts: expected a non-empty list"),
    ({"parameters": [1]}, r"^parameters: expected a mapping such as \{lambda: 1\.0, normalize: "
                          r"true\}$"),
    ({"parameters": {"density": 2}}, r"^parameters\.density: expected a number in \(0, 1\]"),
    ({"parameters": {"lambda": "x"}}, r"^parameters\.lambda: "),
    ({"colour": 1}, r"^recipe: unknown field\(s\) colour;"),
])
def test_a_malformed_top_level_field_is_named(change, message):
    with pytest.raises(Hm3Error, match=message):
        parse_recipe(_recipe(**change))


@pytest.mark.parametrize("expert, message", [
    ({"model": "org/x", "task": 5}, r"^experts\[1\]\.task: expected a non-empty name without "
                                    r"'/', got 5$"),
    ({"model": "org/x", "task": ""}, r"^experts\[1\]\.task: expected a non-empty name"),
    ({"model": "org/x", "task": "a/b"}, r"^experts\[1\]\.task: expected a non-empty name"),
    ({"task": "tags"}, r"^experts\[1\] \(task tags\): no `model:`; add `model: PATH_OR_HUB_ID`"),
    ({"task": 3}, r"^experts\[1\]: no `model:`"),
    ({"model": "org/tags/"}, r"^experts\[1\] \(org/tags/\): no `task:`; add `task: NAME`, the "
                             r"name of its group of labels in the merged model \(e\.g\. `task: "
                             r"tags`\)$"),
    ({"model": "/"}, r"\(e\.g\. `task: NAME`\)$"),
    (3, r"^experts\[1\]: expected a mapping such as `\{model: PATH_OR_HUB_ID, task: NAME\}`, "
        r"got 3$"),
    ("org/tags", r"^experts\[1\]: expected a mapping such as `\{model: org/tags, task: NAME\}`"),
    ({"model": "org/x", "task": "t", "size": 1}, r"^experts\[1\]: unknown field\(s\) size;"),
    ({"model": "org/x", "task": "t", "density": 3}, r"^experts\[1\]\.density: expected"),
])
def test_a_malformed_expert_is_named_by_its_index(expert, message):
    raw = _recipe()
    raw["experts"][1] = expert
    with pytest.raises(Hm3Error, match=message):
        parse_recipe(raw)


def test_model_without_base_says_base_is_the_field():
    with pytest.raises(Hm3Error, match="^base: missing; the model the experts were fine-tuned "
                                       "from is `base:`, not `model:`"):
        parse_recipe({"model": "org/base", "experts": EXPERTS})
    with pytest.raises(Hm3Error, match="^base: missing; give the model"):
        parse_recipe({"base": None, "experts": EXPERTS})


def test_seed_allow_pickle_dtype_and_the_data_root_default_or_as_given():
    recipe = parse_recipe(_recipe())
    assert (recipe.seed, recipe.allow_pickle, recipe.dtype, recipe.data_root) == \
        (0, False, None, None)
    recipe = parse_recipe(_recipe(seed=7, allow_pickle=True, dtype="bfloat16"))
    assert (recipe.seed, recipe.allow_pickle, recipe.dtype) == (7, True, "bfloat16")


@pytest.mark.parametrize("change, message", [
    ({"seed": -1}, "seed: expected a non-negative integer, got -1"),
    ({"seed": True}, "seed: expected a non-negative integer, got True"),
    ({"seed": "3"}, "seed: expected a non-negative integer, got '3'"),
    ({"allow_pickle": "yes"}, "allow_pickle: expected true or false, got 'yes'"),
    ({"dtype": "float64"}, "dtype: expected one of float32, float16, bfloat16, got 'float64'"),
    ({"overrides": "x"}, "overrides: expected a list of {pattern: GLOB, density: ..., weight: "
                         "...}, got 'x'; write it as `overrides: [{pattern: ...}]`"),
    ({"overrides": {"pattern": "*"}}, "overrides: expected a list of {pattern: GLOB, density: "
                                      "..., weight: ...}, got a mapping; write it as "
                                      "`overrides: [{pattern: ...}]`"),
    ({"recentre": True}, "recentre: needs unlabelled texts: add a `calibration:` block, e.g. "
                         "`calibration: {texts: traffic.txt}` (the same texts for every task) or "
                         "`{texts: {TASK: texts.txt, ...}}` (a file per task)"),
    ({"preset": "label-free"}, "preset label-free runs label-free steps that read unlabelled "
                               "texts: add a `calibration:` block, e.g. `calibration: {texts: "
                               "{TASK: texts.txt, ...}}` (texts of each task's domain) or "
                               "`{texts: traffic.txt}` (one sample)"),
])
def test_a_bad_top_level_value_gets_its_whole_message(change, message):
    with pytest.raises(Hm3Error) as error:
        parse_recipe(_recipe(**change))
    assert str(error.value) == message


def test_a_model_field_beside_base_is_an_unknown_field():
    with pytest.raises(Hm3Error, match=r"^recipe: unknown field\(s\) model; allowed: "):
        parse_recipe(_recipe(model="org/x"))


def test_duplicate_tasks_are_refused_each_named_once():
    raw = _recipe()
    raw["experts"][1]["task"] = "tone"
    with pytest.raises(Hm3Error) as error:
        parse_recipe(raw)
    assert str(error.value) == ("experts: duplicate task name(s) tone; give every expert its "
                                "own `task`")
    raw["experts"] += [{"model": "org/a", "task": "tags"}, {"model": "org/b", "task": "tags"}]
    with pytest.raises(Hm3Error) as error:
        parse_recipe(raw)
    assert str(error.value).startswith("experts: duplicate task name(s) tags, tone; ")


def test_only_an_expert_listed_twice_under_two_tasks_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # experts of their own: no warning
        parse_recipe(_recipe())
        raw = _recipe()
        raw["experts"][1]["revision"] = "v2"
        raw["experts"][1]["model"] = "org/tone"  # another revision is another expert
        parse_recipe(raw)
    raw = _recipe()
    raw["experts"][1]["model"] = "org/tone"
    with pytest.warns(Hm3Warning) as caught:
        parse_recipe(raw)
    assert [str(w.message) for w in caught] == [
        "experts: org/tone is listed twice, as tasks tone and tags; the merged model will answer "
        "both with the same head rows (list each expert once unless that is what you want)"]


def test_a_mergekit_models_error_names_it_by_its_models_index():
    raw = {"merge_method": "ties", "base_model": "org/base",
           "models": [{"model": "org/tone", "parameters": {"density": 0.5}},
                      {"model": "org/tags", "task": "a/b", "parameters": {"density": 0.5}}]}
    with pytest.raises(Hm3Error) as error:
        parse_recipe(raw)
    assert str(error.value) == "models[1].task: expected a non-empty name without '/', got 'a/b'"
