"""Model search, the paper's Algorithm: sample merge parameters, merge in memory, score every task
on its validation split, and touch the test split only when a trial sets a new best."""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import socket
import sqlite3
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import optuna
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from tqdm.auto import tqdm

from hm3.checkpoint import load_tokenizer, write_json_atomic, write_text_atomic
from hm3.errors import Hm3Error
from hm3.evaluate import Dataset, evaluate, label_indices, score_task
from hm3.guided.config import Lewis
from hm3.guided.lewis import LewisScores
from hm3.guided.pipeline import (HeadSteps, calibration_batches, check_heads, format_guided,
                                 head_modules)
from hm3.heads import TaskGroup
from hm3.merge import Sources, build_model, merge, merge_into, open_sources, with_recipe
from hm3.methods import get_method
from hm3.model import MultiTaskClassifier, group_probabilities, load
from hm3.plots import plot_search
from hm3.recipe import Recipe, parse_recipe
from hm3.table import format_table

SAMPLERS = ("beta", "tpe", "cmaes", "random")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A dead worker's trial stays RUNNING until a live one sees no heartbeat for GRACE seconds.
HEARTBEAT_SECONDS, GRACE_SECONDS = 10, 60
WORKER = f"{socket.gethostname()}:{os.getpid()}"
BEST_MODEL, BEST_JSON, STUDY_DB = "best-model", "best.json", "study.db"
TRIAL_RECORD = "hm3"  # the user attribute holding a trial's seed, worker, scores and timings
TRIALS_CSV, TRIALS_JSON, PLOT = "trials.csv", "trials.json", "density.png"


# --- the search space ----------------------------------------------------------------------------

def is_density(param_name: str) -> bool:
    """Whether a search parameter is a task-vector density (`density` or `density/TASK`)."""
    return param_name == "density" or param_name.startswith("density/")


@dataclass(frozen=True)
class SearchSpace:
    """What each trial samples. Parameter names: `method`; `density`, or `density/TASK` per
    expert; `weight/TASK`; `lambda`. Density and lambda are sampled only for methods that
    take them.

    Parameters
    ----------
    methods : merge methods to choose from (the paper: dare_ties alone).
    density_range : densities are sampled in [low, high], 0 < low <= high <= 1.
    per_expert_density : one density per expert instead of one for all.
    weight_range : when set, one weight per expert is sampled in this range.
    lambda_range : when set, the task-vector scale lambda is sampled in this range.
    lewis_range : when set, LEWIS's gamma and epsilon are sampled in this range (two draws,
        the smaller is gamma); the recipe needs a `calibration` block.
    """

    methods: tuple[str, ...] = ("dare_ties",)
    density_range: tuple[float, float] = (0.01, 1.0)
    per_expert_density: bool = False
    weight_range: tuple[float, float] | None = None
    lambda_range: tuple[float, float] | None = None
    lewis_range: tuple[float, float] | None = None

    def __post_init__(self):
        if not self.methods:
            raise Hm3Error("search: give at least one merge method to search over")
        for name in self.methods:
            try:
                get_method(name)
            except KeyError as exc:
                raise Hm3Error(f"search methods: {exc.args[0]}") from None
        low, high = self.density_range
        if not 0 < low <= high <= 1:
            raise Hm3Error(f"density range: expected 0 < low <= high <= 1, got {low}, {high}")
        if self.lewis_range is not None and not 0 < self.lewis_range[0] < self.lewis_range[1] <= 1:
            raise Hm3Error(f"lewis range: expected 0 < low < high <= 1, got {self.lewis_range}")
        for name, bounds in (("weight", self.weight_range), ("lambda", self.lambda_range)):
            if bounds is not None and not (all(math.isfinite(b) for b in bounds)
                                           and bounds[0] < bounds[1]):
                raise Hm3Error(f"{name} range: expected finite low < high, got {bounds}")

    def suggest(self, trial: optuna.Trial, tasks: Sequence[str]) -> dict[str, Any]:
        """Sample one trial's parameters; returns `trial.params`."""
        method = get_method(trial.suggest_categorical("method", list(self.methods)))
        per_model = {p.name for p in method.model_parameter_specs()}
        shared = {p.name for p in method.shared_parameter_specs()}
        if "density" in per_model:
            for name in ([f"density/{t}" for t in tasks] if self.per_expert_density
                         else ["density"]):
                trial.suggest_float(name, *self.density_range)
        if self.weight_range is not None:
            for task in tasks:
                trial.suggest_float(f"weight/{task}", *self.weight_range)
        if self.lambda_range is not None and "lambda" in shared:
            trial.suggest_float("lambda", *self.lambda_range)
        if self.lewis_range is not None and "density" in per_model:
            trial.suggest_float("lewis_a", *self.lewis_range)
            trial.suggest_float("lewis_b", *self.lewis_range)
        return dict(trial.params)


DELLA_MARGIN = 1e-3  # how far inside DELLA's valid densities a clamped one lies


def trial_recipe(recipe: Recipe, params: dict[str, Any], seed: int) -> Recipe:
    """The recipe a trial merges: `recipe` with the sampled method, densities, weights and lambda.

    The recipe's method-wide parameters apply to trials of the same method; other methods start
    from their own defaults. Per-expert parameters the trial's method does not take are dropped.
    A density below 1 that DELLA cannot take (density ± epsilon must lie inside (0, 1)) is
    clamped to the nearest one it can: a sampled value never aborts the study.
    """
    method = get_method(params["method"])
    shared = dict(recipe.parameters) if method.name == recipe.method else {}
    if "lambda" in params:
        shared["lambda"] = params["lambda"]
    shared = method.validate_shared(shared, where="search")
    accepted = {p.name for p in method.model_parameter_specs()}
    experts = []
    for expert in recipe.experts:
        own = {k: v for k, v in expert.parameters.items() if k in accepted}
        for name in ("density", "weight"):
            value = params.get(f"{name}/{expert.task}", params.get(name))
            if value is not None and name in accepted:
                own[name] = value
        if "epsilon" in accepted and own.get("density", 1.0) < 1:
            epsilon = own.get("epsilon", method.model_defaults()["epsilon"])
            own["density"] = min(max(own["density"], epsilon + DELLA_MARGIN),
                                 1 - epsilon - DELLA_MARGIN)
        experts.append(dataclasses.replace(expert, parameters=own))
    guided = recipe.guided
    if "lewis_a" in params:
        low, high = sorted((params["lewis_a"], params["lewis_b"]))
        guided = dataclasses.replace(guided, lewis=Lewis(gamma=low, epsilon=high))
    return dataclasses.replace(recipe, method=method.name, parameters=shared,
                               experts=tuple(experts), seed=seed, guided=guided)


def with_lewis(recipe: Recipe, scores: LewisScores | None) -> Recipe:
    """The trial recipe with its LEWIS densities as overrides, when it has a `lewis` block."""
    return scores.apply(recipe) if scores is not None and recipe.guided.lewis else recipe


def trial_density(params: dict[str, Any]) -> float | None:
    """The density a trial is plotted at: its density, or the mean of its per-expert ones."""
    values = [v for k, v in params.items() if is_density(k)]
    return float(np.mean(values)) if values else None


# --- samplers ------------------------------------------------------------------------------------

class BetaSampler(optuna.samplers.BaseSampler):
    """The paper's sampler: every density ~ Beta(alpha, beta), truncated to its range; other
    parameters uniform. alpha > 1 gives zero probability density at 0 and a mode at low density.

    Each value depends only on (seed, trial number, parameter name): a resumed study and several
    workers sharing one study draw exactly what one uninterrupted run would.
    """

    def __init__(self, alpha: float = 1.5, beta: float = 3.0, seed: int = 0):
        if not (math.isfinite(alpha) and alpha > 1):
            raise Hm3Error(f"Beta alpha: expected a number > 1 (so that density 0 has zero "
                           f"probability), got {alpha}")
        if not (math.isfinite(beta) and beta > 0):
            raise Hm3Error(f"Beta beta: expected a positive number, got {beta}")
        self.alpha, self.beta, self.seed = alpha, beta, seed

    def infer_relative_search_space(self, study, trial) -> dict:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict:
        return {}

    def sample_independent(self, study, trial, param_name: str, param_distribution) -> Any:
        rng = np.random.default_rng([self.seed, trial.number, zlib.crc32(param_name.encode())])
        if isinstance(param_distribution, CategoricalDistribution):
            return param_distribution.choices[int(rng.integers(len(param_distribution.choices)))]
        if not isinstance(param_distribution, FloatDistribution) or param_distribution.log:
            raise TypeError(f"BetaSampler samples linear floats and categories, not {param_name}: "
                            f"{param_distribution}")
        low, high = param_distribution.low, param_distribution.high
        if not is_density(param_name):
            return float(rng.uniform(low, high))
        for _ in range(10_000):  # rejection keeps the Beta's shape inside [low, high]
            value = float(rng.beta(self.alpha, self.beta))
            if low <= value <= high:
                return value
        raise Hm3Error(f"Beta({self.alpha}, {self.beta}) almost never falls in the density range "
                       f"[{low}, {high}]; widen the range or change alpha and beta")


def make_sampler(name: str, alpha: float, beta: float, seed: int) -> optuna.samplers.BaseSampler:
    """One of SAMPLERS. CMA-ES falls back to the Beta sampler for categories and for a
    one-dimensional space (one density): give it per-expert densities, weights or lambda."""
    if name == "beta":
        return BetaSampler(alpha, beta, seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "cmaes":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False,
                                                independent_sampler=BetaSampler(alpha, beta, seed))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise Hm3Error(f"sampler: expected one of {', '.join(SAMPLERS)}, got {name!r}")


# --- scoring -------------------------------------------------------------------------------------

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


# --- the study -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchConfig:
    """How to search.

    Parameters
    ----------
    trials : finished (complete or pruned) trials the study should hold in total, over every
        run and worker; a rerun runs only the missing ones.
    space : what each trial samples (`SearchSpace`).
    sampler : "beta" (the paper's), "tpe", "cmaes" or "random".
    alpha, beta : the Beta prior of the densities (beta sampler, and CMA-ES's fallback).
    seed : the sampler's seed.
    vary_merge_seed : merge trial k with seed recipe.seed + k, so that every trial draws its own
        DARE masks (the paper's setting); False keeps the recipe's seed for every trial (then
        masks at two densities are nested and the scatter shows the density alone).
    prune_fraction : score this share of each validation set first and prune the trial when
        its score there is not in the top `prune_keep` percent of finished trials'.
    prune_startup : finished trials before pruning starts.
    batch_size, max_length, device : inference settings (max_length: the tokenizer's default).
    storage : an Optuna RDB URL (default sqlite:///OUTPUT/study.db).
    study_name : default: derived from the recipe, data and search settings, so the same
        command resumes the same study.
    """

    trials: int = 50
    space: SearchSpace = field(default_factory=SearchSpace)
    sampler: str = "beta"
    alpha: float = 1.5
    beta: float = 3.0
    seed: int = 0
    vary_merge_seed: bool = True
    prune_fraction: float | None = None
    prune_keep: float = 50.0
    prune_startup: int = 5
    batch_size: int = 64
    max_length: int | None = None
    device: str | None = None
    storage: str | None = None
    study_name: str | None = None

    def __post_init__(self):
        if self.trials < 1:
            raise Hm3Error(f"trials: expected at least 1, got {self.trials}")
        if self.sampler not in SAMPLERS:
            raise Hm3Error(f"sampler: expected one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.prune_fraction is not None and not 0 < self.prune_fraction < 1:
            raise Hm3Error(f"prune fraction: expected a number in (0, 1), "
                           f"got {self.prune_fraction}")
        if not 0 < self.prune_keep < 100:
            raise Hm3Error(f"prune keep: expected a percentage in (0, 100), got {self.prune_keep}")
        if self.max_length is not None and self.max_length < 2:
            raise Hm3Error(f"max_length must be at least 2 tokens, got {self.max_length}")
        BetaSampler(self.alpha, self.beta)  # checks alpha and beta


@dataclass
class SearchResult:
    """What a search run did and wrote."""

    study_name: str
    storage: str
    finished: int          # finished trials in the study (all runs and workers)
    ran: int               # trials this run finished
    seconds: float         # wall time of this run's trials
    experts: dict[str, dict]
    best: dict | None      # the content of best.json
    files: dict[str, Path]

    @property
    def trials_per_minute(self) -> float | None:
        return 60 * self.ran / self.seconds if self.ran and self.seconds > 0 else None


@dataclass
class TrialModel:
    """The preloaded model a trial's recipe is merged into, in memory: LEWIS densities from
    importances measured once, then the method's merge, then the recipe's head steps
    (align_heads, recentre) from expert logits computed once."""

    classifier: MultiTaskClassifier
    sources: Sources
    lewis: LewisScores | None = None
    heads: HeadSteps | None = None

    def merge(self, recipe: Recipe) -> dict[str, float] | None:
        """Merge `recipe` into the model; with head steps, returns each task's argmax agreement
        with its expert on the calibration texts after align_heads (None without it)."""
        sources = with_recipe(self.sources, with_lewis(recipe, self.lewis))
        merge_into(self.classifier.model, sources)
        if self.heads is None:
            return None
        report = self.heads(self.classifier.model, sources)
        if "align_heads" not in report:
            return None
        return {task: entry["agreement_after"]
                for task, entry in report["align_heads"]["tasks"].items()}


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
        if self.test_scorer is not None and _is_new_best(self.study, value):
            tested = self.test_scorer.score_all()
            record["test"] = {t: s["macro_f1"] for t, s in tested.items()}
            record["test_mean"] = mean_f1(tested)
        record["seconds"] = round(time.perf_counter() - started, 3)
        trial.set_user_attr(TRIAL_RECORD, record)
        return value


def run_search(recipe: Recipe, validation: Sequence[Dataset], test: Sequence[Dataset] | None,
               output: str | Path, config: SearchConfig = SearchConfig(), progress: bool = True,
               title: str | None = None) -> SearchResult:
    """Search merge parameters for `recipe`'s experts; write the trials table, the plot and the
    best merged model (with its scores) under `output`.

    Parameters
    ----------
    recipe : base, experts, and what trials keep (overrides, dtype, seed, method-wide params).
    validation : one dataset per expert task: the trials are scored on these.
    test : datasets per task, scored only by a trial that sets a new best validation score.
    output : folder of the study database (by default), tables, plot and best model.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tasks = [e.task for e in recipe.experts]
    _check_tasks(tasks, validation, "validation")
    if test:
        _check_tasks(tasks, test, "test")
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")

    if recipe.guided.regmean:
        raise Hm3Error("regmean sets every linear layer in closed form, so the densities and "
                       "weights a search samples would not matter; search without it")
    if recipe.guided.coefficients:
        raise Hm3Error("coefficients would be fitted again on every trial (minutes each); "
                       "search without them, then add them to the best recipe (best.json) and "
                       "run `hm3 merge`")
    sources = open_sources(recipe)
    check_heads(sources)
    # Calibration texts never include a text the trials are scored on.
    held_out = {task: [text for dataset in (*validation, *(test or [])) if dataset.task == task
                       for text in dataset.texts] for task in tasks}
    wants_lewis = bool(recipe.guided.lewis or config.space.lewis_range)
    wants_heads = bool(recipe.guided.align_heads or recipe.guided.recentre)
    lewis_scores = heads = None
    if wants_lewis or wants_heads:
        batches = calibration_batches(sources, held_out)[2]
        if wants_lewis:
            lewis_scores = LewisScores(sources, batches, head_modules(sources))
        if wants_heads:
            heads = HeadSteps.prepare(sources, batches)
    for method in config.space.methods:  # incompatible overrides fail now, not at trial 1
        with_recipe(sources, trial_recipe(recipe, {"method": method}, recipe.seed))
    for checkpoint in (sources.base, *sources.experts):
        checkpoint.preload()
    classifier = _classifier(sources, config.max_length, device)
    trial_model = TrialModel(classifier, sources, lewis_scores, heads)
    scorer = SplitScorer(classifier, validation, config.batch_size, config.prune_fraction,
                         config.seed)
    test_scorer = SplitScorer(classifier, test, config.batch_size) if test else None

    study, storage = _open_study(recipe, validation, test, output, config)
    experts = study.user_attrs.get("experts")
    if experts is None:
        experts = expert_scores(recipe, validation, test, config.batch_size, config.max_length,
                                device)
        study.set_user_attr("experts", experts)

    already = _count_finished(study)
    bar = tqdm(total=config.trials, initial=min(already, config.trials), desc="search",
               unit="trial", disable=not progress)

    mine: list[int] = []  # trials this run finished (callbacks see only this process's trials)

    def show_progress(study: optuna.Study, trial) -> None:
        if trial.state in FINISHED:
            mine.append(trial.number)
        bar.n = min(_count_finished(study), config.trials)
        best = _best_value(study)
        if best is not None:
            bar.set_postfix_str(f"best {best:.4f}", refresh=False)
        bar.refresh()

    started = time.perf_counter()
    try:
        if already < config.trials:
            objective = Objective(recipe, trial_model, scorer, test_scorer, config, study)
            study.optimize(objective, n_trials=config.trials - already, catch=(),
                           callbacks=[optuna.study.MaxTrialsCallback(config.trials, FINISHED),
                                      show_progress])
    finally:
        bar.close()
        seconds = time.perf_counter() - started
        files = write_tables(study, output)
        files["plot"] = plot_search(trial_rows(study), experts, output / PLOT,
                                    title=title or _default_title(recipe, config))
    best = save_best(study, recipe, output, experts, test_scorer, trial_model, held_out)
    if best is not None:
        files.update(model=output / BEST_MODEL, best=output / BEST_JSON)
    return SearchResult(study.study_name, storage, _count_finished(study), len(mine), seconds,
                        experts, best, files)


def self_merge(expert: str, base: str, validation: Dataset, test: Dataset | None,
               output: str | Path, config: SearchConfig = SearchConfig(),
               progress: bool = True) -> SearchResult:
    """The paper's self-merging: one expert, its task vector alone, under DARE-TIES at sampled
    densities; the plot shows its F1 against density with the expert's own F1 as a line."""
    recipe = parse_recipe({"base": base, "method": "dare_ties",
                           "experts": [{"model": expert, "task": validation.task}]})
    space = dataclasses.replace(config.space, methods=("dare_ties",), per_expert_density=False,
                                weight_range=None)
    return run_search(recipe, [validation], [test] if test else None, output,
                      dataclasses.replace(config, space=space), progress=progress,
                      title=f"self-merge of {Path(expert).name} (DARE-TIES)")


def _check_tasks(tasks: list[str], datasets: Sequence[Dataset], split: str) -> None:
    given = [d.task for d in datasets]
    missing = [t for t in tasks if t not in given]
    unknown = [t for t in given if t not in tasks]
    if missing or unknown or len(set(given)) != len(given):
        raise Hm3Error(f"search needs one {split} dataset per expert task ({', '.join(tasks)}); "
                       f"got {', '.join(given) or 'none'}")


def _classifier(sources: Sources, max_length: int | None, device: str) -> MultiTaskClassifier:
    tokenizer = load_tokenizer(
        [sources.base.path, sources.experts[0].path],
        missing=f"neither the base {sources.base.reference} nor the first expert has "
                "tokenizer files; a search needs a tokenizer to score trials")
    model = build_model(sources).to(device)
    return MultiTaskClassifier(model, tokenizer, sources.groups, max_length)


def _identity(recipe: Recipe, validation: Sequence[Dataset], test: Sequence[Dataset] | None,
              config: SearchConfig) -> dict:
    """What a study's trials mean: the same identity, the same study. Models are named by their
    folder (or hub id) and data by content, so workers on other machines agree."""
    data = hashlib.sha256()
    for split, datasets in (("validation", validation), ("test", test or [])):
        for d in sorted(datasets, key=lambda d: d.task):
            data.update(json.dumps([split, d.task, d.texts, [str(x) for x in d.labels]]).encode())
    described = recipe.to_dict()
    described["base"] = Path(recipe.base).name
    for expert in described["experts"]:
        expert["model"] = Path(expert["model"]).name
    return json.loads(json.dumps({
        "recipe": described, "data": data.hexdigest()[:16],
        "space": dataclasses.asdict(config.space), "sampler": config.sampler,
        "alpha": config.alpha, "beta": config.beta, "seed": config.seed,
        "vary_merge_seed": config.vary_merge_seed, "max_length": config.max_length}))


def _rdb_storage(url: str, engine: dict, attempts: int = 5) -> optuna.storages.RDBStorage:
    """Open (creating if new) the study storage. Workers started together on a new database race
    to create its schema; the loser sees a lock, "already exists" or a duplicate schema version,
    and simply opens it again once the winner is done."""
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine,
                                                  heartbeat_interval=HEARTBEAT_SECONDS,
                                                  grace_period=GRACE_SECONDS)
        except Exception as exc:
            name, message = type(exc).__name__, str(exc).lower()
            racing = (name == "IntegrityError"
                      or (name == "OperationalError" and "connection" not in message)
                      or (name == "ProgrammingError" and "already exists" in message))
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def _open_study(recipe, validation, test, output: Path,
                config: SearchConfig) -> tuple[optuna.Study, str]:
    identity = _identity(recipe, validation, test, config)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    name = config.study_name or f"hm3-search-{digest}"
    url = config.storage or f"sqlite:///{(output / STUDY_DB).resolve()}"
    file = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
    engine = {"creator": functools.partial(_sqlite_connection, file)} if file not in (
        "", ":memory:") else {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar says it instead
    try:
        storage = _rdb_storage(url, engine)
    except ImportError as exc:  # Optuna's message does not say which package to install
        raise Hm3Error(f"cannot open the study storage {url}: no driver for it ({exc}); for "
                       "PostgreSQL install hm3's `postgres` extra: pip install 'hm3[postgres]'"
                       ) from None
    except Exception as exc:  # SQLAlchemy raises many types: bad URL, no server, bad login
        raise Hm3Error(f"cannot open the study storage {url}: {type(exc).__name__}: {exc}; "
                       "--storage takes an Optuna RDB URL such as sqlite:///study.db or "
                       "postgresql://user@host/db") from None
    pruner = (optuna.pruners.PercentilePruner(config.prune_keep, config.prune_startup)
              if config.prune_fraction else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                sampler=make_sampler(config.sampler, config.alpha, config.beta,
                                                     config.seed),
                                pruner=pruner, load_if_exists=True)
    stored = study.user_attrs.get("search")
    if stored is None:
        study.set_user_attr("search", identity)
    elif stored != identity:
        changed = sorted(k for k in identity if identity[k] != stored.get(k))
        raise Hm3Error(f"study {name} in {url} was created with other settings "
                       f"({', '.join(changed)} differ); pick another --study-name or output")
    return study, url


def _sqlite_connection(file: str) -> sqlite3.Connection:
    """A connection to the study's SQLite file. Write-ahead logging with synchronous=NORMAL
    survives a killed process (not a power cut) and makes a commit far cheaper than SQLite's
    default; the timeout makes a worker wait for another's write lock instead of failing."""
    connection = sqlite3.connect(file, timeout=60, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


def _count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _best_value(study: optuna.Study) -> float | None:
    values = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return max(values) if values else None


def _is_new_best(study: optuna.Study, value: float) -> bool:
    """Whether `value` beats every trial finished so far (ties do not): only such a trial
    touches the test split."""
    best = _best_value(study)
    return best is None or value > best


# --- outputs -------------------------------------------------------------------------------------

def trial_rows(study: optuna.Study) -> list[dict]:
    """One flat row per trial: state, objective, parameters, per-task scores and bookkeeping."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs.get(TRIAL_RECORD, {})
        # Optuna gives a pruned trial its subset score as value; only complete ones have one.
        value = trial.value if trial.state == TrialState.COMPLETE else None
        row = {"number": trial.number, "state": trial.state.name, "value": value,
               "subset_value": trial.intermediate_values.get(0),
               "density": trial_density(trial.params), **trial.params,
               **{f"validation/{t}": v for t, v in attrs.get("validation", {}).items()},
               "new_best": "test" in attrs, "test_mean": attrs.get("test_mean"),
               **{f"test/{t}": v for t, v in attrs.get("test", {}).items()},
               **{f"agreement/{t}": v for t, v in attrs.get("agreement", {}).items()},
               "seed": attrs.get("seed"), "worker": attrs.get("worker"),
               "merge_seconds": attrs.get("merge_seconds"), "seconds": attrs.get("seconds"),
               "started": trial.datetime_start.isoformat() if trial.datetime_start else None}
        rows.append(row)
    return rows


def write_tables(study: optuna.Study, output: Path) -> dict[str, Path]:
    """The trials table as CSV and JSON (atomically)."""
    rows = trial_rows(study)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path, json_path = output / TRIALS_CSV, output / TRIALS_JSON
    write_text_atomic(csv_path, buffer.getvalue())
    write_json_atomic(json_path, rows)
    return {"csv": csv_path, "json": json_path}


def save_best(study: optuna.Study, recipe: Recipe, output: Path, experts: dict,
              test_scorer: SplitScorer | None, trial_model: TrialModel,
              held_out: dict[str, list[str]]) -> dict | None:
    """Write the best trial's merged model (hm3's atomic writer) and best.json with its scores;
    skipped when both already hold the current best trial. `held_out`: the texts kept out of
    the calibration texts during the search, kept out again when the model is written."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        return None
    best = study.best_trial
    record_path = output / BEST_JSON
    if record_path.is_file() and (output / BEST_MODEL).is_dir():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("trial") == best.number and record.get("study") == study.study_name:
            return record
    attrs = best.user_attrs[TRIAL_RECORD]
    best_recipe = trial_recipe(recipe, best.params, attrs["seed"])
    test = attrs.get("test")
    if test is None and test_scorer is not None:
        # Only a tie with an earlier trial leaves the best untested: test it now.
        trial_model.merge(best_recipe)
        test = {t: s["macro_f1"] for t, s in test_scorer.score_all().items()}
    report = merge(best_recipe, output / BEST_MODEL, overwrite=True, progress=False,
                   held_out=held_out)
    record = {
        "study": study.study_name, "trial": best.number, "params": best.params,
        "seed": attrs["seed"], "density": trial_density(best.params),
        "validation_mean": best.value, "validation": attrs.get("validation"),
        "test_mean": float(np.mean(list(test.values()))) if test else None, "test": test,
        "experts": experts, "model": str((output / BEST_MODEL).resolve()),
        "recipe": best_recipe.to_dict(),
        "guided": report.guided,  # the label-free steps of the written model, texts used
    }
    write_json_atomic(record_path, record)
    return record


def _default_title(recipe: Recipe, config: SearchConfig) -> str:
    tasks = " + ".join(e.task for e in recipe.experts)
    methods = ", ".join(config.space.methods)
    return f"{tasks}: {methods}, {config.sampler} sampler"


def format_summary(result: SearchResult) -> str:
    """Experts against the best trial, per task and on average, on validation and test."""
    best = result.best or {}
    rows = []
    for task, expert in result.experts.items():
        rows.append([task, expert.get("validation"), (best.get("validation") or {}).get(task),
                     expert.get("test"), (best.get("test") or {}).get(task)])

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if len(values) == len(rows) else None

    rows.append(["mean", mean(r[1] for r in rows), best.get("validation_mean"),
                 mean(r[3] for r in rows), best.get("test_mean")])
    lines = [format_table(["task", "experts val F1", "best val F1", "experts test F1",
                           "best test F1"], rows)]
    if best:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in best["params"].items())
        lines.append(f"best: trial {best['trial']} ({params}, seed {best['seed']})")
    if best.get("guided"):
        lines.append(format_guided(best["guided"]))
    return "\n".join(lines)
