"""The search's rules, each seen from outside: the DARE seed of every trial (seed + trial
number, or the recipe's seed with --fixed-merge-seed), pruning on the validation subset, and
densities DELLA cannot take clamped rather than fatal."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import yaml

import hm3.search.trial
from hm3.cli import main
from hm3.data.blocks import load_data_block
from hm3.recipe import parse_recipe
from hm3.search import SearchConfig, SearchSpace, run_search, trial_recipe

from conftest import WORDS, build_family, spread_head

TASKS = {"sentiment": ["negative", "positive"], "topic": ["news", "sport", "film"]}


def split(path, labels, n, seed):
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(2, 7))),
                                        "label": rng.choice(labels)}) + "\n"
                            for _ in range(n)))
    return str(path)


@pytest.fixture
def case(tmp_path):
    """Experts whose heads spread their predictions, so trial scores differ with the merge."""
    base, experts = build_family(tmp_path / "models", TASKS, noise=0.03)
    texts = [" ".join(random.Random(i).choices(WORDS, k=5)) for i in range(40)]
    for i, folder in enumerate(experts.values()):
        spread_head(folder, texts, seed=i)
    data = {task: {"path": split(tmp_path / f"{task}-test.jsonl", labels, 30, i),
                   "validation": split(tmp_path / f"{task}-val.jsonl", labels, 40, 10 + i)}
            for i, (task, labels) in enumerate(TASKS.items())}
    raw = {"base": str(base), "method": "dare_ties", "seed": 7,
           "experts": [{"model": str(p), "task": t} for t, p in experts.items()], "data": data}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    tasks = list(TASKS)
    return SimpleNamespace(raw=raw, path=path, out=tmp_path / "out",
                           validation=load_data_block(data, tasks=tasks, part="validation"),
                           test=load_data_block(data, tasks=tasks, part="test"))


def merge_seeds(monkeypatch) -> list[int]:
    """Record the seed of every in-memory merge the search runs."""
    seeds: list[int] = []
    merge_in_memory = hm3.search.trial.merge_in_memory

    def recording(model, sources, *args, **kwargs):
        seeds.append(sources.recipe.seed)
        return merge_in_memory(model, sources, *args, **kwargs)

    monkeypatch.setattr(hm3.search.trial, "merge_in_memory", recording)
    return seeds


@pytest.mark.parametrize("fixed", [False, True])
def test_each_trial_merges_with_seed_plus_its_number_unless_fixed(case, monkeypatch, capsys,
                                                                  fixed):
    seeds = merge_seeds(monkeypatch)
    argv = ["search", str(case.path), "-o", str(case.out), "--trials", "3", "--no-progress"]
    assert main(argv + (["--fixed-merge-seed"] if fixed else [])) == 0
    printed = capsys.readouterr().out
    assert "3 finished trials; this run 3" in printed
    assert str(case.out / "best-model") in printed and (case.out / "best-model").is_dir()
    want = [7, 7, 7] if fixed else [7, 8, 9]
    assert seeds == want
    rows = json.loads((case.out / "trials.json").read_text())
    assert [row["seed"] for row in rows] == want
    best = json.loads((case.out / "best.json").read_text())
    assert best["seed"] == want[best["trial"]]


def test_pruning_stops_trials_whose_subset_score_is_below_the_kept_share(case):
    config = SearchConfig(trials=6, prune_fraction=0.5, prune_keep=10.0, prune_startup=1,
                          space=SearchSpace(density_range=(0.05, 1.0)))
    run_search(parse_recipe(case.raw), case.validation, case.test, case.out, config,
               progress=False)
    rows = json.loads((case.out / "trials.json").read_text())
    pruned = [row for row in rows if row["state"] == "PRUNED"]
    assert pruned, "nothing was pruned with only the top 10% kept"
    for row in rows:
        assert row["subset_value"] is not None
        earlier = [r["subset_value"] for r in rows if r["number"] < row["number"]]
        if row["state"] == "PRUNED":
            assert row["value"] is None and row["test_mean"] is None
            assert row["subset_value"] < max(earlier)  # only a trial worse than one before
        else:
            assert row["value"] is not None
        if row["number"] == 0:
            assert row["state"] == "COMPLETE"  # the startup trial is never pruned


def test_della_densities_it_cannot_take_are_clamped_not_fatal(case):
    recipe = parse_recipe(case.raw)
    for sampled, want in ((0.037, 0.151), (0.9, 0.849), (0.5, 0.5)):
        trial = trial_recipe(recipe, {"method": "della", "density": sampled}, seed=0)
        assert [e.parameters["density"] for e in trial.experts] == [pytest.approx(want)] * 2
    assert trial_recipe(recipe, {"method": "della", "density": 1.0}, 0).experts[0].parameters[
        "density"] == 1.0  # density 1 keeps everything, whatever epsilon
    config = SearchConfig(trials=2, space=SearchSpace(methods=("della",),
                                                      density_range=(0.01, 0.1)))
    result = run_search(recipe, case.validation, None, case.out, config, progress=False)
    assert result.finished == 2
