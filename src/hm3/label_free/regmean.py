"""`regmean`: RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of
Language Models", arXiv:2212.09849): each linear layer merged in closed form from the experts' input
Gram matrices on unlabelled texts, W* = (sum_i G_i)^-1 sum_i G_i W_i, with G_i's off-diagonal
entries scaled by alpha. Everything else keeps the recipe method's merge (body stage: after the
merge, before distill).

Memory: one expert's Grams are collected at a time and spilled to a temporary safetensors
file; the solve then reads one layer's Grams from every expert at a time.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hm3.engine import Sources
from hm3.label_free.calibration import (
    expert_classifier,
    head_modules,
    layer_input_means,
    linear_layers,
)
from hm3.label_free.registry import Step, StepRun, fraction, option

RIDGE = 1e-6  # relative to the Grams' mean diagonal


@dataclass(frozen=True)
class RegMeanOptions:
    """Options of the `regmean` step."""

    alpha: float = option(1.0, fraction, "scale of the Grams' off-diagonal entries (1 keeps "
                          "them: measured best on the zoo, against 0.9 and 0.5)")


@dataclass
class RegMeanReport:
    """What `regmean` did: its alpha and the number of linear layers it solved."""

    alpha: float
    layers: int

    def summary(self) -> str:
        return f"regmean: {self.layers} linear layers (alpha {self.alpha})"


class RegMean(Step):
    """Every linear layer of the body solved in closed form from the experts' Grams."""

    name = "regmean"
    options = RegMeanOptions
    report = RegMeanReport
    stage = "body"
    search_refusal = ("sets every linear layer in closed form, so the densities and weights a "
                      "search samples would not matter; search without it")
    conflicts = {"coefficients": "RegMean solves the linear layers in closed form, which leaves "
                                 "no task vectors to weigh"}
    reference = "https://arxiv.org/abs/2212.09849"

    def apply(self, run: StepRun, options: RegMeanOptions) -> RegMeanReport:
        layers = apply_regmean(run.model, run.sources, run.calibrated.batches, options.alpha,
                               head_modules(run.sources), run.progress)
        return RegMeanReport(options.alpha, len(layers))


def gram_matrices(model: torch.nn.Module, batches: Sequence[dict],
                  skip: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Per linear layer, the mean over tokens of x x^T of its inputs (float64). Each task's Grams
    are means, so a task with longer texts does not outweigh the others."""
    return layer_input_means(model, batches, lambda x: x.T @ x, skip)


def solve(grams: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
          alpha: float) -> torch.Tensor:
    """RegMean's merged weight (out, in) from each expert's Gram (in, in) and weight (out, in).

    A small ridge pulls the solution toward the experts' plain mean: input directions that no
    calibration text reaches (a Gram of lower rank than its width, as the pooler's with fewer
    texts than dimensions) keep the mean instead of dropping to zero.
    """
    total = torch.zeros_like(grams[0], dtype=torch.float64)
    right = torch.zeros((grams[0].shape[0], weights[0].shape[0]), dtype=torch.float64)
    mean = torch.zeros_like(weights[0], dtype=torch.float64)
    for gram, weight in zip(grams, weights):
        gram = gram.double()
        regular = alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))
        total += regular
        right += regular @ weight.double().T
        mean += weight.double() / len(weights)
    return ridge_toward(total, right, mean, RIDGE).float()


def ridge_toward(gram: torch.Tensor, cross: torch.Tensor, start: torch.Tensor,
                 ridge: float) -> torch.Tensor:
    """The rows W (out, in) minimising the least-squares fit given by `gram` (in, in) and
    `cross` (in, out), plus ridge * s * |W - start|^2 with s the Gram's mean diagonal:
    W^T = (gram + ridge s I)^-1 (cross + ridge s start^T), in float64."""
    scale = ridge * float(torch.diagonal(gram).mean().clamp_min(1e-12))
    system = gram.double() + scale * torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.linalg.solve(system, cross.double() + scale * start.double().T).T


@torch.no_grad()
def apply_regmean(model: torch.nn.Module, sources: Sources, batches: dict[str, list[dict]],
                  alpha: float, skip: Sequence[str], progress: bool = False) -> list[str]:
    """Replace the merged model's linear weights (not the head) by RegMean's; returns the
    layers done. The experts run on the model's device; the solve runs on the CPU."""
    device = next(model.parameters()).device
    layers = linear_layers(model, skip)
    with tempfile.TemporaryDirectory(prefix="hm3-regmean-") as folder:
        files = []
        for spec, ckpt in tqdm(list(zip(sources.recipe.experts, sources.experts)),
                               desc="regmean grams", unit="expert", disable=not progress):
            grams = gram_matrices(expert_classifier(ckpt, device), batches[spec.task], skip)
            files.append(Path(folder) / f"{len(files)}.safetensors")
            save_file({name: grams[name].contiguous() for name in layers}, str(files[-1]))
            del grams
        handles = [safe_open(str(f), framework="pt") for f in files]
        for name, layer in tqdm(layers.items(), desc="regmean solve", unit="layer",
                                disable=not progress):
            grams = [handle.get_tensor(name) for handle in handles]
            weights = [ckpt.tensor(f"{name}.weight") for ckpt in sources.experts]
            layer.weight.copy_(solve(grams, weights, alpha))
    return list(layers)
