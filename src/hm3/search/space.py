"""What a search samples and how: the search space, a trial's recipe, the samplers (the paper's
Beta sampler and Optuna's) and the search settings."""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution

from hm3.errors import Hm3Error
from hm3.label_free.lewis import LewisOptions
from hm3.methods import get_method
from hm3.recipe import Recipe

SAMPLERS = ("beta", "tpe", "cmaes", "random")


def is_density(param_name: str) -> bool:
    """Whether a search parameter is a task-vector density (`density` or `density/TASK`)."""
    return param_name == "density" or param_name.startswith("density/")


@dataclass(frozen=True)
class SearchSpace:
    """What each trial samples. Parameter names: `method`; `density`, or `density/TASK` per
    expert; `weight/TASK`; `lambda`. Density and lambda are sampled only for methods that
    take them.

    - `methods`: merge methods to choose from (the paper: dare_ties alone).
    - `density_range`: densities are sampled in [low, high], 0 < low <= high <= 1.
    - `per_expert_density`: one density per expert instead of one for all.
    - `weight_range`: when set, one weight per expert is sampled in this range.
    - `lambda_range`: when set, the task-vector scale lambda is sampled in this range.
    - `lewis_range`: when set, LEWIS's gamma and epsilon are sampled in this range (two draws, the
    smaller is gamma); the recipe needs a `calibration` block.
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
    label_free = recipe.label_free
    if "lewis_a" in params:
        low, high = sorted((params["lewis_a"], params["lewis_b"]))
        label_free = label_free.with_step("lewis", LewisOptions(gamma=low, epsilon=high))
    return dataclasses.replace(recipe, method=method.name, parameters=shared,
                               experts=tuple(experts), seed=seed, label_free=label_free)


def trial_density(params: dict[str, Any]) -> float | None:
    """The density a trial is plotted at: its density, or the mean of its per-expert ones."""
    values = [v for k, v in params.items() if is_density(k)]
    return float(np.mean(values)) if values else None


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


@dataclass(frozen=True)
class SearchConfig:
    """How to search.

    - `trials`: finished (complete or pruned) trials the study should hold in total, over every
    run and worker; a rerun runs only the missing ones.
    - `space`: what each trial samples (`SearchSpace`).
    - `sampler`: "beta" (the paper's), "tpe", "cmaes" or "random".
    - `alpha`, `beta`: the Beta prior of the densities (beta sampler, and CMA-ES's fallback).
    - `seed`: the sampler's seed.
    - `vary_merge_seed`: merge trial k with seed recipe.seed + k, so that every trial draws its own
    DARE masks (the paper's setting); False keeps the recipe's seed for every trial (then masks
    at two densities are nested and the scatter shows the density alone).
    - `prune_fraction`: score this share of each validation set first and prune the trial when its
    score there is not in the top `prune_keep` percent of finished trials'.
    - `prune_startup`: finished trials before pruning starts.
    - `batch_size`, `max_length`, `device`: inference settings (`max_length`: the tokenizer's
    default).
    - `storage`: an Optuna RDB URL (default sqlite:///OUTPUT/study.db).
    - `study_name`: default: derived from the recipe, data and search settings, so the same command
    resumes the same study.
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
