"""Held-out logits for the head steps: each calibration text's logits from head rows fitted
without it (k-fold cross-fitting).

The merge records each task's agreement with its expert on its calibration texts, but the head
steps were fitted to those very texts: with hundreds of free parameters per task (one row of a
768-wide head per label) the figure comes out several points higher than on other texts. Here
the texts are cut into FOLDS folds (every k-th text, so each fold spans the texts' order); the
head steps (align_heads with the ridge it used, then recentre) are fitted on the other folds and
applied to the held one. The body's label-free steps (coefficients, RegMean, LEWIS) are not
refitted: they saw every text.
"""

from __future__ import annotations

import torch

from hm3.guided.align import fit_rows
from hm3.guided.recentre import recentre

FOLDS = 5


@torch.no_grad()
def cross_fitted_logits(groups, inputs: dict[str, torch.Tensor],
                        expert_logits: dict[str, torch.Tensor], starts: dict[str, torch.Tensor],
                        ridges: dict[str, float] | None, recentre_heads: bool,
                        folds: int = FOLDS) -> dict[str, torch.Tensor]:
    """Per task, (n, K_task) logits in which text i's come from head rows fitted without its
    fold. `inputs`: the head's inputs on the task's texts (with the bias column, as
    `align.head_inputs` gives them); `starts`: the task's rows before the head steps
    (`align.head_rows`); `ridges`: the ridge align_heads used per task (None: no align_heads).
    Tasks with fewer than two texts are left out."""
    out = {}
    for group in groups:
        x = inputs[group.name]
        target = expert_logits[group.name].double()
        n = len(x)
        k = min(folds, n)
        if k < 2:
            continue
        logits = torch.empty(target.shape, dtype=torch.float64)
        for fold in range(k):
            held = torch.zeros(n, dtype=torch.bool)
            held[fold::k] = True
            rows = starts[group.name]
            if ridges is not None:
                rows = fit_rows(x[~held], target[~held], rows, ridges[group.name])
            fitted = x @ rows.T
            if recentre_heads:
                shift = recentre(fitted[~held].numpy(), target[~held].numpy(), group)["shift"]
                fitted = fitted + torch.tensor(shift, dtype=torch.float64)
            logits[held] = fitted[held]
        out[group.name] = logits
    return out
