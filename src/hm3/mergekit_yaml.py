"""A mergekit YAML (`merge_method`, `base_model`, `models: [{model, parameters}]`, `parameters`,
`dtype`) read as hm3's recipe mapping, so that `parse_recipe` validates it like any recipe.

Each model's task is its `task:` (an hm3 key) or its folder's name; a model that is the
`base_model` is dropped (its task vector is zero, as mergekit treats it). What hm3 does not do
is refused by name: `slices`, methods hm3 lacks, per-layer gradients and per-tensor `filter`
values, LoRA adapters, a tokenizer other than the base's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from hm3.errors import Hm3Error
from hm3.methods.registry import METHODS, get_method

MERGEKIT_KEYS = {"merge_method", "base_model", "models", "slices", "tokenizer_source",
                 "tokenizer", "out_dtype", "chat_template", "modules", "name"}
READ_KEYS = ("base_model", "dtype", "merge_method", "models", "out_dtype", "parameters",
             "tokenizer_source", "tokenizer")
HM3_ONLY = ("base", "experts", "method")  # a mergekit YAML says these its own way
_MODEL_KEYS = {"model", "parameters", "task", "revision", "head"}
_MEMORY_OPTIONS = {"int8_mask"}  # mergekit's, with no effect on the merged weights


def is_mergekit(raw: Any) -> bool:
    """Whether a recipe mapping is written in mergekit's form."""
    return isinstance(raw, dict) and bool(MERGEKIT_KEYS & set(raw))


def from_mergekit(raw: dict, hm3_keys: set[str] = frozenset(),
                  locate: Callable[[str], str] = str) -> tuple[dict, list[str]]:
    """hm3's recipe mapping for a mergekit one, and where each expert came from (`models[i]`).
    `hm3_keys`: hm3's own top-level keys a mergekit YAML may add (seed, calibration, ...);
    `locate`: a model name as the recipe will resolve it (to tell the base among the models)."""
    mixed = sorted(set(raw) & set(HM3_ONLY))
    if mixed:
        raise Hm3Error(f"recipe: mixes hm3's fields ({', '.join(mixed)}) with mergekit's "
                       f"({', '.join(sorted(MERGEKIT_KEYS & set(raw)))}); write the recipe in "
                       "one of the two forms")
    if "slices" in raw:
        raise Hm3Error("slices: hm3 merges whole models (every layer of each expert); "
                       "mergekit's `slices` (layer ranges, stacking) is not supported: list the "
                       "experts under `models:`")
    unknown = sorted(set(raw) - set(READ_KEYS) - set(hm3_keys), key=str)
    if unknown:
        raise Hm3Error(f"recipe: mergekit field(s) {', '.join(map(str, unknown))} not supported "
                       f"by hm3; a mergekit YAML may hold {', '.join(READ_KEYS)} and hm3's "
                       f"{', '.join(sorted(set(hm3_keys) - set(READ_KEYS) - set(HM3_ONLY)))}")

    name = raw.get("merge_method")
    known = ", ".join(METHODS)
    if name is None:
        raise Hm3Error(f"merge_method: missing; name one of hm3's methods: {known}")
    if name not in METHODS:
        raise Hm3Error(f"merge_method: hm3 does not do mergekit's `{name}`; hm3's methods are "
                       f"{known}")
    method = get_method(name)

    if raw.get("base_model") is None:
        raise Hm3Error("base_model: missing; hm3 needs the model the experts were fine-tuned "
                       "from (also for linear): add `base_model: PATH_OR_HUB_ID`")
    base = _reference(raw["base_model"], "base_model")
    _check_tokenizer(raw, base)

    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise Hm3Error("parameters: expected a mapping such as {normalize: true, lambda: 1.0}")
    parameters = {key: _scalar(value, f"parameters.{key}") for key, value in parameters.items()
                  if key not in _MEMORY_OPTIONS}

    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise Hm3Error("models: expected a non-empty list of {model: PATH_OR_HUB_ID, "
                       "parameters: {...}}")
    experts, where = [], []
    for i, entry in enumerate(models):
        label = f"models[{i}]"
        if not isinstance(entry, dict):
            entry = {"model": entry}
        unknown = sorted(set(entry) - _MODEL_KEYS, key=str)
        if unknown:
            raise Hm3Error(f"{label}: unknown field(s) {', '.join(map(str, unknown))}; allowed: "
                           f"{', '.join(sorted(_MODEL_KEYS))} (per-model parameters go under "
                           "`parameters:`)")
        model = _reference(entry.get("model"), f"{label}.model")
        if entry.get("revision") is not None:
            model = {**model, "revision": entry["revision"]}
        if _same(model, base, locate):
            if method.mean_of_models:
                raise Hm3Error(f"{label} is the base_model: under {name} mergekit would average "
                               "it in as a model, which hm3 does not do (the base answers no "
                               "task); drop it from `models:`")
            continue  # its task vector is zero: mergekit leaves it out of the merge too
        own = entry.get("parameters") or {}
        if not isinstance(own, dict):
            raise Hm3Error(f"{label}.parameters: expected a mapping such as "
                           "{weight: 1.0, density: 0.5}")
        own = {key: _scalar(value, f"{label}.parameters.{key}") for key, value in own.items()}
        method.validate_model_parameters(own, where=f"{label}.parameters")
        task = entry.get("task") or Path(model["model"].rstrip("/")).name
        expert = {**model, "task": task, **own}
        if entry.get("head") is not None:
            expert["head"] = entry["head"]
        experts.append(expert)
        where.append(label)

    tasks = [e["task"] for e in experts]
    shared = sorted({t for t in tasks if tasks.count(t) > 1})
    if shared:
        raise Hm3Error(f"models: duplicate task name(s) {', '.join(shared)}; add `task: NAME` to "
                       "the models that share a folder name")
    if not experts:
        raise Hm3Error("models: every model is the base_model; list the experts to merge")

    out = {key: value for key, value in raw.items() if key in hm3_keys and key not in READ_KEYS}
    out.update(base=base, experts=experts, method=name, parameters=parameters)
    dtype = raw.get("out_dtype") or raw.get("dtype")  # mergekit writes out_dtype, else dtype
    if dtype is not None:
        out["dtype"] = dtype
    return out, where


def _reference(value: Any, where: str) -> dict[str, str]:
    """`{model, revision?}` from mergekit's `path@revision`; LoRA (`path+adapter`) refused."""
    if not isinstance(value, str) or not value.strip():
        raise Hm3Error(f"{where}: expected a local path or hub id (with @revision if you like), "
                       f"got {value!r}")
    if "+" in value:
        raise Hm3Error(f"{where}: a LoRA adapter (`{value}`) is not supported; merge the adapter "
                       "into its model first (peft's merge_and_unload) and list that folder")
    path, _, revision = value.partition("@")
    return {"model": path, "revision": revision} if revision else {"model": path}


def _same(model: dict, base: dict, locate: Callable[[str], str]) -> bool:
    return ((locate(model["model"]), model.get("revision"))
            == (locate(base["model"]), base.get("revision")))


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            raise Hm3Error(f"{where}: per-tensor values (`filter`/`value` entries) are not "
                           "supported; give one number, or hm3 `overrides:` (pattern, weight, "
                           "density, experts)")
        raise Hm3Error(f"{where}: a per-layer gradient (a list) is not supported; give one "
                       "number, or hm3 `overrides:` with a tensor pattern per layer")
    if isinstance(value, dict):
        raise Hm3Error(f"{where}: expected one value, got a mapping {value!r}")
    return value


def _check_tokenizer(raw: dict, base: dict) -> None:
    source = raw.get("tokenizer_source")
    where = "tokenizer_source"
    if isinstance(raw.get("tokenizer"), dict):
        source, where = raw["tokenizer"].get("source"), "tokenizer.source"
        extra = sorted(set(raw["tokenizer"]) - {"source"}, key=str)
        if extra:
            raise Hm3Error(f"tokenizer: hm3 writes the base model's tokenizer as it is; "
                           f"{', '.join(map(str, extra))} not supported: drop them")
    if source in (None, "base", base["model"]):
        return
    raise Hm3Error(f"{where}: hm3 writes the base model's tokenizer (experts fine-tuned from "
                   f"one base share it); {source!r} is not supported: drop the field or write "
                   "`tokenizer_source: base`")
