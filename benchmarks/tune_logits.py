"""Does training the merged model end to end on the experts' logits help after the preset? The
preset merge (its body method, distill, head steps) built in memory, then the `tune` step
(`hm3.label_free.tune`: the last `--blocks` blocks, 0 for all, and everything after them trained
by Adam so that each task's logits match its expert's on that task's calibration texts), the
head steps rerun, every variant scored on validation (test only for a new best, and only of the
variant that won: tuned alone, or tuned with the head steps rerun). `--teach all`:
every expert teaches on every task's calibration texts, not only its own. `--dev`: choose on
val+dev (validation with up to 1000 more labelled texts per task, `common.dev_datasets`).

  .venv/bin/python benchmarks/tune_logits.py --zoo minilm --blocks 2 --steps 30 --lr 1e-5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from hm3.demo import demo_recipe, held_out_texts
from hm3.engine import build_model, open_sources
from hm3.evaluate import evaluate
from hm3.label_free.tune import TuneOptions, tune_model
from hm3.model import MultiTaskClassifier
from hm3.pipeline import calibrate, head_steps, merge_in_memory
from hm3.recipe import parse_recipe
from hm3.zoo import build_mpnet_zoo, build_zoo

from common import datasets, with_dev
from mpnet_zoo import PRESET, PRESET_STEPS, recipe, zoo_dev


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=("mpnet", "minilm"), default="minilm")
    parser.add_argument("--blocks", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, nargs="+", default=[30])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-5])
    parser.add_argument("--teach", nargs="+", default=["own"], choices=("own", "all"))
    parser.add_argument("--best", type=float, default=None)
    parser.add_argument("--dev", action="store_true",
                        help="choose on val+dev (validation with the larger dev set)")
    args = parser.parse_args()
    if args.zoo == "mpnet":
        zoo = build_mpnet_zoo(progress=True)
        raw = recipe(zoo, list(zoo.experts), PRESET_STEPS, "per-task+unseen",
                     Path(tempfile.mkdtemp()), method=PRESET["method"],
                     parameters=PRESET["parameters"])
    else:
        zoo = build_zoo(progress=True)
        raw = demo_recipe(zoo)
    sources = open_sources(parse_recipe(raw))
    calibrated = calibrate(sources, held_out_texts(zoo), progress=True)
    model = build_model(sources)
    cache = Path(tempfile.gettempdir()) / f"hm3-tune-logits-{args.zoo}-{raw['method']}.pt"
    if cache.is_file():  # the preset merge of an earlier run (delete the file to redo it)
        model.load_state_dict(torch.load(cache))
    else:
        merge_in_memory(model, sources, calibrated, progress=True)
        torch.save(model.state_dict(), cache)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    clf = MultiTaskClassifier(model, calibrated.tokenizer, sources.groups,
                              raw["calibration"]["max_length"])
    splits = {s: datasets(zoo, s) for s in ("validation", "test")}
    choose = "validation"
    if args.dev:
        splits["val+dev"] = with_dev(splits["validation"], zoo_dev(zoo, args.zoo))
        choose = "val+dev"

    def score(split):
        report = evaluate(clf, splits[split])["tasks"]
        return {t: round(r["macro_f1"], 4) for t, r in report.items()}

    val = score(choose)
    best = args.best if args.best is not None else sum(val.values()) / len(val)
    print(f"preset: {choose} {sum(val.values()) / len(val):.4f} {json.dumps(val)}", flush=True)
    for blocks in args.blocks:
        for steps in args.steps:
            for lr, teach in ((lr, teach) for lr in args.lr for teach in args.teach):
                model.load_state_dict(start)
                started = time.perf_counter()
                tune_model(model, sources, calibrated,
                           TuneOptions(steps=steps, lr=lr, blocks=blocks, teach=teach))
                tuned = score(choose)
                before_rerun = {k: v.clone() for k, v in model.state_dict().items()}
                head_steps(model, sources, calibrated)
                refit = score(choose)
                row = {"tuned": tuned, "tuned+head steps": refit}
                # test only for a new best, of whichever of the two won on `choose`
                variant, scores = max(row.items(), key=lambda kv: sum(kv[1].values()))
                mean = sum(scores.values()) / len(scores)
                if mean > best:
                    best = mean
                    if variant == "tuned":
                        model.load_state_dict(before_rerun)
                    row[f"{variant} test"] = score("test")
                means = {k: round(sum(v.values()) / len(v), 4) for k, v in row.items()}
                print(f"blocks {blocks} steps {steps} lr {lr} teach {teach}, on {choose} "
                      f"({time.perf_counter() - started:.0f}s): {json.dumps(means)} "
                      f"{json.dumps(row)}", flush=True)


if __name__ == "__main__":
    main()
