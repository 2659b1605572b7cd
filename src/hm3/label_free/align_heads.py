"""`align_heads`: each task's head rows refitted in closed form so that, on that task's
unlabelled texts, the merged model's logits match its expert's.

The merged body changes the features the head reads; with X the merged model's head inputs on a
task's texts (a column of ones appended for the bias), Z its expert's logits on the same texts
and W0 the head rows as merged, the rows become the ridge regression toward W0

    W = argmin |X W^T - Z|^2 + ridge * s * |W - W0|^2,   s = trace(X^T X) / columns,

solved exactly (no gradient steps). With few texts the ridge keeps the rows near the expert's.
With `others: w` > 0 each head is also fitted on the other tasks' calibration texts, at weight w
per text against 1 for its own, the targets its expert's logits on them (every expert runs
over the other tasks' texts once more): a deployment runs every head on all of its traffic,
and fitted on its own task's texts alone a head follows its expert less well on the others.
`ridge: auto` picks it per task from RIDGES by k-fold cross-validation on the task's own
calibration texts: the ridge whose rows, fitted without a fold, best predict the expert's logits
on that fold (no labels; texts with more features than texts need a stronger pull). Heads stage,
before recentre.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from hm3.errors import Hm3Error
from hm3.label_free.calibration import experts_on_other_batches, sample_batches, spread_rows
from hm3.label_free.heads_stage import head_rows
from hm3.label_free.registry import (
    HeadFit,
    Step,
    StepRun,
    non_negative,
    option,
    positive,
    positive_int,
)
from hm3.label_free.regmean import ridge_toward

RIDGES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # what `ridge: auto` chooses from
FOLDS = 5


def ridge_or_auto(value: Any, where: str) -> float | str:
    if value == "auto":
        return value
    if isinstance(value, str):
        raise Hm3Error(f"{where}: expected a positive number or 'auto', got {value!r}")
    return positive(value, where)


@dataclass(frozen=True)
class AlignHeadsOptions:
    """Options of the `align_heads` step."""

    ridge: float | str = option(0.1, ridge_or_auto, "pull toward the rows as merged (0.1 "
                                "measured better than 1.0 on the zoo), or `auto`: per task by "
                                "cross-validation on the calibration texts")
    others: float = option(0.0, non_negative, "weight of each of the other tasks' calibration "
                           "texts in a head's fit, its own texts weighing 1 (0: its own texts "
                           "alone); above 0 every expert also runs over the other tasks' texts")
    other_texts: int = option(64, positive_int, "texts of each other task a head is fitted on "
                              "(at most; spread over the texts' lengths)")


@dataclass
class AlignHeadsReport:
    """What `align_heads` did: the ridge asked for and, per task, the mean squared error and
    argmax agreement of the merged logits with the expert's before and after (with `ridge:
    auto`, also the ridge chosen and each ridge's cross-validated error; with `others`, the
    agreement on the other tasks' texts before and after, and the seconds the experts took
    over those texts, 0 when a search's earlier trial ran them). `extra` (not written): per task,
    the other tasks' texts as fitted (weighted head inputs, weighted targets), for the
    held-out refits."""

    ridge: float | str
    tasks: dict[str, dict]
    others: float = 0.0
    others_seconds: float | None = None  # the experts' pass over the other tasks' texts
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def summary(self) -> str:
        lines = []
        for task, entry in self.tasks.items():
            chosen = f" (ridge {entry['ridge']} by cross-validation)" if "ridge" in entry else ""
            other = (f"; on {entry['other_texts']} texts of the other tasks (fitted on them) "
                     f"{entry['others_agreement_before']:.1%} -> "
                     f"{entry['others_agreement_after']:.1%}"
                     if "others_agreement_after" in entry else "")
            lines.append(f"align_heads {task}: agreement with the expert "
                         f"{entry['agreement_before']:.1%} -> {entry['agreement_after']:.1%}"
                         f"{chosen}{other}")
        return "\n".join(lines)


class AlignHeads(Step):
    """Each task's head rows refitted in closed form toward its expert's logits (heads stage)."""

    name = "align_heads"
    options = AlignHeadsOptions
    report = AlignHeadsReport
    stage = "heads"
    needs = ("expert_logits",)
    per_trial = True

    def apply(self, run: StepRun, options: AlignHeadsOptions) -> AlignHeadsReport:
        started = time.perf_counter()
        others = other_texts(run, options.other_texts) if options.others > 0 else None
        waited = round(time.perf_counter() - started, 1)
        report = align_heads(run.model, run.sources, run.head_inputs,
                             run.calibrated.expert_logits, options.ridge, options.others, others)
        return AlignHeadsReport(**report, others_seconds=waited if others is not None else None)

    def report_dict(self, report: AlignHeadsReport) -> dict[str, Any]:
        entry = {f.name: getattr(report, f.name) for f in fields(report) if f.name != "extra"}
        return {**entry, "summary": report.summary()}

    def refit_fold(self, options: AlignHeadsOptions, report: AlignHeadsReport, group,
                   inputs: torch.Tensor, targets: torch.Tensor, train: torch.Tensor,
                   fit: HeadFit) -> None:
        ridge = report.tasks[group.name].get("ridge", report.ridge)  # `auto`: the one chosen
        fit.rows = fit_rows(inputs[train], targets[train], fit.rows, ridge,
                            report.extra.get(group.name))


def other_texts(run: StepRun, limit: int) -> dict[str, dict[str, tuple[list[int], torch.Tensor]]]:
    """Per expert's task, per other task (the first of each other list of batches): the rows of
    that task's head inputs sampled (at most `limit`, `spread_rows`) and the expert's logits on
    them. The experts run once per limit; the calibration keeps their logits for a search's
    later trials."""
    calibrated = run.calibrated
    kept = calibrated.other_logits = calibrated.other_logits or {}
    if limit not in kept:
        spec = run.sources.recipe.label_free.calibration
        rows = {task: spread_rows(len(run.head_inputs[task]), limit)
                for task in calibrated.batches}
        logits = experts_on_other_batches(
            run.sources, calibrated.batches, run.progress, calibrated.device,
            "align_heads: experts on the other tasks' texts",
            sample=lambda task: sample_batches(calibrated, task, rows[task], spec))
        kept[limit] = {expert: {task: (rows[task], z) for task, z in by_task.items()}
                       for expert, by_task in logits.items()}
    return kept[limit]


def fit_rows(features: torch.Tensor, targets: torch.Tensor, start: torch.Tensor,
             ridge: float, extra: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> torch.Tensor:
    """The ridge solution (rows x columns) for features (n, columns), targets (n, rows) and the
    rows it shrinks toward `start` (rows, columns); `extra`, more (features, targets) rows
    fitted beside them (already weighted)."""
    if extra is not None:
        features, targets = torch.cat([features, extra[0]]), torch.cat([targets, extra[1]])
    x = features.double()
    return ridge_toward(x.T @ x, x.T @ targets.double(), start, ridge)


@torch.no_grad()
def choose_ridge(features: torch.Tensor, targets: torch.Tensor, start: torch.Tensor,
                 ridges=RIDGES, folds: int = FOLDS,
                 extra: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[float, dict[float, float]]:
    """The ridge (of `ridges`) with the lowest k-fold cross-validated mean squared error of the
    refitted logits against `targets`, and each ridge's error. Fold j holds every k-th text from
    the j-th, so each fold spans the texts' order (calibration batches come sorted by length).
    Among equal errors the stronger ridge wins (closer to the rows as merged). `extra` (as
    `fit_rows`) is fitted in every fold and held out of none."""
    x, z = features.double(), targets.double()
    n = len(x)
    folds = max(2, min(folds, n))
    errors = {}
    for ridge in ridges:
        total = 0.0
        for j in range(folds):
            held = torch.zeros(n, dtype=torch.bool)
            held[j::folds] = True
            rows = fit_rows(x[~held], z[~held], start, ridge, extra)
            total += float((x[held] @ rows.T - z[held]).pow(2).sum())
        errors[ridge] = total / z.numel()
    best = min(errors.values())
    return max(r for r, e in errors.items() if e <= best * (1 + 1e-9)), errors


@torch.no_grad()
def align_heads(model: torch.nn.Module, sources, inputs: dict[str, torch.Tensor],
                expert_logits: dict[str, torch.Tensor], ridge: float | str,
                others: float = 0.0,
                other_logits: dict[str, dict[str, tuple[list[int], torch.Tensor]]] | None = None
                ) -> dict:
    """Refit every task's head rows (weight and bias) on its texts' head inputs; returns, per
    task, how well the merged logits match the expert's before and after (mean squared error,
    argmax agreement). With `others` > 0, each head is also fitted on the other tasks' texts:
    `other_logits` (`other_texts`) holds, per other task, the rows of its head inputs and the
    expert's logits on them."""
    state = model.state_dict()
    weight = state[sources.heads[0].weight]
    bias = state[sources.heads[0].bias] if sources.heads[0].bias else None
    report, extras = {}, {}
    for group in sources.groups:
        x, target = inputs[group.name], expert_logits[group.name].double()
        start = head_rows(model, sources, group)
        extra = None
        if others > 0 and other_logits and other_logits[group.name]:
            sampled = other_logits[group.name]
            other_x = torch.cat([inputs[task][rows] for task, (rows, _) in sampled.items()])
            other_z = torch.cat([z for _, z in sampled.values()]).double()
            extra = extras[group.name] = (other_x * others ** 0.5, other_z * others ** 0.5)
        before = x @ start.T
        chosen, errors = (choose_ridge(x, target, start, extra=extra) if ridge == "auto"
                          else (ridge, None))
        fitted = fit_rows(x, target, start, chosen, extra)
        after = x @ fitted.T
        rows = slice(group.offset, group.stop)
        weight[rows] = fitted[:, :weight.shape[1]].to(weight)
        if bias is not None:
            bias[rows] = fitted[:, -1].to(bias)
        entry = report[group.name] = {
            "mse_before": round(float((before - target).pow(2).mean()), 5),
            "mse_after": round(float((after - target).pow(2).mean()), 5),
            "agreement_before": round(_agreement(before, target, group), 4),
            "agreement_after": round(_agreement(after, target, group), 4)}
        if extra is not None:
            entry["other_texts"] = len(other_x)
            entry["others_agreement_before"] = round(_agreement(other_x @ start.T, other_z,
                                                                group), 4)
            entry["others_agreement_after"] = round(_agreement(other_x @ fitted.T, other_z,
                                                               group), 4)
        if errors is not None:
            entry["ridge"] = chosen
            entry["cv_mse"] = {str(r): round(e, 5) for r, e in errors.items()}
    return {"ridge": ridge, "tasks": report, "others": others, "extra": extras}


def _agreement(logits: torch.Tensor, target: torch.Tensor, group) -> float:
    """Share of texts given the expert's label (each label's on/off decision at the group's
    threshold if multi-label)."""
    if group.multi_label:
        cut = group.logit_threshold
        return float(((logits > cut) == (target > cut)).double().mean())
    return float((logits.argmax(1) == target.argmax(1)).double().mean())
