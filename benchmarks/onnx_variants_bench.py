"""What else could make the ONNX export faster on CPU: graph fusion and how much is int8.

Offline texts/s at batch 32 (padded, and in length-sorted sub-batches as `hm3 serve` runs them)
and one-text latency, on one pinned core and thread, A B C rounds, medians (serve_bench's
`offline`), for the demo's merged MiniLM as:
- torch, and `hm3 export` fp32 (ONNX Runtime applies its own graph optimisations at load);
- fp32 passed through ONNX Runtime's transformer optimizer (`onnxruntime.transformers.optimizer`,
  model_type bert: fused Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization);
- int8 as `hm3 export --quantize int8` (head + FFN down-projections fp32), int8 with only the
  last two layers' FFN down-projections fp32, and everything but the head int8 (which costs
  accuracy: RESULTS.md §6.1), to see how far quantising more could go.

  .venv/bin/python benchmarks/onnx_variants_bench.py --model /tmp/demo-before/merged   # ~6 min
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from hm3.checkpoint import write_json_atomic
from hm3.export import FP32_NODES, HEAD_ONLY, export_onnx, quantize_int8
from hm3.onnx_model import ONNX_FILE
from hm3.zoo import build_zoo

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_bench import machine, mixed_texts, offline  # noqa: E402

RESULTS = HERE / "results" / "onnx_variants.json"
INT8 = {"int8 (hm3 default: head + FFN-down fp32)": FP32_NODES,
        "int8, head + last two FFN-down fp32": HEAD_ONLY + (r"layer\.[45]/output/dense",),
        "int8, head fp32 (all else int8)": HEAD_ONLY}


def fused(fp32: Path, target: Path, config: dict) -> dict:
    from onnxruntime.transformers.optimizer import optimize_model

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(fp32, target)
    model = optimize_model(str(fp32 / ONNX_FILE), model_type="bert",
                           num_heads=config["num_attention_heads"],
                           hidden_size=config["hidden_size"], use_gpu=False)
    model.save_model_to_file(str(target / ONNX_FILE))
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="/tmp/demo-before/merged")
    parser.add_argument("--work", default="/tmp/hm3-onnx-variants")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(args.model) / "config.json").read_text())
    folders = {"torch": Path(args.model), "onnx fp32": work / "fp32"}
    export_onnx(args.model, folders["onnx fp32"], overwrite=True)
    folders["onnx fp32, transformer optimizer"] = work / "fused"
    fusions = fused(folders["onnx fp32"], folders["onnx fp32, transformer optimizer"], config)
    for i, (name, exclude) in enumerate(INT8.items()):
        folders[name] = work / f"int8-{i}"
        shutil.rmtree(folders[name], ignore_errors=True)
        shutil.copytree(folders["onnx fp32"], folders[name])
        quantize_int8(folders["onnx fp32"] / ONNX_FILE, folders[name] / ONNX_FILE, exclude)
    zoo = build_zoo(progress=False)
    texts = mixed_texts(zoo)
    result = {"machine": machine(), "model": args.model, "fusions": fusions,
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    result["offline"] = offline(folders, texts, work, pin=True, rounds=args.rounds, requests=32)
    base = result["offline"]["torch"]
    result["x_torch"] = {name: {"batch32": row["batch32_texts_per_s"] / base["batch32_texts_per_s"],
                                "split32": row["split32_texts_per_s"] / base["split32_texts_per_s"]}
                         for name, row in result["offline"].items()}
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    write_json_atomic(Path(args.output), result)
    print("| model | b32 padded texts/s (× torch) | b32 sub-batches (× torch) | 1 text ms |")
    for name, row in result["offline"].items():
        x = result["x_torch"][name]
        print(f"| {name} | {row['batch32_texts_per_s']:.1f} ({x['batch32']:.2f}×) | "
              f"{row['split32_texts_per_s']:.1f} ({x['split32']:.2f}×) | "
              f"{row['one_text_ms']:.1f} |")


if __name__ == "__main__":
    main()
