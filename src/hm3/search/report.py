"""What a search writes and prints: the trials table (CSV, JSON), the best model with its
scores (best.json) and the summary against the experts."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from hm3.checkpoint import write_json_atomic, write_text_atomic
from hm3.label_free.registry import CONFIG_KEY, saved_report
from hm3.pipeline import LabelFreeReport, merge
from hm3.recipe import Recipe
from hm3.search.space import SearchConfig, trial_density, trial_recipe
from hm3.search.trial import TRIAL_RECORD, SplitScorer, TrialModel
from hm3.table import format_table

BEST_MODEL, BEST_JSON = "best-model", "best.json"
TRIALS_CSV, TRIALS_JSON, PLOT = "trials.csv", "trials.json", "density.png"


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
        # the label-free steps of the written model, texts used
        CONFIG_KEY: report.label_free.to_dict() if report.label_free else None,
    }
    write_json_atomic(record_path, record)
    return record


def default_title(recipe: Recipe, config: SearchConfig) -> str:
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
    label_free = saved_report(best)  # `guided` in the best.json of earlier versions
    if label_free:
        lines.append(LabelFreeReport.from_dict(label_free).summary())
    return "\n".join(lines)
