"""Bad input: each case raises Hm3Error saying what is wrong, and nothing appears at the output."""

import json
import math
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from hm3 import Hm3Error, merge, parse_recipe
from hm3.cli import main
from hm3.errors import Hm3Warning

from conftest import TINY, WORDS, build_family, recipe_dict

VOCAB = 5 + len(WORDS)
NAME = "bert.encoder.layer.1.output.dense.weight"


def refused(tmp_path, raw, *fragments, output=None, **kwargs):
    """Parse and merge `raw`; it must fail with every fragment in the message and write nothing."""
    output = output or tmp_path / "merged"
    before = {p.name for p in output.parent.iterdir()}
    with pytest.raises(Hm3Error) as info:
        merge(parse_recipe(raw), output, progress=False, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message
    after = {p.name for p in output.parent.iterdir()}
    assert after == before, f"left behind: {after - before}"  # no output, no .partial sibling
    return message


def rewrite(expert, change):
    """Apply `change` to an expert's state dict and save it back."""
    file = expert / "model.safetensors"
    state = load_file(file)
    change(state)
    save_file(state, file, metadata={"format": "pt"})


def bert_expert(folder, labels=("no", "yes"), seed=5, **changes):
    """A tiny BERT classifier whose config differs from the family's by `changes`."""
    settings = {"vocab_size": VOCAB, **TINY["bert"], **changes}
    config = AutoConfig.for_model("bert", **settings, id2label=dict(enumerate(labels)),
                                  label2id={lab: i for i, lab in enumerate(labels)})
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    return folder


# --- experts that do not fit the base ---------------------------------------------------------

@pytest.mark.parametrize("field, value", [("hidden_size", 48), ("num_hidden_layers", 3),
                                          ("vocab_size", VOCAB + 7)])
def test_expert_with_another_architecture_than_the_base(family, tmp_path, field, value):
    base, experts = family
    odd = bert_expert(tmp_path / "odd", **{field: value})
    refused(tmp_path, recipe_dict(base, {**experts, "odd": odd}),
            "expert odd", f"{field}={value}", "base", "fine-tuned from the recipe's base")


def test_expert_of_another_model_type(family, tmp_path):
    base, experts = family
    _, others = build_family(tmp_path / "roberta", {"odd": ["a", "b"]}, model_type="roberta",
                             tokenizer=False)
    refused(tmp_path, recipe_dict(base, {**experts, **others}), "model_type=roberta", "bert")


def test_expert_shapes_the_config_does_not_admit(family, tmp_path):
    base, experts = family
    odd = bert_expert(tmp_path / "odd", hidden_size=48)
    # a config that claims the family's sizes over weights that are not
    (odd / "config.json").write_text((experts["sentiment"] / "config.json").read_text())
    refused(tmp_path, recipe_dict(base, {**experts, "odd": odd}),
            "different shapes across experts")


def test_base_shapes_the_config_does_not_admit(family, tmp_path):
    base, experts = family
    other = tmp_path / "other-base"
    config = AutoConfig.for_model("bert", vocab_size=VOCAB, **{**TINY["bert"], "hidden_size": 48})
    AutoModel.from_config(config).save_pretrained(other)
    (base / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    refused(tmp_path, recipe_dict(base, experts), "the base", "(48,", "(32,")


def test_labels_that_do_not_match_the_head_rows(family, tmp_path):
    base, experts = family
    file = experts["topic"] / "config.json"
    config = json.loads(file.read_text())
    config["id2label"] = {str(i): f"t{i}" for i in range(4)}
    config["label2id"] = {f"t{i}": i for i in range(4)}
    file.write_text(json.dumps(config))
    refused(tmp_path, recipe_dict(base, experts), "cannot find the classification head",
            "4 rows", "head:")


def test_experts_naming_their_heads_differently(family, tmp_path):
    base, experts = family
    raw = recipe_dict(base, experts)
    raw["experts"][1]["head"] = {"weight": "bert.pooler.dense.weight",
                                 "bias": "bert.pooler.dense.bias"}
    refused(tmp_path, raw, "name their classification heads differently", "classifier.weight",
            "bert.pooler.dense.weight")


@pytest.mark.parametrize("what", ["missing", "extra"])
def test_expert_with_missing_or_extra_tensors(family, tmp_path, what):
    base, experts = family
    if what == "missing":
        rewrite(experts["topic"], lambda state: state.pop(NAME))
        culprit = NAME
    else:
        culprit = "bert.adapter.weight"
        rewrite(experts["topic"], lambda state: state.update({culprit: torch.zeros(3, 3)}))
    refused(tmp_path, recipe_dict(base, experts), "expert topic", f"{what}: {culprit}")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_weights(family, tmp_path, bad):
    base, experts = family

    def poison(state):
        state[NAME][3, 4] = bad
    rewrite(experts["topic"], poison)
    refused(tmp_path, recipe_dict(base, experts), "NaN or Inf", NAME, str(experts["topic"]))


def test_nan_in_the_head_or_the_base(family, tmp_path):
    base, experts = family

    def poison(state):
        state["classifier.bias"][0] = math.nan
    rewrite(experts["sentiment"], poison)
    refused(tmp_path, recipe_dict(base, experts), "NaN or Inf", "classifier.bias")


def test_failed_merge_over_an_existing_output_leaves_it_intact(family, tmp_path):
    base, experts = family
    output = tmp_path / "merged"
    merge(parse_recipe(recipe_dict(base, experts)), output, progress=False)
    config = (output / "config.json").read_text()
    weights = (output / "model.safetensors").read_bytes()

    def poison(state):
        state[NAME][0, 0] = math.nan
    rewrite(experts["topic"], poison)
    refused(tmp_path, recipe_dict(base, experts, "linear"), "NaN", overwrite=True)
    assert (output / "config.json").read_text() == config
    assert (output / "model.safetensors").read_bytes() == weights


def test_a_merged_model_as_an_expert_is_refused_with_the_experts_it_came_from(family, tmp_path):
    """Its config has one id2label over all its tasks: merged as one expert, its labels would
    share one softmax (a 5-way task here) and its task groups would be lost."""
    base, experts = family
    merged = tmp_path / "merged"
    merge(parse_recipe(recipe_dict(base, experts)), merged, progress=False)
    (tmp_path / "again").mkdir()
    raw = recipe_dict(base, {"guard": merged, "sentiment": experts["sentiment"]})
    refused(tmp_path / "again", raw,
            f"experts[0] ({merged}) is a model merged by hm3, with tasks sentiment, topic: "
            "merged as one expert its 5 labels would share one softmax as task guard; list the "
            f"experts it was merged from instead (sentiment: {experts['sentiment']}; topic: "
            f"{experts['topic']}; its hm3_recipe.yaml has them)",
            output=tmp_path / "again" / "out")


# --- recipe errors ----------------------------------------------------------------------------

def test_duplicate_task_names(family, tmp_path):
    base, experts = family
    raw = recipe_dict(base, experts)
    raw["experts"][1]["task"] = "sentiment"
    refused(tmp_path, raw, "duplicate task name(s) sentiment")


@pytest.mark.parametrize("density", [0, 1.5])
def test_density_outside_zero_one(family, tmp_path, density):
    base, experts = family
    raw = recipe_dict(base, experts)
    raw["experts"][1]["density"] = density
    refused(tmp_path, raw, "experts[1].density", "(0, 1]", f"got {density}")
    refused(tmp_path, recipe_dict(base, experts, parameters={"density": density}),
            "parameters.density", "(0, 1]")


def test_unknown_method(family, tmp_path):
    base, experts = family
    message = refused(tmp_path, recipe_dict(base, experts, "frankenmerge"),
                      "method:", "'frankenmerge'")
    assert "dare_ties" in message  # says what to choose instead


@pytest.mark.parametrize("where, expected", [("top", "recipe: unknown field(s) densty"),
                                             ("expert", "experts[0]: unknown field(s) densty"),
                                             ("parameters", "parameters.densty")])
def test_unknown_field(family, tmp_path, where, expected):
    base, experts = family
    raw = recipe_dict(base, experts)
    target = {"top": raw, "expert": raw["experts"][0],
              "parameters": raw.setdefault("parameters", {})}[where]
    target["densty"] = 0.5
    refused(tmp_path, raw, expected)


def test_della_density_and_epsilon_are_checked_in_combination(family, tmp_path):
    """epsilon from an expert with density from the method-wide parameters or an override."""
    base, experts = family
    raw = recipe_dict(base, experts, "della", parameters={"density": 0.2})
    raw["experts"][0]["epsilon"] = 0.3
    refused(tmp_path, raw, "della needs density ± epsilon inside (0, 1)", "sentiment")
    raw = recipe_dict(base, experts, "della", overrides=[{"pattern": "*.query.*",
                                                          "density": 0.2}])
    raw["experts"][1]["epsilon"] = 0.3
    refused(tmp_path, raw, "della needs density ± epsilon inside (0, 1)", "topic", ".query.")


def test_missing_base_or_expert_directory(family, tmp_path):
    base, experts = family
    refused(tmp_path, recipe_dict(tmp_path / "nowhere", experts), "nowhere", "does not exist")
    refused(tmp_path, recipe_dict(base, {"x": experts["topic"] / "config.json"}),
            "is a file", "directory")


# --- unreadable checkpoints -------------------------------------------------------------------

def test_truncated_safetensors_file(family, tmp_path):
    base, experts = family
    file = experts["topic"] / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])
    refused(tmp_path, recipe_dict(base, experts), str(file), "truncated or not a safetensors")


def test_not_a_safetensors_file(family, tmp_path):
    base, experts = family
    file = experts["topic"] / "model.safetensors"
    file.write_text("<html>404 Not Found</html>\n" * 40)
    refused(tmp_path, recipe_dict(base, experts), str(file), "truncated or not a safetensors")


def test_directory_without_weights(family, tmp_path):
    base, experts = family
    (experts["topic"] / "model.safetensors").unlink()
    refused(tmp_path, recipe_dict(base, experts), "no model.safetensors")


def test_pickle_only_expert_needs_allow_pickle(family, tmp_path):
    base, experts = family
    reference = tmp_path / "reference"
    merge(parse_recipe(recipe_dict(base, experts)), reference, progress=False)
    file = experts["topic"] / "model.safetensors"
    torch.save(load_file(file), experts["topic"] / "pytorch_model.bin")
    file.unlink()

    refused(tmp_path, recipe_dict(base, experts), "pickle", "allow_pickle: true",
            str(experts["topic"]))
    output = tmp_path / "merged"
    merge(parse_recipe(recipe_dict(base, experts, allow_pickle=True)), output, progress=False)
    got, want = load_file(output / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_unfindable_head_names_the_head_field(family, tmp_path):
    base, experts = family

    def rename(state):
        state["my_head.weight"] = state.pop("classifier.weight")
        state["my_head.bias"] = state.pop("classifier.bias")
    rewrite(experts["topic"], rename)
    one = {"topic": experts["topic"]}
    refused(tmp_path, recipe_dict(base, one), "cannot find the classification head", "head:",
            "3 rows")
    # naming it in the recipe is the way out
    head = {"weight": "my_head.weight", "bias": "my_head.bias"}
    output = tmp_path / "merged"
    merge(parse_recipe(recipe_dict(base, one, head=head)), output, progress=False)
    merged = load_file(output / "model.safetensors")
    assert torch.equal(merged["my_head.weight"], load_file(
        experts["topic"] / "model.safetensors")["my_head.weight"])
    # and a name that is not there is refused
    refused(tmp_path, recipe_dict(base, one, head={"weight": "nothing.weight"}),
            "head tensor nothing.weight", "does not exist", output=tmp_path / "other")


def test_huge_task_vector_merges_but_warns(family, tmp_path):
    base, experts = family
    with warnings.catch_warnings():
        warnings.simplefilter("error", Hm3Warning)  # the genuine family does not warn
        merge(parse_recipe(recipe_dict(base, experts)), tmp_path / "fine", progress=False)

    def rerandomise(state):
        for name, value in state.items():
            if not name.startswith("classifier."):
                state[name] = torch.randn_like(value)
    rewrite(experts["topic"], rerandomise)
    with pytest.warns(Hm3Warning, match="expert topic's weights differ from the base") as record:
        report = merge(parse_recipe(recipe_dict(base, experts)), tmp_path / "odd", progress=False)
    assert len(record) == 1
    assert report.task_vector_norms["topic"] > 1 > report.task_vector_norms["sentiment"]
    assert (tmp_path / "odd" / "model.safetensors").is_file()


def test_existing_output_without_overwrite(family, tmp_path):
    base, experts = family
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    refused(tmp_path, recipe_dict(base, experts), str(output), "already exists", "--overwrite",
            output=output)
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


# --- the command line -------------------------------------------------------------------------

def write_recipe(tmp_path, raw):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw) if isinstance(raw, dict) else raw)
    return path


def run_cli(tmp_path, capsys, recipe, *extra):
    output = tmp_path / "cli-out"
    code = main(["merge", str(recipe), "-o", str(output), "--no-progress", *extra])
    return code, capsys.readouterr(), output


@pytest.mark.parametrize("problem", ["density", "yaml", "missing"])
def test_cli_bad_recipe_is_one_error_line_and_exit_2(family, tmp_path, capsys, problem):
    base, experts = family
    raw = recipe_dict(base, experts)
    if problem == "density":
        raw["experts"][0]["density"] = 1.5
        recipe, expected = write_recipe(tmp_path, raw), "experts[0].density"
    elif problem == "yaml":
        recipe, expected = write_recipe(tmp_path, "base: [unclosed\nexperts: x\n"), "YAML"
    else:
        recipe, expected = tmp_path / "absent.yaml", "does not exist"
    code, captured, output = run_cli(tmp_path, capsys, recipe)
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hm3: error: "), captured.err
    assert expected in lines[0]
    assert not output.exists()


def test_cli_merges_a_good_recipe(family, tmp_path, capsys):
    base, experts = family
    recipe = write_recipe(tmp_path, recipe_dict(base, experts))
    code, captured, output = run_cli(tmp_path, capsys, recipe)
    assert code == 0, captured.err
    assert "merged 2 experts" in captured.out
    assert json.loads((output / "config.json").read_text())["id2label"]["2"] == "topic/news"
