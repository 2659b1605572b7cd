"""`recentre`: shift each task's head biases so that the merged model's
predicted-label distribution on unlabelled texts matches its expert's (the cure for a task that
collapses to one class after merging).

Single-label task: the shift b solves min_b mean_i tau * logsumexp((z_i + b) / tau) - t.b, a
convex problem whose gradient is (soft label histogram) - t; annealing tau towards 0 makes the
hard (argmax) histogram match t. Multi-label task: each label's bias is set so that the same
fraction of texts clears the threshold as with the expert. Heads stage, after align_heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hm3.engine import Sources
from hm3.errors import Hm3Error
from hm3.heads import TaskGroup
from hm3.label_free.heads_stage import head_logits
from hm3.label_free.registry import HeadFit, Step, StepRun

TEMPERATURES = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003)


def histogram(logits: np.ndarray) -> np.ndarray:
    """Fraction of texts whose argmax is each class."""
    counts = np.bincount(np.asarray(logits).argmax(1), minlength=np.asarray(logits).shape[1])
    return counts / max(len(logits), 1)


def softmax_shift(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The bias shift (mean 0) that gives `logits` + shift the argmax histogram `target` (as
    nearly as the texts allow: of no shift and each annealing stage's, the closest)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n, k = z.shape
    t = torch.as_tensor(np.asarray(target), dtype=torch.float64).clamp_min(0.5 / n)
    t = t / t.sum()
    # Start from columns of equal mean and anneal relative to the spread within columns: the
    # shift needed can be far larger than that spread (a collapsed task).
    scale = float(z.std(0).mean()) or 1.0
    b = (-z.mean(0)).clone().requires_grad_(True)
    wanted = np.asarray(target, dtype=np.float64)
    best = np.zeros(k)  # no shift, unless a stage below matches the histogram better
    best_gap = np.abs(histogram(z.numpy()) - wanted).max()
    for tau in TEMPERATURES:
        tau = tau * scale
        optimizer = torch.optim.LBFGS([b], lr=1, max_iter=200, tolerance_grad=1e-10,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = tau * torch.logsumexp((z + b) / tau, dim=1).mean() - (t * b).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        shift = b.detach().numpy()
        gap = np.abs(histogram(z.numpy() + shift) - wanted).max()
        if gap < best_gap:
            best, best_gap = shift - shift.mean(), gap
    return best


def sigmoid_shift(logits: np.ndarray, rates: np.ndarray, threshold: float) -> np.ndarray:
    """Per-label shifts so that a fraction `rates[k]` of texts lands above the threshold."""
    z = np.sort(np.asarray(logits, dtype=np.float64), axis=0)[::-1]  # descending per label
    n = len(z)
    cut_logit = math.log(threshold / (1 - threshold))
    shifts = np.zeros(z.shape[1])
    for label in range(z.shape[1]):
        m = int(round(rates[label] * n))
        column = z[:, label]
        if m == 0:
            cut = column[0] + 1e-3
        elif m == n:
            cut = column[-1] - 1e-3
        else:
            cut = (column[m - 1] + column[m]) / 2
        shifts[label] = cut_logit - cut
    return shifts


def group_targets(expert_logits: np.ndarray, group: TaskGroup) -> np.ndarray:
    """The expert's predicted-label distribution on its texts (its own logits, one group)."""
    if group.multi_label:
        return (expert_logits > group.logit_threshold).mean(0)
    return histogram(expert_logits)


def recentre(merged_logits: np.ndarray, expert_logits: np.ndarray, group: TaskGroup) -> dict:
    """The bias shift for one group, with the histograms before and after and the target.
    Both logits are the group's own columns."""
    z = merged_logits
    target = group_targets(expert_logits, group)
    if group.multi_label:
        shift = sigmoid_shift(z, target, group.threshold)
        cut = group.logit_threshold
        before, after = (z > cut).mean(0), (z + shift > cut).mean(0)
    else:
        shift = softmax_shift(z, target)
        before, after = histogram(z), histogram(z + shift)
    return {"shift": [float(v) for v in shift],
            "target": [round(float(v), 4) for v in target],
            "before": [round(float(v), 4) for v in before],
            "after": [round(float(v), 4) for v in after]}


@torch.no_grad()
def recentre_heads(model: torch.nn.Module, sources: Sources, merged_logits: dict[str, torch.Tensor],
                   expert_logits: dict[str, torch.Tensor]) -> dict:
    """Shift every task's head biases in `model` (see `recentre`), from the merged model's and
    the experts' logits on each task's texts; returns what each task got."""
    bias = model.state_dict()[sources.heads[0].bias]
    out = {}
    for group in sources.groups:
        result = recentre(merged_logits[group.name].numpy(), expert_logits[group.name].numpy(),
                          group)
        bias[group.offset:group.stop] += torch.tensor(result["shift"]).to(bias)
        out[group.name] = result
    return out


@dataclass(frozen=True)
class RecentreOptions:
    """`recentre` has no options: the recipe says `recentre: true`."""


@dataclass
class RecentreReport:
    """What `recentre` did: per task, the bias shift and the predicted-label distribution
    before, after and of the expert (`target`)."""

    tasks: dict[str, dict]

    def summary(self) -> str:
        lines = []
        for task, entry in self.tasks.items():
            gap = max(abs(b - t) for b, t in zip(entry["before"], entry["target"]))
            done = max(abs(a - t) for a, t in zip(entry["after"], entry["target"]))
            lines.append(f"recentre {task}: largest label-share gap to the expert "
                         f"{gap:.1%} -> {done:.1%}")
        return "\n".join(lines)


class Recentre(Step):
    """Each task's head biases shifted to its expert's label distribution (heads stage)."""

    name = "recentre"
    options = RecentreOptions
    report = RecentreReport
    stage = "heads"
    needs = ("expert_logits",)
    per_trial = True

    def parse(self, raw: Any) -> RecentreOptions:
        if raw is not True:
            raise Hm3Error(f"recentre: expected true or false, got {raw!r}")
        return RecentreOptions()

    @staticmethod
    def to_dict(options: RecentreOptions) -> bool:
        return True

    def check(self, sources: Sources, options: RecentreOptions) -> None:
        if sources.heads[0].bias is None:
            raise Hm3Error(f"recentre shifts the head's biases, and {sources.heads[0].weight} "
                           "has none; drop `recentre` from the recipe (align_heads works without)")

    def apply(self, run: StepRun, options: RecentreOptions) -> RecentreReport:
        merged = head_logits(run.model, run.sources, run.head_inputs)
        return RecentreReport(recentre_heads(run.model, run.sources, merged,
                                             run.calibrated.expert_logits))

    def read_report(self, entry: dict) -> RecentreReport:
        # models merged before the report had `tasks` hold the tasks at the top
        return RecentreReport(entry["tasks"] if "tasks" in entry else entry)

    def refit_fold(self, options: RecentreOptions, report: RecentreReport, group,
                   inputs: torch.Tensor, targets: torch.Tensor, train: torch.Tensor,
                   fit: HeadFit) -> None:
        fitted = inputs @ fit.rows.T
        if fit.shift is not None:
            fitted = fitted + fit.shift
        shift = torch.tensor(recentre(fitted[train].numpy(), targets[train].numpy(),
                                      group)["shift"], dtype=torch.float64)
        fit.shift = shift if fit.shift is None else fit.shift + shift
