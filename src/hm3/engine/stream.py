"""The per-tensor merge: for each job of the plan, read the inputs, build the task vectors
(head rows expanded to the merged layout), sparsify them and hand them to the method's kernel
(`hm3.methods`), one tensor at a time, into a writer (`write.py`) or a model in memory.

What a merge measures on the way (each expert's task-vector size) goes into a
`TaskVectorSquares` the caller hands in and reads afterwards; the stream keeps no state."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from tqdm.auto import tqdm

from hm3.engine.plan import TensorJob, tensor_role
from hm3.engine.sources import Sources
from hm3.heads import expand_head
from hm3.methods import MergeMethod, get_method

CHUNK = 1 << 16  # entries `weighted_sum` handles at once: 256 KiB of float32 per buffer


@dataclass
class TaskVectorSquares:
    """Per expert, |tau_i|^2 and |theta_0|^2 summed over the tensors the base has (head layers
    excluded): filled by a merge that is handed it, from the task vectors it builds anyway."""

    tau: list[float]
    base: list[float]

    @classmethod
    def zeros(cls, experts: int) -> TaskVectorSquares:
        return cls([0.0] * experts, [0.0] * experts)

    def add(self, expert: int, tau_sq: float, base_sq: float) -> None:
        self.tau[expert] += tau_sq
        self.base[expert] += base_sq


def task_vector_norms(sources: Sources, squares: TaskVectorSquares) -> dict[str, float]:
    """|tau_i| / |theta_0| over the body, per task, from the squares a merge filled."""
    return {spec.task: math.sqrt(tau / max(theta, 1e-12))
            for spec, tau, theta in zip(sources.recipe.experts, squares.tau, squares.base)}


def merged_tensors(sources: Sources, progress: bool = False,
                   squares: TaskVectorSquares | None = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged float32 tensor) in plan order, reading each input tensor once.

    Memory holds the base's tensor and, at most, one tensor per expert at a time (see
    `MergeMethod.combine`). With `squares`, adds each expert's task-vector size to it.
    """
    for job in tqdm(sources.jobs, desc="merging", unit="tensor", disable=not progress):
        yield job.name, merge_job(sources, job, squares)


@torch.no_grad()
def merge_into(model: torch.nn.Module, sources: Sources, progress: bool = False,
               squares: TaskVectorSquares | None = None) -> None:
    """Merge straight into `model`'s weights, in memory: nothing is written to disk. With
    `squares`, adds each expert's task-vector size to it."""
    state = model.state_dict()
    for name, tensor in merged_tensors(sources, progress=progress, squares=squares):
        if name in state:  # checkpoints may hold buffers the model does not persist
            state[name].copy_(tensor)


def state_tensors(model: torch.nn.Module, sources: Sources) -> Iterator[tuple[str, torch.Tensor]]:
    """A model's weights in plan order, after `merge_into` (and any step that changed them); a
    tensor the model does not hold (a buffer it does not persist) is merged alone."""
    state = model.state_dict()
    for job in sources.jobs:
        yield job.name, state[job.name].cpu() if job.name in state else merge_job(sources, job)


def merge_job(sources: Sources, job: TensorJob,
              squares: TaskVectorSquares | None = None) -> torch.Tensor:
    """One output tensor: copied (not floating), the experts' head rows (`heads: whole`), or
    the method's merge of the experts' task vectors."""
    if not job.floating:
        return sources.experts[0].tensor(job.name)
    if job.head_role is not None and sources.recipe.label_free.heads == "whole":
        return whole_head(sources, job)
    method = get_method(sources.recipe.method)
    if (method.sparsifier is None and not method.consensus and not method.spectral
            and job.head_role is None):
        return weighted_sum(sources, job, method, squares)
    base, deltas, weights = job_inputs(sources, job, squares)
    return method.combine(base, deltas, weights, sources.recipe.parameters, role=tensor_role(job))


def whole_head(sources: Sources, job: TensorJob) -> torch.Tensor:
    """`heads: whole`: every task's head rows exactly as its expert has them."""
    head = torch.zeros(job.shape)
    for group, ckpt in zip(sources.groups, sources.experts):
        head[group.offset:group.stop] = ckpt.tensor(job.name).float()
    return head


def weighted_sum(sources: Sources, job: TensorJob, method: MergeMethod,
                 squares: TaskVectorSquares | None = None) -> torch.Tensor:
    """`linear` and `task_arithmetic` (no sparsifier, no consensus) from S = sum w_i theta_i,
    read straight from the models with no task vector built and no temporary per expert:
    linear is S (divided by W = sum w_i when normalised), mergekit's formula; task arithmetic is
    base + lambda * (S - W base) (divided by W when normalised), the same as base + lambda *
    sum w_i (theta_i - base). Adds to `squares` when given.

    Every entry is computed on its own, so the tensor goes CHUNK entries at a time, each model's
    part read into one small buffer that stays in the CPU's cache while it is checked, measured
    and added: memory traffic is the file reads and the output, and no read allocates."""
    recipe, shared = sources.recipe, sources.recipe.parameters
    measure = job.base_name is not None and squares is not None
    weights = [recipe.model_parameters(job.name, spec)["weight"] for spec in recipe.experts]
    total = sum(weights)
    divisor = total if shared["normalize"] and abs(total) > 1e-8 else 1.0
    out = torch.empty(job.shape)
    flat = out.view(-1)
    size = min(CHUNK, flat.numel())
    base, theta = torch.empty(size), torch.empty(size)
    tau_sq, base_sq = [0.0] * len(weights), 0.0
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start:start + CHUNK]
        n = part.numel()
        if measure or not method.mean_of_models:
            sources.reference(job, base[:n], start)
            base_sq += squared_norm(base[:n]) if measure else 0.0
        part.zero_()
        for i, (weight, ckpt) in enumerate(zip(weights, sources.experts)):
            ckpt.read_into(job.name, theta[:n], start)
            if measure:
                tau_sq[i] += float(torch.dist(theta[:n], base[:n])) ** 2
            part.add_(theta[:n], alpha=weight)
        if method.mean_of_models:
            part.div_(divisor)
        else:
            part.sub_(base[:n], alpha=total).div_(divisor).mul_(shared["lambda"]).add_(base[:n])
    if measure:
        for i, tau in enumerate(tau_sq):
            squares.add(i, tau, base_sq)
    return out


def job_inputs(sources: Sources, job: TensorJob, squares: TaskVectorSquares | None = None
               ) -> tuple[torch.Tensor, Iterator[torch.Tensor], list[float]]:
    """One floating tensor's base, the experts' sparsified task vectors and their weights (head
    rows expanded to the merged layout). The task vectors come lazily, one expert at a time, so
    a method that needs no consensus holds one of them at once. Adds to `squares` when given,
    as the task vectors are consumed."""
    recipe = sources.recipe
    base = torch.zeros(job.shape) if job.head_role is not None else sources.reference(job)
    weights = [recipe.model_parameters(job.name, spec)["weight"] for spec in recipe.experts]
    return base, _task_vectors(sources, job, base, squares), weights


def _task_vectors(sources: Sources, job: TensorJob, base: torch.Tensor,
                  squares: TaskVectorSquares | None) -> Iterator[torch.Tensor]:
    recipe = sources.recipe
    method = get_method(recipe.method)
    shared = recipe.parameters
    measure = job.base_name is not None and squares is not None
    base_sq = squared_norm(base) if measure else 0.0
    for i, (spec, ckpt) in enumerate(zip(recipe.experts, sources.experts)):
        params = recipe.model_parameters(job.name, spec)
        generator = _generator(recipe.seed, job.name, i)
        if job.head_role is not None:
            sparse = method.sparsify(ckpt.tensor(job.name).float(), params, shared, generator)
            yield expand_head(sparse, sources.groups[i].offset, sources.num_labels)
            continue
        # Read in parts into a tensor of this merge's own (a preloaded checkpoint's must not
        # change), each part made the task vector and measured while it is in the CPU's cache.
        delta = torch.empty(job.shape)
        flat, reference = delta.view(-1), base.view(-1)
        tau_sq = 0.0
        for start in range(0, flat.numel(), CHUNK):
            part = ckpt.read_into(job.name, flat[start:start + CHUNK], start)
            part.sub_(reference[start:start + CHUNK])
            tau_sq += squared_norm(part) if measure else 0.0
        if measure:
            squares.add(i, tau_sq, base_sq)
        sparse = method.sparsify(delta, params, shared, generator)
        del delta, flat  # the consumer may hold `sparse` while the next one is built
        yield sparse


def squared_norm(tensor: torch.Tensor) -> float:
    """The sum of squares, exact to float32's precision: a float32 norm of millions of entries
    in one pass drifts (5e-4 relative at 8M), so CHUNK entries at a time, summed in float64."""
    flat = tensor.reshape(-1)
    return sum(float(torch.linalg.vector_norm(flat[start:start + CHUNK])) ** 2
               for start in range(0, flat.numel(), CHUNK))


def _generator(seed: int, tensor: str, expert: int) -> torch.Generator:
    """A generator per (seed, tensor, expert): the result cannot depend on streaming order."""
    digest = hashlib.blake2b(f"{seed}/{tensor}/{expert}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
