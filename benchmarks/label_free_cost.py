"""What the recommended label-free merge (`preset: label-free`) costs on a device: wall time,
peak RSS and, on a GPU, peak GPU memory, for eight experts of the base-size zoo's SHAPE.

The experts are synthetic (the base's architecture with random weights, each expert the base
plus a small random task vector and its own head, label counts as in the MPNet zoo): the
cost of the merge depends on shapes and text counts, not on what the weights learned, and the
real zoo's weights do not travel to a machine without the zoo. Calibration texts are real when
`--texts-dir` holds one `calibration-*-TASK.txt` per task (e.g. those distill_variants.py
writes), else random word sequences of the zoo's length.

  python benchmarks/label_free_cost.py --config ~/.cache/hm3/bases/all-mpnet-base-v2-*/ \
      --device cuda
Results: benchmarks/results/label_free_cost.json, one entry per device.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hm3 import merge, parse_recipe
from hm3.checkpoint import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results" / "label_free_cost.json"
# the MPNet zoo's tasks and label counts (toxicity multi-label), texts per task ~ its
# per-task+unseen calibration (171-640)
TASKS = {"spam": 2, "sentiment": 3, "topic": 5, "question": 6, "jailbreak": 2, "toxicity": 7,
         "harm_area": 5, "tense": 2}
MULTI_LABEL = {"toxicity"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")


def build_experts(config_dir: Path, root: Path, noise: float = 0.003) -> tuple[Path, dict]:
    """A random base of `config_dir`'s architecture and one expert per task: the base plus
    Gaussian noise of `noise` times each tensor's RMS, and a random head."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(config_dir)
    base = AutoModel.from_config(config)
    base.save_pretrained(root / "base")
    for name in TOKENIZER_FILES:
        if (config_dir / name).is_file():
            shutil.copyfile(config_dir / name, root / "base" / name)
    experts = {}
    for task, labels in TASKS.items():
        expert_config = AutoConfig.from_pretrained(
            root / "base", num_labels=labels,
            id2label={i: f"l{i}" for i in range(labels)},
            label2id={f"l{i}": i for i in range(labels)},
            problem_type="multi_label_classification" if task in MULTI_LABEL else None)
        model = AutoModelForSequenceClassification.from_config(expert_config)
        body = getattr(model, model.base_model_prefix)
        body.load_state_dict(base.state_dict(), strict=False)  # a base may hold a pooler
        with torch.no_grad():
            for parameter in model.parameters():
                rms = parameter.pow(2).mean().sqrt()
                parameter.add_(torch.randn_like(parameter) * noise * rms)
        folder = root / task
        model.save_pretrained(folder)
        for name in TOKENIZER_FILES:
            if (root / "base" / name).is_file():
                shutil.copyfile(root / "base" / name, folder / name)
        experts[task] = folder
    return root / "base", experts


def calibration_files(root: Path, texts_dir: Path | None, per_task: int) -> dict[str, str]:
    files = {}
    words = [line.strip() for line in (root / "base" / "vocab.txt").read_text().splitlines()
             if line.strip().isalpha()][1000:6000]
    for i, task in enumerate(TASKS):
        found = sorted(texts_dir.glob(f"calibration-*-{task}.txt")) if texts_dir else []
        if found:
            files[task] = str(found[0])
            continue
        rng = random.Random(i)
        path = root / f"{task}.txt"
        path.write_text("\n".join(" ".join(rng.choices(words, k=rng.randint(8, 30)))
                                  for _ in range(per_task)) + "\n")
        files[task] = str(path)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True,
                        help="folder with the base's config.json and tokenizer files")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--texts-dir", type=Path)
    parser.add_argument("--per-task", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hm3-cost-"))
    base, experts = build_experts(args.config, root)
    calibration = {"texts": calibration_files(root, args.texts_dir, args.per_task),
                   "limit": args.per_task, "max_length": args.max_length}
    recipe = parse_recipe({"preset": "label-free", "base": str(base),
                           "experts": [{"model": str(p), "task": t} for t, p in experts.items()],
                           "calibration": calibration})
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    report = merge(recipe, root / "merged", progress=False, device=args.device)
    wall = time.perf_counter() - started
    entry = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
             else (f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads"),
             "torch": torch.__version__, "experts": len(experts),
             "texts": {t: e["texts"] for t, e in report.label_free.calibration.items()},
             "max_length": args.max_length, "recipe": recipe.to_dict(),
             "wall_seconds": round(wall, 1),
             "label_free_seconds": report.label_free.seconds,
             "distill_seconds": report.label_free.steps["distill"].seconds,
             "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if args.device.startswith("cuda"):
        entry["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    results[args.device.split(":")[0]] = entry
    write_json_atomic(args.results, results)
    print(json.dumps({k: v for k, v in entry.items() if k != "recipe"}, indent=1))


if __name__ == "__main__":
    main()
