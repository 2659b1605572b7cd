"""`hm3 check` on mixed traffic: every task's test texts pooled and shuffled into one sample (as
a deployment's traffic is), each merged model checked against its experts on it, counting every
text, only the texts each expert is sure of (`--count confident`), each text weighted by
its expert's confidence (`--count weighted`) or the quarter of texts each expert is surest
of (`--count surest`); beside each task's test
macro-F1 change (merged minus expert, on the task's own test split). A verdict should fail a
task 3 or more points under its expert and pass one within 1 point.

  .venv/bin/python benchmarks/check_mixed_traffic.py --zoo minilm NAME=FOLDER ...
Results: benchmarks/results/check_mixed_traffic.json (one entry per zoo and model).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from hm3.check import DEFAULT_MIN_AGREEMENT, check
from hm3.checkpoint import write_json_atomic
from hm3.evaluate import evaluate
from hm3.model import load
from hm3.zoo import build_mpnet_zoo, build_zoo

from common import datasets

RESULTS = Path(__file__).resolve().parent / "results" / "check_mixed_traffic.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=("minilm", "mpnet"), default="minilm")
    parser.add_argument("--max-length", type=int)
    parser.add_argument("models", nargs="+", metavar="NAME=FOLDER")
    args = parser.parse_args()
    zoo = build_mpnet_zoo(progress=False) if args.zoo == "mpnet" else build_zoo(progress=False)
    max_length = args.max_length or (32 if args.zoo == "mpnet" else 128)
    test = datasets(zoo, "test")
    traffic = [text for data in test for text in data.texts]
    random.Random(0).shuffle(traffic)
    experts = {task: load(path, task=task, max_length=max_length)
               for task, path in zoo.experts.items()}
    expert_f1 = {data.task: evaluate(experts[data.task], [data])["tasks"][data.task]["macro_f1"]
                 for data in test}
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for item in args.models:
        name, _, folder = item.partition("=")
        merged = load(folder, max_length=max_length)
        f1 = {t: r["macro_f1"] for t, r in evaluate(merged, test)["tasks"].items()}
        report = check(merged, experts, traffic)
        rows = {}
        for task, entry in report["tasks"].items():
            change = f1[task] - expert_f1[task]
            rows[task] = {"f1_change": round(change, 4), "agreement": round(entry["agreement"], 4),
                          "confident_agreement": entry["confident_agreement"] and
                          round(entry["confident_agreement"], 4),
                          "confident_n": entry["confident_n"],
                          "weighted_agreement": entry["weighted_agreement"] and
                          round(entry["weighted_agreement"], 4),
                          "surest_agreement": round(entry["surest_agreement"], 4),
                          "surest_n": entry["surest_n"]}
            print(name, task, rows[task], flush=True)
        results[f"{args.zoo} {name}"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "texts": len(traffic), "model": folder, "tasks": rows}
        write_json_atomic(RESULTS, results)
    print(json.dumps(outcomes(results), indent=1))


def outcomes(results: dict, minimum: float = DEFAULT_MIN_AGREEMENT) -> dict:
    """Per way of counting: false alarms (a task within 1 point failed) and misses (a task 3 or
    more points under passed), over every (model, task) recorded."""
    out = {}
    for count, key in (("all", "agreement"), ("confident", "confident_agreement"),
                       ("weighted", "weighted_agreement"), ("surest", "surest_agreement")):
        alarms, misses, within, under = [], [], 0, 0
        for model, entry in results.items():
            for task, row in entry["tasks"].items():
                if key not in row:  # recorded before this way of counting existed
                    continue
                share = row[key] if row[key] is not None else row["agreement"]
                if row["f1_change"] >= -0.01:
                    within += 1
                    if share < minimum:
                        alarms.append(f"{model}/{task}")
                elif row["f1_change"] <= -0.03:
                    under += 1
                    if share >= minimum:
                        misses.append(f"{model}/{task}")
        out[count] = {"within_1_point": within, "false_alarms": alarms,
                      "3_or_more_under": under, "misses": misses}
    return out


if __name__ == "__main__":
    main()
