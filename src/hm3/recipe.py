"""The recipe schema: what to merge and how (base, experts, method, parameters, overrides), the
head mode and the label-free steps' blocks (`lewis`, `coefficients`, `regmean`, `distill`,
`align_heads`, `recentre`: each read and written from its step's declaration in
`hm3.label_free`), validated before any tensor is read. The `data:` and `calibration:` blocks are
`hm3.data`'s."""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hm3.data.blocks import CalibrationSpec, parse_calibration_block, parse_data_block
from hm3.data.tables import read_utf8
from hm3.errors import Hm3Error, Hm3Warning
from hm3.label_free.registry import get_step, step_names
from hm3.mergekit_yaml import from_mergekit, is_mergekit
from hm3.methods.registry import get_method

DTYPES = ("float32", "float16", "bfloat16")
HEAD_MODES = ("whole", "merge")
DEFAULT_SHARD_SIZE = 2 * 10**9  # bytes per weights file: "2GB"
DEFAULT_HEADS = "whole"  # measured at least as good as merging the rows (benchmarks/RESULTS.md)
_RECIPE_KEYS = {"base", "experts", "method", "parameters", "dtype", "seed", "overrides", "head",
                "allow_pickle", "max_shard_size", "data", "preset", "heads", "calibration"}
# `preset: NAME` fills in these keys; a key the recipe gives itself wins. What each holds was
# picked on validation splits (benchmarks/RESULTS.md, "The recommended recipe").
PRESETS: dict[str, dict[str, Any]] = {
    # Validation picked distill on the MiniLM zoo, the MPNet zoo with 64 texts per task and
    # with one shared sample, and the head steps alone with 171-640 texts per task; summed over
    # the four, distill gains 1.4 points of validation mean. The body: TSV-Merge over TIES at
    # density 0.2 on val+dev (+0.17 MiniLM; MPNet +0.25, +0.46 with 64 texts per task), lambda 1
    # as its paper (0.7 and 1.4 lower on MiniLM). Each head also fitted on 64 texts of every
    # other task at weight 1: val+dev +0.5 on MPNet, +2.0 with 64 texts per task, -0.3 on
    # MiniLM, and each head follows its expert on the other tasks' texts (mixed traffic) 9-18
    # points more often (benchmarks/RESULTS.md §10).
    "label-free": {"method": "tsv", "parameters": {"lambda": 1.0}, "heads": "whole",
                   "distill": {"train": "weights"},
                   "align_heads": {"ridge": 0.1, "others": 1.0, "other_texts": 64},
                   "recentre": True},
}
_EXPERT_KEYS = {"model", "task", "weight", "density", "gamma", "epsilon", "revision", "head"}
_OVERRIDE_KEYS = {"pattern", "weight", "density", "gamma", "epsilon", "experts"}
PER_MODEL_PARAMETERS = ("weight", "density", "gamma", "epsilon")


@dataclass(frozen=True)
class HeadNames:
    """Tensor names of a classifier's final projection, for heads hm3 cannot find itself."""

    weight: str
    bias: str | None = None


@dataclass(frozen=True)
class Expert:
    """One source classifier: where it is, the task it answers, and its merge parameters."""

    model: str
    task: str
    revision: str | None = None
    head: HeadNames | None = None
    parameters: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Override:
    """Per-model parameters for the tensors whose names match a glob pattern."""

    pattern: str
    parameters: dict[str, float]
    experts: tuple[str, ...] | None = None  # tasks it applies to; None means all

    def applies(self, tensor_name: str, task: str) -> bool:
        return fnmatch.fnmatchcase(tensor_name, self.pattern) and (
            self.experts is None or task in self.experts)


# --- label-free steps ----------------------------------------------------------------------------

def top_level_keys() -> set[str]:
    """Every key a recipe may hold: its own and one per registered label-free step. (A function:
    the steps register when `hm3` is imported, after this module.)"""
    return _RECIPE_KEYS | set(step_names())


@dataclass(frozen=True)
class LabelFree:
    """The head mode, the calibration texts and the label-free steps a recipe asks for."""

    heads: str = DEFAULT_HEADS
    calibration: CalibrationSpec | None = None
    # the registry's steps (`hm3.label_free`) the recipe asks for: (name, options), in run order
    steps: tuple[tuple[str, Any], ...] = ()

    @property
    def needs_model(self) -> bool:
        """Whether the merge must run the model on calibration texts (in memory)."""
        return bool(self.steps)

    def step(self, name: str) -> Any:
        """The options of registered step `name`, or None when the recipe does not ask for it."""
        return dict(self.steps).get(name)

    def with_step(self, name: str, options: Any) -> LabelFree:
        """These steps with `name`'s options set (added in its run order when not asked for)."""
        asked = {**dict(self.steps), name: options}
        return LabelFree(self.heads, self.calibration,
                         tuple((n, asked[n]) for n in step_names() if n in asked))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"heads": self.heads}
        if self.calibration:
            out["calibration"] = self.calibration.to_dict()
        for name, options in self.steps:
            out[name] = get_step(name).to_dict(options)
        return out


# --- the recipe ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """A validated merge recipe. Build it with `load_recipe` or `parse_recipe`."""

    base: str
    experts: tuple[Expert, ...]
    method: str = "ties"
    parameters: dict[str, Any] = field(default_factory=dict)  # method-wide, e.g. lambda
    dtype: str | None = None
    seed: int = 0
    overrides: tuple[Override, ...] = ()
    base_revision: str | None = None
    allow_pickle: bool = False
    max_shard_size: int = DEFAULT_SHARD_SIZE
    data: dict[str, Any] = field(default_factory=dict)
    label_free: LabelFree = field(default_factory=LabelFree)
    data_root: str | None = None  # the recipe's folder: relative `data:` paths start there

    def model_parameters(self, tensor_name: str, expert: Expert) -> dict[str, float]:
        """The per-model parameters of `expert` for one tensor: defaults, expert, then overrides."""
        params = get_method(self.method).model_defaults()
        params.update(expert.parameters)
        for override in self.overrides:
            if override.applies(tensor_name, expert.task):
                params.update(override.parameters)
        return params

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, every field, for the merged model's provenance
        (`hm3_recipe.yaml`): `parse_recipe` reads it back to an equal recipe, so the file
        re-creates the merge. Relative `data:` paths are written resolved against the recipe's
        folder, as they were read."""
        base: Any = self.base
        if self.base_revision is not None:
            base = {"model": self.base, "revision": self.base_revision}
        out = {
            "base": base,
            "experts": [_expert_dict(e) for e in self.experts],
            "method": self.method,
            "parameters": dict(self.parameters),
            "dtype": self.dtype,
            "seed": self.seed,
            "overrides": [{"pattern": o.pattern, **o.parameters,
                           **({"experts": list(o.experts)} if o.experts is not None else {})}
                          for o in self.overrides],
            "allow_pickle": self.allow_pickle,
            "max_shard_size": self.max_shard_size,
        }
        if self.data:
            out["data"] = resolve_data_paths(self.data, self.data_root)
        return {**out, **self.label_free.to_dict()}


def _expert_dict(expert: Expert) -> dict[str, Any]:
    out: dict[str, Any] = {"model": expert.model, "task": expert.task}
    if expert.revision is not None:
        out["revision"] = expert.revision
    if expert.head is not None:
        out["head"] = {"weight": expert.head.weight, "bias": expert.head.bias}
    return {**out, **expert.parameters}


def resolve_data_paths(data: dict[str, Any], root: str | None) -> dict[str, Any]:
    """A `data:` block with each relative path that exists under `root` made absolute (others:
    hub ids, absolute paths, missing files, as given)."""
    def resolved(path: str) -> str:
        if root is None or Path(path).is_absolute() or not (Path(root) / path).exists():
            return path
        return str((Path(root) / path).resolve())

    out: dict[str, Any] = {}
    for task, entry in data.items():
        if isinstance(entry, str):
            out[task] = resolved(entry)
            continue
        entry = {**entry, "path": resolved(entry["path"])}
        validation = entry.get("validation")
        if isinstance(validation, str):
            entry["validation"] = resolved(validation)
        elif isinstance(validation, dict) and "path" in validation:
            entry["validation"] = {**validation, "path": resolved(validation["path"])}
        out[task] = entry
    return out


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe; relative model paths are taken from the recipe's folder."""
    path = Path(path)
    return parse_recipe(_read_yaml(path), root=path.parent)


def load_data_recipe(path: str | Path) -> dict[str, Any]:
    """The `data:` block of a recipe file, validated; for `hm3 eval --recipe`, the file may hold
    that block alone (no base or experts)."""
    path = Path(path)
    raw = _read_yaml(path)
    if isinstance(raw, dict) and set(raw) == {"data"}:
        parse_data_block(raw["data"])
        return raw["data"]
    return parse_recipe(raw, root=path.parent).data


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise Hm3Error(f"recipe {path} does not exist; pass the path of a YAML recipe file")
    try:
        return yaml.safe_load(read_utf8(path))
    except yaml.YAMLError as exc:
        raise Hm3Error(f"recipe {path} is not valid YAML: {_yaml_problem(exc)}") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message on one line (its own spans several, with a caret drawing)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or not problem:
        return " ".join(str(exc).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def parse_recipe(raw: Any, root: Path | None = None) -> Recipe:
    """Validate recipe data (as read from YAML); every error names the field at fault. A
    mergekit YAML (`merge_method`, `base_model`, `models`) is read as the hm3 recipe it means
    (`hm3.mergekit_yaml`)."""
    expert_where = None
    if is_mergekit(raw):
        raw, expert_where = from_mergekit(
            raw, top_level_keys(), lambda model: _model_reference(model, "model", root)[0])
    if raw is None:
        raise Hm3Error("the recipe is empty: write at least `base: MODEL` and "
                       "`experts: [{model: MODEL, task: NAME}, ...]`")
    if not isinstance(raw, dict):
        raise Hm3Error("recipe must be a mapping with at least `base` and `experts`")
    if "model" in raw and "base" not in raw:
        raise Hm3Error("base: missing; the model the experts were fine-tuned from is `base:`, "
                       "not `model:` (`model:` names each expert), e.g. "
                       "`base: bert-base-uncased`")
    _reject_unknown(raw, top_level_keys(), "recipe")
    raw = expand_preset(raw)
    if raw.get("base") is None:
        raise Hm3Error("base: missing; give the model the experts were fine-tuned from, e.g. "
                       "`base: bert-base-uncased`")
    base, base_revision = _model_reference(raw["base"], "base", root)

    method_name = raw.get("method", "ties")
    try:
        method = get_method(method_name)
    except KeyError as exc:
        raise Hm3Error(f"method: {exc.args[0]}") from None

    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise Hm3Error("parameters: expected a mapping such as {lambda: 1.0, normalize: true}")
    shared = method.validate_shared(parameters, where="parameters")
    # Per-model parameters may also be given method-wide, as mergekit allows.
    method_wide_models = {k: v for k, v in parameters.items() if k in PER_MODEL_PARAMETERS}
    method_wide_models = method.validate_model_parameters(method_wide_models, where="parameters")

    experts_raw = raw.get("experts")
    if not isinstance(experts_raw, list) or not experts_raw:
        raise Hm3Error("experts: expected a non-empty list of {model: PATH_OR_HUB_ID, task: NAME}")
    experts = []
    for i, item in enumerate(experts_raw):
        where = expert_where[i] if expert_where else f"experts[{i}]"
        if not isinstance(item, dict):
            example = item if isinstance(item, str) else "PATH_OR_HUB_ID"
            raise Hm3Error(f"{where}: expected a mapping such as `{{model: {example}, task: NAME}}`"
                           f", got {item!r}")
        _reject_unknown(item, _EXPERT_KEYS, where)
        if item.get("model") is None:
            named = f" (task {item['task']})" if isinstance(item.get("task"), str) else ""
            raise Hm3Error(f"{where}{named}: no `model:`; add `model: PATH_OR_HUB_ID`, the "
                           "expert's folder or hub id")
        if item.get("task") is None:
            name = Path(str(item["model"]).rstrip("/")).name or "NAME"
            raise Hm3Error(f"{where} ({item['model']}): no `task:`; add `task: NAME`, the name "
                           f"of its group of labels in the merged model (e.g. `task: {name}`)")
        model, revision = _model_reference(item, where, root)
        task = item.get("task")
        if not isinstance(task, str) or not task or "/" in task:
            raise Hm3Error(f"{where}.task: expected a non-empty name without '/', got {task!r}")
        own = {k: item[k] for k in PER_MODEL_PARAMETERS if k in item}
        params = {**method_wide_models, **method.validate_model_parameters(own, where=where)}
        experts.append(Expert(model=model, task=task, revision=revision,
                              head=(_head_names(item["head"], f"{where}.head")
                                    if item.get("head") is not None
                                    else _head_names(raw.get("head"), "head")),
                              parameters=params))
    tasks = [e.task for e in experts]
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise Hm3Error(f"experts: duplicate task name(s) {', '.join(duplicates)}; "
                       "give every expert its own `task`")
    first_task: dict[tuple[str, str | None], str] = {}
    for expert in experts:
        earlier = first_task.setdefault((expert.model, expert.revision), expert.task)
        if earlier != expert.task:
            warnings.warn(f"experts: {expert.model} is listed twice, as tasks {earlier} and "
                          f"{expert.task}; the merged model will answer both with the same "
                          "head rows (list each expert once unless that is what you want)",
                          Hm3Warning, stacklevel=2)

    overrides_raw = raw.get("overrides") or []
    if not isinstance(overrides_raw, list):
        kind = "a mapping" if isinstance(overrides_raw, dict) else repr(overrides_raw)
        raise Hm3Error(f"overrides: expected a list of {{pattern: GLOB, density: ..., weight: "
                       f"...}}, got {kind}; write it as `overrides: [{{pattern: ...}}]`")
    overrides = tuple(_override(item, i, method, set(tasks))
                      for i, item in enumerate(overrides_raw))

    dtype = raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise Hm3Error(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise Hm3Error(f"seed: expected a non-negative integer, got {seed!r}")
    allow_pickle = raw.get("allow_pickle", False)
    if not isinstance(allow_pickle, bool):
        raise Hm3Error(f"allow_pickle: expected true or false, got {allow_pickle!r}")
    max_shard_size = parse_size(raw.get("max_shard_size", DEFAULT_SHARD_SIZE), "max_shard_size")
    data = raw.get("data") or {}
    if data:
        parse_data_block(data, tasks)  # validated now, read by `hm3 eval` and `hm3 search`
    label_free = parse_label_free(raw, tasks)
    if label_free.calibration and root is not None:
        for source in label_free.calibration.all_sources():
            candidate = (root / source["path"]).expanduser()
            if candidate.exists():
                source["path"] = str(candidate.resolve())
    return Recipe(base=base, base_revision=base_revision, experts=tuple(experts),
                  method=method.name, parameters=shared, dtype=dtype, seed=seed,
                  overrides=overrides, allow_pickle=allow_pickle,
                  max_shard_size=max_shard_size, data=data, label_free=label_free,
                  data_root=str(root) if root is not None else None)


def expand_preset(raw: dict) -> dict:
    """The recipe mapping with its `preset:` expanded (the recipe's own keys win); a merged
    model's recipe records the expansion, not the preset's name."""
    if "preset" not in raw:
        return raw
    name = raw["preset"]
    if name not in PRESETS:
        raise Hm3Error(f"preset: expected one of {', '.join(PRESETS)}, got {name!r}")
    own = {key: value for key, value in raw.items() if key != "preset"}
    if "calibration" not in own:
        raise Hm3Error(f"preset {name} runs label-free steps that read unlabelled texts: add a "
                       "`calibration:` block, e.g. `calibration: {texts: {TASK: texts.txt, ...}}` "
                       "(texts of each task's domain) or `{texts: traffic.txt}` (one sample)")
    if "method" not in own and isinstance(own.get("parameters"), dict):
        method = get_method(PRESETS[name]["method"])
        allowed = method.parameter_names()
        for key in own["parameters"]:
            if key not in allowed:
                raise Hm3Error(f"parameters.{key}: preset {name} merges the body with `method: "
                               f"{method.name}`, which takes no `{key}` (its parameters: "
                               f"{', '.join(allowed)}); to give another method's parameters, "
                               "name that method beside the preset, e.g. `method: ties` with "
                               "`parameters: {density: 0.2}` (the preset's body in earlier "
                               "versions)")
    return {**PRESETS[name], **own}


def parse_size(value: Any, where: str) -> int:
    """Parse a byte size such as 2GB, 500MB or 1048576."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10,
             "MIB": 2**20, "GIB": 2**30}
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().upper()
        number = text.rstrip("KMGIB")
        unit = text[len(number):]
        try:
            size = int(float(number) * units[unit])
        except (ValueError, KeyError):
            size = 0
        if size > 0:
            return size
    raise Hm3Error(f"{where}: expected a positive size such as 2GB or 500MB, got {value!r}")


def _model_reference(item: Any, where: str, root: Path | None) -> tuple[str, str | None]:
    if isinstance(item, str):
        model, revision = item, None
    elif isinstance(item, dict):
        model, revision = item.get("model"), item.get("revision")
    else:
        model, revision = None, None
    if not isinstance(model, str) or not model.strip():
        if where == "base":
            raise Hm3Error("base: expected a local path or hub id, e.g. `base: bert-base-uncased` "
                           f"or `base: {{model: bert-base-uncased, revision: main}}`, got {item!r}")
        raise Hm3Error(f"{where}.model: expected a local path or hub id, e.g. "
                       f"`model: bert-base-uncased`, got {model!r}")
    # A folder under the recipe's own wins over a hub id of the same spelling (docs/recipe.md):
    # `experts/tone` beside the recipe is that folder, from whatever directory hm3 runs in.
    if root is not None:
        candidate = (root / model).expanduser()
        if candidate.exists():
            model = str(candidate.resolve())
    return model, revision


def _head_names(raw: Any, where: str) -> HeadNames | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("weight"), str):
        raise Hm3Error(f"{where}: expected {{weight: TENSOR_NAME, bias: TENSOR_NAME}}, "
                       f"got {raw!r}")
    bias = raw.get("bias")
    if bias is not None and not isinstance(bias, str):
        raise Hm3Error(f"{where}.bias: expected a tensor name or nothing")
    return HeadNames(weight=raw["weight"], bias=bias)


def _override(item: Any, index: int, method, tasks: set[str]) -> Override:
    where = f"overrides[{index}]"
    if not isinstance(item, dict) or not isinstance(item.get("pattern"), str):
        raise Hm3Error(f"{where}: expected {{pattern: GLOB, density: ..., weight: ...}}")
    _reject_unknown(item, _OVERRIDE_KEYS, where)
    params = method.validate_model_parameters(
        {k: item[k] for k in PER_MODEL_PARAMETERS if k in item}, where=where)
    experts = item.get("experts")
    if experts is not None:
        if isinstance(experts, str):
            experts = [experts]
        unknown = sorted(set(experts) - tasks)
        if unknown:
            raise Hm3Error(f"{where}.experts: unknown task(s) {', '.join(unknown)}; "
                           f"known tasks are {', '.join(sorted(tasks))}")
        experts = tuple(experts)
    return Override(pattern=item["pattern"], parameters=params, experts=experts)


def _reject_unknown(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise Hm3Error(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; "
                       f"allowed: {', '.join(sorted(allowed))}")


def parse_label_free(raw: dict, tasks: list[str]) -> LabelFree:
    """Read the head mode, the calibration block and the label-free steps' blocks of a recipe
    mapping (each step's from its declaration; `false` or absent: not asked for)."""
    heads = raw.get("heads", DEFAULT_HEADS)
    if heads not in HEAD_MODES:
        raise Hm3Error(f"heads: expected 'whole' (copy each task's head rows from its expert) or "
                       f"'merge' (merge them like the body), got {heads!r}")
    steps = tuple((name, get_step(name).parse(raw[name])) for name in step_names()
                  if raw.get(name) not in (None, False))
    asked = [name for name, _ in steps]
    for name in asked:
        for other, why in get_step(name).conflicts.items():
            if other in asked:
                raise Hm3Error(f"{name} and {other} cannot be combined: {why}; keep one")
    calibration = parse_calibration_block(raw.get("calibration"), tasks)
    if steps and calibration is None:
        raise Hm3Error(f"{', '.join(asked)}: needs unlabelled texts: add a `calibration:` block, "
                       "e.g. `calibration: {texts: traffic.txt}` (the same texts for every "
                       "task) or `{texts: {TASK: texts.txt, ...}}` (a file per task)")
    return LabelFree(heads, calibration, steps)
