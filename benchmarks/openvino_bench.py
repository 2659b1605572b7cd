"""Another runtime for the same ONNX export: OpenVINO against ONNX Runtime and PyTorch, offline.

`hm3 export`'s ONNX folder (fp32, and `--quantize int8`) run by ONNX Runtime (hm3's `onnx`
backend) and by the OpenVINO runtime (`openvino` package, not an hm3 dependency yet: `pip install
openvino`) at f32 and at bf16 inference precision (on CPUs with AVX-512 BF16 or AMX), against the
PyTorch model. Speed: 256 mixed zoo test texts in padded batches of 32, tokenisation included,
one thread each, A B C ... rounds, medians; run it pinned to one core. Accuracy: macro-F1 per
task on the zoo's validation and test splits, and the largest logit difference from PyTorch.
Writes benchmarks/results/openvino.json.

  .venv/bin/pip install openvino
  taskset -c 0 .venv/bin/python benchmarks/openvino_bench.py --model hm3-demo/merged   # ~4 min
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from hm3.checkpoint import write_json_atomic
from hm3.evaluate import evaluate
from hm3.export import export_onnx
from hm3.model import load
from hm3.onnx_model import ONNX_FILE
from hm3.zoo import build_zoo, read_split

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from guided_zoo import datasets  # noqa: E402
from serve_bench import machine  # noqa: E402

RESULTS = HERE / "results" / "openvino.json"
MAX_LENGTH = 128  # as the demo scores


class OpenVinoClassifier:
    """An OpenVINO compiled model with the call interface of a transformers classifier."""

    def __init__(self, folder: Path, precision: str):
        import openvino as ov

        compiled = ov.Core().compile_model(
            str(folder / ONNX_FILE), "CPU",
            {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
             "INFERENCE_PRECISION_HINT": precision})
        self.inputs = [i.get_any_name() for i in compiled.inputs]
        self.logits = compiled.output("logits")
        self.request = compiled.create_infer_request()
        self.device = torch.device("cpu")

    def __call__(self, **batch) -> SimpleNamespace:
        result = self.request.infer({name: batch[name].numpy() for name in self.inputs})
        return SimpleNamespace(logits=torch.from_numpy(np.array(result[self.logits])))

    def eval(self):
        return self


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hm3-demo/merged")
    parser.add_argument("--work", default="/tmp/hm3-openvino-bench")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["HM3_ONNX_THREADS"] = "1"
    work = Path(args.work)
    fp32, int8 = work / "fp32", work / "int8"
    export_onnx(args.model, fp32, overwrite=True)
    export_onnx(args.model, int8, quantize="int8", overwrite=True)
    torch_model = load(args.model, device="cpu", max_length=MAX_LENGTH)
    models = {"torch": torch_model,
              "onnx runtime fp32": load(fp32, max_length=MAX_LENGTH),
              "onnx runtime int8 (hm3 default)": load(int8, max_length=MAX_LENGTH)}
    for precision in ("f32", "bf16"):
        wrapped = load(fp32, max_length=MAX_LENGTH)
        wrapped.model = OpenVinoClassifier(fp32, precision)
        models[f"openvino {precision}"] = wrapped
    zoo = build_zoo(progress=False)
    texts = [text for splits in zoo.splits.values() for text, _ in read_split(splits["test"])]
    texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))][:256]
    result = {"machine": machine(), "model": args.model, "max_length": MAX_LENGTH,
              "threads": 1, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    reference = torch_model.logits(texts[:64])
    speed = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            started = time.perf_counter()
            for i in range(0, len(texts), 32):
                with torch.inference_mode():
                    model.model(**model.encode(texts[i:i + 32]))
            speed[name].append(len(texts) / (time.perf_counter() - started))
    torch_rate = statistics.median(speed["torch"])
    scored = {split: datasets(zoo, split) for split in ("validation", "test")}  # read once
    rows = {}
    for name, model in models.items():
        rows[name] = {"texts_per_s": round(statistics.median(speed[name]), 2),
                      "runs": [round(r, 2) for r in speed[name]],
                      "x_torch": round(statistics.median(speed[name]) / torch_rate, 3),
                      "max_abs_logit_diff": float(np.abs(model.logits(texts[:64]) - reference).max())}
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
