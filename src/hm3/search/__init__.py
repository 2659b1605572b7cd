"""Model search, the paper's algorithm: sample merge parameters, merge in memory, score every task
on its validation split, and touch the test split only when a trial sets a new best.

`space` (what is sampled and how), `trial` (one trial's merge and scores), `study` (the Optuna
study, its storage and the run), `report` (tables, best model, summary).
"""

from hm3.search.report import SearchResult, format_summary, save_best, trial_rows, write_tables
from hm3.search.space import (
                              SAMPLERS,
                              BetaSampler,
                              SearchConfig,
                              SearchSpace,
                              is_density,
                              make_sampler,
                              trial_density,
                              trial_recipe,
)
from hm3.search.study import run_search, self_merge
from hm3.search.trial import Objective, SplitScorer, TrialModel, expert_scores, mean_f1

__all__ = ["SAMPLERS", "BetaSampler", "Objective", "SearchConfig", "SearchResult", "SearchSpace",
           "SplitScorer", "TrialModel", "expert_scores", "format_summary", "is_density",
           "make_sampler", "mean_f1", "run_search", "save_best", "self_merge", "trial_density",
           "trial_recipe", "trial_rows", "write_tables"]
