"""Exported model folders (`hm3 export`) run by ONNX Runtime or by OpenVINO.

`OnnxSequenceClassifier` and `OpenVinoSequenceClassifier` answer the call a transformers
classifier answers (`model(**tokenizer(texts, return_tensors="pt")).logits`), so
`hm3.model.MultiTaskClassifier`, and with it predict / eval / bench / serve, uses an export
unchanged. The graph's own per-task probability outputs are for other consumers of the file; hm3
reads its logits and applies the same group softmax / sigmoid as for a PyTorch model.

Precision: ONNX Runtime and PyTorch compute in f32. OpenVINO computes at the precision it is
given: "auto" (hm3's default), resolved at load by `choose_precision` from the capabilities
OpenVINO reports for the CPU it runs on (bf16 where it lists BF16, else f32), "f32" (PyTorch's
scores, always), or "bf16" (faster on CPUs with AVX-512 BF16 or AMX; scores move a little).
At bf16 the classification head (`BF16_F32_NODES`: pooler, classifier and what is computed from
them) still runs at f32, as a second compiled model (`split_graph`). int8 is not chosen here: it
needs a quantised export (`--quantize int8`), whose int8 layers run as int8 at either precision.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from hm3.errors import Hm3Error

ONNX_FILE = "model.onnx"
OPENVINO_FILE = "openvino_model.xml"  # and its weights, openvino_model.bin
LAYOUT_FILE = "hm3_onnx.json"  # inputs, outputs, tasks and how the graph was made
THREADS_ENV = "HM3_ONNX_THREADS"  # intra-op threads of either runtime (default: its own choice)
PRECISIONS = ("auto", "f32", "bf16")
# auto by default: bf16 with the head at f32 kept every task within 0.2 macro-F1 points of PyTorch
# on validation and test over three merges of two zoos (MiniLM, MPNet-base), at 1.7-2.0x OpenVINO
# f32's speed (benchmarks/RESULTS.md §6.7); all-bf16 cost a task 0.41-0.58 points. A near-tie text
# can still flip, so "f32" is there for scores equal to PyTorch's.
DEFAULT_PRECISION = "auto"
# At bf16, these nodes (regular expressions searched in the graph's node names: the head modules
# of the architectures hm3 exports) and every node computed from them run at f32: a third less
# logit error than all-bf16 on the zoo's MiniLM at 97-100% of its speed (benchmarks/RESULTS.md
# §6.7).
BF16_F32_NODES = (r"/(pooler|pre_classifier|head|classifier|score)/",)


def is_onnx_folder(folder: Path) -> bool:
    return (Path(folder) / ONNX_FILE).is_file() and (Path(folder) / LAYOUT_FILE).is_file()


def is_openvino_folder(folder: Path) -> bool:
    return (Path(folder) / OPENVINO_FILE).is_file() and (Path(folder) / LAYOUT_FILE).is_file()


def choose_precision(capabilities) -> str:
    """The inference precision "auto" stands for on a CPU with these OpenVINO
    `OPTIMIZATION_CAPABILITIES`: "bf16" where "BF16" is listed, else "f32"."""
    return "bf16" if "BF16" in capabilities else "f32"


def cpu_capabilities() -> list[str]:
    """What OpenVINO reports this machine's CPU computes well (`OPTIMIZATION_CAPABILITIES`)."""
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def check_precision(precision: str | None) -> None:
    if precision is not None and precision not in PRECISIONS:
        raise Hm3Error(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def open_export(folder: Path, precision: str | None = None) -> "ExportedClassifier | None":
    """The runtime for an `hm3 export` folder, or None when `folder` is not one.

    - `precision`: OpenVINO's inference precision (see `PRECISIONS`; default: the one the export
    recorded, else "f32"). ONNX Runtime computes in f32: "bf16" is refused there.
    """
    check_precision(precision)
    if is_openvino_folder(folder):
        return OpenVinoSequenceClassifier(folder, precision=precision)
    if is_onnx_folder(folder):
        if precision == "bf16":
            raise Hm3Error(f"{folder} is an ONNX export, which runs in f32; export with "
                           "--format openvino to run it in bf16")
        return OnnxSequenceClassifier(folder)
    return None


class ExportedClassifier:
    """What both runtimes share: the layout, the config, the CPU device and the call."""

    backend = "?"
    kind = "?"  # for messages: "an ONNX export"
    precision = "f32"  # the precision it computes at, reported by `hm3 serve` and `hm3 export`
    detected: list[str] | None = None  # the CPU capabilities "auto" was resolved from

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.layout = json.loads((folder / LAYOUT_FILE).read_text())
        self.config = SimpleNamespace(**json.loads((folder / "config.json").read_text()))
        self.device = torch.device("cpu")
        self.input_names: list[str] = []

    def eval(self) -> "ExportedClassifier":
        return self

    def to(self, _device) -> "ExportedClassifier":
        return self  # the runtime runs on its CPU device, whatever the device asked for

    def outputs(self, feed: dict[str, np.ndarray],
                names: list[str] | None) -> dict[str, np.ndarray]:
        """The graph's outputs by name (all of them when `names` is None)."""
        raise NotImplementedError

    def run(self, **batch) -> dict[str, np.ndarray]:
        """Every output of the graph (logits and each task's probabilities), by name."""
        missing = [name for name in self.input_names if name not in batch]
        if missing:
            raise Hm3Error(f"the exported model needs inputs {', '.join(missing)}")
        return self.outputs(self._feed(batch), None)

    def __call__(self, **batch) -> SimpleNamespace:
        logits = self.outputs(self._feed(batch), ["logits"])["logits"]
        return SimpleNamespace(logits=torch.from_numpy(np.array(logits)))

    def _feed(self, batch) -> dict[str, np.ndarray]:
        return {name: _numpy(batch[name]) for name in self.input_names}


class OnnxSequenceClassifier(ExportedClassifier):
    """An ONNX Runtime session with the call interface of a transformers sequence classifier.

    - `folder`: an `hm3 export` folder (model.onnx, hm3_onnx.json, config.json, tokenizer files).
    - `threads`: intra-op threads (default: $HM3_ONNX_THREADS, else ONNX Runtime's own choice).
    """

    backend = "onnx"
    kind = "ONNX"

    def __init__(self, folder: str | Path, threads: int | None = None):
        # Imported here, not at the top: only ONNX folders pay onnxruntime's import time.
        import onnxruntime as ort

        super().__init__(folder)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = threads or _threads()
        if threads:
            options.intra_op_num_threads = threads
        path = Path(folder) / ONNX_FILE
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise Hm3Error(f"cannot load {path} with ONNX Runtime: {exc}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def outputs(self, feed, names):
        names = names or [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed)))


class OpenVinoSequenceClassifier(ExportedClassifier):
    """An OpenVINO compiled model with the call interface of a transformers sequence classifier.

    Compiled for latency (one stream) at the inference precision asked for, "auto" by default
    (bf16 on CPUs OpenVINO lists BF16 for, else f32; always set, never OpenVINO's own default,
    which would run all of the graph, head included, at bf16 on such CPUs). At bf16 the head
    (`f32_nodes`) still runs at f32: the graph is cut in two models (`split_graph`), the encoder
    compiled at bf16 and the head at f32, run one after the other. An int8 export (`--quantize
    int8`) runs its int8 layers as such.

    - `folder`: an `hm3 export --format openvino` folder (openvino_model.xml/.bin, hm3_onnx.json,
    config.json, tokenizer files).
    - `threads`: inference threads (default: $HM3_ONNX_THREADS, else OpenVINO's own choice).
    - `precision`: "auto" (bf16 where OpenVINO lists BF16 for this CPU, else f32:
    `choose_precision`), "f32" (PyTorch's scores) or "bf16" (scores move a little); default: the
    one the export recorded (`hm3 export --precision`), else auto. `self.precision` is the one
    used.
    - `f32_nodes`: at bf16, the nodes (regular expressions searched in node names) from which on
    the graph runs at f32 (default `BF16_F32_NODES`, the head; () for all-bf16).
    `self.f32_node_count`: how many of the graph's computing nodes that puts at f32.
    """

    backend = "openvino"
    kind = "OpenVINO"

    def __init__(self, folder: str | Path, threads: int | None = None,
                 precision: str | None = None, f32_nodes: Sequence[str] | None = None):
        check_precision(precision)
        try:
            import openvino as ov
        except ImportError:
            raise Hm3Error(f"{folder} is an OpenVINO export; install the openvino extra "
                           "(pip install 'hm3[openvino]') to run it") from None

        super().__init__(folder)
        precision = precision or self.layout.get("precision") or DEFAULT_PRECISION
        if precision == "auto":
            self.detected = cpu_capabilities()
            precision = choose_precision(self.detected)
        self.precision = precision
        settings = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                    "INFERENCE_PRECISION_HINT": precision}
        threads = threads or _threads()
        if threads:
            settings["INFERENCE_NUM_THREADS"] = threads
        f32_nodes = BF16_F32_NODES if f32_nodes is None else tuple(f32_nodes)
        path = Path(folder) / OPENVINO_FILE
        core = ov.Core()
        try:
            graph = core.read_model(str(path))
            self.input_names = [i.get_any_name() for i in graph.inputs]
            self.output_names = [o.get_any_name() for o in graph.outputs]
            parts, self.sources = [graph], []
            if precision != "f32" and f32_nodes:
                parts, self.sources = split_graph(graph, f32_nodes)
            self.f32_node_count = 0 if len(parts) == 1 else sum(
                node.get_type_name() not in ("Parameter", "Constant", "Result")
                for node in parts[1].get_ordered_ops())
            # the first part at the precision asked for, the rest (the f32 nodes on) at f32
            self.stages = [core.compile_model(part, "CPU", {
                **settings, "INFERENCE_PRECISION_HINT": precision if i == 0 else "f32"})
                for i, part in enumerate(parts)]
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own untyped errors
            raise Hm3Error(f"cannot load {path} with OpenVINO: {exc}") from None
        self.compiled = self.stages[0]
        self._requests = threading.local()  # an infer request serves one thread at a time

    def outputs(self, feed, names):
        requests = getattr(self._requests, "requests", None)
        if requests is None:
            requests = self._requests.requests = [s.create_infer_request() for s in self.stages]
        result = requests[0].infer(feed)
        first = [result[port] for port in self.stages[0].outputs]
        values = {port.get_any_name(): value for port, value in zip(self.stages[0].outputs, first)
                  if port.get_names()}
        if len(self.stages) > 1:
            result = requests[1].infer([feed[source] if isinstance(source, str) else first[source]
                                        for source in self.sources])
            values.update((port.get_any_name(), result[port]) for port in self.stages[1].outputs)
        return {name: values[name] for name in names or self.output_names}


def split_graph(graph, f32_nodes: Sequence[str]) -> tuple[list, list[str | int]]:
    """`graph` (an OpenVINO model, modified) cut in two: the nodes whose name matches a regular
    expression of `f32_nodes` and every node computed from them, as a second model fed by the
    graph's inputs and the first's outputs, so that it can be compiled at f32 while the first runs
    at bf16. (Marking nodes to keep their precision inside one compiled model does not hold on
    OpenVINO 2026's CPU plugin: a matrix product fused with its bias loses the mark.)

    Returns the models and, for each input of the second, where its value comes from: an input's
    name, or the index of one of the first model's outputs; ([graph], []) when no node matches."""
    from openvino import Model, opset13 as ops

    late = set()
    for node in graph.get_ordered_ops():  # topological: a node's producers come first
        if node.get_type_name() in ("Parameter", "Constant", "Result"):
            continue
        if any(re.search(p, node.get_friendly_name()) for p in f32_nodes) or any(
                i.get_source_output().get_node().get_instance_id() in late
                for i in node.inputs()):
            late.add(node.get_instance_id())
    if not late:
        return [graph], []
    results = graph.get_results()
    early_results = [r for r in results
                     if r.input_value(0).get_node().get_instance_id() not in late]
    late_results = [r for r in results if r not in early_results]
    parameters, sources, boundary, made = [], [], [], {}
    for node in [n for n in graph.get_ordered_ops() if n.get_instance_id() in late]:
        for index, port in enumerate(i.get_source_output() for i in node.inputs()):
            producer = port.get_node()
            if producer.get_instance_id() in late or producer.get_type_name() == "Constant":
                continue
            key = (producer.get_instance_id(), port.get_index())
            if key not in made:
                made[key] = ops.parameter(port.get_partial_shape(), port.get_element_type())
                parameters.append(made[key])
                if producer.get_type_name() == "Parameter":
                    sources.append(port.get_any_name())
                else:
                    sources.append(len(early_results) + len(boundary))
                    boundary.append(port)
            node.input(index).replace_source_output(made[key].output(0))
    first = Model(early_results + [ops.result(port) for port in boundary],
                  graph.get_parameters())
    return [first, Model(late_results, parameters)], sources


def describe_precision(model) -> str:
    """What `model` (a transformers model or an export) computes at, for a log line or summary:
    "bf16 (auto: this CPU lists BF16; head f32)", "bf16 (head f32)", "f32"."""
    precision = getattr(model, "precision", "f32")
    detected = getattr(model, "detected", None)
    notes = [] if detected is None else [
        f"auto: this CPU {'lists' if 'BF16' in detected else 'lacks'} BF16"]
    if getattr(model, "f32_node_count", 0):
        notes.append("head f32")
    return f"{precision} ({'; '.join(notes)})" if notes else precision


def _threads() -> int:
    return int(os.environ.get(THREADS_ENV, "0") or 0)


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.cpu().numpy()
    return np.asarray(value, dtype=np.int64)
