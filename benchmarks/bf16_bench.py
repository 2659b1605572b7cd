"""Which parts of a bf16 OpenVINO run to keep in f32: accuracy against PyTorch, and speed.

The demo's merged model exported by `hm3 export --format openvino` (f32 weights), then run at bf16
inference precision with different parts kept at f32 (`variants`): the graph from some node on cut
off into a second model compiled at f32 (`hm3.onnx_model.split_graph`, what `hm3.load` does with
the head at bf16), or single nodes marked `precise` in the IR (`keep_f32`). Each variant against
PyTorch on every zoo task's validation and test splits: macro-F1, how many texts' decisions
differ from PyTorch's (argmax of a single-label task, each label's on/off of a multi-label one),
the largest and the root-mean-square logit difference. Speed: 256 mixed zoo test texts in batches
of 32, padded, and in length-sorted sub-batches (as the server runs a batch), tokenisation
included, one thread, one warm-up and A B C ... rounds, medians; run it pinned to one core.
Writes benchmarks/results/openvino_bf16.json, one entry per zoo and model ("minilm MODEL").

  taskset -c 0 .venv/bin/python benchmarks/bf16_bench.py --model hm3-demo/merged   # ~10 min
  taskset -c 0 .venv/bin/python benchmarks/bf16_bench.py --zoo mpnet --model FOLDER \
      --variants bf16 "bf16, head f32 (hm3's bf16)"                               # ~20 min
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import torch

from hm3.checkpoint import write_json_atomic
from hm3.evaluate import predictions, score_task
from hm3.export import export_openvino
from hm3.model import group_probabilities, load
from hm3.onnx_model import BF16_F32_NODES, OPENVINO_FILE, OpenVinoSequenceClassifier
from hm3.zoo import build_mpnet_zoo, build_zoo

from common import batch_speeds, datasets, machine, mixed_texts, speed_row

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "openvino_bf16.json"
MAX_LENGTH = {"minilm": 128, "mpnet": 32}  # as the demo and the MPNet zoo's experts score

HEAD = BF16_F32_NODES  # hm3's bf16: the head kept f32
# OpenVINO names a layer norm's last node after it and its MVN and scale nodes MVN_N, Multiply_N
LAYER_NORMS = (r"LayerNorm", r"^MVN_\d+$", r"^Multiply_\d+$")
ALL_BUT_MATMULS = ("ALL_BUT_MATMULS",)  # every node but the matrix products, marked
# "split": from the first node matching on, the graph runs as a second model compiled at f32
# (`hm3.onnx_model.split_graph`, what `hm3.load` does at bf16 with the head); "marks": nodes
# marked `precise` in the IR (`keep_f32`), which OpenVINO's CPU plugin honours except where it
# fuses the node with another (a MatMul with its bias: the matrix products stay bf16 that way)


def variants(layers: int) -> dict[str, dict]:
    """The variants for an encoder of `layers` blocks (named layer.0 ... in the graph)."""
    last, second = rf"/layer\.{layers - 1}/", rf"/layer\.{layers - 2}/"
    return {
        "bf16": {},
        "bf16, head f32 (hm3's bf16)": {"split": HEAD},
        "bf16, last block + head f32": {"split": (last,) + HEAD},
        "bf16, last two blocks + head f32": {"split": (second,) + HEAD},
        "bf16, layer norms f32": {"marks": LAYER_NORMS},
        "bf16, everything f32 but the matrix products": {"marks": ALL_BUT_MATMULS},
        "bf16, everything f32 but the matrix products, head f32": {"marks": ALL_BUT_MATMULS,
                                                                    "split": HEAD},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hm3-demo/merged")
    parser.add_argument("--work", default="/tmp/hm3-bf16-bench")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="*", help="names of `variants` (default: all)")
    parser.add_argument("--splits", nargs="*", default=["validation", "test"])
    parser.add_argument("--zoo", choices=tuple(MAX_LENGTH), default="minilm")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["HM3_ONNX_THREADS"] = "1"
    work = Path(args.work)
    started_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = os.getloadavg()
    zoo = build_mpnet_zoo(progress=False) if args.zoo == "mpnet" else build_zoo(progress=False)
    max_length = MAX_LENGTH[args.zoo]
    f32_folder = work / "openvino-f32"
    export_openvino(args.model, f32_folder, overwrite=True, max_length=max_length)
    torch_model = load(args.model, device="cpu", max_length=max_length)
    chosen = variants(torch_model.model.config.num_hidden_layers)
    models = {"torch": torch_model, "openvino f32": load(f32_folder, precision="f32")}
    marked, split_counts = {}, {}
    for name in args.variants or chosen:
        folder = work / name.replace(",", "").replace(" ", "-").replace("+", "and")
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(f32_folder, folder)
        marks, split = chosen[name].get("marks", ()), chosen[name].get("split", ())
        if marks == ALL_BUT_MATMULS:
            marks = _all_but_matmuls(folder / OPENVINO_FILE)
        marked[name] = keep_f32(folder / OPENVINO_FILE, marks)
        models[name] = load(folder, precision="bf16")
        models[name].model = OpenVinoSequenceClassifier(folder, precision="bf16", f32_nodes=split)
        split_counts[name] = models[name].model.f32_node_count
    texts = mixed_texts(zoo)
    speed = batch_speeds(models, texts, args.rounds)
    f32_rate = {way: statistics.median(runs) for way, runs in speed["openvino f32"].items()}
    rows = {}
    scored = {split: datasets(zoo, split) for split in args.splits}  # read once
    reference = {split: {d.task: torch_model.logits(d.texts, batch_size=32) for d in data}
                 for split, data in scored.items()}
    for name, model in models.items():
        row = rows[name] = {
            **speed_row(speed[name], f32_rate, "openvino_f32"),
            "marked_f32": len(marked.get(name, [])), "split_f32": split_counts.get(name, 0)}
        for split in args.splits:
            row[split], row[f"{split}_changed"], diffs = {}, {}, []
            for d in scored[split]:
                logits = model.logits(d.texts, batch_size=32)
                want = reference[split][d.task]
                diffs.append(logits - want)
                group = next(g for g in model.groups if g.name == d.task)
                probabilities = group_probabilities(logits, [group])[d.task]
                scores = score_task(group, d.labels, probabilities)
                row[split][d.task] = round(scores["macro_f1"], 4)
                # texts whose decision (a label, or each label's on/off) differs from PyTorch's
                ours = predictions(group, probabilities)
                theirs = predictions(group, group_probabilities(want, [group])[d.task])
                row[f"{split}_changed"][d.task] = int(
                    (ours != theirs).reshape(len(ours), -1).any(axis=1).sum())
            row[split]["mean"] = round(float(np.mean(list(row[split].values()))), 4)
            diffs = np.concatenate([d.ravel() for d in diffs])
            row[f"{split}_max_abs_logit_diff"] = float(np.abs(diffs).max())
            row[f"{split}_rms_logit_diff"] = float(np.sqrt(np.mean(diffs ** 2)))
        for split in args.splits:
            row[f"{split}_worst_vs_torch_pt"] = round(100 * min(
                row[split][t] - rows["torch"][split][t] for t in row[split] if t != "mean"), 2)
        print(name, {k: v for k, v in row.items() if k != "runs"}, flush=True)
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.is_file() else {}
    if "rows" in results:  # the file's first run, from before it kept one entry per model
        results = {f"minilm {results['model']}": results}
    results[f"{args.zoo} {args.model}"] = {
        "machine": machine(), "model": args.model, "zoo": args.zoo, "max_length": max_length,
        "threads": 1, "variants": {name: chosen[name] for name in marked},
        "started": started_at, "load_average_start": load_before,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average_end": os.getloadavg(), "rows": rows}
    write_json_atomic(output, results)


def keep_f32(xml: Path, patterns) -> list[str]:
    """Mark the nodes of an OpenVINO IR (`xml`, rewritten in place) whose name matches any of the
    regular expressions `patterns` to run at f32 when the model is compiled at a lower inference
    precision (bf16): the IR's `precise` runtime attribute. OpenVINO 2026.4's CPU plugin keeps
    a marked layer norm or element-wise node at f32, but drops the mark when it fuses the node
    with another (every MatMul with its bias), so matrix products stay bf16 whatever is marked.
    Returns the names of the nodes marked (constants, inputs and outputs are left alone: they
    compute nothing)."""
    tree = ElementTree.parse(xml)
    marked = []
    for layer in tree.getroot().iter("layer"):
        name = layer.get("name", "")
        if layer.get("type") in ("Const", "Parameter", "Result") or not any(
                re.search(pattern, name) for pattern in patterns):
            continue
        info = layer.find("rt_info")
        if info is None:
            info = ElementTree.Element("rt_info")
            layer.insert(0, info)
        if not any(a.get("name") == "precise" for a in info.iter("attribute")):
            ElementTree.SubElement(info, "attribute", name="precise", version="0")
        marked.append(name)
    tree.write(xml, encoding="utf-8", xml_declaration=True)
    return marked


def _all_but_matmuls(xml: Path) -> list[str]:
    return ["^" + re.escape(layer.get("name")) + "$"
            for layer in ElementTree.parse(xml).getroot().iter("layer")
            if layer.get("type") != "MatMul"]


if __name__ == "__main__":
    main()
