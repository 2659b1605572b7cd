"""Which calibration texts a label-free merge needs, and whether `hm3 check` sees a bad merge.

On the offline MiniLM zoo (four experts), the demo's label-free merge (TIES 0.2 + learned
coefficients + head alignment + re-centring, 128 tokens) is run with four calibration sources:

- per-task: each task's own calibration split (256 texts each, as the demo);
- shared 1024: ONE sample pooled from all four calibration splits (1024 texts, shuffled), fed to
  every task: the same total size as per-task;
- shared 256: the first 256 texts of that pool, fed to every task: the same size per task;
- off-task: each task gets another task's calibration split (spam <- sentiment <- topic <-
  question <- spam).

Every merge, and a few plain merges (TIES at several densities, linear), is scored on each task's
validation and test split (labelled macro-F1), and checked label-free with `hm3.check` against the
experts on each task's validation texts (labels unused). The agreement is compared with the
labelled macro-F1 change (validation) over all merges and tasks: Pearson and Spearman
correlation, and a plot (benchmarks/results/check_agreement_vs_f1.png). Nothing here is chosen
on test. The label-free steps are run twice: the demo's (with learned coefficients) and the
head steps alone (align_heads + recentre, minutes cheaper).

  .venv/bin/python benchmarks/calibration_sources.py               # every missing row
  .venv/bin/python benchmarks/calibration_sources.py --only shared  # rows whose name matches
  .venv/bin/python benchmarks/calibration_sources.py --report       # table + plot from the JSON
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hm3.check import compare_task
from hm3.checkpoint import load_tokenizer, write_json_atomic
from hm3.engine import build_model, merge_into, open_sources
from hm3.evaluate import score_task
from hm3.model import MultiTaskClassifier, group_probabilities, load
from hm3.pipeline import label_free_model
from hm3.recipe import parse_recipe
from hm3.zoo import build_zoo, read_split
from hm3.zoo.build import zoo_dir

from common import agreement_correlations, plot_agreement

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "calibration_sources.json"
PLOT = HERE / "results" / "check_agreement_vs_f1.png"
EXPERT_CACHE = Path(tempfile.gettempdir()) / "hm3-calibration-sources-experts.json"
MAX_LENGTH = 128  # as `hm3 demo`
LIMIT = 256       # calibration texts per task, as `hm3 demo`
DEMO = {"method": "ties", "parameters": {"density": 0.2}, "heads": "whole",
        "coefficients": {"steps": 40}, "align_heads": {"ridge": 0.1}, "recentre": True}
HEADS_ONLY = {"method": "ties", "parameters": {"density": 0.2}, "heads": "whole",
              "align_heads": {"ridge": 0.1}, "recentre": True}
SOURCES = ("per-task", "shared 1024", "shared 256", "off-task")
PLAIN = {"ties 0.1": {"method": "ties", "parameters": {"density": 0.1}},
         "ties 0.2": {"method": "ties", "parameters": {"density": 0.2}},
         "ties 0.5": {"method": "ties", "parameters": {"density": 0.5}},
         "ties 1.0": {"method": "ties", "parameters": {"density": 1.0}},
         "linear": {"method": "linear"}}


def rows_to_run() -> dict[str, tuple[dict, str | None]]:
    """name -> (recipe fields, calibration source or None), in the order they run (cheapest
    answer to the question first; results are saved after each row)."""
    first = ("per-task", "shared 1024", "off-task")
    rows = {f"head steps, {source}": (HEADS_ONLY, source) for source in first}
    rows.update({f"plain {name}": (PLAIN[name], None) for name in ("ties 0.2", "linear")})
    rows.update({f"demo steps, {source}": (DEMO, source) for source in first})
    rows.update({f"plain {name}": (fields, None) for name, fields in PLAIN.items()
                 if f"plain {name}" not in rows})
    rows.update({f"{steps}, shared 256": (fields, "shared 256")
                 for steps, fields in (("head steps", HEADS_ONLY), ("demo steps", DEMO))})
    return rows


def cached_zoo():
    """The zoo, only if it is already built: a second build here would compete with it."""
    missing = [t for t in ("spam", "sentiment", "topic", "question")
               if not (zoo_dir() / "experts" / t).is_dir()]
    if missing:
        sys.exit(f"the zoo is not built yet (no expert for {', '.join(missing)} in {zoo_dir()}); "
                 "run `hm3 demo` first")
    return build_zoo(progress=False)


def calibration_block(zoo, source: str, folder: Path) -> dict:
    tasks = list(zoo.splits)
    own = {t: str(zoo.splits[t]["calibration"]) for t in tasks}
    if source == "per-task":
        return {"texts": own, "limit": LIMIT, "max_length": MAX_LENGTH}
    if source == "off-task":
        rotated = {t: own[tasks[(i + 1) % len(tasks)]] for i, t in enumerate(tasks)}
        return {"texts": rotated, "limit": LIMIT, "max_length": MAX_LENGTH}
    pool = [text for t in tasks for text, _ in read_split(zoo.splits[t]["calibration"])]
    random.Random(0).shuffle(pool)
    path = folder / "traffic.txt"
    path.write_text("\n".join(" ".join(t.split()) for t in pool) + "\n", encoding="utf-8")
    limit = len(pool) if source == "shared 1024" else LIMIT
    return {"texts": str(path), "limit": limit, "max_length": MAX_LENGTH}


class Splits:
    """Validation and test texts with labels, the experts' logits on them (computed once)."""

    def __init__(self, zoo):
        self.tasks = list(zoo.splits)
        self.data = {split: {t: read_split(zoo.splits[t][split]) for t in self.tasks}
                     for split in ("validation", "test")}
        self.experts, self.expert_scores = {}, {"validation": {}, "test": {}}
        zoo_name = Path(next(iter(zoo.experts.values()))).parent.parent.name
        cache = EXPERT_CACHE.with_name(f"{EXPERT_CACHE.stem}-{zoo_name}.json")
        if cache.is_file():  # the experts' figures do not change between runs
            saved = json.loads(cache.read_text())
            self.expert_scores = saved["scores"]
            for task, path in zoo.experts.items():
                group = load(path, task=task, device="cpu", max_length=MAX_LENGTH).groups[0]
                self.experts[task] = {"group": group,
                                      "validation": np.array(saved["validation"][task])}
            return
        for task, path in zoo.experts.items():
            model = load(path, task=task, device="cpu", max_length=MAX_LENGTH)
            group = model.groups[0]
            self.experts[task] = {"group": group}
            for split in ("validation", "test"):
                logits = model.logits(self.texts(split, task))
                labels = [lab for _, lab in self.data[split][task]]
                probs = group_probabilities(logits, [group])[task]
                self.expert_scores[split][task] = score_task(group, labels, probs)["macro_f1"]
                self.experts[task][split] = probs
        write_json_atomic(cache, {"scores": self.expert_scores, "validation": {
            t: e["validation"].tolist() for t, e in self.experts.items()}})

    def texts(self, split: str, task: str) -> list[str]:
        return [text for text, _ in self.data[split][task]]

    def score(self, classifier: MultiTaskClassifier) -> dict:
        """Labelled macro-F1 per task (validation, test), and the label-free check figures
        against each expert on the task's validation texts (as `hm3 check` computes them)."""
        out = {"validation": {}, "test": {}, "check": {}}
        for group in classifier.groups:
            task = group.name
            for split in ("validation", "test"):
                logits = classifier.logits(self.texts(split, task))
                labels = [lab for _, lab in self.data[split][task]]
                probs = group_probabilities(logits, [group])[task]
                out[split][task] = score_task(group, labels, probs)["macro_f1"]
                if split == "validation":
                    figures = compare_task(group, self.experts[task]["validation"], probs)
                    out["check"][task] = _figures(figures)
        return out


def _figures(entry: dict) -> dict:
    return {k: entry[k] for k in ("agreement", "drift", "mean_abs_dp")}


def run_row(zoo, splits: Splits, name: str, fields: dict, source: str | None) -> dict:
    raw = {"base": str(zoo.base), **fields, "seed": 0,
           "experts": [{"model": str(p), "task": t} for t, p in zoo.experts.items()]}
    with tempfile.TemporaryDirectory() as folder:
        if source is not None:
            raw["calibration"] = calibration_block(zoo, source, Path(folder))
        recipe = parse_recipe(raw)
        cpu, wall = time.process_time(), time.perf_counter()
        sources = open_sources(recipe)
        report = None
        if recipe.label_free.needs_model:
            held = {t: [x for s in ("validation", "test") for x, _ in splits.data[s][t]]
                    for t in splits.tasks}
            model, sources, report = label_free_model(sources, progress=False, held_out=held)
        else:
            model = build_model(sources)
            merge_into(model, sources, progress=False)
        seconds = {"merge_cpu": round(time.process_time() - cpu, 1),
                   "merge_wall": round(time.perf_counter() - wall, 1)}
    tokenizer = load_tokenizer([sources.base.path, sources.experts[0].path], "no tokenizer")
    scores = splits.score(MultiTaskClassifier(model.eval(), tokenizer, sources.groups,
                                              MAX_LENGTH))
    row = {"name": name, "calibration": source, "recipe": recipe.to_dict(), **scores,
           "mean": {s: float(np.mean(list(scores[s].values()))) for s in ("validation", "test")},
           "seconds": seconds}
    if report is not None:
        row["calibration_used"] = report["calibration"]
        row["fidelity_on_calibration"] = report["fidelity"]["tasks"]
        if "held_out" in report["fidelity"]:  # the head steps cross-fitted (5 folds)
            row["fidelity_held_out"] = report["fidelity"]["held_out"]["tasks"]
    return row


def fidelity_table(document: dict) -> str:
    """Per row with head steps and task: the merge's recorded agreement with the expert on its
    calibration texts (as fitted, and cross-fitted) beside `hm3 check`'s on validation texts."""
    lines = ["| merge | task | on calibration, as fitted | held out (5-fold) "
             "| validation (hm3 check) |",
             "| --- | --- | --- | --- | --- |"]
    for row in document["rows"]:
        for task, held in row.get("fidelity_held_out", {}).items():
            lines.append(f"| {row['name']} | {task} | "
                         f"{row['fidelity_on_calibration'][task]['agreement']:.1%} | "
                         f"{held['agreement']:.1%} | {row['check'][task]['agreement']:.1%} |")
    return "\n".join(lines)


# --- report --------------------------------------------------------------------------------------

def points(document: dict) -> list[tuple[str, str, float, float]]:
    """(row, task, agreement, validation macro-F1 minus the expert's) for every merge and task."""
    experts = document["experts"]["validation"]
    return [(row["name"], task, row["check"][task]["agreement"],
             row["validation"][task] - experts[task])
            for row in document["rows"] for task in row["validation"]]


def correlations(document: dict) -> dict:
    return agreement_correlations(points(document))


def plot(document: dict, path: Path) -> None:
    plot_agreement(points(document), path, "MiniLM zoo", "validation",
                   document.get("correlations") or {})


def table(document: dict) -> str:
    tasks = list(document["experts"]["validation"])
    header = ["merge", "val mean", "test mean", *(f"test {t}" for t in tasks),
              *(f"check {t}" for t in tasks), "merge CPU s"]
    body = [["experts", f"{np.mean(list(document['experts']['validation'].values())):.3f}",
             f"{np.mean(list(document['experts']['test'].values())):.3f}",
             *(f"{document['experts']['test'][t]:.3f}" for t in tasks), *([""] * len(tasks)), ""]]
    for row in document["rows"]:
        body.append([row["name"], f"{row['mean']['validation']:.3f}",
                     f"{row['mean']['test']:.3f}", *(f"{row['test'][t]:.3f}" for t in tasks),
                     *(f"{row['check'][t]['agreement']:.3f}" for t in tasks),
                     f"{row['seconds']['merge_cpu']:.0f}"])
    return "\n".join("| " + " | ".join(map(str, line)) + " |"
                     for line in [header, ["---"] * len(header), *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="rows whose name contains one of these")
    parser.add_argument("--report", action="store_true", help="only redo table and plot")
    parser.add_argument("--redo", action="store_true", help="rerun rows already in the results "
                        "(default: a rerun runs only the missing rows)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    document = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}
    if not args.report:
        zoo = cached_zoo()
        started = time.perf_counter()
        splits = Splits(zoo)
        print(f"experts scored in {time.perf_counter() - started:.0f}s", flush=True)
        rows = {row["name"]: row for row in document["rows"]}
        document.update(experts=splits.expert_scores, max_length=MAX_LENGTH,
                        machine=f"{platform.machine()}, {torch.get_num_threads()} torch "
                        f"threads, Python {platform.python_version()}")
        for name, (fields, source) in rows_to_run().items():
            if args.only and not any(word.lower() in name.lower() for word in args.only):
                continue
            if name in rows and not args.redo:
                continue
            print(f"== {name}", flush=True)
            rows[name] = run_row(zoo, splits, name, fields, source)
            print(json.dumps({"mean": rows[name]["mean"], "seconds": rows[name]["seconds"]}),
                  flush=True)
            document["rows"] = list(rows.values())
            document["correlations"] = correlations(document)
            write_json_atomic(RESULTS, document)
    document["correlations"] = correlations(document)
    write_json_atomic(RESULTS, document)
    plot(document, PLOT)
    print(table(document))
    print(fidelity_table(document))
    print(json.dumps(document.get("correlations"), indent=2))


if __name__ == "__main__":
    main()
