"""How much of the base-size gap is in the last blocks: each task scored with the merged model's
body up to block L-k and its own expert's last k blocks and head on top (the expert's weights as
they are, fed the merged stream). k = 0 is the merged body under the expert's own head.

  .venv/bin/python benchmarks/task_tails.py [--zoo mpnet|minilm] [--tails 1 2] [--distill]
Prints validation (and, for a new best validation mean, test) macro-F1 per task.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from hm3.checkpoint import load_tokenizer
from hm3.demo import demo_recipe, held_out_texts
from hm3.engine import build_model, merge_into, open_sources
from hm3.evaluate import evaluate
from hm3.label_free.calibration import expert_classifier
from hm3.label_free.distill import DistillOptions, distill_body
from hm3.model import MultiTaskClassifier
from hm3.pipeline import calibrate
from hm3.recipe import parse_recipe
from hm3.zoo import build_mpnet_zoo, build_zoo

from common import datasets
from mpnet_zoo import HEAD_STEPS, recipe

BLOCK = re.compile(r"\.layer\.(\d+)\.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=("mpnet", "minilm"), default="mpnet")
    parser.add_argument("--tails", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--distill", action="store_true", help="distil the body first")
    parser.add_argument("--best", type=float, default=0.0,
                        help="the best validation mean so far (test is scored above it)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hm3-tails-"))
    if args.zoo == "mpnet":
        zoo = build_mpnet_zoo(progress=True)
        raw = recipe(zoo, list(zoo.experts), HEAD_STEPS, "per-task+unseen", work)
    else:
        zoo = build_zoo(progress=True)
        raw = {**demo_recipe(zoo), "coefficients": None}
    sources = open_sources(parse_recipe(raw))
    started = time.perf_counter()
    model = build_model(sources)
    merge_into(model, sources, progress=True)
    if args.distill:
        calibrated = calibrate(sources, held_out_texts(zoo), progress=True)
        distill_body(model, sources, calibrated, DistillOptions(train="weights", lr=0.02),
                     progress=True)
    print(f"body ready in {time.perf_counter() - started:.0f}s", flush=True)
    merged = model.state_dict()
    layers = 1 + max(int(m.group(1)) for k in merged if (m := BLOCK.search(k)))
    splits = {s: {d.task: d for d in datasets(zoo, s)} for s in ("validation", "test")}
    tokenizer = load_tokenizer([c.path for c in sources.experts], "no tokenizer")
    max_length = raw["calibration"]["max_length"]
    best = args.best
    for k in args.tails:
        scores = {"validation": hybrid_scores(k, sources, merged, layers, splits["validation"],
                                              tokenizer, max_length)}
        mean = sum(scores["validation"].values()) / len(scores["validation"])
        if mean > best:  # test only for a new best on validation
            best = mean
            scores["test"] = hybrid_scores(k, sources, merged, layers, splits["test"],
                                           tokenizer, max_length)
        means = {s: round(sum(v.values()) / len(v), 4) for s, v in scores.items()}
        print(f"tail {k}: {json.dumps(means)} {json.dumps(scores)}", flush=True)


def hybrid_scores(k, sources, merged, layers, split, tokenizer, max_length) -> dict:
    """Each task's macro-F1 on `split` with the merged body below its expert's last k blocks
    and head."""
    scores = {}
    for spec, checkpoint in zip(sources.recipe.experts, sources.experts):
        expert = expert_classifier(checkpoint)
        hybrid = {}
        for name, value in expert.state_dict().items():
            m = BLOCK.search(name)
            own = (m is not None and int(m.group(1)) >= layers - k) or "classifier" in name \
                or "pooler" in name or name not in merged or merged[name].shape != value.shape
            hybrid[name] = value if own else merged[name]
        expert.load_state_dict(hybrid)
        group = [type(g)(g.name, g.labels, 0, g.multi_label, g.threshold)
                 for g in sources.groups if g.name == spec.task]
        clf = MultiTaskClassifier(expert, tokenizer, group, max_length)
        report = evaluate(clf, [split[spec.task]])
        scores[spec.task] = round(report["tasks"][spec.task]["macro_f1"], 4)
    return scores


if __name__ == "__main__":
    main()
