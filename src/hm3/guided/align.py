"""Head alignment: each task's head rows refitted in closed form so that, on that task's
unlabelled texts, the merged model's logits match its expert's.

The merged body changes the features the head reads; with X the merged model's head inputs on a
task's texts (a column of ones appended for the bias), Z its expert's logits on the same texts
and W0 the head rows as merged, the rows become the ridge regression toward W0

    W = argmin |X W^T - Z|^2 + ridge * s * |W - W0|^2,   s = trace(X^T X) / columns,

solved exactly (no gradient steps). With few texts the ridge keeps the rows near the expert's.
"""

from __future__ import annotations

import torch

from hm3.guided.calibration import input_hooks, run_batches
from hm3.guided.regmean import ridge_toward


def fit_rows(features: torch.Tensor, targets: torch.Tensor, start: torch.Tensor,
             ridge: float) -> torch.Tensor:
    """The ridge solution (rows x columns) for features (n, columns), targets (n, rows) and the
    rows it shrinks toward `start` (rows, columns)."""
    x = features.double()
    return ridge_toward(x.T @ x, x.T @ targets.double(), start, ridge)


@torch.no_grad()
def align_heads(model: torch.nn.Module, sources, batches: dict[str, list[dict]],
                expert_logits: dict[str, torch.Tensor], ridge: float) -> dict:
    """Refit every task's head rows (weight and bias) on its texts; returns, per task, how well
    the merged logits match the expert's before and after (mean squared error, argmax agreement)."""
    weight_name, bias_name = sources.heads[0].weight, sources.heads[0].bias
    head_name = weight_name.rsplit(".", 1)[0]
    state = model.state_dict()
    weight, bias = state[weight_name], state[bias_name] if bias_name else None
    report = {}
    for group in sources.groups:
        seen: list[torch.Tensor] = []
        with input_hooks({head_name: model.get_submodule(head_name)},
                         lambda _name, x: seen.append(x)) as set_batch:
            before = run_batches(model, batches[group.name], set_batch)[:, group.offset:group.stop]
        x = torch.cat(seen).cpu()
        target = expert_logits[group.name].double()
        rows = slice(group.offset, group.stop)
        if bias is not None:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
            start = torch.cat([weight[rows], bias[rows, None]], dim=1)
        else:
            start = weight[rows]
        fitted = fit_rows(x, target, start, ridge)
        after = x @ fitted.T
        weight[rows] = fitted[:, :weight.shape[1]].to(weight.dtype)
        if bias is not None:
            bias[rows] = fitted[:, -1].to(bias.dtype)
        report[group.name] = {
            "mse_before": round(float((before.double() - target).pow(2).mean()), 5),
            "mse_after": round(float((after - target).pow(2).mean()), 5),
            "agreement_before": round(_agreement(before, target, group.multi_label), 4),
            "agreement_after": round(_agreement(after, target, group.multi_label), 4)}
    return {"ridge": ridge, "tasks": report}


def _agreement(logits: torch.Tensor, target: torch.Tensor, multi_label: bool) -> float:
    """Share of texts given the expert's label (each label's on/off decision if multi-label)."""
    if multi_label:
        return float(((logits > 0) == (target > 0)).double().mean())
    return float((logits.argmax(1) == target.argmax(1)).double().mean())
