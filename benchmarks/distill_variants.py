"""The `distill` step's variants on a zoo, against the head steps alone: the body merged once
(TIES at the zoo's density, heads whole), the calibration texts tokenised and the experts run on
them once, then each variant distils a fresh copy of that body, the head steps (align_heads +
recentre) refit its heads, and it is scored on every task's validation split; as in the paper's
search, only a variant that sets a new best validation mean (and the head steps alone, the
baseline) is scored on the test split too, so test figures choose nothing.

  .venv/bin/python benchmarks/distill_variants.py --zoo mpnet --calibration per-task+unseen
  .venv/bin/python benchmarks/distill_variants.py --zoo mpnet --calibration per-task --limit 64
  .venv/bin/python benchmarks/distill_variants.py --zoo mpnet --calibration shared+unseen \
      --limit 1024
  .venv/bin/python benchmarks/distill_variants.py --zoo minilm
  .venv/bin/python benchmarks/distill_variants.py --zoo minilm --augment 2 --drop 0.15
  .venv/bin/python benchmarks/distill_variants.py --zoo minilm --body tsv --dev
`--body METHOD`: the body merged by another method (its defaults; `--lambda`), heads whole.
`--augment K`: every calibration file gets K copies of each of its texts with words dropped at
random (`--drop`, the chance per word; seeded): more texts on which the experts teach, near
their task's own, at no cost in labels.
`--dev`: choose on `val+dev` instead (each task's validation split with up to 1000 more
labelled source texts outside the zoo's splits and the calibration texts, `common.dev_datasets`;
RESULTS.md §10: the 100-text validation splits cannot rank half-point choices).
Results: benchmarks/results/distill_variants.json (one entry per zoo and calibration).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import tempfile
import time
from pathlib import Path

import torch

from hm3.checkpoint import write_json_atomic
from hm3.data.tables import read_texts
from hm3.demo import demo_recipe, held_out_texts
from hm3.engine import build_model, merge_into, open_sources
from hm3.evaluate import evaluate
from hm3.label_free.distill import DistillOptions, distill_body
from hm3.model import MultiTaskClassifier
from hm3.pipeline import calibrate, head_steps
from hm3.recipe import parse_recipe
from hm3.zoo import build_mpnet_zoo, build_zoo

from common import datasets, with_dev
from mpnet_zoo import HEAD_STEPS, recipe, write_texts, zoo_dev

RESULTS = Path(__file__).resolve().parent / "results" / "distill_variants.json"
VARIANTS = {
    "head steps": None,
    "distill weights": {"train": "weights", "lr": 0.05},  # the step's lr before 2026-12-04
    "distill weights, lr 0.02": {"train": "weights", "lr": 0.02},
    "distill weights, lr 0.1": {"train": "weights", "lr": 0.1},
    "distill weights, pull 0.1": {"train": "weights", "pull": 0.1},
    "distill weights, 128 texts": {"train": "weights", "texts": 128},
    "distill weights, 48 steps": {"train": "weights", "steps": 48},
    "distill rows": {"train": "rows"},
    "distill elementwise": {"train": "elementwise"},
    "distill tensor": {"train": "tensor"},
    "distill weights, route all": {"train": "weights", "route": "all"},
    # one shared sample: every text taught by every expert, against the default (confident)
    "distill weights, lr 0.02, route all": {"train": "weights", "lr": 0.02, "route": "all"},
    # More texts at the same number of steps: each text seen about once, not three times.
    "distill weights, lr 0.02, 256 texts": {"train": "weights", "lr": 0.02, "texts": 256},
    "distill weights, lr 0.02, 128 texts": {"train": "weights", "lr": 0.02, "texts": 128},
    # the last block matched on what the heads make of it (the experts' logits), or on both
    "distill weights, lr 0.02, last logits": {"train": "weights", "lr": 0.02, "last": "logits"},
    "distill weights, lr 0.02, last both": {"train": "weights", "lr": 0.02, "last": "both"},
    # four times the steps: does a block fitted closer (benchmarks/distill_steps.py) score higher?
    "distill weights, lr 0.02, 96 steps": {"train": "weights", "lr": 0.02, "steps": 96},
    "distill weights, lr 0.05, 256 texts": {"train": "weights", "lr": 0.05, "texts": 256},
    "distill weights, lr 0.02, 256 texts, 48 steps": {"train": "weights", "lr": 0.02,
                                                      "texts": 256, "steps": 48},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=("mpnet", "minilm"), default="mpnet")
    parser.add_argument("--calibration", default="per-task+unseen",
                        help="mpnet: mpnet_zoo.py's calibration modes; minilm: the demo's")
    parser.add_argument("--limit", type=int, help="calibration texts per task (shared: in all)")
    parser.add_argument("--label", help="a name for this run, added to its results entry's key "
                        "(a run after a change to the merge starts a fresh entry)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--augment", type=int, default=0,
                        help="copies of every calibration text with words dropped")
    parser.add_argument("--drop", type=float, default=0.15, help="each word's chance to go")
    parser.add_argument("--dev", action="store_true",
                        help="choose on val+dev (validation with the larger dev set)")
    parser.add_argument("--body", help="merge the body with this method instead of the "
                        "preset's TIES 0.2 (its defaults, `--lambda`)")
    parser.add_argument("--lambda", dest="scale", type=float, help="the body method's lambda")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hm3-distill-"))
    if args.zoo == "mpnet":
        zoo = build_mpnet_zoo(progress=True)
        raw = recipe(zoo, list(zoo.experts), HEAD_STEPS, args.calibration, work)
        key = f"mpnet {args.calibration}"
    else:
        zoo = build_zoo(progress=True)
        raw = {**demo_recipe(zoo), "coefficients": None}
        key = "minilm demo"
    held = held_out_texts(zoo)
    if args.limit:
        raw["calibration"]["limit"] = args.limit
        key += f" limit {args.limit}"
    if args.augment:
        augment(raw["calibration"], args.augment, args.drop, work)
        key += f" augment {args.augment} drop {args.drop}"
    if args.body:
        raw["method"] = args.body
        raw["parameters"] = {} if args.scale is None else {"lambda": args.scale}
        key += f" body {args.body}" + ("" if args.scale is None else f" lambda {args.scale}")
    if args.label:
        key += f" {args.label}"
    choose = "val+dev" if args.dev else "validation"
    if args.dev:
        key += " dev"
    max_length = raw["calibration"]["max_length"]
    sources = open_sources(parse_recipe(raw))
    started = time.perf_counter()
    calibrated = calibrate(sources, held, progress=True)
    model = build_model(sources)
    merge_into(model, sources, progress=True)
    merged = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    shared_cost = round(time.perf_counter() - started, 1)
    tasks = list(zoo.experts)
    classifier = MultiTaskClassifier(model, calibrated.tokenizer, sources.groups, max_length)
    splits = {split: datasets(zoo, split) for split in ("validation", "test")}
    if args.dev:
        splits["val+dev"] = with_dev(splits["validation"], zoo_dev(zoo, args.zoo))
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    entry = results.setdefault(key, {"rows": {}})
    entry.update({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch "
                             f"{torch.__version__}, {torch.get_num_threads()} threads",
                  "texts": {t: len(x) for t, x in calibrated.calibration.texts.items()},
                  "merge_and_calibration_seconds": shared_cost})
    entry["experts"] = {s: {t: round(zoo.scores[t][s]["macro_f1"], 4) for t in zoo.experts}
                        for s in ("validation", "test")}
    for name in args.variants:
        model.load_state_dict(merged)
        started = time.perf_counter()
        row: dict = {"options": VARIANTS[name]}
        if VARIANTS[name] is not None:
            report = distill_body(model, sources, calibrated, DistillOptions(**VARIANTS[name]),
                                  progress=True)
            row["distill"] = {"error_before": report.error_before,
                              "error_after": report.error_after, "routed": report.routed}
            row["distill_seconds"] = report.seconds
        head_steps(model, sources, calibrated)
        row["seconds"] = round(time.perf_counter() - started, 1)
        best = max((r["mean"][choose] for r in entry["rows"].values()), default=-1.0)
        row["scores"] = {s: f1s(classifier, splits[s])
                         for s in dict.fromkeys(("validation", choose))}  # each split once
        if sum(row["scores"][choose].values()) / len(tasks) > best or VARIANTS[name] is None:
            row["scores"]["test"] = f1s(classifier, splits["test"])
        row["mean"] = {s: round(sum(v.values()) / len(v), 4) for s, v in row["scores"].items()}
        row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        entry["rows"][name] = row
        save(key, entry)
        print(f"{name}: {json.dumps(row['mean'])} ({row['seconds']:.0f}s) "
              f"{json.dumps(row['scores'])}", flush=True)
    rows = entry["rows"]
    picked = max(rows, key=lambda n: rows[n]["mean"][choose])
    expert_mean = {s: round(sum(v.values()) / len(v), 4) for s, v in entry["experts"].items()}
    entry[f"picked_on_{choose}"] = picked
    entry["experts_mean"] = expert_mean
    save(key, entry)
    print(f"experts: {expert_mean}; picked on {choose}: {picked} {rows[picked]['mean']}")


def augment(calibration: dict, copies: int, drop: float, work: Path) -> None:
    """Rewrite the recipe's calibration files (one per task, or one shared) with `copies` of
    every text within the limit after those texts, each word dropped with chance `drop` (see
    `dropped`); the limit grows to keep them all."""
    files = calibration["texts"]
    named = files if isinstance(files, dict) else {"shared": files}
    out = {}
    for name, path in named.items():
        texts = read_texts(path)[:calibration["limit"]]
        rng = random.Random(f"{name} {copies} {drop}")
        extra = [dropped(text, drop, rng) for _ in range(copies) for text in texts]
        out[name] = write_texts(work / f"augmented-{name}.txt", texts + extra)
    calibration["texts"] = ({k: str(v) for k, v in out.items()} if isinstance(files, dict)
                            else str(out["shared"]))
    calibration["limit"] = calibration["limit"] * (copies + 1)


def dropped(text: str, drop: float, rng: random.Random) -> str:
    """`text` with each word dropped with chance `drop`; at least one word dropped and one kept
    (a text of one word stays as it is)."""
    words = text.split()
    kept = [i for i in range(len(words)) if rng.random() >= drop]
    if len(kept) == len(words) > 1:
        kept.remove(rng.randrange(len(words)))
    return " ".join(words[i] for i in kept) if kept else rng.choice(words)


def save(key: str, entry: dict) -> None:
    """Write this run's entry; other entries as the file holds them now (another run of this
    script may have written its own meanwhile)."""
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[key] = entry
    write_json_atomic(RESULTS, results)


def f1s(classifier, data) -> dict[str, float]:
    return {t: round(r["macro_f1"], 4) for t, r in evaluate(classifier, data)["tasks"].items()}


if __name__ == "__main__":
    main()
