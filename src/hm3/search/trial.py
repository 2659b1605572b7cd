"""A search trial: its recipe merged in memory by the pipeline, then scored on every task's
validation split (a pruning subset first), and on the test split only when it sets a new best."""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from hm3.data.tables import Dataset
from hm3.engine import Sources, with_recipe
from hm3.errors import Hm3Error
from hm3.evaluate import evaluate, label_indices, score_task
from hm3.heads import TaskGroup
from hm3.model import MultiTaskClassifier, group_probabilities, load
from hm3.pipeline import Calibrated, merge_in_memory
from hm3.recipe import Recipe
from hm3.search.space import SearchConfig, trial_recipe

WORKER = f"{socket.gethostname()}:{os.getpid()}"
TRIAL_RECORD = "hm3"  # the user attribute holding a trial's seed, worker, scores and timings


@dataclass
class _EncodedTask:
    """One task's split as the scorer keeps it."""

    group: TaskGroup
    labels: list      # in the order the batches give logits: the pruning subset first
    batches: list     # tokenised once, padded per batch
    subset_batches: int


class SplitScorer:
    """One split of every task, tokenised once; scores the current weights of a model.

    With `subset_fraction`, a seeded random share of each task's examples comes first, so that
    a trial can be judged (and pruned) on it before the rest is run.
    """

    def __init__(self, classifier: MultiTaskClassifier, datasets: Sequence[Dataset],
                 batch_size: int = 64, subset_fraction: float | None = None, seed: int = 0):
        if batch_size < 1:
            raise Hm3Error(f"batch_size must be at least 1, got {batch_size}")
        self.classifier = classifier
        self.tasks: dict[str, _EncodedTask] = {}
        for data in datasets:
            group = classifier.group(data.task)
            n = len(data.texts)
            order = np.random.default_rng(seed).permutation(n) if subset_fraction else range(n)
            order = list(order)
            k = min(n, max(1, math.ceil(subset_fraction * n))) if subset_fraction else 0
            parts = [sorted(order[:k], key=lambda i: len(data.texts[i])),
                     sorted(order[k:], key=lambda i: len(data.texts[i]))]
            batches = [self._encode(data.texts, part, batch_size) for part in parts]
            label_indices(group, data.labels, data.source)  # a label typo fails before trial 0
            self.tasks[data.task] = _EncodedTask(group, [data.labels[i] for p in parts for i in p],
                                                 batches[0] + batches[1], len(batches[0]))

    def _encode(self, texts: list[str], index: list[int], batch_size: int) -> list:
        return [self.classifier.encode([texts[i] for i in index[start:start + batch_size]])
                for start in range(0, len(index), batch_size)]

    @torch.inference_mode()
    def logits(self, task: str, subset: bool | None = None) -> np.ndarray:
        """Logits of the pruning subset (True), the rest (False) or everything (None)."""
        encoded = self.tasks[task]
        cut = encoded.subset_batches
        batches = {True: encoded.batches[:cut], False: encoded.batches[cut:],
                   None: encoded.batches}[subset]
        model, device = self.classifier.model, self.classifier.device
        out = [model(**batch.to(device)).logits.float().cpu().numpy() for batch in batches]
        width = self.classifier.groups[-1].stop
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)

    def scores(self, logits: dict[str, np.ndarray]) -> dict[str, dict]:
        """Per task, n, accuracy and macro-F1 of the logits (which may cover only the subset)."""
        out = {}
        for task, values in logits.items():
            encoded = self.tasks[task]
            probabilities = group_probabilities(values, [encoded.group])[task]
            full = score_task(encoded.group, encoded.labels[:len(values)], probabilities)
            out[task] = {key: full[key] for key in ("n", "accuracy", "macro_f1")}
        return out

    def score_all(self) -> dict[str, dict]:
        return self.scores({task: self.logits(task) for task in self.tasks})


def mean_f1(scores: dict[str, dict]) -> float:
    """The objective: mean macro-F1 over tasks."""
    return float(np.mean([s["macro_f1"] for s in scores.values()]))


def expert_scores(recipe: Recipe, validation: Sequence[Dataset], test: Sequence[Dataset] | None,
                  batch_size: int, max_length: int | None, device: str) -> dict[str, dict]:
    """Each expert's macro-F1 on its own task's validation (and test) data."""
    test_by_task = {d.task: d for d in test or []}
    out = {}
    for data in validation:
        spec = next(e for e in recipe.experts if e.task == data.task)
        model = load(spec.model, task=data.task, device=device, revision=spec.revision,
                     max_length=max_length)
        row = {"model": spec.model}
        for split, dataset in (("validation", data), ("test", test_by_task.get(data.task))):
            if dataset is not None:
                report = evaluate(model, [dataset], batch_size=batch_size)
                row[split] = report["tasks"][data.task]["macro_f1"]
        out[data.task] = row
    return out


@dataclass
class TrialModel:
    """The preloaded model a trial's recipe is merged into, in memory, by the pipeline's steps:
    LEWIS densities from importances measured once, then the method's merge, then the recipe's
    head steps (align_heads, recentre) from expert logits computed once (`calibrated`)."""

    classifier: MultiTaskClassifier
    sources: Sources
    calibrated: Calibrated | None = None

    def merge(self, recipe: Recipe) -> dict[str, float] | None:
        """Merge `recipe` into the model; with head steps, returns each task's argmax agreement
        with its expert on the calibration texts after align_heads (None without it)."""
        _, done = merge_in_memory(self.classifier.model, with_recipe(self.sources, recipe),
                                  self.calibrated)
        aligned = done.reports.get("align_heads")
        if aligned is None:
            return None
        return {task: entry["agreement_after"] for task, entry in aligned.tasks.items()}


@dataclass
class Objective:
    """One trial: sample, merge in memory, score the validation split (the pruning subset
    first), and score the test split only if the trial beats every finished one."""

    recipe: Recipe
    trial_model: TrialModel
    scorer: SplitScorer
    test_scorer: SplitScorer | None
    config: SearchConfig
    study: optuna.Study

    def __call__(self, trial: optuna.Trial) -> float:
        started = time.perf_counter()
        params = self.config.space.suggest(trial, [e.task for e in self.recipe.experts])
        seed = self.recipe.seed + (trial.number if self.config.vary_merge_seed else 0)
        # One user attribute per trial, written once: every write is a database commit.
        record = {"seed": seed, "worker": WORKER}
        agreement = self.trial_model.merge(trial_recipe(self.recipe, params, seed))
        if agreement is not None:
            record["agreement"] = agreement
        record["merge_seconds"] = round(time.perf_counter() - started, 3)
        scorer = self.scorer
        logits = {task: scorer.logits(task, subset=True) for task in scorer.tasks}
        if self.config.prune_fraction:
            trial.report(mean_f1(scorer.scores(logits)), step=0)
            if trial.should_prune():
                record["seconds"] = round(time.perf_counter() - started, 3)
                trial.set_user_attr(TRIAL_RECORD, record)
                raise optuna.TrialPruned()
        logits = {task: np.concatenate([values, scorer.logits(task, subset=False)])
                  for task, values in logits.items()}
        scores = scorer.scores(logits)
        value = mean_f1(scores)
        record["validation"] = {t: s["macro_f1"] for t, s in scores.items()}
        if self.test_scorer is not None and is_new_best(self.study, value):
            tested = self.test_scorer.score_all()
            record["test"] = {t: s["macro_f1"] for t, s in tested.items()}
            record["test_mean"] = mean_f1(tested)
        record["seconds"] = round(time.perf_counter() - started, 3)
        trial.set_user_attr(TRIAL_RECORD, record)
        return value


def best_value(study: optuna.Study) -> float | None:
    values = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return max(values) if values else None


def is_new_best(study: optuna.Study, value: float) -> bool:
    """Whether `value` beats every trial finished so far (ties do not): only such a trial
    touches the test split."""
    best = best_value(study)
    return best is None or value > best
