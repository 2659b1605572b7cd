"""The inputs of a merge: the base and the experts opened (lazily: nothing but headers is read)
and cross-checked, their heads found, the merged label layout and the plan (`Sources`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from hm3.checkpoint import Checkpoint
from hm3.engine.plan import TensorJob, check_parameters, plan_jobs
from hm3.errors import Hm3Error
from hm3.heads import TaskGroup, expert_labels, find_head, is_multi_label, layout
from hm3.recipe import HeadNames, Recipe

# Architecture fields that must agree between the base and every expert.
_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                 "intermediate_size", "num_attention_heads", "n_embd", "n_layer", "dim",
                 "n_layers")


@dataclass(frozen=True)
class Sources:
    """The opened, cross-checked inputs of a merge: read-only (what a merge measures on the way
    is handed back to its caller, `stream.TaskVectorSquares`); another recipe over the same
    inputs is `with_recipe`."""

    recipe: Recipe
    base: Checkpoint
    experts: list[Checkpoint]
    heads: list[HeadNames]
    groups: list[TaskGroup]
    jobs: list[TensorJob]

    @property
    def num_labels(self) -> int:
        return self.groups[-1].stop

    def reference(self, job: TensorJob, out: torch.Tensor | None = None,
                  start: int = 0) -> torch.Tensor:
        """What a tensor's task vectors are taken from: the base's tensor (float32), or, for a head
        layer the base lacks (RoBERTa/MPNet `classifier.dense`, DistilBERT `pre_classifier`), the
        experts' mean. Experts fine-tuned by one script usually start that layer from one random
        init, so their mean is close to each of them (1.5-7% relative distance on the MPNet zoo),
        while task vectors taken from zeros are the whole weights: TIES at density 0.2 then kept
        22% of the layer's entries, 57% away from every expert (benchmarks/RESULTS.md, section
        10). With `out` (float32, one dimension), fills it with entries start, start + 1, ... of
        the flattened reference instead (`Checkpoint.read_into`)."""
        whole = out is None
        flat = torch.empty(job.shape).view(-1) if whole else out
        if job.base_name is not None:
            self.base.read_into(job.base_name, flat, start)
        else:
            flat.zero_()
            part = torch.empty_like(flat)
            for ckpt in self.experts:
                flat.add_(ckpt.read_into(job.name, part, start))
            flat.div_(len(self.experts))
        return flat.view(job.shape) if whole else flat


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
    jobs = plan_jobs(recipe, base, experts, heads, groups)
    check_parameters(recipe, jobs)
    return Sources(recipe, base, experts, heads, groups, jobs)


def with_recipe(sources: Sources, recipe: Recipe) -> Sources:
    """The same opened inputs under another recipe (method, parameters, seed, weights): for
    search trials. The recipe must name the same base and experts in the same order."""
    same = (recipe.base == sources.recipe.base and [(e.model, e.task) for e in recipe.experts]
            == [(e.model, e.task) for e in sources.recipe.experts])
    if not same:
        raise Hm3Error("with_recipe: the new recipe must name the same base and experts, in order")
    check_parameters(recipe, sources.jobs)
    return dataclasses.replace(sources, recipe=recipe)


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
