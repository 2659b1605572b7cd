"""Label-free bias re-centring: shift each task's head biases so that the merged model's
predicted-label distribution on unlabelled texts matches its expert's (the cure for a task that
collapses to one class after merging).

Single-label task: the shift b solves min_b mean_i tau * logsumexp((z_i + b) / tau) - t.b, a
convex problem whose gradient is (soft label histogram) - t; annealing tau towards 0 makes the
hard (argmax) histogram match t. Multi-label task: each label's bias is set so that the same
fraction of texts clears the threshold as with the expert.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hm3.engine import Sources
from hm3.heads import TaskGroup

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
