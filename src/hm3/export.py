"""`hm3 export`: a model as ONNX (or OpenVINO) whose outputs are each task's probabilities, computed
in the graph.

The exported graph wraps the classifier in `ProbabilityHead`: besides the raw `logits` it outputs
`probabilities.TASK` per task (a softmax over the task's own logits, or a sigmoid per label for a
multi-label task), so any ONNX Runtime consumer gets correct per-task scores without knowing the
layout. Beside model.onnx: config.json (with the `hm3` task layout), the tokenizer, and
hm3_onnx.json (inputs, outputs, tasks, quantisation). `hm3.load(folder)` runs it on ONNX Runtime.
`--format openvino` converts the same graph for the OpenVINO runtime (openvino_model.xml/.bin in
place of model.onnx); `hm3.load` runs that folder on OpenVINO.

int8, ONNX: ONNX Runtime's dynamic quantisation (weights int8 per output channel, activations
quantised on the fly) of the MatMuls; the head, the FFN down-projections and the embeddings stay
fp32 -- see `FP32_NODES` and `benchmarks/serve_bench.py` for the measurement that chose this.
int8, OpenVINO: NNCF's static quantisation (activation ranges from calibration texts), the same
nodes kept fp32 (`benchmarks/openvino_bench.py`).
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hm3.bench import SAMPLE_TEXTS
from hm3.checkpoint import (
    atomic_directory,
    check_destination,
    read_config,
    resolve,
    write_json_atomic,
)
from hm3.errors import Hm3Error, Hm3Warning
from hm3.heads import TaskGroup
from hm3.model import load
from hm3.onnx_model import (
    DEFAULT_PRECISION,
    LAYOUT_FILE,
    ONNX_FILE,
    OPENVINO_FILE,
    ExportedClassifier,
    check_precision,
    describe_precision,
    open_export,
)

OPSET = 17
FP32_TOLERANCE = 1e-3  # an fp32 export differs from PyTorch by ~1e-7; more means a wrong graph
# Nodes kept in fp32 by default under int8 (regular expressions searched in node names): the
# head (final projection, pooler, hidden head layers) and each layer's FFN down-projection,
# whose inputs (after GELU) have the widest range. Measured on the zoo's merged MiniLM
# (benchmarks/serve_bench.py, validation split): argmax agreement with fp32 99.75% with these
# in fp32, against HEAD_ONLY's lower figure in benchmarks/RESULTS.md.
HEAD_ONLY = (r"classifier", r"pooler", r"pre_classifier", r"score")
FP32_NODES = HEAD_ONLY + (r"layer\.\d+/output/dense", r"ffn/lin2")
MIN_CALIBRATION_TEXTS = 16  # fewer cannot measure an activation's range; a few hundred is right
CALIBRATION_BATCH = 16


class ProbabilityHead(torch.nn.Module):
    """The classifier followed by a softmax (or sigmoids) per task group: what is exported."""

    def __init__(self, model: torch.nn.Module, groups: list[TaskGroup], input_names: list[str]):
        super().__init__()
        self.model = model
        self.groups = groups
        self.input_names = input_names
        self.eval()  # the exporter restores the wrapper's mode afterwards: it must be eval too

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.model(**dict(zip(self.input_names, inputs))).logits
        outputs = [logits]
        for group in self.groups:
            z = logits[:, group.offset:group.stop]
            outputs.append(torch.sigmoid(z) if group.multi_label else torch.softmax(z, dim=-1))
        return tuple(outputs)


def output_names(groups: list[TaskGroup]) -> list[str]:
    return ["logits"] + [f"probabilities.{g.name}" for g in groups]


def export_onnx(model: str | Path, output: str | Path, quantize: str | None = None,
                overwrite: bool = False, exclude: tuple[str, ...] = FP32_NODES,
                per_channel: bool = True, max_length: int | None = None,
                allow_pickle: bool = False) -> dict:
    """Export `model` (merged model, single classifier or hub id) to an ONNX folder at `output`.

    - `quantize`: None (fp32) or "int8" (dynamic quantisation of the MatMul weights).
    - `exclude`: with int8, keep nodes whose name matches any of these regular expressions in fp32.
    - `per_channel`: with int8, one scale per output channel (else one per tensor).
    - `max_length`: the token length `hm3.load` cuts texts to when it runs the export (recorded);
    default: the tokenizer's maximum.
    - `allow_pickle`: read a model whose weights exist only as pickle `.bin` files (`hm3.load`).

    Returns a dict: path, file, megabytes, max_abs_diff (largest difference of any task
    probability from the PyTorch model's on sample texts), quantized, precision (what the
    export computed at in that check: f32 for ONNX).
    """
    if quantize not in (None, "int8"):
        raise Hm3Error(f"--quantize supports int8, got {quantize!r}")

    def convert(fp32: Path, staging: Path, classifier) -> None:
        if quantize == "int8":
            quantize_int8(fp32, staging / ONNX_FILE, exclude, per_channel)
        else:
            fp32.replace(staging / ONNX_FILE)

    return _export(model, output, overwrite, ONNX_FILE, convert, max_length, allow_pickle, {
        "format": "onnx", "quantized": quantize, "per_channel": per_channel if quantize else None,
        "fp32_nodes": list(exclude) if quantize else None})


def export_openvino(model: str | Path, output: str | Path, quantize: str | None = None,
                    calibration: Sequence[str] | None = None, overwrite: bool = False,
                    exclude: tuple[str, ...] = FP32_NODES, max_length: int | None = None,
                    allow_pickle: bool = False, precision: str | None = None) -> dict:
    """Export `model` to an OpenVINO folder (openvino_model.xml/.bin) at `output`.

    The graph is the ONNX export's (per-task probabilities inside), converted by OpenVINO and
    stored with fp32 weights. int8 is NNCF's post-training quantisation: weights AND activations
    int8, the activations' ranges measured on `calibration` (unlabelled texts like the traffic
    the model will see; a few hundred are enough); nodes matching `exclude` stay fp32.
    `max_length`: the token length texts are cut to, at calibration and (the export records it)
    when `hm3.load` runs the folder; default: the tokenizer's maximum. Calibrate at the length
    you serve at: ranges measured on 512-token texts cost a task 1.1 points served at 128
    (benchmarks/RESULTS.md §6.7). `allow_pickle`: as for `export_onnx`.
    `precision`: the inference precision the folder runs at when loaded ("f32", "bf16" or
    "auto", resolved on the machine that loads it; `hm3.load` and `hm3 serve` can override it);
    default: auto, and f32 for an int8 export (its int8 layers run as int8 at any precision; the
    nodes `exclude` keeps fp32 for accuracy would run at bf16 under auto: not measured). The
    check against PyTorch runs at it, and, where that is not f32, once more at f32 (the graph's
    own check: a wrong graph warns whatever the precision).

    Returns the same dict as `export_onnx`, "precision" being what the check ran at here.
    """
    check_precision(precision)
    if quantize not in (None, "int8"):
        raise Hm3Error(f"--quantize supports int8, got {quantize!r}")
    texts = [text for text in (calibration or []) if text.strip()]
    if quantize == "int8" and len(texts) < MIN_CALIBRATION_TEXTS:
        raise Hm3Error(f"an OpenVINO int8 export measures activation ranges on unlabelled texts: "
                       f"give at least {MIN_CALIBRATION_TEXTS} (got {len(texts)}), e.g. "
                       "`--calibration traffic.txt` with a few hundred texts like your traffic")
    if quantize is None and texts:
        raise Hm3Error("calibration texts are for --quantize int8 only")
    try:
        import openvino as ov
    except ImportError:
        raise Hm3Error("the OpenVINO export needs the openvino extra: "
                       "pip install 'hm3[openvino]'") from None

    def convert(fp32: Path, staging: Path, classifier) -> None:
        graph = ov.convert_model(str(fp32))
        if quantize == "int8":
            graph = _nncf_int8(graph, classifier, texts, exclude)
        ov.save_model(graph, str(staging / OPENVINO_FILE), compress_to_fp16=False)

    return _export(model, output, overwrite, OPENVINO_FILE, convert, max_length, allow_pickle, {
        "format": "openvino", "quantized": quantize,
        "precision": recorded_precision(precision, quantize),
        "calibration_texts": len(texts) if quantize else None,
        "fp32_nodes": list(exclude) if quantize else None})


def recorded_precision(precision: str | None, quantize: str | None) -> str:
    """The precision an OpenVINO export records: the one asked for, else auto, else (an int8
    export) f32, so that the nodes it keeps fp32 for accuracy stay so (not measured at bf16)."""
    return precision or (DEFAULT_PRECISION if quantize is None else "f32")


def _export(model, output, overwrite: bool, file: str, convert, max_length: int | None,
            allow_pickle: bool, layout: dict) -> dict:
    """The ONNX graph of `model`, `convert`ed into `file` of a new folder with the config, the
    tokenizer and the layout; checked against the PyTorch model on sample texts."""
    check_destination(output, overwrite)
    classifier = load(model, device="cpu", max_length=max_length, allow_pickle=allow_pickle)
    if getattr(classifier.model, "backend", "torch") != "torch":
        raise Hm3Error(f"{model} is already an {classifier.model.kind} export; export the "
                       "PyTorch model instead")
    groups = classifier.groups
    if any(g.name == "logits" for g in groups):
        raise Hm3Error("a task named 'logits' would clash with the graph's logits output; "
                       "rename the task in the recipe")
    sample = classifier.encode(list(SAMPLE_TEXTS[:4]))
    input_names = [name for name in classifier.tokenizer.model_input_names if name in sample]
    # eager attention traces to a graph that holds for every batch and length; sdpa bakes in
    # the sample's padding
    classifier.model.set_attn_implementation("eager")
    wrapper = ProbabilityHead(classifier.model.float().eval(), groups, input_names)
    outputs = output_names(groups)
    axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    axes.update({name: {0: "batch"} for name in outputs})
    with atomic_directory(output, overwrite=overwrite) as staging:
        with tempfile.TemporaryDirectory(dir=staging) as scratch:
            fp32 = Path(scratch) / "fp32.onnx"
            _torch_export(wrapper, tuple(sample[name] for name in input_names), fp32,
                          input_names, outputs, axes)
            _add_metadata(fp32, groups)
            convert(fp32, staging, classifier)
        config = read_config(resolve(str(model), allow_pickle=allow_pickle))
        # a plain classifier gets the task layout it was loaded with, so the export keeps it
        config.setdefault("hm3", {"tasks": [g.to_dict() for g in groups]})
        write_json_atomic(staging / "config.json", config)
        classifier.tokenizer.save_pretrained(staging)
        write_json_atomic(staging / LAYOUT_FILE, {
            "source": str(model), "file": file, "inputs": input_names, "outputs": outputs,
            "opset": OPSET, **layout, "max_length": classifier.max_length,
            "tasks": [g.to_dict() for g in groups]})
        exported = open_export(staging)
        diff = _max_difference(classifier, exported, groups)
        if not layout["quantized"]:  # the graph checked at f32, whatever it runs at here
            f32_diff = diff if exported.precision == "f32" else _max_difference(
                classifier, open_export(staging, "f32"), groups)
            if f32_diff > FP32_TOLERANCE:
                warnings.warn(Hm3Warning(
                    f"the export's probabilities differ from PyTorch's by up to {f32_diff:.2g} "
                    "on sample texts at f32; check it on your own texts before you deploy it"),
                    stacklevel=3)
        size = sum(path.stat().st_size for path in staging.glob(Path(file).stem + ".*"))
    return {"path": str(Path(output).resolve()), "file": file, "megabytes": size / 2**20,
            "max_abs_diff": diff, "quantized": layout["quantized"],
            "precision": describe_precision(exported)}


def _nncf_int8(graph, classifier, texts: list[str], exclude: tuple[str, ...]):
    """NNCF's post-training int8 quantisation of an OpenVINO graph, ranges from `texts` cut to
    the classifier's max_length."""
    import nncf  # the openvino extra

    nncf.set_log_level(logging.ERROR)  # its per-node INFO lines would drown the command's output
    names = [port.get_any_name() for port in graph.inputs]
    batches = []
    for start in range(0, len(texts), CALIBRATION_BATCH):
        encoded = classifier.encode(texts[start:start + CALIBRATION_BATCH])
        batches.append({name: encoded[name].numpy() for name in names})
    return nncf.quantize(graph, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=len(texts),
                         ignored_scope=nncf.IgnoredScope(
                             patterns=[f".*(?:{pattern}).*" for pattern in exclude],
                             validate=False))


def _torch_export(wrapper, inputs, path: Path, input_names, outputs, axes) -> None:
    try:
        with warnings.catch_warnings():
            # the tracer's "might not generalise" and the exporter's "negative indices would give
            # incorrect results" are about graphs in general; this one is checked against
            # PyTorch on texts of other lengths (`_max_difference`), which warns if it differs
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=r"Exporting aten::index operator")
            torch.onnx.export(wrapper, inputs, str(path), input_names=input_names,
                              output_names=outputs, dynamic_axes=axes, opset_version=OPSET,
                              dynamo=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; say which model
        raise Hm3Error(f"torch.onnx could not export this model: {exc}") from None


def _add_metadata(path: Path, groups: list[TaskGroup]) -> None:
    """The task layout inside the .onnx file too, for consumers that see only the graph."""
    import onnx  # the onnx extra; imported here so `hm3.export` imports without it

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"hm3_tasks": json.dumps([g.to_dict() for g in groups])})
    onnx.save(proto, str(path))


def quantize_int8(source: Path, target: Path, exclude: tuple[str, ...] = FP32_NODES,
                  per_channel: bool = True) -> list[str]:
    """Dynamic int8 quantisation of the MatMul weights of `source`; nodes whose name matches a
    regular expression of `exclude` stay fp32. Returns the names of the nodes kept in fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    kept = [node.name for node in graph.node
            if any(re.search(pattern, node.name) for pattern in exclude)]
    # the quantiser first rewrites each Gemm as NAME_MatMul + NAME_Add: exclude those names too
    quantize_dynamic(str(source), str(target), per_channel=per_channel,
                     weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                     nodes_to_exclude=kept + [f"{name}_MatMul" for name in kept])
    return kept


def _max_difference(classifier, exported: ExportedClassifier,
                    groups: list[TaskGroup]) -> float:
    batch = classifier.encode(list(SAMPLE_TEXTS))
    with torch.inference_mode():
        reference = ProbabilityHead(classifier.model, groups, list(batch.keys()))(
            *batch.values())
    got = exported.run(**batch)
    names = output_names(groups)
    return max(float(np.abs(got[name] - want.numpy()).max())
               for name, want in zip(names[1:], reference[1:]))
