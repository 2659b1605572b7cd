"""Model search on tiny families: the Beta sampler, test-on-new-best, resume after kill -9, two
workers on one storage, outputs (tables, plot, best model) and self-merging."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import yaml

import hm3
from hm3.cli import main
from hm3.data import load_data_block, parse_data_block
from hm3.errors import Hm3Error
from hm3.evaluate import evaluate
from hm3.recipe import parse_recipe
from hm3.search import (
    BetaSampler,
    SearchConfig,
    SearchSpace,
    format_summary,
    run_search,
    self_merge,
    trial_recipe,
)

from conftest import WORDS, build_family, spread_head

TASKS = {"sentiment": ["negative", "positive"], "topic": ["news", "sport", "film"]}
SRC = str(Path(__file__).resolve().parents[1] / "src")


def write_split(path: Path, labels: list[str], n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(n):
            handle.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=6)),
                                     "label": rng.choice(labels)}) + "\n")
    return path


@pytest.fixture
def case(tmp_path):
    """A tiny family with validation and test data per task, and a recipe naming them."""
    base, experts = build_family(tmp_path / "models", TASKS)
    data = {}
    for i, (task, labels) in enumerate(TASKS.items()):
        data[task] = {"path": str(write_split(tmp_path / f"{task}-test.jsonl", labels, 30, i)),
                      "validation": str(write_split(tmp_path / f"{task}-val.jsonl", labels, 30,
                                                    10 + i))}
    raw = {"base": str(base), "method": "ties",
           "experts": [{"model": str(path), "task": task} for task, path in experts.items()],
           "data": data}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    return SimpleNamespace(root=tmp_path, base=base, experts=experts, raw=raw,
                           recipe_path=recipe_path, out=tmp_path / "out")


def datasets(case):
    tasks = list(TASKS)
    return (load_data_block(case.raw["data"], tasks=tasks, part="validation"),
            load_data_block(case.raw["data"], tasks=tasks, part="test"))


def storage_url(case) -> str:
    return f"sqlite:///{case.out / 'study.db'}"


def finished_trials(case_or_url) -> list:
    """The finished trials of the one study in a case's storage (or the storage URL given)."""
    url = case_or_url if isinstance(case_or_url, str) else storage_url(case_or_url)
    (name,) = optuna.get_all_study_names(url)
    study = optuna.load_study(study_name=name, storage=url)
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                    optuna.trial.TrialState.PRUNED))


# --- the sampler ---------------------------------------------------------------------------------

def beta_densities(seed: int, trials: int = 300) -> list[float]:
    study = optuna.create_study(sampler=BetaSampler(1.5, 3.0, seed), direction="maximize")
    study.optimize(lambda t: t.suggest_float("density", 0.01, 1.0), n_trials=trials)
    return [t.params["density"] for t in study.trials]


def test_beta_sampler_support_shape_and_seed_determinism():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    densities = beta_densities(seed=7)
    assert all(0.01 <= d <= 1.0 for d in densities)
    assert np.mean(densities) == pytest.approx(1.5 / 4.5, abs=0.04)  # Beta(1.5, 3) mean 1/3
    assert np.mean(np.array(densities) < 0.5) > 0.6  # skewed toward low density
    assert beta_densities(seed=7) == densities
    assert beta_densities(seed=8) != densities
    # A value depends on (seed, trial number, name) only: resumed or parallel runs agree.
    again = BetaSampler(1.5, 3.0, 7).sample_independent(
        None, SimpleNamespace(number=42), "density",
        optuna.distributions.FloatDistribution(0.01, 1.0))
    assert again == densities[42]


def test_beta_sampler_needs_zero_probability_at_zero():
    with pytest.raises(Hm3Error, match="alpha"):
        BetaSampler(alpha=1.0, beta=3.0)
    with pytest.raises(Hm3Error, match="beta"):
        BetaSampler(alpha=2.0, beta=0.0)


# --- recipes of trials ---------------------------------------------------------------------------

def test_trial_recipe_sets_sampled_parameters(case):
    recipe = parse_recipe({**case.raw, "parameters": {"lambda": 0.8, "density": 0.5}})
    ties = trial_recipe(recipe, {"method": "ties", "density/sentiment": 0.2,
                                 "density/topic": 0.7, "weight/topic": 1.5}, seed=3)
    assert ties.parameters["lambda"] == 0.8 and ties.seed == 3
    assert [e.parameters for e in ties.experts] == [{"density": 0.2}, {"density": 0.7,
                                                                        "weight": 1.5}]
    dare = trial_recipe(recipe, {"method": "dare_ties", "density": 0.1, "lambda": 1.2}, seed=0)
    assert dare.method == "dare_ties" and dare.parameters["lambda"] == 1.2
    assert dare.parameters["normalize"] is False  # dare_ties' default, not the ties recipe's
    linear = trial_recipe(recipe, {"method": "linear"}, seed=0)
    assert all("density" not in e.parameters for e in linear.experts)


def test_data_block_validation_part():
    data = {"a": {"path": "test.jsonl", "validation": "val.jsonl", "text_column": "t"},
            "b": {"path": "org/set", "subset": "x", "split": "test",
                  "validation": {"split": "validation"}}}
    specs = parse_data_block(data, part="validation")
    assert specs["a"]["spec"] == "val.jsonl" and specs["a"]["text_column"] == "t"
    assert specs["b"] == {"spec": "org/set", "task": "b", "subset": "x", "split": "validation",
                          "expect": {}}
    assert parse_data_block(data)["a"]["spec"] == "test.jsonl"
    with pytest.raises(Hm3Error, match="no `validation`"):
        parse_data_block({"a": "test.jsonl"}, part="validation")
    with pytest.raises(Hm3Error, match="validation: unknown field"):
        parse_data_block({"a": {"path": "t.jsonl", "validation": {"expect": {}}}})


# --- a search ------------------------------------------------------------------------------------

def test_search_scores_test_only_on_new_best_and_writes_outputs(case):
    validation, test = datasets(case)
    recipe = parse_recipe(case.raw)
    result = run_search(recipe, validation, test, case.out, SearchConfig(trials=8),
                        progress=False)
    assert result.finished == result.ran == 8
    rows = json.loads((case.out / "trials.json").read_text())
    assert [r["number"] for r in rows] == list(range(8))
    best_so_far = None
    for row in rows:
        new_best = best_so_far is None or row["value"] > best_so_far
        assert row["new_best"] is new_best
        assert (row["test_mean"] is not None) is new_best
        best_so_far = row["value"] if best_so_far is None else max(best_so_far, row["value"])
        assert 0 < row["density"] <= 1 and row["method"] == "dare_ties"
    assert (case.out / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((case.out / "trials.csv").read_text().splitlines()) == 9

    best = json.loads((case.out / "best.json").read_text())
    assert best["validation_mean"] == pytest.approx(best_so_far)
    assert best["test"] and set(best["experts"]) == set(TASKS)
    # The saved model (hm3's writer) is the in-memory trial's model: same validation score.
    model = hm3.load(case.out / "best-model", device="cpu")
    assert model.tasks == list(TASKS)
    report = evaluate(model, validation)
    assert report["mean_macro_f1"] == pytest.approx(best["validation_mean"], abs=1e-9)

    # Rerunning with the same settings resumes: nothing is left to run.
    again = run_search(recipe, validation, test, case.out, SearchConfig(trials=8),
                       progress=False)
    assert again.ran == 0 and again.finished == 8 and again.best["trial"] == best["trial"]


def test_other_samplers_methods_and_pruning(case):
    validation, test = datasets(case)
    recipe = parse_recipe(case.raw)
    space = SearchSpace(methods=("dare_ties", "ties", "linear"), per_expert_density=True,
                        weight_range=(0.5, 1.5), lambda_range=(0.5, 1.5))
    for sampler in ("tpe", "cmaes"):
        result = run_search(recipe, validation, test, case.out / sampler,
                            SearchConfig(trials=4, space=space, sampler=sampler,
                                         prune_fraction=0.5, prune_startup=1), progress=False)
        assert result.finished == 4
        rows = json.loads((case.out / sampler / "trials.json").read_text())
        for row in rows:
            assert row["subset_value"] is not None  # pruning scored the subset first
            assert (row["value"] is None) == (row["state"] == "PRUNED")
            if row["method"] != "linear":
                assert row["density/sentiment"] and row["density/topic"]


def test_settings_that_change_trials_open_another_study(case):
    validation, test = datasets(case)
    recipe = parse_recipe(case.raw)
    run_search(recipe, validation, test, case.out, SearchConfig(trials=2), progress=False)
    other = run_search(recipe, validation, test, case.out, SearchConfig(trials=2, alpha=2.0),
                       progress=False)
    assert other.ran == 2
    names = optuna.get_all_study_names(storage_url(case))
    assert len(names) == 2
    with pytest.raises(Hm3Error, match="other settings"):
        run_search(recipe, validation, test, case.out,
                   SearchConfig(trials=2, alpha=3.0, study_name=names[0]), progress=False)


# --- crash safety and workers --------------------------------------------------------------------

def search_command(case, trials: int) -> list[str]:
    return [sys.executable, "-m", "hm3.cli", "search", str(case.recipe_path), "-o", str(case.out),
            "--trials", str(trials), "--no-progress"]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def count_finished_read_only(database: Path) -> int:
    """Finished trials in a study database the worker may still be creating, read without
    writing: opening it through Optuna would create the schema too and race the worker's own
    creation (UNIQUE constraint failed: alembic_version)."""
    if not database.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True,
                                     timeout=0.1)) as connection:
            (count,) = connection.execute("SELECT count(*) FROM trials WHERE state IN "
                                          "('COMPLETE', 'PRUNED')").fetchone()
            return count
    except sqlite3.Error:  # no tables yet, or locked by a writer: look again later
        return 0


def test_resume_after_kill_loses_no_finished_trial(case):
    worker = subprocess.Popen(search_command(case, 10_000), env=environment(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600  # a guard against a hang, not a speed target
        while count_finished_read_only(case.out / "study.db") < 3:
            assert worker.poll() is None, worker.stderr.read().decode()
            assert time.monotonic() < deadline, "the search finished no trial in time"
            time.sleep(0.5)
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    before = {t.number: (t.params, t.value) for t in finished_trials(case)}
    assert main(search_command(case, len(before) + 2)[3:]) == 0
    after = finished_trials(case)
    assert len(after) == len(before) + 2
    assert {t.number: (t.params, t.value) for t in after if t.number in before} == before
    assert len({t.number for t in after}) == len(after)


WORKER_SCRIPT = """
import sys, time
from pathlib import Path
import hm3.pipeline
from hm3.cli import main

# A barrier inside the first trial: each worker, once it holds a trial, waits until the other holds
# one too. Without it a worker that loads faster can finish all the trials of a tiny study alone.
folder, me = Path(sys.argv[1]), sys.argv[2]
merge_into = hm3.pipeline.merge_into
def first_trial_waits(*args, **kwargs):
    started = folder / f"started-{me}"
    if not started.exists():
        started.touch()
        deadline = time.monotonic() + 120
        while len(list(folder.glob("started-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    return merge_into(*args, **kwargs)
hm3.pipeline.merge_into = first_trial_waits
sys.exit(main(sys.argv[3:]))
"""


def two_workers_share(case, storage: str) -> list:
    """Run two search workers for a 10-trial study on `storage` and check that they shared it:
    every trial once, both contributed. Returns the finished trials."""
    script = case.root / "worker.py"
    script.write_text(WORKER_SCRIPT)
    case.out.mkdir()
    # The schema is created once up front, as Optuna advises for parallel workers: the test is
    # about sharing trials, not about which worker wins the race to create tables.
    optuna.storages.RDBStorage(storage)
    workers = [subprocess.Popen([sys.executable, str(script), str(case.root), str(i),
                                 *search_command(case, 10)[3:], "--storage", storage],
                                env=environment(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE) for i in range(2)]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read().decode()
    trials = finished_trials(storage)
    assert 10 <= len(trials) <= 11  # a worker stops once the study holds 10
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.params["density"] for t in trials}) == len(trials)
    assert len({t.user_attrs["hm3"]["worker"] for t in trials}) == 2
    return trials


def test_two_workers_share_one_study_without_duplicates(case):
    two_workers_share(case, storage_url(case))


# --- self-merging and the command line -----------------------------------------------------------

def test_self_merge_cli(case, capsys):
    files = case.raw["data"]["topic"]
    code = main(["self-merge", str(case.experts["topic"]), "--base", str(case.base),
                 "--validation", files["validation"], "--test", files["path"],
                 "-o", str(case.out), "--trials", "4", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "4 finished trials" in printed and "topic" in printed
    assert (case.out / "density.png").is_file() and (case.out / "trials.csv").is_file()
    best = json.loads((case.out / "best.json").read_text())
    assert best["recipe"]["method"] == "dare_ties" and len(best["recipe"]["experts"]) == 1
    assert set(best["experts"]) == {"topic"}


def test_self_merge_function_takes_the_expert_alone(case):
    validation, test = datasets(case)
    result = self_merge(str(case.experts["sentiment"]), str(case.base), validation[0], test[0],
                        case.out, SearchConfig(trials=2), progress=False)
    assert list(result.experts) == ["sentiment"] and result.finished == 2


@pytest.mark.parametrize("extra, message", [
    (["--alpha", "1"], "alpha"),
    (["--methods", "soup"], "unknown merge method"),
    (["--density-range", "0", "1"], "density range"),
    (["--prune", "1.5"], "prune fraction"),
])
def test_search_cli_rejects_bad_options(case, capsys, extra, message):
    assert main(search_command(case, 2)[3:] + extra) == 2
    assert message in capsys.readouterr().err


def test_search_cli_needs_validation_data(case, capsys):
    raw = dict(case.raw, data={t: e["path"] for t, e in case.raw["data"].items()})
    case.recipe_path.write_text(yaml.safe_dump(raw))
    assert main(search_command(case, 2)[3:]) == 2
    assert "no `validation`" in capsys.readouterr().err


def with_calibration(case, **steps) -> dict:
    """The case's recipe with unlabelled calibration texts per task and label-free `steps`."""
    texts = {}
    for i, task in enumerate(TASKS):
        rng = random.Random(100 + i)
        path = case.root / f"{task}-unlabelled.txt"
        path.write_text("\n".join(" ".join(rng.choices(WORDS, k=5)) for _ in range(20)) + "\n")
        texts[task] = str(path)
    return {**case.raw, "calibration": {"texts": texts, "batch_size": 8}, **steps}


def test_search_samples_lewis_gamma_and_epsilon_and_saves_what_it_scored(case):
    validation, test = datasets(case)
    recipe = parse_recipe(with_calibration(case))
    space = SearchSpace(methods=("ties",), lewis_range=(0.2, 0.9))
    result = run_search(recipe, validation, test, case.out, SearchConfig(trials=4, space=space),
                        progress=False)
    assert result.finished == 4
    for row in json.loads((case.out / "trials.json").read_text()):
        assert 0.2 <= row["lewis_a"] <= 0.9 and 0.2 <= row["lewis_b"] <= 0.9
    best = json.loads((case.out / "best.json").read_text())
    gamma, epsilon = sorted((best["params"]["lewis_a"], best["params"]["lewis_b"]))
    assert best["recipe"]["lewis"] == {"gamma": gamma, "epsilon": epsilon}
    config = json.loads((case.out / "best-model" / "config.json").read_text())
    densities = [d for table in config["hm3"]["label_free"]["lewis"]["densities"].values()
                 for d in table.values()]
    assert min(densities) == pytest.approx(gamma, abs=1e-4)
    assert max(densities) == pytest.approx(epsilon, abs=1e-4)
    # The saved model is the model the trial scored: LEWIS re-derived from the same texts.
    model = hm3.load(case.out / "best-model", device="cpu")
    assert evaluate(model, validation)["mean_macro_f1"] == pytest.approx(best["validation_mean"],
                                                                         abs=1e-9)


def test_search_refits_heads_on_every_trial_and_saves_what_it_scored(case):
    validation, test = datasets(case)
    raw = with_calibration(case, align_heads={"ridge": 0.1}, recentre=True)
    for task, folder in case.experts.items():  # predictions that vary from text to text
        spread_head(folder, Path(raw["calibration"]["texts"][task]).read_text().split("\n"), 1)
    # A validation text among the calibration texts is left out of them, in the search as in
    # the saved model's merge.
    calibration = Path(raw["calibration"]["texts"]["topic"])
    calibration.write_text(validation[1].texts[0] + "\n" + calibration.read_text())
    recipe = parse_recipe(raw)
    space = SearchSpace(methods=("ties",))
    with pytest.warns(Warning, match="1 also appear in the held-out"):
        refit = run_search(recipe, validation, test, case.out / "refit",
                           SearchConfig(trials=3, space=space), progress=False)
    run_search(parse_recipe(case.raw), validation, test, case.out / "plain",
                       SearchConfig(trials=3, space=space), progress=False)
    # Same sampler seed, so the same densities: only the head steps differ.
    rows = {name: json.loads((case.out / name / "trials.json").read_text())
            for name in ("refit", "plain")}
    assert [r["density"] for r in rows["refit"]] == [r["density"] for r in rows["plain"]]
    assert [r["value"] for r in rows["refit"]] != [r["value"] for r in rows["plain"]]
    assert all(0 <= r[f"agreement/{task}"] <= 1 for r in rows["refit"] for task in TASKS)
    assert not any(key.startswith("agreement/") for key in rows["plain"][0])
    # The saved model is the best trial's: heads refitted on the same texts, the same score.
    best = refit.best
    config = json.loads((case.out / "refit" / "best-model" / "config.json").read_text())
    label_free = config["hm3"]["label_free"]
    assert set(label_free) >= {"align_heads", "recentre"}
    assert label_free["calibration"]["topic"]["held_out_removed"] == 1
    assert best["label_free"] == label_free  # best.json and the summary say which texts were used
    summary = format_summary(refit)
    assert "calibration texts: sentiment 20, topic 20" in summary and "align_heads topic" in summary
    trial = next(r for r in rows["refit"] if r["number"] == best["trial"])
    assert {task: trial[f"agreement/{task}"] for task in TASKS} == {
        task: entry["agreement_after"]
        for task, entry in label_free["align_heads"]["tasks"].items()}
    model = hm3.load(case.out / "refit" / "best-model", device="cpu")
    assert evaluate(model, validation)["mean_macro_f1"] == pytest.approx(best["validation_mean"],
                                                                         abs=1e-9)


@pytest.mark.parametrize("step, reason", [("regmean", "would not matter"),
                                          ("coefficients", "fitted again on every trial")])
def test_search_refuses_steps_that_defeat_it(case, step, reason):
    validation, test = datasets(case)
    recipe = parse_recipe(with_calibration(case, **{step: True}))
    with pytest.raises(Hm3Error, match=f"{step} .*{reason}"):
        run_search(recipe, validation, test, case.out, SearchConfig(trials=2), progress=False)
    assert not (case.out / "study.db").exists()
