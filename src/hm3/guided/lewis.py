"""LEWIS guided layer-wise density (Chopra et al. 2025, "LEWIS (LayEr WIse Sparsity) - A Training
Free Guided Model Merging Approach", arXiv:2503.03874): layers whose importance moved most
during fine-tuning keep more of their task vector.

Importance of a linear layer on calibration texts (Wanda-style): || |W| * sqrt(mean x^2) ||_F,
x its input rows. Per expert: |importance_expert - importance_base| for every layer, min-max
scaled into [gamma, epsilon]. The densities reach the merge as per-tensor, per-expert overrides.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from tqdm.auto import tqdm

from hm3.engine import Sources
from hm3.guided.calibration import (
    base_as_classifier,
    expert_classifier,
    layer_input_means,
    linear_layers,
    once_per_batches,
)
from hm3.recipe import Override, Recipe


def importance(model: torch.nn.Module, batches: Sequence[dict],
               skip: Sequence[str] = ()) -> dict[str, float]:
    """Wanda importance of each linear layer (by module name) over the batches."""
    mean_squares = layer_input_means(model, batches, lambda x: x.pow(2).sum(0), skip)
    layers = linear_layers(model, skip)
    return {name: float((layer.weight.detach().double().cpu().abs() * mean_squares[name].sqrt()).norm())  # noqa: E501 (tools/planted_bugs.py plants a bug in this line)
            for name, layer in layers.items()}


def scale_densities(base: dict[str, float], expert: dict[str, float], gamma: float,
                    epsilon: float) -> dict[str, float]:
    """|expert - base| per layer, min-max scaled into [gamma, epsilon] (equal moves: midpoint)."""
    moved = {name: abs(expert[name] - base[name]) for name in expert}
    low, high = min(moved.values()), max(moved.values())
    if high - low <= 1e-12 * max(high, 1.0):
        return dict.fromkeys(moved, (gamma + epsilon) / 2)
    return {name: gamma + (epsilon - gamma) * (value - low) / (high - low)
            for name, value in moved.items()}


def overrides(table: dict[str, dict[str, float]], tensor_names: set[str]) -> list[Override]:
    """Per-expert overrides giving each layer's weight (and bias) its density."""
    out = []
    for task, densities in table.items():
        for layer, density in densities.items():
            for suffix in (".weight", ".bias"):
                name = layer + suffix
                if name in tensor_names:
                    out.append(Override(pattern=_literal(name), parameters={"density": density},
                                        experts=(task,)))
    return out


def _literal(name: str) -> str:
    """A glob that matches exactly `name` (escapes glob characters)."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


class LewisScores:
    """Importance of every layer for the base and each expert, measured once; densities for any
    [gamma, epsilon] follow without running the models again (what `hm3 search` varies)."""

    def __init__(self, sources: Sources, batches: dict[str, list[dict]], skip: Sequence[str],
                 progress: bool = False, device: str = "cpu"):
        pairs = list(zip(sources.recipe.experts, sources.experts))
        bar = tqdm(pairs, desc="lewis importance", unit="expert", disable=not progress)
        base_model = base_as_classifier(sources, device)
        # the base once per distinct texts (tasks that share one sample share its importances)
        base = once_per_batches(batches, lambda b: importance(base_model, b, skip))
        self.scores = {}
        for spec, ckpt in bar:
            self.scores[spec.task] = (base[spec.task],
                                      importance(expert_classifier(ckpt, device),
                                                 batches[spec.task], skip))
        self.tensor_names = {job.name for job in sources.jobs}

    def table(self, gamma: float, epsilon: float) -> dict[str, dict[str, float]]:
        return {task: scale_densities(base, expert, gamma, epsilon)
                for task, (base, expert) in self.scores.items()}

    def apply(self, recipe: Recipe) -> Recipe:
        """`recipe` with its LEWIS densities (`recipe.guided.lewis`) as per-tensor overrides,
        placed before the recipe's own overrides so that those still win."""
        config = recipe.guided.lewis
        extra = overrides(self.table(config.gamma, config.epsilon), self.tensor_names)
        return dataclasses.replace(recipe, overrides=(*extra, *recipe.overrides))
