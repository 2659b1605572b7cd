"""The study: the paper's algorithm run as an Optuna study in a shared storage (SQLite by
default, any RDB for many workers), resumable, with the best model written at the end."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Sequence

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from hm3.checkpoint import load_tokenizer
from hm3.data.tables import Dataset
from hm3.engine import Sources, build_model, open_sources, with_recipe
from hm3.errors import Hm3Error
from hm3.label_free.steps import get_step
from hm3.model import MultiTaskClassifier, pick_device
from hm3.pipeline import calibrate, check_steps
from hm3.plots import plot_search
from hm3.recipe import Recipe, parse_recipe
from hm3.search.report import (
    BEST_JSON,
    BEST_MODEL,
    PLOT,
    SearchResult,
    default_title,
    save_best,
    trial_rows,
    write_tables,
)
from hm3.search.space import SearchConfig, make_sampler, trial_recipe
from hm3.search.trial import Objective, SplitScorer, TrialModel, best_value, expert_scores

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A dead worker's trial stays RUNNING until a live one sees no heartbeat for GRACE seconds.
HEARTBEAT_SECONDS, GRACE_SECONDS = 10, 60
STUDY_DB = "study.db"


def run_search(recipe: Recipe, validation: Sequence[Dataset], test: Sequence[Dataset] | None,
               output: str | Path, config: SearchConfig = SearchConfig(), progress: bool = True,
               title: str | None = None) -> SearchResult:
    """Search merge parameters for `recipe`'s experts; write the trials table, the plot and the
    best merged model (with its scores) under `output`.

    - `recipe`: base, experts, and what trials keep (overrides, dtype, seed, method-wide params).
    - `validation`: one dataset per expert task: the trials are scored on these.
    - `test`: datasets per task, scored only by a trial that sets a new best validation score.
    - `output`: folder of the study database (by default), tables, plot and best model.
    """
    device = pick_device(config.device)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tasks = [e.task for e in recipe.experts]
    _check_tasks(tasks, validation, "validation")
    if test:
        _check_tasks(tasks, test, "test")

    for name, _ in recipe.label_free.steps:
        if not get_step(name).per_trial:
            raise Hm3Error(f"{name} {get_step(name).search_refusal}")
    sources = open_sources(recipe)
    check_steps(sources)
    # Calibration texts never include a text the trials are scored on.
    held_out = {task: [text for dataset in (*validation, *(test or [])) if dataset.task == task
                       for text in dataset.texts] for task in tasks}
    # the search varies LEWIS's range when asked to, with or without the recipe's `lewis`
    calibrated = (calibrate(sources, held_out, lewis_scores=True if config.space.lewis_range
                            else None, device=device)
                  if recipe.label_free.steps or config.space.lewis_range else None)
    for method in config.space.methods:  # incompatible overrides fail now, not at trial 1
        with_recipe(sources, trial_recipe(recipe, {"method": method}, recipe.seed))
    for checkpoint in (sources.base, *sources.experts):
        checkpoint.preload()
    classifier = _classifier(sources, config.max_length, device)
    trial_model = TrialModel(classifier, sources, calibrated)
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
        best = best_value(study)
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
                                    title=title or default_title(recipe, config))
    best = save_best(study, recipe, output, experts, test_scorer, trial_model, held_out)
    if best is not None:
        files.update(model=output / BEST_MODEL, best=output / BEST_JSON)
    return SearchResult(study.study_name, storage, _count_finished(study), len(mine), seconds,
                        experts, best, files)


def self_merge(expert: str, base: str, validation: Dataset, test: Dataset | None,
               output: str | Path, config: SearchConfig = SearchConfig(),
               progress: bool = True, allow_pickle: bool = False) -> SearchResult:
    """The paper's self-merging: one expert, its task vector alone, under DARE-TIES at sampled
    densities; the plot shows its F1 against density with the expert's own F1 as a line.
    `allow_pickle`: read pickle `.bin` checkpoints (as the recipe key)."""
    recipe = parse_recipe({"base": base, "method": "dare_ties", "allow_pickle": allow_pickle,
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


