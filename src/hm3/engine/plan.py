"""The merge plan: which tensors the merged model has, where each one's inputs come from and
what shape it ends up (a `TensorJob` per tensor), and the recipe's parameters checked against
those tensors. Reads shapes and dtypes only, never tensor data."""

from __future__ import annotations

import re
from dataclasses import dataclass

from hm3.checkpoint import Checkpoint
from hm3.errors import Hm3Error
from hm3.heads import TaskGroup
from hm3.methods import get_method
from hm3.recipe import HeadNames, Recipe

# Head layers a base encoder usually lacks: their task vectors are taken from the experts' mean
# (`hm3.engine.stream.reference`).
_HEAD_HIDDEN_PREFIXES = ("classifier.", "pre_classifier.", "head.", "pooler.", "score.")


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: where its inputs come from and what shape it ends up."""

    name: str
    shape: tuple[int, ...]
    base_name: str | None  # None: the base lacks it (head layers); the experts' mean stands in
    head_role: str | None = None  # "weight" or "bias" of the final projection, else None
    floating: bool = True


def plan_jobs(recipe: Recipe, base: Checkpoint, experts: list[Checkpoint],
              heads: list[HeadNames], groups: list[TaskGroup]) -> list[TensorJob]:
    """One job per tensor of the experts, in their order; refuses experts that do not share one
    architecture or do not fit the base."""
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


def check_parameters(recipe: Recipe, jobs: list[TensorJob]) -> None:
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
    # iso_c and tsv take the weighted mean of every tensor that is not a weight matrix
    sums_weights = ((recipe.parameters.get("normalize") and not method.consensus)
                    or method.spectral is not None)
    for job in jobs:
        if job.floating:
            for i, spec in enumerate(recipe.experts):
                method.validate_model_parameters(recipe.model_parameters(job.name, spec),
                                                 where=f"experts[{i}] ({spec.task}) at {job.name}")
            if sums_weights:
                weights = [recipe.model_parameters(job.name, e)["weight"] for e in recipe.experts]
                if abs(sum(weights)) < 1e-8:
                    way_out = ("" if method.spectral
                               else ", or set `parameters: {normalize: false}`")
                    raise Hm3Error(f"{recipe.method} divides by the sum of the experts' weights, "
                                   f"which is 0 at {job.name} ({weights}); give weights that do "
                                   f"not cancel out{way_out}")


def tensor_role(job: TensorJob) -> str:
    """What a spectral method (iso_c, tsv) sees in a tensor: `head`, the final projection's
    task-disjoint rows; `matrix`, a layer's weight matrix, merged as a whole (2-D, not an
    embedding table, whose rows of tokens no expert saw stay untouched); else `other`."""
    if job.head_role is not None:
        return "head"
    return "matrix" if len(job.shape) == 2 and not is_embedding(job.name) else "other"


def is_embedding(name: str) -> bool:
    """A token, position or type embedding (table or its norm): `embed` in the name (BERT's
    `embeddings.*`, Llama's `embed_tokens`) or GPT-2's `wte` / `wpe`."""
    return "embed" in name or _GPT2_EMBEDDING.search(f".{name}") is not None


_GPT2_EMBEDDING = re.compile(r"\.(?:wte|wpe)\.")
