"""Label-free merging on the offline zoo's four experts: each configuration merged in memory,
scored on every task's validation and test split, and timed in CPU seconds.

Calibration texts are the zoo's `calibration` split (256 texts per task, labels ignored), which
is disjoint from the validation and test splits. Results go to benchmarks/results/guided_zoo.json
and a markdown table is printed (copied into RESULTS.md by hand).

  .venv/bin/python benchmarks/guided_zoo.py                  # every configuration
  .venv/bin/python benchmarks/guided_zoo.py --only recentre regmean
  .venv/bin/python benchmarks/guided_zoo.py --config NAME '{"regmean": {"alpha": 0.5}}'  # sweep
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from hm3.checkpoint import load_tokenizer, write_json_atomic
from hm3.engine import build_model, merge_into, open_sources
from hm3.evaluate import evaluate
from hm3.model import MultiTaskClassifier, load
from hm3.pipeline import label_free_model
from hm3.recipe import parse_recipe
from hm3.zoo import build_zoo

from common import datasets

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "guided_zoo.json"
SWEEP = HERE / "results" / "guided_zoo_sweep.json"  # earlier and exploratory runs
MAX_LENGTH = 128  # as `hm3 demo`
PLAIN = {"method": "ties", "parameters": {"density": 0.2}}  # the demo's plain merge
# name -> recipe fields on top of PLAIN (`calibration` is added where a step needs it)
CONFIGS = {
    "plain ties 0.2 (heads merged)": {"heads": "merge"},
    "heads whole": {"heads": "whole"},
    "heads whole + recentre": {"heads": "whole", "recentre": True},
    "LEWIS": {"lewis": {"gamma": 0.3, "epsilon": 0.8}},
    "LEWIS + recentre": {"lewis": {"gamma": 0.3, "epsilon": 0.8}, "recentre": True},
    "RegMean": {"regmean": {"alpha": 1.0}},
    "RegMean + recentre": {"regmean": {"alpha": 1.0}, "recentre": True},
    "coefficients": {"coefficients": {"steps": 40}},
    "coefficients + recentre": {"coefficients": {"steps": 40}, "recentre": True},
    "align_heads": {"align_heads": {"ridge": 0.1}},
    "align_heads + recentre": {"align_heads": {"ridge": 0.1}, "recentre": True},
    "LEWIS + align_heads + recentre": {"lewis": {"gamma": 0.3, "epsilon": 0.8},
                                       "align_heads": {"ridge": 0.1}, "recentre": True},
    "RegMean + align_heads + recentre": {"regmean": {"alpha": 1.0},
                                         "align_heads": {"ridge": 0.1}, "recentre": True},
    "coefficients + align_heads + recentre": {"coefficients": {"steps": 40},
                                              "align_heads": {"ridge": 0.1}, "recentre": True},
    # the head-alignment ridge chosen per task by cross-validation on the calibration texts
    "align_heads auto + recentre": {"align_heads": {"ridge": "auto"}, "recentre": True},
    "coefficients + align_heads auto + recentre": {"coefficients": {"steps": 40},
                                                   "align_heads": {"ridge": "auto"},
                                                   "recentre": True},
    "RegMean + align_heads auto + recentre": {"regmean": {"alpha": 1.0},
                                              "align_heads": {"ridge": "auto"}, "recentre": True},
    # Iso-C in place of TIES 0.2 for the body: plain (heads whole), then with the head steps
    **{f"iso_c {lam}{steps}": {"method": "iso_c", "parameters": {"lambda": lam}, "heads": "whole",
                               **extra}
       for lam in (1.0, 1.5)
       for steps, extra in (("", {}), (" + align_heads + recentre",
                                       {"align_heads": {"ridge": 0.1}, "recentre": True}))},
}


def run_config(zoo, name: str, extra: dict, validation, test) -> dict:
    raw = {"base": str(zoo.base), **PLAIN, **extra, "seed": 0,
           "experts": [{"model": str(p), "task": t} for t, p in zoo.experts.items()]}
    if any(k in extra for k in ("recentre", "lewis", "regmean", "coefficients", "align_heads")):
        raw["calibration"] = {"texts": {t: {"path": str(f["calibration"])}
                                        for t, f in zoo.splits.items()}, "limit": 256,
                              "max_length": MAX_LENGTH}
    recipe = parse_recipe(raw)
    cpu, wall = time.process_time(), time.perf_counter()
    sources = open_sources(recipe)
    report = None
    if recipe.label_free.needs_model:
        held = {d.task: d.texts for d in [*validation, *test]}
        model, sources, report = label_free_model(sources, progress=True, held_out=held)
    else:
        model = build_model(sources)
        merge_into(model, sources, progress=False)
    merge_cpu, merge_wall = time.process_time() - cpu, time.perf_counter() - wall
    tokenizer = load_tokenizer([sources.base.path, sources.experts[0].path],
                               missing="the zoo ships the base's tokenizer; rebuild the zoo")
    classifier = MultiTaskClassifier(model, tokenizer, sources.groups, MAX_LENGTH)
    scores = {split: {t: s["macro_f1"] for t, s in evaluate(classifier, data)["tasks"].items()}
              for split, data in (("validation", validation), ("test", test))}
    return {"name": name, "recipe": recipe.to_dict(), "scores": scores,
            "mean": {k: sum(v.values()) / len(v) for k, v in scores.items()},
            "merge_cpu_minutes": round(merge_cpu / 60, 2),
            "merge_wall_minutes": round(merge_wall / 60, 2),
            # (`guided`: the key of every row in results/guided_zoo.json)
            "guided": {k: v for k, v in (report.to_dict() if report else {}).items()
                       if k in ("recentre", "coefficients", "regmean", "calibration")}}


def expert_row(zoo, validation, test) -> dict:
    scores = {"validation": {}, "test": {}}
    for task, path in zoo.experts.items():
        model = load(path, task=task, device="cpu", max_length=MAX_LENGTH)
        for split, data in (("validation", validation), ("test", test)):
            scores[split][task] = evaluate(model, [d for d in data if d.task == task]
                                           )["tasks"][task]["macro_f1"]
    return {"name": "experts", "scores": scores,
            "mean": {k: sum(v.values()) / len(v) for k, v in scores.items()}}


def table(rows: list[dict]) -> str:
    tasks = list(rows[0]["scores"]["test"])
    body = []
    for row in rows:
        body.append([row["name"], f"{row['mean']['validation']:.3f}", f"{row['mean']['test']:.3f}",
                     *(f"{row['scores']['test'][t]:.3f}" for t in tasks),
                     f"{row['merge_cpu_minutes']:.2f}" if "merge_cpu_minutes" in row else "-"])
    header = ["configuration", "val mean", "test mean", *(f"test {t}" for t in tasks),
              "merge CPU min"]
    return "\n".join("| " + " | ".join(map(str, line)) + " |"
                     for line in [header, ["---"] * len(header), *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="configurations whose name contains one of these")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--config", nargs=2, action="append", default=[],
                        metavar=("NAME", "JSON"), help="an extra configuration: recipe fields "
                        "as JSON on top of the plain merge, e.g. '{\"regmean\": {\"alpha\": 0.5}}'")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    zoo = build_zoo(progress=True)
    validation, test = datasets(zoo, "validation"), datasets(zoo, "test")
    target = SWEEP if args.config else RESULTS  # exploratory configurations go to the sweep
    previous = json.loads(target.read_text())["rows"] if target.is_file() else []
    rows = {row["name"]: row for row in previous}
    rows["experts"] = expert_row(zoo, validation, test)
    configs = ({name: json.loads(text) for name, text in args.config} if args.config
               else CONFIGS)
    for name, extra in configs.items():
        if args.only and not any(word.lower() in name.lower() for word in args.only):
            continue
        print(f"== {name}", flush=True)
        rows[name] = run_config(zoo, name, extra, validation, test)
        print(json.dumps({k: rows[name][k] for k in ("mean", "merge_cpu_minutes")}), flush=True)
        write_json_atomic(target, _document(rows))
    write_json_atomic(target, _document(rows))
    print(table([rows["experts"], *(row for n, row in rows.items() if n != "experts")]))


def _document(rows: dict) -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
            f"{torch.get_num_threads()} torch threads, {platform.python_version()}",
            "max_length": MAX_LENGTH, "plain": PLAIN, "rows": list(rows.values())}


if __name__ == "__main__":
    main()
