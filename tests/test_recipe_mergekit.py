"""A mergekit YAML is an hm3 recipe as it is: `merge_method`, `base_model`, `models` with
`parameters`, `dtype`; each expert's task is its `task:` or its folder's name. It parses to the
same `Recipe` as the hm3 recipe that says the same, and merges to the same weights; what hm3
does not do (`slices`, gradients, other methods, LoRA, a union tokenizer) is refused by name."""

from __future__ import annotations

import pytest
import yaml
from safetensors.torch import load_file

import hm3
from hm3 import Hm3Error, merge, parse_recipe
from hm3.cli import main

from conftest import recipe_dict


def both(mergekit_yaml: str, native: dict) -> tuple:
    return parse_recipe(yaml.safe_load(mergekit_yaml)), parse_recipe(native)


# The shapes of mergekit's documented examples (its README and examples/), hub ids as given:
# parsing reads no model, so these run offline.

def test_ties_with_the_base_listed_among_the_models():
    mergekit, native = both("""
models:
  - model: mistralai/Mistral-7B-v0.1
    # the base needs no parameters: its task vector is zero
  - model: OpenPipe/mistral-ft-optimized-1218
    parameters:
      density: 0.5
      weight: 0.5
  - model: mlabonne/NeuralHermes-2.5-Mistral-7B
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: true
dtype: float16
""", {"base": "mistralai/Mistral-7B-v0.1", "method": "ties", "dtype": "float16",
      "parameters": {"normalize": True},
      "experts": [{"model": "OpenPipe/mistral-ft-optimized-1218",
                   "task": "mistral-ft-optimized-1218", "density": 0.5, "weight": 0.5},
                  {"model": "mlabonne/NeuralHermes-2.5-Mistral-7B",
                   "task": "NeuralHermes-2.5-Mistral-7B", "density": 0.5, "weight": 0.3}]})
    assert mergekit == native


def test_ties_with_int8_mask_and_no_normalisation():
    mergekit, native = both("""
models:
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters: {density: 0.5, weight: 0.5}
  - model: BioMistral/BioMistral-7B
    parameters: {density: 0.5, weight: 0.5}
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: false
  int8_mask: true   # a memory saving of mergekit's: the merge is the same without it
dtype: float16
""", {"base": "mistralai/Mistral-7B-v0.1", "method": "ties", "dtype": "float16",
      "parameters": {"normalize": False},
      "experts": [{"model": "mistralai/Mistral-7B-Instruct-v0.2",
                   "task": "Mistral-7B-Instruct-v0.2", "density": 0.5, "weight": 0.5},
                  {"model": "BioMistral/BioMistral-7B", "task": "BioMistral-7B",
                   "density": 0.5, "weight": 0.5}]})
    assert mergekit == native


def test_dare_ties_with_revisions_tasks_and_per_model_parameters_given_method_wide():
    mergekit, native = both("""
base_model: org/encoder@v1
models:
  - model: org/jailbreak-classifier@main
    task: jailbreak
  - model: ./experts/hate
    parameters:
      weight: 0.7
merge_method: dare_ties
tokenizer_source: base
parameters:
  density: 0.3
  lambda: 1.2
  int8_mask: true
dtype: bfloat16
out_dtype: float32
""", {"base": {"model": "org/encoder", "revision": "v1"}, "method": "dare_ties",
      "dtype": "float32", "parameters": {"density": 0.3, "lambda": 1.2},
      "experts": [{"model": "org/jailbreak-classifier", "revision": "main",
                   "task": "jailbreak"},
                  {"model": "./experts/hate", "task": "hate", "weight": 0.7}]})
    assert mergekit == native


@pytest.mark.parametrize("method, extra", [("della", "epsilon: 0.1"),
                                           ("breadcrumbs_ties", "gamma: 0.02"),
                                           ("task_arithmetic", ""), ("dare_linear", "")])
def test_every_task_vector_method_of_both_is_the_same_method(method, extra):
    sparse = "density: 0.6" if method not in ("task_arithmetic",) else ""
    params = "\n".join(f"      {line}" for line in ("weight: 0.5", sparse, extra) if line)
    recipe = parse_recipe(yaml.safe_load(f"""
merge_method: {method}
base_model: base
models:
  - model: a/spam
    parameters:
{params}
  - model: b/topic
parameters:
"""))
    assert recipe.method == method and [e.task for e in recipe.experts] == ["spam", "topic"]
    assert recipe.experts[0].parameters["weight"] == 0.5
    assert recipe.experts[1].parameters == {}


def test_a_mergekit_yaml_merges_to_the_weights_of_the_hm3_recipe(family, tmp_path):
    base, experts = family
    (tmp_path / "mergekit.yaml").write_text(f"""
models:
  - model: ./{base.name}   # the base, as a path: dropped like base_model
  - model: ./{experts['sentiment'].name}   # relative to the recipe's folder, as in hm3
    parameters:
      density: 0.4
      weight: 0.8
  - model: {experts['topic']}
    task: subject
    parameters:
      density: 0.6
merge_method: dare_ties
base_model: {base}
parameters:
  int8_mask: true
seed: 3
""")
    recipe = hm3.load_recipe(tmp_path / "mergekit.yaml")
    native = recipe_dict(base, {"sentiment": experts["sentiment"], "subject": experts["topic"]},
                         "dare_ties", seed=3)
    native["experts"][0].update(density=0.4, weight=0.8)
    native["experts"][1].update(density=0.6)
    assert recipe == parse_recipe(native, root=tmp_path)
    merge(recipe, tmp_path / "from-mergekit", progress=False)
    merge(parse_recipe(native), tmp_path / "from-hm3", progress=False)
    got, want = (load_file(tmp_path / name / "model.safetensors")
                 for name in ("from-mergekit", "from-hm3"))
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
    assert hm3.load(tmp_path / "from-mergekit", device="cpu").tasks == ["sentiment", "subject"]


# --- what hm3 does not do, refused by name --------------------------------------------------------

GOOD = {"merge_method": "ties", "base_model": "base",
        "models": [{"model": "x/spam", "parameters": {"density": 0.5}}, {"model": "x/topic"}]}


@pytest.mark.parametrize("change, message", [
    ({"slices": [{"sources": [{"model": "x/spam", "layer_range": [0, 6]}]}], "models": None},
     r"^slices: hm3 merges whole models \(every layer of each expert\); mergekit's `slices` "
     r"\(layer ranges, stacking\) is not supported: list the experts under `models:`$"),
    ({"merge_method": "slerp"},
     r"^merge_method: hm3 does not do mergekit's `slerp`; hm3's methods are linear, "
     r"task_arithmetic, ties, .*iso_c, tsv$"),
    ({"merge_method": None}, r"^merge_method: missing; name one of hm3's methods: linear, "),
    ({"base_model": None},
     r"^base_model: missing; hm3 needs the model the experts were fine-tuned from \(also for "
     r"linear\): add `base_model: PATH_OR_HUB_ID`$"),
    ({"models": [{"model": "x/spam", "parameters": {"density": [1, 0.7, 0.1]}}]},
     r"^models\[0\]\.parameters\.density: a per-layer gradient \(a list\) is not supported; "
     r"give one number, or hm3 `overrides:` with a tensor pattern per layer$"),
    ({"models": [{"model": "x/spam",
                  "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}}]},
     r"^models\[0\]\.parameters\.weight: per-tensor values \(`filter`/`value` entries\) are not "
     r"supported; give one number, or hm3 `overrides:` \(pattern, weight, density, experts\)$"),
    ({"parameters": {"normalize": [True, False]}},
     r"^parameters\.normalize: a per-layer gradient \(a list\) is not supported"),
    ({"models": [{"model": "x/spam+x/spam-lora"}]},
     r"^models\[0\]\.model: a LoRA adapter \(`x/spam\+x/spam-lora`\) is not supported; merge the "
     r"adapter into its model first \(peft's merge_and_unload\) and list that folder$"),
    ({"models": [{"model": {"model": {"path": "x/spam"}}}]},
     r"^models\[0\]\.model: expected a local path or hub id \(with @revision if you like\), "
     r"got \{'model': "),
    ({"tokenizer_source": "union"},
     r"^tokenizer_source: hm3 writes the base model's tokenizer \(experts fine-tuned from one base "
     r"share it\); 'union' is not supported: drop the field or write `tokenizer_source: base`$"),
    ({"chat_template": "chatml"},
     r"^recipe: mergekit field\(s\) chat_template not supported by hm3; a mergekit YAML may hold "
     r"base_model, dtype, merge_method, models, out_dtype, parameters, tokenizer_source"),
    ({"base": "base"},
     r"^recipe: mixes hm3's fields \(base\) with mergekit's \(base_model, merge_method, models\); "
     r"write the recipe in one of the two forms$"),
    ({"models": [{"model": "x/spam", "parameters": {"density": 0.5}}, {"model": "y/spam"}]},
     r"^models: duplicate task name\(s\) spam; add `task: NAME` to the models that share a "
     r"folder name$"),
    ({"models": [{"model": "x/spam", "parameters": {"densty": 0.5}}]},
     r"^models\[0\]\.parameters\.densty: method ties takes no `densty`; its per-model parameters "
     r"are weight, density$"),
    ({"models": [{"model": "x/spam", "weight": 0.5}]},
     r"^models\[0\]: unknown field\(s\) weight; allowed: head, model, parameters, revision, task "
     r"\(per-model parameters go under `parameters:`\)$"),
    ({"merge_method": "linear", "models": [{"model": "base"}, {"model": "x/spam"}]},
     r"^models\[0\] is the base_model: under linear mergekit would average it in as a model, "
     r"which hm3 does not do \(the base answers no task\); drop it from `models:`$"),
    ({"models": []}, r"^models: expected a non-empty list of \{model: PATH_OR_HUB_ID, "
                     r"parameters: \{\.\.\.\}\}$"),
])
def test_what_hm3_does_not_do_is_refused_by_name(change, message):
    raw = {**GOOD, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(Hm3Error, match=message):
        parse_recipe(raw)


def test_the_cli_refuses_a_mergekit_yaml_it_cannot_do_in_one_line(tmp_path, capsys):
    recipe = tmp_path / "slerp.yaml"
    recipe.write_text(yaml.safe_dump({**GOOD, "merge_method": "slerp",
                                      "parameters": {"t": 0.5}}))
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "merge_method: hm3 does not do mergekit's `slerp`" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
