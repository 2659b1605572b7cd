"""`lewis`: LEWIS layer-wise densities (Chopra et al. 2025, "LEWIS (LayEr WIse Sparsity) - A
Training Free Guided Model Merging Approach", arXiv:2503.03874): layers whose importance moved most
during fine-tuning keep more of their task vector.

Importance of a linear layer on calibration texts (Wanda-style): || |W| * sqrt(mean x^2) ||_F,
x its input rows. Per expert: |importance_expert - importance_base| for every layer, min-max
scaled into [gamma, epsilon]. The densities reach the merge as per-tensor, per-expert overrides
(the densities stage: before the body is merged).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from hm3.engine import Sources, with_recipe
from hm3.errors import Hm3Error
from hm3.label_free.calibration import (
    base_as_classifier,
    expert_classifier,
    layer_input_means,
    linear_layers,
    once_per_batches,
)
from hm3.label_free.registry import Step, StepRun, fraction, option
from hm3.recipe import Override, Recipe


@dataclass(frozen=True)
class LewisOptions:
    """Options of the `lewis` step: the range the layer densities are scaled into."""

    gamma: float = option(0.3, fraction, "the density of the layer that moved least")
    epsilon: float = option(0.8, fraction, "the density of the layer that moved most")


@dataclass
class LewisReport:
    """What `lewis` did: the range and each task's density per layer."""

    gamma: float
    epsilon: float
    densities: dict[str, dict[str, float]]

    def summary(self) -> str:
        return (f"lewis: layer densities in [{self.gamma}, {self.epsilon}] "
                "(table in config.json, plot lewis_densities.png)")


class Lewis(Step):
    """LEWIS densities as per-tensor overrides of the recipe (densities stage)."""

    name = "lewis"
    options = LewisOptions
    report = LewisReport
    stage = "densities"
    needs = ("lewis_scores",)
    per_trial = True  # the scores are measured once; a search varies [gamma, epsilon]
    reference = "https://arxiv.org/abs/2503.03874"

    def validate(self, options: LewisOptions) -> LewisOptions:
        if not options.gamma <= options.epsilon:
            raise Hm3Error(f"lewis: gamma ({options.gamma}) must not exceed epsilon "
                           f"({options.epsilon}); densities are scaled into [gamma, epsilon]")
        if options.gamma <= 0:
            raise Hm3Error("lewis.gamma: expected a density in (0, 1], got 0; a layer needs to "
                           "keep some of its task vector")
        return options

    def apply(self, run: StepRun, options: LewisOptions) -> LewisReport:
        scores = run.calibrated.lewis
        run.sources = with_recipe(run.sources, scores.apply(run.sources.recipe, options))
        table = scores.table(options.gamma, options.epsilon)
        return LewisReport(options.gamma, options.epsilon,
                           {t: {k: round(v, 4) for k, v in d.items()} for t, d in table.items()})

    def write_files(self, report: LewisReport, folder: Path) -> None:
        from hm3.plots import plot_densities  # lazy: matplotlib is slow to import

        plot_densities(dataclasses.asdict(report), folder / "lewis_densities.png")


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

    def apply(self, recipe: Recipe, options: LewisOptions) -> Recipe:
        """`recipe` with the LEWIS densities for `options` as per-tensor overrides, placed
        before the recipe's own overrides so that those still win."""
        extra = overrides(self.table(options.gamma, options.epsilon), self.tensor_names)
        return dataclasses.replace(recipe, overrides=(*extra, *recipe.overrides))
