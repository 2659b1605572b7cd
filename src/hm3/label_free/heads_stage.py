"""The heads stage's shared pieces: what the head's final projection reads on each task's texts
(one forward pass for every heads step), a task's head rows as one matrix, the logits from both,
and the head steps' held-out figures by k-fold cross-fitting.

The merge records each task's agreement with its expert on its calibration texts, but the head
steps were fitted to those very texts: with hundreds of free parameters per task (one row of a
768-wide head per label) the figure comes out several points higher than on other texts. Here
the texts are cut into FOLDS folds (every k-th text, so each fold spans the texts' order); the
head steps (each through its `refit_fold`, in run order: align_heads with the ridge it used,
then recentre) are fitted on the other folds and applied to the held one. The body's label-free
steps (coefficients, RegMean, LEWIS, distill) are not refitted: they saw every text.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from hm3.check import compare_logits
from hm3.label_free.calibration import input_hooks, once_per_batches, run_batches
from hm3.label_free.registry import HeadFit, Step

FOLDS = 5


def head_inputs(model: torch.nn.Module, sources, batches: dict[str, list[dict]]
                ) -> dict[str, torch.Tensor]:
    """What the head's final projection reads on each task's texts (one forward pass per task,
    one for all tasks that share their texts), float64 on the CPU, with a column of ones
    appended when the head has a bias: the head's logits are then `inputs @ [weight | bias].T`,
    so refitting and re-centring need no further pass."""
    head_name = sources.heads[0].weight.rsplit(".", 1)[0]

    def inputs(task_batches: list[dict]) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        with input_hooks({head_name: model.get_submodule(head_name)},
                         lambda _name, x: seen.append(x)) as set_batch:
            run_batches(model, task_batches, set_batch)
        x = torch.cat(seen).cpu()
        if sources.heads[0].bias is not None:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        return x

    return once_per_batches({g.name: batches[g.name] for g in sources.groups}, inputs)


def head_rows(model: torch.nn.Module, sources, group) -> torch.Tensor:
    """A task's head rows as one (rows, columns [+ 1 for the bias]) float64 matrix."""
    state = model.state_dict()
    rows = slice(group.offset, group.stop)
    weight = state[sources.heads[0].weight][rows].double().cpu()
    if sources.heads[0].bias is None:
        return weight
    return torch.cat([weight, state[sources.heads[0].bias][rows, None].double().cpu()], dim=1)


def head_logits(model: torch.nn.Module, sources, inputs: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """Each task's logits (its own rows) from its head inputs and the head as it is now."""
    return {group.name: inputs[group.name] @ head_rows(model, sources, group).T
            for group in sources.groups}


@torch.no_grad()
def cross_fitted_logits(groups, inputs: dict[str, torch.Tensor],
                        expert_logits: dict[str, torch.Tensor], starts: dict[str, torch.Tensor],
                        steps: Sequence[tuple[Step, Any, Any]], folds: int = FOLDS
                        ) -> dict[str, torch.Tensor]:
    """Per task, (n, K_task) logits in which text i's come from head rows fitted without its
    fold. `inputs`: the head's inputs on the task's texts (with the bias column, as
    `head_inputs` gives them); `starts`: the task's rows before the head steps (`head_rows`);
    `steps`: the head steps as they ran, (step, options, report). Tasks with fewer than two
    texts are left out."""
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
            fit = HeadFit(starts[group.name])
            for step, options, report in steps:
                step.refit_fold(options, report, group, x, target, ~held, fit)
            fitted = x @ fit.rows.T
            if fit.shift is not None:
                fitted = fitted + fit.shift
            logits[held] = fitted[held]
        out[group.name] = logits
    return out


def held_out_figures(groups, inputs: dict[str, torch.Tensor],
                     expert_logits: dict[str, torch.Tensor], starts: dict[str, torch.Tensor],
                     steps: Sequence[tuple[Step, Any, Any]], folds: int = FOLDS) -> dict:
    """`compare_logits`'s figures of the head steps cross-fitted over `folds` folds."""
    logits = cross_fitted_logits(groups, inputs, expert_logits, starts, steps, folds)
    scored = [group for group in groups if group.name in logits]
    tasks = compare_logits(scored, {t: expert_logits[t].numpy() for t in logits},
                           {t: z.numpy() for t, z in logits.items()})
    return {"folds": folds,
            "note": f"each calibration text scored by head steps fitted on the other {folds - 1} "
                    f"of {folds} folds; the body's label-free steps saw every text",
            "tasks": {t: {k: e[k] for k in ("n", "agreement", "drift", "mean_abs_dp")}
                      for t, e in tasks.items()}}
