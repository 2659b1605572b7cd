"""The base-size zoo (eight MPNet experts, one of them multi-label) merged by `hm3 merge` as a user
would run it: macro-F1 per task on validation and test, wall time and peak RSS of every merge.

Stages, in the order they run (each writes its figures to benchmarks/results/mpnet_zoo.json as
soon as it is done):
- `plain`: the plain streaming TIES 0.2 merge of all eight experts (scored on test only).
- `heads-only`: the demo's label-free steps without learned coefficients (heads whole,
  align_heads, recentre), per-task calibration on each task's calibration split.
- `streaming`: the plain merge of the first 2, 4 and 8 experts (not scored), for peak memory
  against N.
- `label-free`: the demo's label-free steps (src/hm3/demo.py: TIES 0.2, heads whole, learned
  coefficients, align_heads, recentre), per-task calibration.
- `sweep`: other body merges (TIES 0.1 and 0.05, TIES 0.1 with signs elected by count, LEWIS
  layer-wise densities, RegMean, task arithmetic, linear, Iso-C) under the same head steps, and
  the head-alignment ridge chosen by cross-validation (`ridge: auto`);
  per-task calibration; rows already in the results are skipped.
Of the label-free configurations, the one with the best VALIDATION mean is reported as picked;
test figures never choose anything. Experts' scores are those the zoo recorded when it was built
(same splits, same 32-token limit). Merges run in a child process under /usr/bin/time -v, which
gives their peak RSS. Every label-free row also records, per task, its test macro-F1 change
against the expert with a 95% paired bootstrap interval, and `hm3 check`'s agreement with the
expert on those test texts (no labels); `--report` plots the one against the other, and
tabulates the agreement the merge recorded on its calibration texts (as fitted, and held out
from the head steps over 5 folds) against that test agreement.

  .venv/bin/python benchmarks/mpnet_zoo.py       # all stages (about an hour on 2 busy cores)
  .venv/bin/python benchmarks/mpnet_zoo.py --only plain streaming
  .venv/bin/python benchmarks/mpnet_zoo.py --only heads-only --calibration off-task  # wrong texts
  .venv/bin/python benchmarks/mpnet_zoo.py --only heads-only --calibration per-task+unseen
  .venv/bin/python benchmarks/mpnet_zoo.py --intervals "ROW=FOLDER"  # a kept merged model's
                                                                     # intervals
  .venv/bin/python benchmarks/mpnet_zoo.py --report       # the table, and the check-vs-F1 plot
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.metrics import f1_score

from hm3.check import compare_task
from hm3.checkpoint import Checkpoint, write_json_atomic
from hm3.data.calibration import text_key
from hm3.evaluate import evaluate, label_indices, predictions
from hm3.label_free.registry import saved_report
from hm3.model import load
from hm3.recipe import PRESETS
from hm3.zoo import build_mpnet_zoo, load_examples, read_split
from hm3.zoo.mpnet import MPNET_RECIPES, MPNET_TRAINING, MPNET_ZOO

from common import agreement_correlations, datasets, dev_datasets, plot_agreement

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "mpnet_zoo.json"
PLOT = HERE / "results" / "check_agreement_vs_f1_mpnet.png"
MAX_LENGTH = MPNET_TRAINING.max_length  # what the experts were trained and scored on
CALIBRATION_LIMIT = 128  # the zoo's whole calibration split per task
UNSEEN_LIMIT = 512  # source texts outside every split, per task (`per-task+unseen`)
DEFAULT_METHOD, DEFAULT_PARAMETERS = "ties", {"density": 0.2}
HEAD_STEPS = {"heads": "whole", "align_heads": {"ridge": 0.1}, "recentre": True}
# the demo's steps until 2026-12-04: learned coefficients before the head steps
LABEL_FREE = {**HEAD_STEPS, "coefficients": {"steps": 40}}
PRESET = PRESETS["label-free"]
PRESET_STEPS = {k: v for k, v in PRESET.items() if k not in ("method", "parameters")}
# name -> (method, parameters, label-free steps); every one uses per-task calibration unless
# --calibration says otherwise
LABEL_FREE_CONFIGS = {
    "label-free": (DEFAULT_METHOD, DEFAULT_PARAMETERS, LABEL_FREE),
    "heads-only": (DEFAULT_METHOD, DEFAULT_PARAMETERS, HEAD_STEPS),
    # the recommended recipe (`preset: label-free`) as its expansion
    "preset label-free": (PRESET["method"], PRESET["parameters"], PRESET_STEPS),
    # the preset with distill spelled out (the row measured before distill joined the preset;
    # since then it is the same merge as "preset label-free")
    "preset label-free + distill": (PRESET["method"], PRESET["parameters"],
                                    {**PRESET_STEPS, "distill": {}}),
    # the preset's steps on a TSV-Merge body, each head fitted on its own texts alone (the
    # preset from 2026-12-07 until `others` joined it; spelled out so that the rows above keep
    # the TIES-bodied preset they measured)
    "tsv + distill + head steps": ("tsv", {"lambda": 1.0},
                                   {**PRESET_STEPS, "align_heads": {"ridge": 0.1}}),
    # each head also fitted on 64 texts of every other task (the preset since 2026-12-07)
    "tsv + distill + head steps, others 1": ("tsv", {"lambda": 1.0},
                                             {**PRESET_STEPS, "align_heads": {
                                                 "ridge": 0.1, "others": 1.0,
                                                 "other_texts": 64}}),
    # the sweep: other body merges under the same head steps
    "ties 0.1 + head steps": ("ties", {"density": 0.1}, HEAD_STEPS),
    "regmean + head steps": (DEFAULT_METHOD, DEFAULT_PARAMETERS, {**HEAD_STEPS, "regmean": {}}),
    "task arithmetic 0.3 + head steps": ("task_arithmetic", {"lambda": 0.3}, HEAD_STEPS),
    "linear + head steps": ("linear", {}, HEAD_STEPS),
    "ties 0.2 + head steps, ridge auto": (DEFAULT_METHOD, DEFAULT_PARAMETERS,
                                          {**HEAD_STEPS, "align_heads": {"ridge": "auto"}}),
    "regmean + head steps, ridge auto": (DEFAULT_METHOD, DEFAULT_PARAMETERS,
                                         {**HEAD_STEPS, "regmean": {},
                                          "align_heads": {"ridge": "auto"}}),
    "iso_c 1.5 + head steps": ("iso_c", {"lambda": 1.5}, HEAD_STEPS),
    "ties 0.05 + head steps": ("ties", {"density": 0.05}, HEAD_STEPS),
    # signs elected by vote count, not summed magnitude: the hard-trained expert's large task
    # vector no longer outvotes the others
    "ties 0.1, signs by count + head steps": ("ties", {"density": 0.1, "consensus": "count"},
                                              HEAD_STEPS),
    # LEWIS layer-wise densities around the best single density (0.1)
    "lewis 0.05-0.2 + head steps": ("ties", {"density": 0.1},
                                    {**HEAD_STEPS, "lewis": {"gamma": 0.05, "epsilon": 0.2}}),
    "ties 0.2 + head steps, equal-norm weights": (DEFAULT_METHOD, DEFAULT_PARAMETERS, HEAD_STEPS),
}
# configurations whose experts are weighted by median |tau| / |tau_i| (each expert's task vector
# counts with the same norm; the norms are what `hm3 merge` records, no labels)
EQUAL_NORM = {"ties 0.2 + head steps, equal-norm weights"}
SWEEP = [name for name in LABEL_FREE_CONFIGS if name not in ("label-free", "heads-only")]
# cheapest first: the learned coefficients of `label-free` take the longest
STAGES = ("plain", "heads-only", "streaming", "label-free", "sweep")


def recipe(zoo, tasks, extra: dict, calibration: str = "per-task", work: Path | None = None,
           method: str = DEFAULT_METHOD, parameters: dict | None = None,
           weights: dict | None = None) -> dict:
    """The merge's recipe. Calibration texts for the label-free steps: each task's own split
    (`per-task`), the next task's split (`off-task`: the wrong texts), or every task's splits
    pooled into one file fed to every task (`shared`: one traffic sample of the same total size;
    needs the recipe's `calibration: {texts: FILE}` form). Larger samples from the same
    distributions, the experts' own training texts used without their labels: each task's
    calibration split plus its training texts (`per-task+train`, 448-768 per task), all of
    those pooled and fed to every task (`shared+train`), and, as the
    control for having seen them, 128 training texts per task (`train-128`). Larger samples no
    expert has seen: each task's calibration split plus up to 512 of its source's texts outside
    every split (`per-task+unseen`, 171-640 per task: the guard sources are small), and all of
    those pooled (`shared+unseen`)."""
    raw = {"base": str(zoo.base), "method": method,
           "parameters": DEFAULT_PARAMETERS if parameters is None else parameters,
           "seed": 0, "experts": [{"model": str(zoo.experts[t]), "task": t,
                                   **({"weight": weights[t]} if weights else {})} for t in tasks],
           **extra}
    if not extra:
        return raw
    files = [str(zoo.splits[t]["calibration"]) for t in tasks]
    if calibration == "per-task":
        texts, limit = dict(zip(tasks, files)), CALIBRATION_LIMIT
    elif calibration == "off-task":
        texts, limit = dict(zip(tasks, files[1:] + files[:1])), CALIBRATION_LIMIT
    elif calibration in ("per-task+train", "train-128", "per-task+unseen"):
        texts, sizes = {}, []
        for t in tasks:
            own = [text for text, _ in read_split(zoo.splits[t]["calibration"])]
            if calibration == "per-task+unseen":
                chosen = own + unseen_texts(zoo, t)
            else:
                train = [text for text, _ in read_split(zoo.splits[t]["train"])]
                chosen = train[:CALIBRATION_LIMIT] if calibration == "train-128" else own + train
            texts[t] = str(write_texts(work / f"calibration-{calibration}-{t}.txt", chosen))
            sizes.append(len(chosen))
        limit = max(sizes)
    else:
        splits = ("calibration", "train") if calibration == "shared+train" else ("calibration",)
        pooled = [text for t in tasks for split in splits
                  for text, _ in read_split(zoo.splits[t][split])]
        if calibration == "shared+unseen":
            pooled += [text for t in tasks for text in unseen_texts(zoo, t)]
        random.Random(0).shuffle(pooled)
        texts, limit = str(write_texts(work / "traffic.txt", pooled)), len(pooled)
    raw["calibration"] = {"texts": texts, "limit": limit, "max_length": MAX_LENGTH}
    return raw


def unseen_texts(zoo, task: str, limit: int = UNSEEN_LIMIT) -> list[str]:
    """Up to `limit` of the task's source texts that are in none of its zoo splits: the zoo caps
    each expert's training set, so what its source holds beyond the splits was never seen by
    the expert, nor is it scored -- unlabelled in-domain texts, as a user's traffic is. A fixed
    random sample (seed 0)."""
    used = {text_key(text) for split in zoo.splits[task].values() for text, _ in read_split(split)}
    pool = sorted({text for text, _ in MPNET_ZOO.examples(task) if text_key(text) not in used})
    return random.Random(0).sample(pool, min(limit, len(pool)))


def zoo_dev(zoo, name: str) -> list:
    """The larger validation set (`common.dev_datasets`) of the zoo `name` ("mpnet" or
    "minilm"): source texts in none of its splits; the MPNet zoo's also in none of
    `unseen_texts`, which its unseen calibration modes read."""
    if name == "mpnet":
        return dev_datasets(zoo, MPNET_ZOO.examples, lambda task: unseen_texts(zoo, task))
    return dev_datasets(zoo, load_examples)


def write_texts(path: Path, texts: list[str]) -> Path:
    """One text per line (inner whitespace and newlines made single spaces): a calibration file."""
    path.write_text("\n".join(" ".join(text.split()) for text in texts) + "\n")
    return path


def equal_norm_weights(rows: dict) -> dict[str, float]:
    """Per expert, median |tau| / |tau_i|, from the norms an earlier merge recorded (the same
    in every merge: they are the checkpoints')."""
    norms = next(row["recorded"]["task_vector_norms"] for row in rows.values()
                 if row.get("recorded", {}).get("task_vector_norms"))
    ordered = sorted(norms.values())
    middle = (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2
    return {task: round(middle / norm, 4) for task, norm in norms.items()}


def largest_tensor_gb(zoo) -> float:
    """The base's largest tensor in GiB as float32 (what the merge holds per expert)."""
    base = Checkpoint(str(zoo.base))
    return max(torch.Size(base.shape(name)).numel() for name in base.keys()) * 4 / 2**30


def timed_merge(raw: dict, output: Path) -> dict:
    """`hm3 merge` in a child process: its wall and CPU time and peak RSS (from /usr/bin/time -v),
    and the peaks of its anonymous and file-backed resident memory, sampled every 0.1 s (tensors
    are read with file reads, so file-backed memory is the libraries' code; until 2026-11-29
    they were read through memory maps, whose pages counted in RSS as file-backed)."""
    recipe_file = output.with_suffix(".yaml")
    recipe_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "hm3.cli", "merge", str(recipe_file),
               "-o", str(output), "--overwrite", "--no-progress"]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        peaks = {"RssAnon": 0, "RssFile": 0}
        while child.poll() is None:
            for pid in _children(child.pid):
                for key, kb in _memory(pid).items():
                    peaks[key] = max(peaks[key], kb)
            time.sleep(0.1)
        wall = time.perf_counter() - started
        stderr.seek(0)
        log = stderr.read()
    if child.returncode != 0:
        raise RuntimeError(f"merge failed ({child.returncode}):\n{log[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", log).group(1))
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", log).group(1))
              for kind in ("User", "System"))
    return {"wall_minutes": round(wall / 60, 2), "cpu_minutes": round(cpu / 60, 2),
            "peak_rss_gb": round(peak_kb / 2**20, 3),
            "peak_rss_anon_gb": round(peaks["RssAnon"] / 2**20, 3),
            "peak_rss_file_gb": round(peaks["RssFile"] / 2**20, 3)}


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _memory(pid: int) -> dict[str, int]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {key: int(rest.split()[0]) for key, _, rest in (line.partition(":") for line in lines)
            if key in ("RssAnon", "RssFile")}


def scores_of(folder: Path, zoo, splits=("validation", "test")) -> dict:
    model = load(folder, device="cpu", max_length=MAX_LENGTH)
    out = {}
    for split in splits:
        report = evaluate(model, datasets(zoo, split), batch_size=32)
        out[split] = {t: round(s["macro_f1"], 4) for t, s in report["tasks"].items()}
    return out


def task_gap_intervals(folder: Path, zoo, resamples: int = 2000) -> dict:
    """Per task, the merged model's test macro-F1 minus its expert's and a 95% paired bootstrap
    interval of that difference (the test texts resampled with replacement, both models scored
    on the same resample): with 187-200 texts per task a few points either way is within
    sampling noise, which a goal of "no task more than 3 points under" has to be read against.
    Beside it, `hm3 check`'s agreement with the expert on the same texts."""
    merged = load(folder, device="cpu", max_length=MAX_LENGTH)
    groups = {group.name: group for group in merged.groups}
    rng = np.random.default_rng(0)
    out = {}
    for data in datasets(zoo, "test"):
        group = groups[data.task]
        expert = load(zoo.experts[data.task], task=data.task, device="cpu", max_length=MAX_LENGTH)
        truth = label_indices(group, data.labels)
        p_merged = merged.predict_proba(data.texts, batch_size=32)[data.task]
        p_expert = expert.predict_proba(data.texts, batch_size=32)[data.task]
        ours, theirs = predictions(group, p_merged), predictions(group, p_expert)
        labels = list(range(len(group.labels)))
        draws = [f1_gap(truth, ours, theirs, labels, rng.integers(0, len(truth), len(truth)))
                 for _ in range(resamples)]
        out[data.task] = {"gap": round(f1_gap(truth, ours, theirs, labels,
                                              np.arange(len(truth))), 4),
                          "low": round(float(np.percentile(draws, 2.5)), 4),
                          "high": round(float(np.percentile(draws, 97.5)), 4),
                          # as `hm3 check` reports it, on the same test texts (no labels)
                          "check_agreement": round(compare_task(group, p_expert,
                                                                p_merged)["agreement"], 4)}
    return out


def f1_gap(truth, ours, theirs, labels, rows) -> float:
    """Macro-F1 of `ours` minus that of `theirs` on the given rows."""
    def f1(predicted):
        return f1_score(truth[rows], predicted[rows], labels=labels, average="macro",
                        zero_division=0)
    return float(f1(ours) - f1(theirs))


def check_points(rows: dict) -> list[tuple[str, str, float, float]]:
    """(row, task, `hm3 check` agreement, test macro-F1 change) of every row with intervals."""
    return [(name, task, entry["check_agreement"], entry["gap"])
            for name, row in rows.items() for task, entry in row.get("test_gap_95", {}).items()
            if "check_agreement" in entry]


def with_means(row: dict) -> dict:
    row["mean"] = {split: round(sum(v.values()) / len(v), 4) for split, v in row["scores"].items()}
    return row


def merge_summary(folder: Path) -> dict:
    """What the merge recorded: each expert's relative task-vector norm and, for label-free
    steps, their seconds and the coefficients' objective."""
    block = json.loads((folder / "config.json").read_text())["hm3"]
    label_free = saved_report(block) or {}
    summary = {"task_vector_norms": {t: round(v, 5)
                                     for t, v in block.get("task_vector_norms", {}).items()},
               **{k: label_free[k] for k in ("seconds", "cpu_seconds") if k in label_free}}
    if "coefficients" in label_free:
        summary["coefficients_objective"] = [label_free["coefficients"].get("objective_before"),
                                             label_free["coefficients"].get("objective_after")]
    fidelity = label_free.get("fidelity")
    if fidelity:  # agreement with each expert on the calibration texts: as fitted, held out
        summary["calibration_agreement"] = {t: e["agreement"] for t, e in fidelity["tasks"].items()}
        if "held_out" in fidelity:
            summary["held_out_agreement"] = {t: e["agreement"]
                                             for t, e in fidelity["held_out"]["tasks"].items()}
    return summary


def fidelity_table(rows: dict) -> str:
    """Per row and task, the agreement with the expert the merge recorded on its calibration
    texts (as fitted, and with the head steps cross-fitted) beside `hm3 check`'s on the test
    texts, and the mean absolute error of each against the test figure."""
    lines = ["| merge | task | on calibration, as fitted | held out (5-fold) | test (hm3 check) |",
             "| --- | --- | --- | --- | --- |"]
    errors: dict[str, list[float]] = {"fitted": [], "held_out": []}
    for row in rows.values():
        recorded, test = row.get("recorded", {}), row.get("test_gap_95", {})
        if "held_out_agreement" not in recorded or not test:
            continue
        for task, held in recorded["held_out_agreement"].items():
            fitted, truth = recorded["calibration_agreement"][task], test[task]["check_agreement"]
            errors["fitted"].append(abs(fitted - truth))
            errors["held_out"].append(abs(held - truth))
            lines.append(f"| {row['name']} | {task} | {fitted:.1%} | {held:.1%} | {truth:.1%} |")
    if errors["fitted"]:
        lines.append("mean |figure - test|: as fitted "
                     f"{statistics.mean(errors['fitted']):.1%}, held out "
                     f"{statistics.mean(errors['held_out']):.1%} "
                     f"over {len(errors['fitted'])} tasks")
    return "\n".join(lines)


def goals(rows: dict) -> dict:
    """Issue goals on test: the picked label-free merge within 1 point of the experts' mean, and
    no task more than 3 points under its expert."""
    experts = rows["experts"]["scores"]["test"]
    picked = [n for n in LABEL_FREE_CONFIGS if n in rows]  # per-task calibration only
    if not picked:
        return {}
    best = max(picked, key=lambda n: rows[n]["mean"]["validation"])
    test = rows[best]["scores"]["test"]
    gaps = {t: round(test[t] - experts[t], 4) for t in experts}
    mean_gap = round(rows[best]["mean"]["test"] - rows["experts"]["mean"]["test"], 4)
    return {"picked_on_validation": best, "mean_gap_test": mean_gap, "task_gaps_test": gaps,
            "within_1_point": mean_gap >= -0.01,
            "no_task_3_points_under": min(gaps.values()) >= -0.03}


def table(rows: dict) -> str:
    """The rows as a markdown table: means, test macro-F1 per task, merge wall time and peak RSS."""
    tasks = list(rows["experts"]["scores"]["test"])
    header = ["merge", "val mean", "test mean", *tasks, "wall min", "peak RSS GiB"]
    lines = [header, ["---"] * len(header)]
    for row in rows.values():
        scores, mean, cost = row["scores"], row["mean"], row.get("merge", {})
        lines.append([row["name"], f"{mean['validation']:.3f}" if "validation" in mean else "-",
                      f"{mean['test']:.3f}", *(f"{scores['test'][t]:.3f}" for t in tasks),
                      str(cost.get("wall_minutes", "-")), str(cost.get("peak_rss_gb", "-"))])
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages")
    parser.add_argument("--work", type=Path,
                        help="folder for the merged models (default: a temporary one)")
    parser.add_argument("--calibration", default="per-task",
                        choices=("per-task", "off-task", "shared", "per-task+train", "train-128",
                                 "shared+train", "per-task+unseen", "shared+unseen"),
                        help="which unlabelled texts the label-free stages use (rows of other than "
                             "per-task texts are named with it and never picked)")
    parser.add_argument("--configs", nargs="+", choices=SWEEP,
                        help="the sweep's configurations to run "
                             "(default: those not in the results yet)")
    parser.add_argument("--redo", action="store_true",
                        help="rerun sweep rows already in the results")
    parser.add_argument("--report", action="store_true",
                        help="print the results as a table and stop")
    parser.add_argument("--intervals", nargs="+", metavar="ROW=FOLDER",
                        help="add the test-gap intervals of merged models kept from earlier runs "
                             "to their rows, and stop")
    args = parser.parse_args()
    if args.report:
        rows = {row["name"]: row for row in json.loads(RESULTS.read_text())["rows"]}
        print(table(rows))
        print(fidelity_table(rows))
        points = check_points(rows)
        stats = agreement_correlations(points)
        if stats:
            plot_agreement(points, PLOT, "MPNet zoo", "test", stats)
            print(f"hm3 check agreement vs test macro-F1 change: {stats}; plot {PLOT}")
        return
    if args.intervals:
        zoo = build_mpnet_zoo(progress=False)
        for item in args.intervals:
            name, _, folder = item.partition("=")
            found = json.loads(RESULTS.read_text())
            rows = {row["name"]: row for row in found["rows"]}
            if name not in rows or not Path(folder, "config.json").is_file():
                raise SystemExit(f"--intervals: no row {name!r} or no model in {folder!r}")
            rows[name]["test_gap_95"] = task_gap_intervals(Path(folder), zoo)
            print(name, json.dumps(rows[name]["test_gap_95"]), flush=True)
            write_json_atomic(RESULTS, {**found, "rows": list(rows.values())})
        return
    stages = args.only or STAGES
    zoo = build_mpnet_zoo(progress=True)
    tasks = list(zoo.experts)
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    rows = {row["name"]: row for row in previous.get("rows", [])}
    streaming = previous.get("streaming", {})
    rows["experts"] = with_means({
        "name": "experts",
        "scores": {split: {t: round(zoo.scores[t][split]["macro_f1"], 4) for t in tasks}
                   for split in ("validation", "test")},
        "recipes": {t: {"train": MPNET_RECIPES[t].max_train, "epochs": MPNET_RECIPES[t].epochs,
                        "learning_rate": MPNET_RECIPES[t].learning_rate,
                        "train_seconds": zoo.scores[t]["train_seconds"]} for t in tasks}})

    ran: set[str] = set()

    def save() -> None:
        # another run of this script may have saved rows meanwhile: keep them, ours win
        if RESULTS.is_file():
            for row in json.loads(RESULTS.read_text()).get("rows", []):
                if row["name"] not in ran:
                    rows[row["name"]] = row
        write_json_atomic(RESULTS, {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), torch "
                       f"{torch.__version__}, {torch.get_num_threads()} threads",
            "max_length": MAX_LENGTH, "calibration_per_task": CALIBRATION_LIMIT,
            "plain": {"method": DEFAULT_METHOD, "parameters": DEFAULT_PARAMETERS},
            "rows": list(rows.values()), "streaming": streaming, "goals": goals(rows)})

    work = args.work or Path(tempfile.mkdtemp(prefix="hm3-mpnet-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        print(f"== {stage}", flush=True)
        if stage == "streaming":
            # three rounds of N = 2, 4, 8 (peaks vary by ~0.1 GiB run to run), medians
            runs = {n: [] for n in (2, 4, 8)}
            for _ in range(3):
                for n in runs:
                    runs[n].append(timed_merge(recipe(zoo, tasks[:n], {}), work / f"plain-{n}"))
                    print(n, runs[n][-1], flush=True)
            for n, found in runs.items():
                streaming[str(n)] = {key: statistics.median(r[key] for r in found)
                                     for key in found[0]} | {"runs": found}
            streaming["largest_tensor_gb"] = round(largest_tensor_gb(zoo), 4)
            save()
            continue
        for config in (args.configs or SWEEP) if stage == "sweep" else [stage]:
            method, parameters, extra = LABEL_FREE_CONFIGS.get(
                config, (DEFAULT_METHOD, DEFAULT_PARAMETERS, {}))
            name = (config if not extra or args.calibration == "per-task"
                    else f"{config} ({args.calibration})")
            if stage == "sweep" and name in rows and not args.redo:
                continue
            print(f"-- {name}", flush=True)
            out = work / re.sub(r"[^a-z0-9.]+", "-", name)
            weights = equal_norm_weights(rows) if config in EQUAL_NORM else None
            cost = timed_merge(recipe(zoo, tasks, extra, args.calibration, work, method, parameters,
                                      weights), out)
            print(cost, flush=True)
            rows[name] = with_means({"name": name, "method": method, "parameters": parameters,
                                     **({"weights": weights} if weights else {}),
                                     "recipe_extra": extra, "merge": cost,
                                     "calibration": args.calibration if extra else None,
                                     "recorded": merge_summary(out),
                                     # the plain merge chooses nothing: test only
                                     "scores": scores_of(out, zoo, ("test",) if stage == "plain"
                                                         else ("validation", "test"))})
            if stage != "plain":
                rows[name]["test_gap_95"] = task_gap_intervals(out, zoo)
            ran.add(name)
            print(json.dumps(rows[name]["mean"]), flush=True)
            save()
    save()
    print(json.dumps(goals(rows), indent=2))


if __name__ == "__main__":
    main()
