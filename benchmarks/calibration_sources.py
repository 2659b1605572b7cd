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
experts on the validation texts: on all four tasks' validation texts pooled (traffic, as a user
would run `hm3 check`) and on each task's own. The agreement is compared with the labelled
macro-F1 loss (validation) over all merges and tasks: Pearson and Spearman correlation, and a
plot (benchmarks/results/check_agreement_vs_f1.png). Nothing here is chosen on test.

  .venv/bin/python benchmarks/calibration_sources.py               # every row (~1 h on 2 cores)
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
from scipy.stats import pearsonr, spearmanr

from hm3.check import compare_task
from hm3.checkpoint import load_tokenizer, write_json_atomic
from hm3.evaluate import score_task
from hm3.guided.pipeline import guided_model
from hm3.merge import build_model, merge_into, open_sources
from hm3.model import MultiTaskClassifier, group_probabilities, load
from hm3.recipe import parse_recipe
from hm3.zoo import build_zoo, read_split
from hm3.zoo.build import zoo_dir

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "calibration_sources.json"
PLOT = HERE / "results" / "check_agreement_vs_f1.png"
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
    """name -> (recipe fields, calibration source or None), in the order they run (most
    wanted first, results are saved after each): the demo's steps with the three sources the
    question names, two plain merges, then the rest."""
    first = ("per-task", "shared 1024", "off-task")
    rows = {f"demo steps, {source}": (DEMO, source) for source in first}
    rows.update({f"plain {name}": (PLAIN[name], None) for name in ("ties 0.2", "linear")})
    rows["demo steps, shared 256"] = (DEMO, "shared 256")
    rows.update({f"plain {name}": (fields, None) for name, fields in PLAIN.items()
                 if f"plain {name}" not in rows})
    rows.update({f"head steps, {source}": (HEADS_ONLY, source) for source in SOURCES})
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
        self.pooled = [text for t in self.tasks for text, _ in self.data["validation"][t]]
        self.experts, self.expert_scores = {}, {"validation": {}, "test": {}}
        for task, path in zoo.experts.items():
            model = load(path, task=task, device="cpu", max_length=MAX_LENGTH)
            group = model.groups[0]
            pooled = model.logits(self.pooled)
            test = model.logits([t for t, _ in self.data["test"][task]])
            self.experts[task] = {"group": group, "pooled": pooled}
            for split, logits in (("validation", self._own(task, pooled)), ("test", test)):
                labels = [lab for _, lab in self.data[split][task]]
                probs = group_probabilities(logits, [group])[task]
                self.expert_scores[split][task] = score_task(group, labels, probs)["macro_f1"]

    def _own(self, task: str, pooled: np.ndarray) -> np.ndarray:
        start = sum(len(self.data["validation"][t]) for t in self.tasks[:self.tasks.index(task)])
        return pooled[start:start + len(self.data["validation"][task])]

    def score(self, classifier: MultiTaskClassifier) -> dict:
        """Labelled macro-F1 per task (validation, test) and the label-free check figures
        against each expert on the pooled and on the task's own validation texts."""
        pooled = classifier.logits(self.pooled)
        out = {"validation": {}, "test": {}, "check_pooled": {}, "check_own": {}}
        for group in classifier.groups:
            task = group.name
            test_logits = classifier.logits([t for t, _ in self.data["test"][task]])
            for split, logits in (("validation", self._own(task, pooled)),
                                  ("test", test_logits)):
                labels = [lab for _, lab in self.data[split][task]]
                probs = group_probabilities(logits, [group])[task]
                out[split][task] = score_task(group, labels, probs)["macro_f1"]
            expert = self.experts[task]
            mine = group_probabilities(pooled, [group])[task]
            theirs = group_probabilities(expert["pooled"], [expert["group"]])[task]
            out["check_pooled"][task] = _figures(compare_task(group, theirs, mine))
            own = compare_task(group, self._own(task, theirs), self._own(task, mine))
            out["check_own"][task] = _figures(own)
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
        if recipe.guided.needs_model:
            held = {t: [x for s in ("validation", "test") for x, _ in splits.data[s][t]]
                    for t in splits.tasks}
            model, sources, report = guided_model(sources, progress=False, held_out=held)
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
    return row


# --- report --------------------------------------------------------------------------------------

def points(document: dict, which: str) -> list[tuple[str, str, float, float]]:
    """(row, task, agreement, validation macro-F1 minus the expert's) for every merge and task."""
    experts = document["experts"]["validation"]
    return [(row["name"], task, row[which][task]["agreement"],
             row["validation"][task] - experts[task])
            for row in document["rows"] for task in row["validation"]]


def correlations(document: dict) -> dict:
    out = {}
    for which in ("check_pooled", "check_own"):
        data = points(document, which)
        if len(data) < 3:
            continue
        agreement = np.array([p[2] for p in data])
        delta = np.array([p[3] for p in data])
        out[which] = {"points": len(data),
                      "pearson": float(pearsonr(agreement, delta)[0]),
                      "spearman": float(spearmanr(agreement, delta)[0])}
    return out


def plot(document: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    tasks = list(document["experts"]["validation"])
    markers = dict(zip(tasks, "osD^v"))
    for ax, which, title in ((axes[0], "check_pooled", "check on all tasks' validation texts"),
                             (axes[1], "check_own", "check on the task's own validation texts")):
        for name, task, agreement, delta in points(document, which):
            kind = ("label-free" if not name.startswith("plain") else "plain")
            ax.scatter(agreement, delta, marker=markers[task],
                       c="tab:blue" if kind == "label-free" else "tab:red", alpha=0.7,
                       label=f"{task} ({kind})")
        stats = document.get("correlations", {}).get(which)
        if stats:
            title += f"\nPearson {stats['pearson']:.2f}, Spearman {stats['spearman']:.2f}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("argmax agreement with the expert (label-free)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation macro-F1, merged - expert")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[1].legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
    fig.suptitle("MiniLM zoo: label-free agreement vs labelled macro-F1 change, per task "
                 "and merge", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
                     *(f"{row['check_pooled'][t]['agreement']:.3f}" for t in tasks),
                     f"{row['seconds']['merge_cpu']:.0f}"])
    return "\n".join("| " + " | ".join(map(str, line)) + " |"
                     for line in [header, ["---"] * len(header), *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="rows whose name contains one of these")
    parser.add_argument("--report", action="store_true", help="only redo table and plot")
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
    print(json.dumps(document["correlations"], indent=2))


if __name__ == "__main__":
    main()
