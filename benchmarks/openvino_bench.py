"""hm3's OpenVINO backend against ONNX Runtime and PyTorch, offline: speed and accuracy.

The demo's merged model exported by `hm3 export` as ONNX (fp32, and `--quantize int8`: ONNX
Runtime's dynamic int8) and as OpenVINO (`--format openvino`: f32, and `--quantize int8`: NNCF's
static int8, activation ranges from 256 of the zoo's calibration texts, the texts the merge itself
calibrates on, never validation or test), each loaded by `hm3.load` as `hm3 serve` loads it; also
the OpenVINO f32 export computed at bf16 inference precision (CPUs with AVX-512 BF16 or AMX; the
head at f32, as `hm3.load` runs bf16 since RESULTS §6.7's bf16 study), and a variant int8 with only
the head kept fp32. Speed: 256 mixed zoo test texts in batches of 32, padded to the batch's longest
text and in length-sorted sub-batches (as the server runs a batch), tokenisation included, one
thread each, A B C ... rounds, medians; run it pinned to one core. Accuracy: macro-F1 per task on
the zoo's validation and test splits, and the largest logit difference from PyTorch. Writes
benchmarks/results/openvino.json.

`--precision-only`: PyTorch, the OpenVINO f32 export at f32 and at bf16, and what
`--precision auto` resolves to on this CPU (`hm3.onnx_model.choose_precision`), test splits only;
writes benchmarks/results/openvino_precision.json.

  taskset -c 0 .venv/bin/python benchmarks/openvino_bench.py --model hm3-demo/merged   # ~8 min
  taskset -c 0 .venv/bin/python benchmarks/openvino_bench.py --precision-only   # ~4 min
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from hm3.checkpoint import write_json_atomic
from hm3.evaluate import evaluate
from hm3.export import HEAD_ONLY, export_onnx, export_openvino
from hm3.model import load
from hm3.onnx_model import choose_precision, cpu_capabilities
from hm3.zoo import build_zoo

from common import batch_speeds, calibration_texts, datasets, machine, mixed_texts, speed_row

HERE = Path(__file__).resolve().parent

RESULTS = HERE / "results" / "openvino.json"
PRECISION_RESULTS = HERE / "results" / "openvino_precision.json"
MAX_LENGTH = 128  # as the demo scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hm3-demo/merged")
    parser.add_argument("--work", default="/tmp/hm3-openvino-bench")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", help=f"default {RESULTS.name}, or {PRECISION_RESULTS.name} "
                        "with --precision-only")
    parser.add_argument("--precision-only", action="store_true",
                        help="only PyTorch against OpenVINO f32 and bf16, on the test splits")
    args = parser.parse_args()
    args.output = args.output or str(PRECISION_RESULTS if args.precision_only else RESULTS)
    torch.set_num_threads(1)
    os.environ["HM3_ONNX_THREADS"] = "1"
    work = Path(args.work)
    zoo = build_zoo(progress=False)
    calibration = calibration_texts(zoo)
    exports = {
        "onnx runtime fp32": lambda out: export_onnx(args.model, out, overwrite=True),
        "onnx runtime int8 (hm3 default)": lambda out: export_onnx(
            args.model, out, quantize="int8", overwrite=True),
        # every OpenVINO row at f32 inference precision (hm3's default is auto), as measured
        "openvino f32": lambda out: export_openvino(args.model, out, overwrite=True,
                                                    precision="f32"),
        "openvino int8 (hm3 default)": lambda out: export_openvino(
            args.model, out, quantize="int8", calibration=calibration, overwrite=True,
            max_length=MAX_LENGTH, precision="f32"),
        "openvino int8 calibrated at the tokenizer's 512": lambda out: export_openvino(
            args.model, out, quantize="int8", calibration=calibration, overwrite=True,
            precision="f32"),
        "openvino int8, head only fp32": lambda out: export_openvino(
            args.model, out, quantize="int8", calibration=calibration, overwrite=True,
            exclude=HEAD_ONLY, max_length=MAX_LENGTH, precision="f32")}
    if args.precision_only:
        exports = {"openvino f32": exports["openvino f32"]}
    torch_model = load(args.model, device="cpu", max_length=MAX_LENGTH)
    models, export_seconds = {"torch": torch_model}, {}
    for name, export in exports.items():
        folder = work / name.split(" (")[0].replace(" ", "-").replace(",", "").replace("'", "")
        started = time.perf_counter()
        export(folder)
        export_seconds[name] = round(time.perf_counter() - started, 1)
        models[name] = load(folder, max_length=MAX_LENGTH)
    models["openvino f32 export at bf16 precision"] = load(
        work / "openvino-f32", max_length=MAX_LENGTH, precision="bf16")
    texts = mixed_texts(zoo)
    capabilities = cpu_capabilities()
    result = {"machine": machine(), "model": args.model, "max_length": MAX_LENGTH,
              "openvino_cpu_capabilities": capabilities,
              "auto_resolves_to": choose_precision(capabilities),
              "threads": 1, "calibration_texts": len(calibration), "export_seconds": export_seconds,
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    reference = torch_model.logits(texts[:64])
    speed = batch_speeds(models, texts, args.rounds)
    torch_rate = {way: statistics.median(runs) for way, runs in speed["torch"].items()}
    splits = ("test",) if args.precision_only else ("validation", "test")
    scored = {split: datasets(zoo, split) for split in splits}  # read once
    rows = {}
    for name, model in models.items():
        rows[name] = {**speed_row(speed[name], torch_rate, "torch"),
                      "max_abs_logit_diff": float(
                          np.abs(model.logits(texts[:64]) - reference).max())}
        for split, data in scored.items():
            report = evaluate(model, data, batch_size=32)
            rows[name][split] = {t: round(s["macro_f1"], 4) for t, s in report["tasks"].items()}
            rows[name][split]["mean"] = round(report["mean_macro_f1"], 4)
        print(name, {k: v for k, v in rows[name].items() if k != "runs"}, flush=True)
    result["rows"] = rows
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result["load_average_end"] = os.getloadavg()
    write_json_atomic(Path(args.output), result)


if __name__ == "__main__":
    main()
