"""`hm3 demo`: the offline zoo's four experts merged with HM3, scored and timed against the
experts."""

from __future__ import annotations

import json
import time
from pathlib import Path

from hm3.bench import benchmark, format_bench
from hm3.checkpoint import write_json_atomic
from hm3.data import Dataset
from hm3.evaluate import evaluate
from hm3.model import load
from hm3.pipeline import merge
from hm3.recipe import PRESETS, parse_recipe
from hm3.table import format_table
from hm3.zoo import build_zoo, read_split

# The demo's merge: the recommended recipe, `preset: label-free` (picked on validation splits,
# benchmarks/RESULTS.md, "The recommended recipe").
PRESET = "label-free"
DEFAULT_METHOD = PRESETS[PRESET]["method"]
DEFAULT_PARAMETERS = PRESETS[PRESET]["parameters"]
LABEL_FREE = {k: v for k, v in PRESETS[PRESET].items() if k not in ("method", "parameters")}
CALIBRATION_TEXTS = 256  # per task: the zoo's whole calibration split (labels ignored)
# The experts were fine-tuned on 64 tokens; 128 keeps most of each BBC article's lead and
# keeps the demo quick. Experts and merged model are scored at the same length.
MAX_LENGTH = 128
# Labels other tasks' texts must get on the spam head: none of them is spam.
CROSS_CHECKS = {"sentiment": {"spam": "ham"}, "topic": {"spam": "ham"},
                "question": {"spam": "ham"}}
BENCH_TEXTS = 32


def demo_recipe(zoo) -> dict:
    """The demo's recipe as plain data (what `hm3 merge` would read from YAML)."""
    calibration = {"texts": {task: str(files["calibration"]) for task, files in zoo.splits.items()},
                   "limit": CALIBRATION_TEXTS, "max_length": MAX_LENGTH}
    return {"preset": PRESET, "base": str(zoo.base),
            "experts": [{"model": str(path), "task": task} for task, path in zoo.experts.items()],
            "seed": 0, "calibration": calibration}


def held_out_texts(zoo) -> dict[str, list[str]]:
    """Each task's validation and test texts: kept out of the calibration texts."""
    return {task: [text for part in ("validation", "test") for text, _ in read_split(files[part])]
            for task, files in zoo.splits.items()}


def test_datasets(zoo):
    """Each task's test split, with the cross-checks declared on it."""
    datasets = []
    for task, files in zoo.splits.items():
        examples = read_split(files["test"])
        datasets.append(Dataset(task, [t for t, _ in examples], [lab for _, lab in examples],
                                source=str(files["test"]), expect=CROSS_CHECKS.get(task, {})))
    return datasets


def run_demo(output: str | Path = "hm3-demo", cache_dir: str | Path | None = None,
             progress: bool = True, bench_texts: int = BENCH_TEXTS, echo=print) -> dict:
    """Build (or reuse) the zoo, merge, score experts and merged model on the test splits, time
    both; write `output`/merged and `output`/report.json, and return the report."""
    output = Path(output)
    started = time.perf_counter()
    echo("1/4 experts: building or reusing the offline zoo (all-MiniLM-L6-v2 fine-tunes)")
    zoo = build_zoo(cache_dir, progress=progress)
    echo(f"    cached in {next(iter(zoo.experts.values())).parent}")

    echo(f"2/4 merge: {len(zoo.experts)} experts with HM3, `preset: {PRESET}` ({DEFAULT_METHOD} "
         f"{json.dumps(DEFAULT_PARAMETERS)}, then {', '.join(LABEL_FREE)}) on "
         f"{CALIBRATION_TEXTS} unlabelled calibration texts per task")
    recipe = parse_recipe(demo_recipe(zoo))
    merged_dir = output / "merged"
    merged_report = merge(recipe, merged_dir, overwrite=True, progress=progress,
                          held_out=held_out_texts(zoo))

    echo("3/4 evaluate: experts and merged model on the held-out test splits")
    datasets = test_datasets(zoo)
    merged = load(merged_dir, device="cpu", max_length=MAX_LENGTH)
    scores = evaluate(merged, datasets)
    experts = {task: load(path, task=task, device="cpu", max_length=MAX_LENGTH)
               for task, path in zoo.experts.items()}
    expert_reports = {task: evaluate(model, [d for d in datasets if d.task == task])
                      for task, model in experts.items()}

    echo("4/4 speed: one merged forward pass against the experts one after another")
    texts = [text for d in datasets for text in d.texts][:bench_texts]
    speed = benchmark(merged, list(experts.values()), texts, repeats=3, warmup=1)

    steps = merged_report.label_free.to_dict() if merged_report.label_free else {}
    report = {"recipe": recipe.to_dict(), "merged": scores,
              "label_free": {k: steps[k] for k in ("calibration", "recentre", "distill",
                                                   "seconds", "cpu_seconds") if k in steps},
              "experts": {t: r["tasks"][t] for t, r in expert_reports.items()},
              "bench": speed, "seconds": round(time.perf_counter() - started, 1),
              "merged_model": str(merged_dir.resolve())}
    write_json_atomic(output / "report.json", report)
    echo("")
    echo(format_scores(report))
    echo("")
    echo(format_bench(speed))
    echo("")
    echo(f"merged model: {merged_dir.resolve()}  (try: hm3 predict {merged_dir} \"You have "
         "won a £1000 cash prize. Call 09061701461 to claim now\")")
    echo(f"serve it: hm3 serve {merged_dir}  (POST /v1/classify, playground at "
         "http://127.0.0.1:8000/)")
    echo(f"report: {(output / 'report.json').resolve()}  ({report['seconds']:.0f}s in all)")
    return report


def format_scores(report: dict) -> str:
    """Per-task macro-F1 of each expert against the merged model, and the cross-checks."""
    rows, expert_f1, merged_f1 = [], [], []
    for task, merged in report["merged"]["tasks"].items():
        expert = report["experts"][task]
        expert_f1.append(expert["macro_f1"])
        merged_f1.append(merged["macro_f1"])
        checks = ", ".join(f"{o}={c['expected']}: {c['agreement']:.1%}"
                           for o, c in merged.get("cross_checks", {}).items())
        rows.append([task, merged["n"], f"{expert['macro_f1']:.3f}", f"{merged['macro_f1']:.3f}",
                     f"{merged['macro_f1'] - expert['macro_f1']:+.3f}",
                     f"{merged['accuracy']:.3f}", checks or "-"])
    mean_e, mean_m = sum(expert_f1) / len(expert_f1), sum(merged_f1) / len(merged_f1)
    rows.append(["mean", "", f"{mean_e:.3f}", f"{mean_m:.3f}", f"{mean_m - mean_e:+.3f}", "", ""])
    return format_table(["task", "n", "expert F1", "merged F1", "delta", "merged acc",
                         "cross-checks (merged)"], rows)
