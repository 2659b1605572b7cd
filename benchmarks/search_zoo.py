"""The paper's model search on the offline zoo: `hm3 search` (DARE-TIES, Beta density) on all four
tasks and on two pairs, `hm3 self-merge` on the weakest and the strongest expert, and the Soup
(linear) and TIES baselines beside them.

Every study runs through the command line, from a recipe written here whose `data:` block names
the zoo's validation and test splits, so each is reproducible with the `hm3` command printed in
the summary. Studies (with their ~90 MB best models) live under benchmarks/.work/search/; the
small outputs (trials table, plot, best.json) are copied to benchmarks/results/search/<study>/,
and the summary of every study to benchmarks/results/search_zoo.json (a run of some studies,
`--only`, replaces those studies' entries and keeps the others).

  .venv/bin/python benchmarks/search_zoo.py --trials 30 --self-trials 25 --threads 1
  .venv/bin/python benchmarks/search_zoo.py --only sentiment+question-500 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from hm3.checkpoint import write_json_atomic
from hm3.cli import main as hm3_main
from hm3.data import load_data_block
from hm3.evaluate import evaluate
from hm3.model import load
from hm3.pipeline import merge
from hm3.recipe import load_recipe
from hm3.zoo import build_zoo

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "search"
RESULTS = HERE / "results" / "search"
SUMMARY = HERE / "results" / "search_zoo.json"  # every study's summary and command
COMBINATIONS = {"all4": ("spam", "sentiment", "topic", "question"),
                "spam+topic": ("spam", "topic"),
                "sentiment+question": ("sentiment", "question")}
# Studies: name -> (combination, extra `hm3 search` options, recipe fields). The paper's search
# (DARE-TIES, Beta density) per combination, then two beyond it: DARE-TIES with the disjoint
# mean (`normalize: true`, TIES's default; mergekit's dare_ties sums), and TPE over method and
# lambda too, pruning weak trials on a quarter of the validation data.
# The paper merges the expanded heads like the body (`heads: merge`; hm3 keeps them whole).
PAPER = {"heads": "merge"}
STUDIES = {**{name: (name, [], PAPER) for name in COMBINATIONS},
           "spam+topic-normalize": ("spam+topic", [], {**PAPER, "method": "dare_ties",
                                                       "parameters": {"normalize": True}}),
           "all4-tpe-lambda": ("all4", ["--sampler", "tpe", "--methods", "dare_ties", "ties",
                                        "--lambda", "0.2", "1.5", "--prune", "0.25"], PAPER),
           # The paper's trial count on the fastest pair (run only when named in --only).
           "sentiment+question-500": ("sentiment+question", ["--trials", "500"], PAPER),
           # The paper's search with every trial's heads kept whole and refitted label-free
           # (align_heads + recentre on the zoo's calibration split), then TPE over TIES's
           # density and lambda with the same refit.
           "all4-refit": ("all4", [], {"heads": "whole", "align_heads": {"ridge": 0.1},
                                       "recentre": True, "calibration": "zoo"}),
           "all4-refit-ties": ("all4", ["--methods", "ties", "--sampler", "tpe",
                                        "--lambda", "0.5", "1.5"],
                               {"heads": "whole", "align_heads": {"ridge": 0.1},
                                "recentre": True, "calibration": "zoo"})}
ON_REQUEST = {"sentiment+question-500"}  # long studies a full run leaves out
CALIBRATION_TEXTS = 256  # per task, from the zoo's calibration split (labels ignored)
BASELINES = {"soup": {**PAPER, "method": "linear"},
             "ties-1.0": {**PAPER, "method": "ties", "parameters": {"density": 1.0}},
             "ties-0.5": {**PAPER, "method": "ties", "parameters": {"density": 0.5}}}
MAX_LENGTH = 64  # the zoo's experts were fine-tuned and scored at 64 tokens
KEPT_FILES = ("trials.csv", "trials.json", "density.png", "best.json")


def write_recipe(zoo, tasks: tuple[str, ...], folder: Path, **method) -> Path:
    """A recipe for `tasks` whose data block names the zoo's test and validation splits."""
    folder.mkdir(parents=True, exist_ok=True)
    if method.get("calibration") == "zoo":
        method = {**method, "calibration": {
            "texts": {t: str(zoo.splits[t]["calibration"]) for t in tasks},
            "limit": CALIBRATION_TEXTS, "max_length": MAX_LENGTH}}
    raw = {"base": str(zoo.base), **method,
           "experts": [{"model": str(zoo.experts[t]), "task": t} for t in tasks],
           "data": {t: {"path": str(zoo.splits[t]["test"]),
                        "validation": str(zoo.splits[t]["validation"])} for t in tasks}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_cli(args: list[str]) -> None:
    print("$ hm3 " + " ".join(args), flush=True)
    code = hm3_main(args)
    if code != 0:
        raise SystemExit(f"hm3 {args[0]} failed with exit code {code}")


def keep(study: Path, name: str) -> dict:
    """Copy a study's small outputs to results/ and summarise it."""
    target = RESULTS / name
    target.mkdir(parents=True, exist_ok=True)
    for file in KEPT_FILES:
        shutil.copyfile(study / file, target / file)
    best = json.loads((study / "best.json").read_text())
    rows = json.loads((study / "trials.json").read_text())
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    values = np.array([r["value"] for r in complete])
    densities = np.array([r["density"] for r in complete])
    worst = complete[int(values.argmin())]
    experts = best["experts"]
    return {
        "trials": len(complete),
        "pruned": sum(r["state"] == "PRUNED" for r in rows),
        "seconds_per_pruned_trial": median([r["seconds"] for r in rows if r["state"] == "PRUNED"]),
        "seconds_per_trial": float(np.median([r["seconds"] for r in complete])),
        "merge_seconds_per_trial": float(np.median([r["merge_seconds"] for r in complete])),
        "experts": {split: float(np.mean([e[split] for e in experts.values()]))
                    for split in ("validation", "test")},
        "experts_by_task": experts,
        "best": {"trial": best["trial"], "density": best["density"],
                 "validation": best["validation_mean"], "test": best["test_mean"],
                 "by_task": {"validation": best["validation"], "test": best["test"]}},
        "worst": {"density": worst["density"], "validation": worst["value"]},
        "new_bests": sum(r["new_best"] for r in complete),
        "low_density_share_of_top5": float(np.mean(densities[np.argsort(values)[-5:]] < 0.3)),
        "near_one": {"trials": int((densities > 0.8).sum()),
                     "mean_validation": float(values[densities > 0.8].mean())
                     if (densities > 0.8).any() else None},
    }


def median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def baseline(zoo, tasks: tuple[str, ...], name: str, method: dict) -> dict:
    """Merge once with `method` and score on validation and test (hm3 merge + hm3 eval)."""
    folder = WORK / "baselines" / "-".join(tasks) / name
    recipe_path = write_recipe(zoo, tasks, folder, **method)
    recipe = load_recipe(recipe_path)
    merge(recipe, folder / "merged", overwrite=True, progress=False)
    model = load(folder / "merged", device="cpu", max_length=MAX_LENGTH)
    scores = {}
    for part in ("validation", "test"):
        report = evaluate(model, load_data_block(recipe.data, tasks=list(tasks), part=part))
        scores[part] = report["mean_macro_f1"]
    shutil.rmtree(folder / "merged")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30, help="trials per multi-task study")
    parser.add_argument("--self-trials", type=int, default=25, help="trials per self-merge")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); on a "
                        "shared 2-core machine 1 thread can be twice as fast as 2")
    parser.add_argument("--only", nargs="+", help="run only these studies (names as in "
                        "the summary: all4, spam+topic, sentiment+question, spam+topic-normalize, "
                        "all4-tpe-lambda, all4-refit, all4-refit-ties, self-weak, self-strong, "
                        "baselines; sentiment+question-500 runs only when named)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    zoo = build_zoo(progress=False)
    wanted = set(args.only or [])

    machine = {"threads": torch.get_num_threads(), "platform": platform.platform(),
               "torch": torch.__version__}
    summary = {"machine": machine, "max_length": MAX_LENGTH, "studies": {}, "baselines": {},
               "commands": {}}
    if wanted and SUMMARY.exists():  # a partial run updates its studies in the summary
        summary = {**json.loads(SUMMARY.read_text()), "machine": machine}
    for name, (combination, extra, fields) in STUDIES.items():
        if (wanted and name not in wanted) or (not wanted and name in ON_REQUEST):
            continue
        recipe = write_recipe(zoo, COMBINATIONS[combination], WORK / name, **fields)
        trials = [] if "--trials" in extra else ["--trials", str(args.trials)]
        command = ["search", str(recipe), "-o", str(WORK / name), *trials,
                   "--max-length", str(MAX_LENGTH), "--no-progress", *extra]
        started = time.perf_counter()
        run_cli(command)
        summary["studies"][name] = {**keep(WORK / name, name),
                                    "wall_seconds": time.perf_counter() - started,
                                    "machine": machine}
        summary["commands"][name] = "hm3 " + " ".join(command)

    by_f1 = sorted(zoo.experts, key=lambda t: zoo.scores[t]["validation"]["macro_f1"])
    for role, task in (("weak", by_f1[0]), ("strong", by_f1[-1])):
        name = f"self-{task}"
        if wanted and name not in wanted and f"self-{role}" not in wanted:
            continue
        command = ["self-merge", str(zoo.experts[task]), "--base", str(zoo.base),
                   "--validation", str(zoo.splits[task]["validation"]),
                   "--test", str(zoo.splits[task]["test"]), "--task", task,
                   "-o", str(WORK / name), "--trials", str(args.self_trials),
                   "--max-length", str(MAX_LENGTH), "--no-progress"]
        started = time.perf_counter()
        run_cli(command)
        summary["studies"][name] = {**keep(WORK / name, name), "role": role,
                                    "wall_seconds": time.perf_counter() - started,
                                    "machine": machine}
        summary["commands"][name] = "hm3 " + " ".join(command)

    if not wanted or "baselines" in wanted:
        for combo, tasks in COMBINATIONS.items():
            summary["baselines"][combo] = {name: baseline(zoo, tasks, name, method)
                                           for name, method in BASELINES.items()}
            print(f"baselines {combo}: {json.dumps(summary['baselines'][combo])}", flush=True)

    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(SUMMARY, summary)
    print(f"summary: {SUMMARY}")


if __name__ == "__main__":
    main()
