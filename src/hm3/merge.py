"""The merge engine: open the checkpoints, check they fit together, then stream tensor by tensor
(read -> expand head -> task vectors -> method kernel) into a writer or into a model in memory.
It knows nothing of calibration texts: the label-free steps and `hm3.pipeline` build on it."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from hm3 import __version__
from hm3.card import write_card
from hm3.checkpoint import (TOKENIZER_FILES, TORCH_DTYPES, Checkpoint, ShardedWriter,
                            write_json_atomic)
from hm3.errors import Hm3Error, Hm3Warning
from hm3.heads import (MULTI_LABEL, TaskGroup, expand_head, expert_labels, find_head,
                       is_multi_label, layout)
from hm3.methods import get_method
from hm3.recipe import HeadNames, Recipe

# Architecture fields that must agree between the base and every expert.
_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                 "intermediate_size", "num_attention_heads", "n_embd", "n_layer", "dim",
                 "n_layers")
# Head layers a base encoder usually lacks: their task vector is the expert's whole weight.
_HEAD_HIDDEN_PREFIXES = ("classifier.", "pre_classifier.", "head.", "pooler.", "score.")
# A fine-tune moves its weights by a few percent; this much suggests another base.
IMPLAUSIBLE_TASK_VECTOR = 0.5
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: where its inputs come from and what shape it ends up."""

    name: str
    shape: tuple[int, ...]
    base_name: str | None  # None: the base lacks it (head layers); its value counts as zeros
    head_role: str | None = None  # "weight" or "bias" of the final projection, else None
    floating: bool = True


@dataclass
class Sources:
    """The opened, cross-checked inputs of a merge."""

    recipe: Recipe
    base: Checkpoint
    experts: list[Checkpoint]
    heads: list[HeadNames]
    groups: list[TaskGroup]
    jobs: list[TensorJob]
    task_vector_sq: list[list[float]] = field(default_factory=list)  # per expert: |tau|^2, |theta_0|^2

    @property
    def num_labels(self) -> int:
        return self.groups[-1].stop


def open_sources(recipe: Recipe) -> Sources:
    """Open base and experts and check they fit together, before any tensor data is read."""
    base = Checkpoint(recipe.base, recipe.base_revision, recipe.allow_pickle)
    experts = [Checkpoint(e.model, e.revision, recipe.allow_pickle) for e in recipe.experts]
    for i, (spec, expert) in enumerate(zip(recipe.experts, experts)):
        _refuse_merged_expert(i, spec.model, spec.task, expert.config)
        _check_architecture(base, expert, spec.task)
    labels = [expert_labels(ckpt.config, spec.model) for spec, ckpt in zip(recipe.experts, experts)]
    heads = [find_head(set(ckpt.keys()), ckpt.shape, len(names), spec.model, spec.head)
             for spec, ckpt, names in zip(recipe.experts, experts, labels)]
    groups = layout([e.task for e in recipe.experts], labels,
                    [is_multi_label(c.config) for c in experts])
    jobs = _plan(recipe, base, experts, heads, groups)
    _check_parameters(recipe, jobs)
    return Sources(recipe, base, experts, heads, groups, jobs)


def _check_parameters(recipe: Recipe, jobs: list[TensorJob]) -> None:
    """Check the per-model parameters each tensor will get. The recipe checks each source of
    them alone; only here, with the tensor names, are method-wide values, the expert's own and
    the matching overrides combined (della's density ± epsilon must then still lie in (0, 1))."""
    method = get_method(recipe.method)
    names = [job.name for job in jobs if job.floating]
    for i, override in enumerate(recipe.overrides):
        if not any(override.applies(name, task) for name in names
                   for task in override.experts or [e.task for e in recipe.experts]):
            raise Hm3Error(f"overrides[{i}].pattern {override.pattern!r} matches no tensor of "
                           f"the experts (their names look like {names[len(names) // 2]}); fix "
                           "the pattern or remove the override")
    # iso_c takes the weighted mean of every tensor that is not a weight matrix
    sums_weights = (recipe.parameters.get("normalize") and not method.consensus) or method.isotropic
    for job in jobs:
        if job.floating:
            for i, spec in enumerate(recipe.experts):
                method.validate_model_parameters(recipe.model_parameters(job.name, spec),
                                                 where=f"experts[{i}] ({spec.task}) at {job.name}")
            if sums_weights:
                weights = [recipe.model_parameters(job.name, e)["weight"] for e in recipe.experts]
                if abs(sum(weights)) < 1e-8:
                    way_out = "" if method.isotropic else ", or set `parameters: {normalize: false}`"
                    raise Hm3Error(f"{recipe.method} divides by the sum of the experts' weights, "
                                   f"which is 0 at {job.name} ({weights}); give weights that do "
                                   f"not cancel out{way_out}")


def _refuse_merged_expert(index: int, model: str, task: str, config: dict) -> None:
    """A model hm3 merged has one id2label over all its tasks: read as one expert, its labels
    would share one softmax and its task groups would be lost."""
    block = config.get("hm3")
    if not block:
        return
    tasks = [group["name"] for group in block.get("tasks", [])]
    labels = sum(len(group["labels"]) for group in block.get("tasks", []))
    sources = "".join(f"{s['task']}: {s['model']}; " for s in block.get("sources", []))
    raise Hm3Error(f"experts[{index}] ({model}) is a model merged by hm3, with tasks "
                   f"{', '.join(tasks)}: merged as one expert its {labels} labels would share one "
                   f"softmax as task {task}; list the experts it was merged from instead "
                   f"({sources}its hm3_recipe.yaml has them)")


def _check_architecture(base: Checkpoint, expert: Checkpoint, task: str) -> None:
    for key in _SHAPE_FIELDS:
        if key in base.config and key in expert.config and base.config[key] != expert.config[key]:
            raise Hm3Error(f"expert {task} ({expert.reference}) has {key}={expert.config[key]} "
                           f"but the base {base.reference} has {base.config[key]}; every expert "
                           "must be fine-tuned from the recipe's base")


def _plan(recipe: Recipe, base: Checkpoint, experts: list[Checkpoint], heads: list[HeadNames],
          groups: list[TaskGroup]) -> list[TensorJob]:
    reference = set(experts[0].keys())
    for spec, ckpt in zip(recipe.experts, experts):
        missing, extra = reference - set(ckpt.keys()), set(ckpt.keys()) - reference
        if missing or extra:
            detail = "; ".join(f"{what}: {', '.join(sorted(names)[:4])}"
                               for what, names in (("missing", missing), ("extra", extra)) if names)
            raise Hm3Error(f"expert {spec.task} ({spec.model}) has other tensors than expert "
                           f"{recipe.experts[0].task} ({detail}); experts must share one "
                           "architecture")
    if len(set(heads)) != 1:
        raise Hm3Error("experts name their classification heads differently "
                       f"({', '.join(sorted({h.weight for h in heads}))}); "
                       "experts must share one architecture")
    head = heads[0]
    num_labels = groups[-1].stop
    jobs = []
    for name in experts[0].keys():
        shapes = {ckpt.shape(name) for ckpt in experts}
        if name in (head.weight, head.bias):
            role = "weight" if name == head.weight else "bias"
            widths = {s[1:] for s in shapes}
            if len(widths) != 1:
                raise Hm3Error(f"experts' head {name} differ in width {sorted(widths)}")
            jobs.append(TensorJob(name, (num_labels, *widths.pop()), None, role))
            continue
        if len(shapes) != 1:
            raise Hm3Error(f"tensor {name} has different shapes across experts {sorted(shapes)}; "
                           "experts must share one architecture")
        shape = shapes.pop()
        floating = experts[0].dtype(name).startswith(("F", "BF"))
        base_name = _base_name(base, name)
        if base_name is None and floating and not name.startswith(_HEAD_HIDDEN_PREFIXES):
            raise Hm3Error(f"the base {recipe.base} has no tensor {name}, which the experts have; "
                           "is it the model they were fine-tuned from?")
        if base_name is not None and base.shape(base_name) != shape:
            raise Hm3Error(f"tensor {name}: the experts have shape {shape}, the base "
                           f"{base.shape(base_name)}; every expert must be fine-tuned from the "
                           "recipe's base")
        jobs.append(TensorJob(name, shape, base_name, None, floating))
    return jobs


def _base_name(base: Checkpoint, name: str) -> str | None:
    """The base's name for an expert tensor: the same, or without the task model's prefix
    (an expert's `bert.encoder...` is a bare encoder's `encoder...`)."""
    if name in base:
        return name
    _, _, rest = name.partition(".")
    return rest if rest in base else None


def _generator(seed: int, tensor: str, expert: int) -> torch.Generator:
    """A generator per (seed, tensor, expert): the result cannot depend on streaming order."""
    digest = hashlib.blake2b(f"{seed}/{tensor}/{expert}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def merged_tensors(sources: Sources, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged float32 tensor) in plan order, reading each input tensor once.

    Memory holds the base's tensor and, at most, one tensor per expert at a time (see
    `MergeMethod.combine`). Also collects the relative
    size of each expert's task vector, read by `task_vector_norms` afterwards.
    """
    sources.task_vector_sq = [[0.0, 0.0] for _ in sources.experts]
    for job in tqdm(sources.jobs, desc="merging", unit="tensor", disable=not progress):
        yield job.name, merge_job(sources, job)


def merge_job(sources: Sources, job: TensorJob) -> torch.Tensor:
    """One output tensor: copied (not floating), the experts' head rows (`heads: whole`), or
    the method's merge of the experts' task vectors."""
    if not job.floating:
        return sources.experts[0].tensor(job.name)
    if job.head_role is not None and sources.recipe.guided.heads == "whole":
        return whole_head(sources, job)
    method = get_method(sources.recipe.method)
    if (method.sparsifier is None and not method.consensus and not method.isotropic
            and job.head_role is None):
        return weighted_sum(sources, job, method)
    base, deltas, weights = job_inputs(sources, job)
    return method.combine(base, deltas, weights, sources.recipe.parameters, role=tensor_role(job))


def tensor_role(job: TensorJob) -> str:
    """What a spectral method (iso_c) sees in a tensor: `head`, the final projection's
    task-disjoint rows; `matrix`, a layer's weight matrix, merged as a whole (2-D, not an
    embedding table, whose rows of tokens no expert saw stay untouched); else `other`."""
    if job.head_role is not None:
        return "head"
    return "matrix" if len(job.shape) == 2 and "embed" not in job.name else "other"


def whole_head(sources: Sources, job: TensorJob) -> torch.Tensor:
    """`heads: whole`: every task's head rows exactly as its expert has them."""
    head = torch.zeros(job.shape)
    for group, ckpt in zip(sources.groups, sources.experts):
        head[group.offset:group.stop] = ckpt.tensor(job.name).float()
    return head


def weighted_sum(sources: Sources, job: TensorJob, method) -> torch.Tensor:
    """`linear` and `task_arithmetic` (no sparsifier, no consensus) from S = sum w_i theta_i,
    read straight from the models with no task vector built and no temporary per expert:
    linear is S (divided by W = sum w_i when normalised), mergekit's formula; task arithmetic is
    base + lambda * (S - W base) (divided by W when normalised), the same as base + lambda *
    sum w_i (theta_i - base). Adds to `sources.task_vector_sq` when it is set."""
    recipe, shared = sources.recipe, sources.recipe.parameters
    squares = sources.task_vector_sq
    base = (sources.base.tensor(job.base_name).float() if job.base_name
            else torch.zeros(job.shape))
    base_sq = float(base.pow(2).sum()) if job.base_name and squares else 0.0
    weights = [recipe.model_parameters(job.name, spec)["weight"] for spec in recipe.experts]
    out = torch.zeros(job.shape)
    for i, (weight, ckpt) in enumerate(zip(weights, sources.experts)):
        theta = ckpt.tensor(job.name).float()
        if job.base_name and squares:
            squares[i][0] += float(torch.dist(theta, base)) ** 2
            squares[i][1] += base_sq
        out.add_(theta, alpha=weight)
    total = sum(weights)
    divisor = total if shared["normalize"] and abs(total) > 1e-8 else 1.0
    if method.mean_of_models:
        return out.div_(divisor)
    mixed = out.sub_(base, alpha=total).div_(divisor)
    return mixed.mul_(shared["lambda"]).add_(base)


def job_inputs(sources: Sources, job: TensorJob
               ) -> tuple[torch.Tensor, Iterator[torch.Tensor], list[float]]:
    """One floating tensor's base, the experts' sparsified task vectors and their weights (head
    rows expanded to the merged layout). The task vectors come lazily, one expert at a time, so
    a method that needs no consensus holds one of them at once. Adds to
    `sources.task_vector_sq` when it is set."""
    recipe = sources.recipe
    if job.head_role is not None:
        base = torch.zeros(job.shape)
    else:
        base = (sources.base.tensor(job.base_name).float() if job.base_name
                else torch.zeros(job.shape))
    weights = [recipe.model_parameters(job.name, spec)["weight"] for spec in recipe.experts]
    return base, _task_vectors(sources, job, base), weights


def _task_vectors(sources: Sources, job: TensorJob, base: torch.Tensor) -> Iterator[torch.Tensor]:
    recipe = sources.recipe
    method = get_method(recipe.method)
    shared = recipe.parameters
    squares = sources.task_vector_sq
    base_sq = float(base.pow(2).sum()) if job.base_name and squares else 0.0
    for i, (spec, ckpt) in enumerate(zip(recipe.experts, sources.experts)):
        params = recipe.model_parameters(job.name, spec)
        generator = _generator(recipe.seed, job.name, i)
        if job.head_role is not None:
            sparse = method.sparsify(ckpt.tensor(job.name).float(), params, shared, generator)
            yield expand_head(sparse, sources.groups[i].offset, sources.num_labels)
            continue
        # A fresh tensor: a preloaded checkpoint returns its own stored copy, which must not change.
        delta = ckpt.tensor(job.name).float() - base
        if job.base_name and squares:
            squares[i][0] += float(torch.linalg.vector_norm(delta)) ** 2
            squares[i][1] += base_sq
        yield method.sparsify(delta, params, shared, generator)


def with_recipe(sources: Sources, recipe: Recipe) -> Sources:
    """The same opened inputs under another recipe (method, parameters, seed, weights): for
    search trials. The recipe must name the same base and experts in the same order."""
    same = (recipe.base == sources.recipe.base and [(e.model, e.task) for e in recipe.experts]
            == [(e.model, e.task) for e in sources.recipe.experts])
    if not same:
        raise Hm3Error("with_recipe: the new recipe must name the same base and experts, in order")
    _check_parameters(recipe, sources.jobs)
    return dataclasses.replace(sources, recipe=recipe, task_vector_sq=[])


def build_model(sources: Sources):
    """An (uninitialised) model of the merged architecture and labels, to `merge_into`."""
    # Lazy: transformers takes seconds to import; a merge to disk never needs it.
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = merged_config(sources, {}, {})
    config.pop("hm3")
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    return AutoModelForSequenceClassification.from_config(config).eval()


@torch.no_grad()
def merge_into(model: torch.nn.Module, sources: Sources, progress: bool = False) -> None:
    """Merge straight into `model`'s weights, in memory: nothing is written to disk."""
    state = model.state_dict()
    for name, tensor in merged_tensors(sources, progress=progress):
        if name in state:  # checkpoints may hold buffers the model does not persist
            state[name].copy_(tensor)


def task_vector_norms(sources: Sources) -> dict[str, float]:
    """|tau_i| / |theta_0| over the body, per task (after `merged_tensors` has run)."""
    return {spec.task: math.sqrt(tau / max(theta, 1e-12))
            for spec, (tau, theta) in zip(sources.recipe.experts, sources.task_vector_sq)}


def state_tensors(model: torch.nn.Module, sources: Sources) -> Iterator[tuple[str, torch.Tensor]]:
    """A model's weights in plan order, after `merge_into` (and any step that changed them); a
    tensor the model does not hold (a buffer it does not persist) is merged alone."""
    state = model.state_dict()
    for job in sources.jobs:
        yield job.name, state[job.name].cpu() if job.name in state else merge_job(sources, job)


def write_model(sources: Sources, folder: Path,
                tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
                notes: dict | None = None, progress: bool = False) -> dict[str, float]:
    """Write a merged model into `folder` (an empty folder, e.g. an `atomic_directory`):
    safetensors shards streamed from `tensors` (default: `merged_tensors`, merging as it
    writes), config.json with the `hm3` block (plus `notes`), the tokenizer files. Returns each
    expert's relative task-vector norm."""
    recipe = sources.recipe
    out_dtypes = {job.name: _output_dtype(recipe, sources, job) for job in sources.jobs}
    if tensors is None:
        tensors = merged_tensors(sources, progress=progress)
    writer = ShardedWriter(folder, {job.name: (job.shape, out_dtypes[job.name])
                                    for job in sources.jobs}, recipe.max_shard_size)
    for name, tensor in tensors:
        writer.write(name, tensor.to(out_dtypes[name]))
    writer.close()
    norms = task_vector_norms(sources)
    config = merged_config(sources, out_dtypes, norms)
    config["hm3"].update(notes or {})
    write_json_atomic(folder / "config.json", config)
    write_card(folder, config)
    _copy_tokenizer(sources, folder)
    return norms


def warn_implausible(norms: dict[str, float]) -> None:
    """A warning for each expert that moved too far from the base to be fine-tuned from it."""
    for task, norm in norms.items():
        if norm > IMPLAUSIBLE_TASK_VECTOR:
            warnings.warn(f"expert {task}'s weights differ from the base by {norm:.0%} of the "
                          "base's norm; it was probably not fine-tuned from this base",
                          Hm3Warning, stacklevel=3)


def _output_dtype(recipe: Recipe, sources: Sources, job: TensorJob) -> torch.dtype:
    stored = TORCH_DTYPES[sources.experts[0].dtype(job.name)]
    if not job.floating:
        return stored
    if recipe.dtype:
        return _DTYPES[recipe.dtype]
    return stored if stored in (torch.float16, torch.bfloat16) else torch.float32


def merged_config(sources: Sources, out_dtypes: dict[str, torch.dtype],
                  norms: dict[str, float]) -> dict:
    """The first expert's config, relabelled as one K-label model with an `hm3` block."""
    recipe = sources.recipe
    config = dict(sources.experts[0].config)
    for key in ("num_labels", "_name_or_path", "torch_dtype"):
        config.pop(key, None)
    names = [f"{g.name}/{label}" for g in sources.groups for label in g.labels]
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    kinds = {g.multi_label for g in sources.groups}
    if kinds == {True}:
        config["problem_type"] = MULTI_LABEL
    elif kinds == {False}:
        config["problem_type"] = "single_label_classification"
    else:
        config.pop("problem_type", None)  # mixed: no single loss fits; hm3 reads the groups
    float_dtypes = {str(d).removeprefix("torch.") for d in out_dtypes.values() if d.is_floating_point}
    if len(float_dtypes) == 1:
        config["dtype"] = float_dtypes.pop()
    config["hm3"] = {
        "version": __version__,
        "tasks": [g.to_dict() for g in sources.groups],
        "sources": [{"task": e.task, "model": e.model} for e in recipe.experts],
        "base": recipe.base,
        "method": recipe.method,
        "parameters": recipe.parameters,
        "seed": recipe.seed,
        "recipe": recipe.to_dict(),
        "task_vector_norms": {k: round(v, 6) for k, v in norms.items()},
    }
    return config


def _copy_tokenizer(sources: Sources, folder: Path) -> None:
    for root in (sources.base.path, sources.experts[0].path):
        present = [name for name in TOKENIZER_FILES if (root / name).is_file()]
        if present:
            for name in present:
                shutil.copyfile(root / name, folder / name)
            return
