"""The recipe written beside a merged model reads back to the same recipe:
`parse_recipe(r.to_dict()) == r` over generated recipes that use every field (hypothesis), and
relative `data:` paths written resolved."""

from __future__ import annotations

import warnings
from dataclasses import fields

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hm3.label_free import get_step, step_names
from hm3.methods.registry import METHODS, get_method
from hm3.recipe import HEAD_MODES, parse_recipe

NAMES = st.text("abcdefghij_", min_size=1, max_size=8)
PATHS = NAMES.map(lambda name: f"/data/{name}.jsonl")
REVISIONS = st.none() | st.sampled_from(["main", "v1.0", "0123abcd"])
# a value every declared parameter accepts, by name (della's density +- epsilon inside (0, 1))
MODEL_VALUES = {"weight": st.sampled_from([0.5, 1.0, 1.5, -0.25]),
                "density": st.sampled_from([0.3, 0.5, 0.6]),
                "gamma": st.sampled_from([0.0, 0.01, 0.2]),
                "epsilon": st.sampled_from([0.0, 0.05, 0.1])}
SHARED_VALUES = {"normalize": st.booleans(), "lambda": st.sampled_from([0.5, 1.0, 2.0]),
                 "rescale": st.sampled_from([True, False, "density", "l1", "l2", "linf"]),
                 "consensus": st.sampled_from(["sum", "count"])}


def _some_of(specs, values) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({}, optional={p.name: values[p.name] for p in specs})


def step_blocks() -> dict[str, st.SearchStrategy]:
    """Per registered step, its recipe blocks: `true`, or some of its options at their declared
    defaults; a few steps also with other values."""
    blocks = {name: st.just(True) | st.fixed_dictionaries({}, optional={
        f.name: st.just(f.default) for f in fields(get_step(name).options)})
        for name in step_names()}
    blocks.update({
        "recentre": st.booleans(),
        "lewis": blocks["lewis"] | st.just({"gamma": 0.2, "epsilon": 0.7}),
        "align_heads": blocks["align_heads"] | st.fixed_dictionaries(
            {"ridge": st.sampled_from([0.1, 1.0, "auto"])}),
        "distill": blocks["distill"] | st.just({"steps": 3, "lr": 0.01}),
    })
    return blocks


@st.composite
def recipes(draw) -> dict:
    method = get_method(draw(st.sampled_from(sorted(METHODS))))
    tasks = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    experts = []
    for i, task in enumerate(tasks):
        expert = {"model": f"/models/{task}-{i}", "task": task,
                  **draw(_some_of(method.model_parameter_specs(), MODEL_VALUES))}
        revision = draw(REVISIONS)
        if revision:
            expert["revision"] = revision
        if draw(st.booleans()):
            expert["head"] = {"weight": "classifier.weight",
                              "bias": draw(st.none() | st.just("classifier.bias"))}
        experts.append(expert)
    raw: dict = {"base": draw(st.sampled_from(["/models/base", "org/base-model"])),
                 "experts": experts, "method": method.name,
                 "parameters": draw(_some_of(method.shared_parameter_specs(), SHARED_VALUES))}
    revision = draw(REVISIONS)
    if revision:
        raw["base"] = {"model": raw["base"], "revision": revision}
    optional = {
        "dtype": st.sampled_from(["float32", "float16", "bfloat16"]),
        "seed": st.integers(0, 2**31),
        "allow_pickle": st.booleans(),
        "max_shard_size": st.sampled_from(["500MB", "2GB", 123456789]),
        "overrides": st.lists(st.fixed_dictionaries(
            {"pattern": st.sampled_from(["*.attention.*", "encoder.layer.0.*"])},
            optional={"experts": st.lists(st.sampled_from(tasks), min_size=1, unique=True),
                      **{p.name: MODEL_VALUES[p.name]
                         for p in method.model_parameter_specs()}}), max_size=2),
        "data": st.dictionaries(st.sampled_from(tasks), PATHS | st.fixed_dictionaries(
            {"path": PATHS},
            optional={"text_column": st.just("sentence"), "label_column": st.just("y"),
                      "limit": st.integers(1, 500), "split": st.just("test"),
                      "validation": PATHS | st.just({"split": "validation"}),
                      "expect": st.dictionaries(st.sampled_from(tasks), st.just("no"),
                                                max_size=1)})),
        "heads": st.sampled_from(HEAD_MODES),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            raw[key] = draw(strategy)
    steps = step_blocks()
    del steps["regmean" if draw(st.booleans()) else "coefficients"]  # the two cannot combine
    chosen = {key: draw(strategy) for key, strategy in steps.items() if draw(st.booleans())}
    if chosen:
        raw.update(chosen)
        shared = draw(st.booleans())
        raw["calibration"] = {
            "texts": "/data/traffic.txt" if shared else {t: f"/data/{t}.txt" for t in tasks},
            **draw(st.fixed_dictionaries({}, optional={
                "limit": st.integers(1, 5000), "max_length": st.integers(2, 512),
                "batch_size": st.integers(1, 64)}))}
    return raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes())
def test_a_recipe_written_out_reads_back_equal(raw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recipe = parse_recipe(raw)
        again = parse_recipe(recipe.to_dict())
    assert again == recipe
    assert again.to_dict() == recipe.to_dict()


def test_every_registered_step_and_field_is_generated():
    """The generator above covers the registry's steps and the recipe's fields (a field added
    to the recipe without a generator here would go unchecked)."""
    from hm3.recipe import LabelFree, Recipe

    covered = {"base", "experts", "method", "parameters", "dtype", "seed", "overrides",
               "base_revision", "allow_pickle", "max_shard_size", "data", "label_free",
               "data_root"}
    assert {f.name for f in fields(Recipe)} == covered
    assert {f.name for f in fields(LabelFree)} == {"heads", "calibration", "steps"}
    assert set(step_blocks()) == set(step_names())


def test_relative_data_paths_are_written_resolved_against_the_recipe(tmp_path):
    folder = tmp_path / "recipes"
    (folder / "splits").mkdir(parents=True)
    (folder / "splits" / "test.jsonl").write_text('{"text": "a", "label": "x"}\n')
    (folder / "splits" / "val.jsonl").write_text('{"text": "b", "label": "x"}\n')
    raw = {"base": "/models/base", "experts": [{"model": "/models/a", "task": "a"}],
           "data": {"a": {"path": "splits/test.jsonl", "validation": "splits/val.jsonl"}}}
    written = parse_recipe(raw, root=folder).to_dict()
    assert written["data"]["a"] == {"path": str(folder / "splits" / "test.jsonl"),
                                    "validation": str(folder / "splits" / "val.jsonl")}
    # read from anywhere else, the written recipe still finds its data
    elsewhere = parse_recipe(written, root=tmp_path / "model")
    assert elsewhere.data == written["data"]


@pytest.mark.parametrize("field,value", [("allow_pickle", True), ("max_shard_size", 123456),
                                         ("dtype", "float16")])
def test_fields_the_written_recipe_once_dropped_are_kept(field, value):
    raw = {"base": {"model": "org/base", "revision": "v2"},
           "experts": [{"model": "org/a", "task": "a", "revision": "r1",
                        "head": {"weight": "score.weight"}}], field: value}
    written = parse_recipe(raw).to_dict()
    assert written[field] == value
    assert written["base"] == {"model": "org/base", "revision": "v2"}
    assert written["experts"][0]["revision"] == "r1"
    assert written["experts"][0]["head"] == {"weight": "score.weight", "bias": None}
