"""Export pieces on their own, in seconds: the runtimes of `hm3.onnx_model` on a hand-built ONNX
graph whose logits are sums of the token ids and of the attention mask (so every answer is known
by hand), the precision rules, and `hm3.export`'s checks, wrapper, metadata, int8 node choice,
difference measure and conversion steps with stand-ins for the model and the converters; last,
real exports of conftest's tiny merged model (built once per run, then a fraction of a second
each): the folder, its layout, the graph's shapes, the warning past the fp32 tolerance."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from hm3 import export, onnx_model  # noqa: E402
from hm3.errors import Hm3Error, Hm3Warning  # noqa: E402
from hm3.heads import TaskGroup  # noqa: E402
from hm3.onnx_model import (  # noqa: E402
    OnnxSequenceClassifier,
    _numpy,
    choose_precision,
    describe_precision,
    is_onnx_folder,
    is_openvino_folder,
    open_export,
)

GROUPS = [TaskGroup("spam", ("ham", "spam"), 0),
          TaskGroup("tox", ("insult", "threat"), 2, multi_label=True)]
# logits = [sum(ids), sum(mask)] @ W
W = np.array([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, -1.0]], dtype=np.float32)


def tiny_graph() -> onnx.ModelProto:
    """input_ids, attention_mask -> logits ([sum ids, sum mask] @ W, a MatMul named like a
    classifier head) and probabilities.spam (a softmax of the first two logits)."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                         ["batch", "sequence"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])
    spam = helper.make_tensor_value_info("probabilities.spam", TensorProto.FLOAT, ["batch", 2])
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["ids_f", "axes"], ["ids_sum"], keepdims=1),
        helper.make_node("ReduceSum", ["mask_f", "axes"], ["mask_sum"], keepdims=1),
        helper.make_node("Concat", ["ids_sum", "mask_sum"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", "W"], ["logits"], name="/classifier/MatMul"),
        helper.make_node("Slice", ["logits", "start", "end", "axes"], ["spam_logits"]),
        helper.make_node("Softmax", ["spam_logits"], ["probabilities.spam"], axis=1),
    ]
    inits = [helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
             helper.make_tensor("start", TensorProto.INT64, [1], [0]),
             helper.make_tensor("end", TensorProto.INT64, [1], [2]),
             helper.make_tensor("W", TensorProto.FLOAT, W.shape, W.ravel().tolist())]
    graph = helper.make_graph(nodes, "tiny", [ids, mask], [logits, spam], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def write_folder(folder: Path, layout: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_graph(), str(folder / "model.onnx"))
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "vocab_size": 9}))
    (folder / "hm3_onnx.json").write_text(json.dumps(
        {"inputs": ["input_ids", "attention_mask"], **(layout or {})}))
    return folder


def to_openvino(folder: Path, layout: dict | None = None) -> Path:
    ov = pytest.importorskip("openvino")
    out = folder.parent / (folder.name + "-ov")
    out.mkdir()
    ov.save_model(ov.convert_model(str(folder / "model.onnx")), str(out / "openvino_model.xml"),
                  compress_to_fp16=False)
    shutil.copy(folder / "config.json", out / "config.json")
    (out / "hm3_onnx.json").write_text(json.dumps({"inputs": [], **(layout or {})}))
    return out


IDS = [[3, 4, 0], [5, 0, 0]]
MASK = [[1, 1, 0], [1, 0, 0]]
# by hand: features [[7, 2], [5, 1]] @ W
LOGITS = np.array([[7, 2, 14, -2], [5, 1, 10, -1]], dtype=np.float32)


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --- hm3.onnx_model --------------------------------------------------------------------------

def test_an_onnx_folder_runs_like_a_transformers_classifier(tmp_path):
    folder = write_folder(tmp_path / "onnx")
    model = open_export(folder)
    assert isinstance(model, OnnxSequenceClassifier)
    assert (model.backend, model.kind, model.precision) == ("onnx", "ONNX", "f32")
    assert model.eval() is model and model.to("cuda") is model
    assert model.device == torch.device("cpu") and model.config.vocab_size == 9
    assert model.input_names == ["input_ids", "attention_mask"]
    answer = model(input_ids=torch.tensor(IDS, dtype=torch.int32), attention_mask=MASK,
                   token_type_ids=torch.zeros(2, 3))  # inputs the graph lacks are left out
    assert isinstance(answer.logits, torch.Tensor)
    np.testing.assert_array_equal(answer.logits.numpy(), LOGITS)
    outputs = model.run(input_ids=np.array(IDS), attention_mask=np.array(MASK))
    assert list(outputs) == ["logits", "probabilities.spam"]
    np.testing.assert_allclose(outputs["probabilities.spam"], softmax(LOGITS[:, :2]), rtol=1e-6)
    with pytest.raises(Hm3Error, match="^the exported model needs inputs attention_mask$"):
        model.run(input_ids=np.array(IDS))
    feed = {"input_ids": np.array(IDS), "attention_mask": np.array(MASK)}
    named = model.outputs(feed, ["probabilities.spam"])  # only the outputs named, by name
    assert list(named) == ["probabilities.spam"]
    np.testing.assert_allclose(named["probabilities.spam"], softmax(LOGITS[:, :2]), rtol=1e-6)


def test_a_folder_is_an_export_only_with_its_graph_and_layout(tmp_path):
    folder = write_folder(tmp_path / "onnx")
    assert is_onnx_folder(folder) and not is_openvino_folder(folder)
    (folder / "hm3_onnx.json").unlink()
    assert not is_onnx_folder(folder) and open_export(folder) is None
    (folder / "hm3_onnx.json").mkdir()  # a folder of that name is not the file
    assert not is_onnx_folder(folder)
    assert open_export(tmp_path) is None


def test_onnx_runs_in_f32_only_and_precisions_are_checked(tmp_path):
    folder = write_folder(tmp_path / "onnx")
    with pytest.raises(Hm3Error) as error:
        open_export(folder, precision="bf16")
    assert str(error.value) == (f"{folder} is an ONNX export, which runs in f32; export with "
                                "--format openvino to run it in bf16")
    assert open_export(folder, precision="f32").precision == "f32"
    assert open_export(folder, precision="auto").precision == "f32"
    with pytest.raises(Hm3Error, match=r"^precision must be one of auto, f32, bf16, got 'fp16'$"):
        open_export(folder, precision="fp16")


def test_threads_come_from_the_argument_or_the_environment(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "onnx")
    threads = lambda model: model.session.get_session_options().intra_op_num_threads  # noqa: E731
    assert threads(OnnxSequenceClassifier(folder, threads=3)) == 3
    monkeypatch.setenv("HM3_ONNX_THREADS", "2")
    assert threads(OnnxSequenceClassifier(folder)) == 2
    assert onnx_model._threads() == 2
    monkeypatch.setenv("HM3_ONNX_THREADS", "")
    assert onnx_model._threads() == 0
    monkeypatch.delenv("HM3_ONNX_THREADS")
    assert onnx_model._threads() == 0
    options = OnnxSequenceClassifier(folder).session.get_session_options()
    assert options.graph_optimization_level.name == "ORT_ENABLE_ALL"
    assert OnnxSequenceClassifier(folder).session.get_providers() == ["CPUExecutionProvider"]


def test_a_corrupt_graph_is_named(tmp_path):
    folder = write_folder(tmp_path / "onnx")
    (folder / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(Hm3Error, match=f"^cannot load {folder / 'model.onnx'} with ONNX Runtime: "):
        open_export(folder)


def test_numpy_inputs_are_int64():
    for value in (torch.tensor([[1, 2]], dtype=torch.int32), [[1, 2]], np.array([[1, 2]])):
        got = _numpy(value)
        assert isinstance(got, np.ndarray) and got.dtype == np.int64
        np.testing.assert_array_equal(got, [[1, 2]])


def test_describe_precision_says_where_auto_came_from():
    assert describe_precision(SimpleNamespace()) == "f32"
    assert describe_precision(SimpleNamespace(precision="bf16")) == "bf16"
    assert describe_precision(SimpleNamespace(precision="bf16", detected=["FP32", "BF16"])) == \
        "bf16 (auto: this CPU lists BF16)"
    assert describe_precision(SimpleNamespace(precision="f32", detected=["FP32"])) == \
        "f32 (auto: this CPU lacks BF16)"
    assert choose_precision(("FP32", "BF16")) == "bf16" and choose_precision(["BF"]) == "f32"


def test_an_openvino_folder_runs_at_the_precision_asked_or_recorded(tmp_path, monkeypatch):
    ov_folder = to_openvino(write_folder(tmp_path / "onnx"))
    # a folder that records no precision runs at auto: here on a CPU without bf16 units
    monkeypatch.setattr(onnx_model, "cpu_capabilities", lambda: ["FP32", "INT8"])
    model = open_export(ov_folder)
    assert (model.backend, model.kind, model.precision, model.detected) == \
        ("openvino", "OpenVINO", "f32", ["FP32", "INT8"])
    assert open_export(ov_folder, precision="f32").detected is None  # asked for: not detected
    assert sorted(model.input_names) == ["attention_mask", "input_ids"]
    np.testing.assert_array_equal(model(input_ids=IDS, attention_mask=MASK).logits.numpy(),
                                  LOGITS)
    outputs = model.run(input_ids=np.array(IDS), attention_mask=np.array(MASK))
    assert sorted(outputs) == ["logits", "probabilities.spam"]
    named = model.outputs({"input_ids": np.array(IDS), "attention_mask": np.array(MASK)},
                          ["probabilities.spam"])
    assert list(named) == ["probabilities.spam"]
    np.testing.assert_allclose(outputs["probabilities.spam"], softmax(LOGITS[:, :2]), rtol=1e-6)
    compiled = model.compiled
    assert str(compiled.get_property("PERFORMANCE_HINT")) == "LATENCY"
    assert compiled.get_property("NUM_STREAMS") == 1
    assert open_export(ov_folder, precision="bf16").precision == "bf16"
    monkeypatch.setattr(onnx_model, "cpu_capabilities", lambda: ["FP32", "BF16"])
    auto = open_export(ov_folder, precision="auto")
    assert (auto.precision, auto.detected) == ("bf16", ["FP32", "BF16"])
    assert open_export(ov_folder).precision == "bf16"  # the default, on a CPU with bf16 units
    monkeypatch.setattr(onnx_model, "cpu_capabilities", lambda: ["FP32", "INT8"])
    assert open_export(ov_folder, precision="auto").precision == "f32"
    (ov_folder / "hm3_onnx.json").write_text(json.dumps({"precision": "auto"}))
    assert open_export(ov_folder).precision == "f32"  # the recorded "auto", resolved here
    assert open_export(ov_folder, precision="bf16").precision == "bf16"  # asked for wins
    (ov_folder / "hm3_onnx.json").write_text(json.dumps({"precision": "bf16"}))
    assert open_export(ov_folder).precision == "bf16"
    monkeypatch.setenv("HM3_ONNX_THREADS", "1")
    assert open_export(ov_folder).compiled.get_property("INFERENCE_NUM_THREADS") == 1


def test_an_openvino_folder_opened_directly_checks_the_precision_too(tmp_path):
    folder = to_openvino(write_folder(tmp_path / "onnx"))
    with pytest.raises(Hm3Error, match=r"^precision must be one of auto, f32, bf16, got 'fp16'$"):
        onnx_model.OpenVinoSequenceClassifier(folder, precision="fp16")


def test_every_missing_input_is_named(tmp_path):
    model = open_export(write_folder(tmp_path / "onnx"))
    with pytest.raises(Hm3Error) as error:
        model.run(token_type_ids=np.zeros((2, 3)))
    assert str(error.value) == "the exported model needs inputs input_ids, attention_mask"


def test_an_openvino_folder_without_openvino_says_which_extra_to_install(tmp_path, monkeypatch):
    folder = tmp_path / "ov"
    folder.mkdir()
    (folder / "openvino_model.xml").write_text("<net/>")
    (folder / "hm3_onnx.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with pytest.raises(Hm3Error) as error:
        open_export(folder)
    assert str(error.value) == (f"{folder} is an OpenVINO export; install the openvino extra "
                                "(pip install 'hm3[openvino]') to run it")
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_each_thread_has_its_own_openvino_request(tmp_path):
    model = open_export(to_openvino(write_folder(tmp_path / "onnx")))
    requests = []

    def work():
        model(input_ids=IDS, attention_mask=MASK)
        first = model._requests.requests  # one per compiled part of the graph
        model(input_ids=IDS, attention_mask=MASK)
        assert model._requests.requests is first  # each thread reuses its own
        requests.append(first)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    work()
    assert len({id(r) for r in requests}) == 3


def test_a_corrupt_openvino_graph_is_named(tmp_path):
    folder = to_openvino(write_folder(tmp_path / "onnx"))
    (folder / "openvino_model.xml").write_text("<net>")
    with pytest.raises(Hm3Error, match=f"^cannot load {folder / 'openvino_model.xml'} with "
                                       "OpenVINO: "):
        open_export(folder)


# --- hm3.export ------------------------------------------------------------------------------

class Logits(torch.nn.Module):
    """A stand-in classifier: the logits are given, the inputs checked by name."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.seen = None

    def forward(self, **inputs):
        self.seen = inputs
        return SimpleNamespace(logits=self.logits)


def test_the_wrapper_gives_each_task_its_softmax_or_sigmoids():
    logits = torch.tensor([[1.0, 3.0, 0.0, -2.0], [2.0, 2.0, 4.0, 1.0]])
    model = Logits(logits)
    wrapper = export.ProbabilityHead(model, GROUPS, ["input_ids", "attention_mask"])
    assert wrapper.training is False
    ids, mask = torch.ones(2, 3), torch.zeros(2, 3)
    out = wrapper(ids, mask)
    assert model.seen["input_ids"] is ids and model.seen["attention_mask"] is mask
    assert len(out) == 3 and out[0] is logits
    np.testing.assert_allclose(out[1].numpy(), softmax(logits[:, :2].numpy()), rtol=1e-6)
    np.testing.assert_allclose(out[2].numpy(), 1 / (1 + np.exp(-logits[:, 2:].numpy())),
                               rtol=1e-6)
    assert export.output_names(GROUPS) == ["logits", "probabilities.spam", "probabilities.tox"]


def test_the_difference_is_over_the_task_probabilities_only():
    logits = torch.tensor([[1.0, 3.0, 0.0, -2.0]])
    classifier = SimpleNamespace(model=Logits(logits),
                                 encode=lambda texts: {"input_ids": torch.ones(1, 2)})
    spam = softmax(logits[:, :2].numpy())
    tox = 1 / (1 + np.exp(-logits[:, 2:].numpy()))
    got = {"logits": logits.numpy() + 5.0, "probabilities.spam": spam + [[0.0, 0.01]],
           "probabilities.tox": tox - [[0.003, 0.0]]}
    exported = SimpleNamespace(run=lambda **batch: got)
    assert export._max_difference(classifier, exported, GROUPS) == pytest.approx(0.01, abs=1e-7)


def test_the_task_layout_is_written_into_the_graph(tmp_path):
    path = tmp_path / "g.onnx"
    onnx.save(tiny_graph(), str(path))
    export._add_metadata(path, GROUPS)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["hm3_tasks"]) == [g.to_dict() for g in GROUPS]


def body_and_head_graph() -> onnx.ModelProto:
    """x -> a MatMul and a Gemm named as body layers -> a Gemm named as the head."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    inits = [helper.make_tensor(name, TensorProto.FLOAT, [8, 8],
                                rng.normal(size=64).astype(np.float32).tolist())
             for name in ("body_w", "inner_w", "head_w")]
    inits += [helper.make_tensor(name, TensorProto.FLOAT, [8], [0.1] * 8)
              for name in ("inner_b", "head_b")]
    nodes = [helper.make_node("MatMul", ["x", "body_w"], ["h"], name="/layer.0/attention/MatMul"),
             helper.make_node("Gemm", ["h", "inner_w", "inner_b"], ["g"],
                              name="/layer.0/intermediate/dense/Gemm"),
             helper.make_node("Gemm", ["g", "head_w", "head_b"], ["y"], name="/classifier/Gemm")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 17)])


def integer_nodes(path: Path) -> list[str]:
    return [node.name for node in onnx.load(str(path)).graph.node
            if node.op_type == "MatMulInteger"]


@pytest.mark.parametrize("per_channel", [True, False, None])
def test_int8_quantises_the_body_and_keeps_the_matched_nodes_fp32(tmp_path, per_channel):
    source, target = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(body_and_head_graph(), str(source))
    if per_channel is None:  # the default: one scale per output channel
        kept = export.quantize_int8(source, target)
    else:
        kept = export.quantize_int8(source, target, per_channel=per_channel)
    assert kept == ["/classifier/Gemm"]
    quantised = integer_nodes(target)
    # both body layers, the Gemm too (rewritten as NAME_MatMul + NAME_Add first); not the head
    assert len(quantised) == 2 and not any("classifier" in name for name in quantised)
    graph = onnx.load(str(target)).graph
    scales = [i for i in graph.initializer if i.name.startswith("body_w") and "scale" in i.name]
    assert [list(s.dims) for s in scales] == ([[]] if per_channel is False else [[8]])
    nothing_kept = export.quantize_int8(source, tmp_path / "all.onnx", exclude=())
    assert nothing_kept == [] and len(integer_nodes(tmp_path / "all.onnx")) == 3


def test_export_options_are_checked_before_the_model_is_read(tmp_path):
    missing = tmp_path / "no-model"
    with pytest.raises(Hm3Error, match=r"^--quantize supports int8, got 'int4'$"):
        export.export_onnx(missing, tmp_path / "out", quantize="int4")
    pytest.importorskip("openvino")
    with pytest.raises(Hm3Error, match=r"^--quantize supports int8, got 'int4'$"):
        export.export_openvino(missing, tmp_path / "out", quantize="int4")
    with pytest.raises(Hm3Error, match=r"^precision must be one of auto, f32, bf16"):
        export.export_openvino(missing, tmp_path / "out", precision="f16")
    texts = [f"text {i}" for i in range(15)] + ["  ", ""]
    with pytest.raises(Hm3Error) as error:
        export.export_openvino(missing, tmp_path / "out", quantize="int8", calibration=texts)
    assert str(error.value) == (
        "an OpenVINO int8 export measures activation ranges on unlabelled texts: give at least "
        "16 (got 15), e.g. `--calibration traffic.txt` with a few hundred texts like your "
        "traffic")
    with pytest.raises(Hm3Error, match=r"give at least 16 \(got 0\)"):
        export.export_openvino(missing, tmp_path / "out", quantize="int8")
    with pytest.raises(Hm3Error, match="^calibration texts are for --quantize int8 only$"):
        export.export_openvino(missing, tmp_path / "out", calibration=["a"])


def test_an_openvino_export_without_openvino_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with pytest.raises(Hm3Error) as error:
        export.export_openvino(tmp_path / "no-model", tmp_path / "out")
    assert str(error.value) == ("the OpenVINO export needs the openvino extra: "
                                "pip install 'hm3[openvino]'")
    assert error.value.__cause__ is None and error.value.__suppress_context__


def fake_load(monkeypatch, backend="torch", groups=GROUPS):
    classifier = SimpleNamespace(model=SimpleNamespace(backend=backend, kind="ONNX"),
                                 groups=groups)
    calls = []
    monkeypatch.setattr(export, "load", lambda *args, **kwargs: calls.append((args, kwargs))
                        or classifier)
    return calls


def test_an_export_or_a_task_named_logits_is_refused(tmp_path, monkeypatch):
    calls = fake_load(monkeypatch, backend="onnx")
    with pytest.raises(Hm3Error, match="^m is already an ONNX export; export the PyTorch model "
                                       "instead$"):
        export.export_onnx("m", tmp_path / "out", max_length=9, allow_pickle=True)
    assert calls == [(("m",), {"device": "cpu", "max_length": 9, "allow_pickle": True})]
    fake_load(monkeypatch, groups=[TaskGroup("logits", ("a", "b"), 0)])
    with pytest.raises(Hm3Error) as error:
        export.export_onnx("m", tmp_path / "out")
    assert str(error.value) == ("a task named 'logits' would clash with the graph's logits "
                                "output; rename the task in the recipe")
    fake_load(monkeypatch)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(Hm3Error, match="already exists"):  # not overwritten unasked
        export.export_onnx("m", tmp_path / "full")


def test_the_layout_records_how_the_graph_was_made(tmp_path, monkeypatch):
    recorded = []
    monkeypatch.setattr(export, "_export", lambda model, output, overwrite, file, convert,
                        max_length, allow_pickle, layout: recorded.append(
                            (overwrite, file, layout)))
    export.export_onnx("m", tmp_path / "a")
    export.export_onnx("m", tmp_path / "b", quantize="int8")
    pytest.importorskip("openvino")
    export.export_openvino("m", tmp_path / "c")
    export.export_openvino("m", tmp_path / "d", quantize="int8", calibration=["t"] * 16)
    export.export_openvino("m", tmp_path / "e", quantize="int8", calibration=["t"] * 16,
                           precision="bf16")
    assert recorded == [
        (False, "model.onnx", {"format": "onnx", "quantized": None, "per_channel": None,
                               "fp32_nodes": None}),
        (False, "model.onnx", {"format": "onnx", "quantized": "int8", "per_channel": True,
                               "fp32_nodes": list(export.FP32_NODES)}),
        (False, "openvino_model.xml", {"format": "openvino", "quantized": None,
                                       "precision": "auto", "calibration_texts": None,
                                       "fp32_nodes": None}),  # auto: resolved where it loads
        # int8: f32 unless asked (the nodes it keeps fp32 for accuracy stay so)
        (False, "openvino_model.xml", {"format": "openvino", "quantized": "int8",
                                       "precision": "f32", "calibration_texts": 16,
                                       "fp32_nodes": list(export.FP32_NODES)}),
        (False, "openvino_model.xml", {"format": "openvino", "quantized": "int8",
                                       "precision": "bf16", "calibration_texts": 16,
                                       "fp32_nodes": list(export.FP32_NODES)})]


def test_an_exporter_failure_names_it(tmp_path):
    class Fails(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot trace this")

    with pytest.raises(Hm3Error, match="^torch.onnx could not export this model: .*cannot trace"):
        export._torch_export(Fails(), (torch.ones(1, 2),), tmp_path / "x.onnx", ["x"], ["y"],
                             {"x": {0: "batch"}})


def test_the_exporter_silences_only_the_tracers_general_warnings(tmp_path):
    class Warns(torch.nn.Module):
        def forward(self, x):
            warnings.warn("Converting a tensor to a Python boolean might cause the trace to be "
                          "incorrect", torch.jit.TracerWarning)
            warnings.warn("Exporting aten::index operator of advanced indexing in opset 17",
                          UserWarning)
            warnings.warn("something else about this model", UserWarning)
            return x * 2

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export._torch_export(Warns(), (torch.ones(1, 2),), tmp_path / "x.onnx", ["x"], ["y"],
                             {"x": {0: "batch"}})
    shown = {str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)}
    assert shown == {"something else about this model"}
    assert [o.name for o in onnx.load(str(tmp_path / "x.onnx")).graph.output] == ["y"]


def test_nncf_is_given_every_calibration_text_in_batches_of_16(monkeypatch):
    """NNCF stood in for: what it is given is tested (an int8 export calibrated on no data at
    all still lands within the export test's bound on the tiny model)."""
    nncf = pytest.importorskip("nncf")
    seen = {}

    def quantize(graph, dataset, **kwargs):
        seen["items"] = list(dataset.get_inference_data())
        seen.update(kwargs)
        return "quantised"

    monkeypatch.setattr(nncf, "quantize", quantize)
    graph = SimpleNamespace(inputs=[SimpleNamespace(get_any_name=lambda n=n: n)
                                    for n in ("input_ids", "attention_mask")])
    encoded = []

    def encode(texts):
        encoded.append(list(texts))
        return {"input_ids": torch.tensor([[len(t)] for t in texts]),
                "attention_mask": torch.ones(len(texts), 1, dtype=torch.long),
                "token_type_ids": torch.zeros(len(texts), 1, dtype=torch.long)}

    texts = [f"t{i}" for i in range(35)]
    classifier = SimpleNamespace(encode=encode)
    assert export._nncf_int8(graph, classifier, texts, ("classifier", r"ffn/lin2")) == "quantised"
    assert encoded == [texts[:16], texts[16:32], texts[32:]]
    assert [sorted(item) for item in seen["items"]] == [["attention_mask", "input_ids"]] * 3
    assert isinstance(seen["items"][0]["input_ids"], np.ndarray)
    np.testing.assert_array_equal(seen["items"][2]["input_ids"], [[3], [3], [3]])
    assert seen["subset_size"] == 35 and seen["model_type"] == nncf.ModelType.TRANSFORMER
    scope = seen["ignored_scope"]
    assert scope.patterns == [".*(?:classifier).*", ".*(?:ffn/lin2).*"]
    assert scope.validate is False


def record_export(monkeypatch) -> list[tuple]:
    """`_export` stood in for: each call's arguments, in the order `_export` takes them."""
    calls = []
    monkeypatch.setattr(export, "_export", lambda *args: calls.append(args) or "report")
    return calls


def test_onnx_export_moves_or_quantises_the_traced_graph_into_the_folder(tmp_path, monkeypatch):
    calls = record_export(monkeypatch)
    quantised = []
    monkeypatch.setattr(export, "quantize_int8", lambda *args: quantised.append(args))
    staging = tmp_path / "staging"
    staging.mkdir()
    fp32 = tmp_path / "fp32.onnx"
    fp32.write_bytes(b"traced graph")

    assert export.export_onnx("m", "out") == "report"
    model, output, overwrite, file, convert, max_length, allow_pickle, layout = calls[-1]
    assert (model, output, overwrite, file, max_length, allow_pickle) == (
        "m", "out", False, "model.onnx", None, False)
    convert(fp32, staging, "classifier")
    assert (staging / "model.onnx").read_bytes() == b"traced graph" and not fp32.exists()
    assert quantised == []

    export.export_onnx("m", "out2", quantize="int8", overwrite=True, exclude=("head",),
                       per_channel=False, max_length=7, allow_pickle=True)
    model, output, overwrite, file, convert, max_length, allow_pickle, layout = calls[-1]
    assert (model, output, overwrite, file, max_length, allow_pickle) == (
        "m", "out2", True, "model.onnx", 7, True)
    assert layout == {"format": "onnx", "quantized": "int8", "per_channel": False,
                      "fp32_nodes": ["head"]}
    convert(tmp_path / "other.onnx", staging, "classifier")
    assert quantised == [(tmp_path / "other.onnx", staging / "model.onnx", ("head",), False)]


def test_openvino_export_converts_then_quantises_with_the_nonblank_texts(tmp_path, monkeypatch):
    ov = pytest.importorskip("openvino")
    calls = record_export(monkeypatch)
    steps = []
    monkeypatch.setattr(ov, "convert_model", lambda path: steps.append(("convert", path))
                        or "graph")
    monkeypatch.setattr(ov, "save_model", lambda graph, path, **kwargs: steps.append(
        ("save", graph, path, kwargs)))
    monkeypatch.setattr(export, "_nncf_int8", lambda graph, classifier, texts, exclude:
                        steps.append(("int8", graph, classifier, texts, exclude)) or "int8 graph")
    staging, fp32 = tmp_path / "staging", tmp_path / "fp32.onnx"

    export.export_openvino("m", "out")
    model, output, overwrite, file, convert, max_length, allow_pickle, layout = calls[-1]
    assert (model, output, overwrite, file, max_length, allow_pickle) == (
        "m", "out", False, "openvino_model.xml", None, False)
    convert(fp32, staging, "classifier")
    assert steps == [("convert", str(fp32)),
                     ("save", "graph", str(staging / "openvino_model.xml"),
                      {"compress_to_fp16": False})]

    steps.clear()
    texts = [f"text {i}" for i in range(16)]  # exactly the minimum, once the blank ones are out
    export.export_openvino("m", "out2", quantize="int8", calibration=[" ", *texts, ""],
                           overwrite=True, exclude=("head",), max_length=7, allow_pickle=True,
                           precision="bf16")
    model, output, overwrite, file, convert, max_length, allow_pickle, layout = calls[-1]
    assert (model, output, overwrite, file, max_length, allow_pickle) == (
        "m", "out2", True, "openvino_model.xml", 7, True)
    assert layout == {"format": "openvino", "quantized": "int8", "precision": "bf16",
                      "calibration_texts": 16, "fp32_nodes": ["head"]}
    convert(fp32, staging, "classifier")
    assert steps == [("convert", str(fp32)), ("int8", "graph", "classifier", texts, ("head",)),
                     ("save", "int8 graph", str(staging / "openvino_model.xml"),
                      {"compress_to_fp16": False})]


# --- real exports of the tiny merged model (conftest's served_model, built once) -------------

SERVED_GROUPS = [{"name": "sentiment", "labels": ["negative", "positive"], "offset": 0,
                  "multi_label": False, "threshold": 0.5},
                 {"name": "topic", "labels": ["news", "sport", "film"], "offset": 2,
                  "multi_label": False, "threshold": 0.5},
                 {"name": "tox", "labels": ["insult", "threat"], "offset": 5,
                  "multi_label": True, "threshold": 0.5}]


def test_an_onnx_export_folder_holds_the_graph_its_layout_the_config_and_the_tokenizer(
        served_model, tmp_path, monkeypatch):
    resolved = []
    real_resolve = export.resolve
    monkeypatch.setattr(export, "resolve", lambda reference, allow_pickle=False: resolved.append(
        (reference, allow_pickle)) or real_resolve(reference, allow_pickle=allow_pickle))
    out = tmp_path / "onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export.export_onnx(served_model, out, max_length=20, allow_pickle=True)
    assert not [w for w in caught if issubclass(w.category, Hm3Warning)]
    assert resolved == [(str(served_model), True)]
    graph_bytes = (out / "model.onnx").stat().st_size
    assert report == {"path": str(out.resolve()), "file": "model.onnx",
                      "megabytes": graph_bytes / 1048576, "max_abs_diff": report["max_abs_diff"],
                      "quantized": None, "precision": "f32"}
    assert isinstance(report["max_abs_diff"], float) and 0 <= report["max_abs_diff"] < 1e-3
    inputs = ["input_ids", "token_type_ids", "attention_mask"]  # the BERT tokenizer's
    outputs = ["logits", "probabilities.sentiment", "probabilities.topic", "probabilities.tox"]
    assert json.loads((out / "hm3_onnx.json").read_text()) == {
        "source": str(served_model), "file": "model.onnx", "inputs": inputs, "outputs": outputs,
        "opset": 17, "format": "onnx", "quantized": None, "per_channel": None, "fp32_nodes": None,
        "max_length": 20, "tasks": SERVED_GROUPS}
    # a merged model's config already holds the task layout: copied as it is
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (served_model / "config.json").read_text())
    # the tokenizer beside the graph, and nothing left of the traced fp32 graph
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "hm3_onnx.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
    proto = onnx.load(str(out / "model.onnx"))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    dims = lambda value: [d.dim_param or d.dim_value  # noqa: E731
                          for d in value.type.tensor_type.shape.dim]
    assert [(i.name, dims(i)) for i in proto.graph.input] == [
        (name, ["batch", "sequence"]) for name in inputs]
    assert [(o.name, dims(o)) for o in proto.graph.output] == [
        ("logits", ["batch", 7]), ("probabilities.sentiment", ["batch", 2]),
        ("probabilities.topic", ["batch", 3]), ("probabilities.tox", ["batch", 2])]
    # an existing folder is replaced when asked to
    again = export.export_onnx(served_model, out, overwrite=True)
    assert again["path"] == str(out.resolve())
    assert json.loads((out / "hm3_onnx.json").read_text())["max_length"] == 32  # the tokenizer's


def test_the_traced_graph_is_written_inside_the_folder_being_made(served_model, tmp_path):
    """So the conversion moves it on the output's own filesystem (a rename, where a temporary
    folder elsewhere could be another filesystem), and it goes with the folder on failure."""
    seen = []

    def convert(fp32, staging, classifier):
        seen.append((fp32, staging, fp32.is_file(), classifier.tasks))
        fp32.replace(staging / "model.onnx")

    out = tmp_path / "out"
    export._export(served_model, out, False, "model.onnx", convert, None, False,
                   {"format": "onnx", "quantized": None})
    (fp32, staging, written, tasks), = seen
    assert written and staging in fp32.parents and staging.parent == out.parent
    assert tasks == ["sentiment", "topic", "tox"] and (out / "model.onnx").is_file()


@pytest.mark.parametrize("quantize, diff, warned", [(None, 0.0011, True), (None, 0.001, False),
                                                    ("int8", 0.05, False)])
def test_an_fp32_export_further_than_the_tolerance_from_pytorch_warns(
        served_model, tmp_path, monkeypatch, quantize, diff, warned):
    measured = []
    monkeypatch.setattr(export, "_max_difference", lambda classifier, exported, groups:
                        measured.append((classifier.tasks, exported.backend,
                                         [g.name for g in groups])) or diff)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export.export_onnx(served_model, tmp_path / "out", quantize=quantize)
    assert measured == [(["sentiment", "topic", "tox"], "onnx", ["sentiment", "topic", "tox"])]
    assert report["max_abs_diff"] == diff and report["quantized"] == quantize
    shown = [str(w.message) for w in caught if issubclass(w.category, Hm3Warning)]
    assert shown == ([f"the export's probabilities differ from PyTorch's by up to {diff} on "
                      "sample texts at f32; check it on your own texts before you deploy it"]
                     if warned else [])


@pytest.mark.parametrize("f32_diff, warned", [(0.5, True), (1e-6, False)])
def test_an_export_run_at_bf16_here_is_checked_at_f32_as_well(
        served_model, tmp_path, monkeypatch, f32_diff, warned):
    """With `auto` the default, an export checked on a CPU with bf16 units runs at bf16, where
    the probabilities move by ~1e-2 and the f32 tolerance means nothing: the graph is opened
    again at f32 and that difference decides the warning (a wrong graph warns on every CPU); the
    report keeps what it runs at here."""
    opened, measured = [], []

    class Runtime:
        def __init__(self, precision):
            self.precision, self.backend = precision, "openvino"

    def open_export(folder, precision=None):
        opened.append(precision)
        return Runtime(precision or "bf16")  # what `auto` resolves to on a CPU with BF16

    monkeypatch.setattr(export, "open_export", open_export)
    monkeypatch.setattr(export, "describe_precision", lambda model: model.precision)
    monkeypatch.setattr(export, "_max_difference", lambda classifier, exported, groups:
                        measured.append(exported.precision) or
                        (0.02 if exported.precision == "bf16" else f32_diff))

    def convert(fp32, staging, classifier):
        fp32.replace(staging / "model.onnx")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export._export(served_model, tmp_path / "out", False, "model.onnx", convert,
                                None, False, {"format": "openvino", "quantized": None})
    assert opened == [None, "f32"] and measured == ["bf16", "f32"]
    assert report["max_abs_diff"] == 0.02 and report["precision"] == "bf16"
    shown = [str(w.message) for w in caught if issubclass(w.category, Hm3Warning)]
    assert shown == ([f"the export's probabilities differ from PyTorch's by up to {f32_diff} on "
                      "sample texts at f32; check it on your own texts before you deploy it"]
                     if warned else [])


@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ,
                    reason="mutmut's trampoline adds a frame to every call under it")
def test_the_fp32_tolerance_warning_points_at_the_callers_line(served_model, tmp_path,
                                                               monkeypatch):
    monkeypatch.setattr(export, "_max_difference", lambda *_: 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export.export_onnx(served_model, tmp_path / "out")
    shown = [w for w in caught if issubclass(w.category, Hm3Warning)]
    assert [Path(w.filename).name for w in shown] == [Path(__file__).name]


def test_a_plain_classifier_exports_with_the_task_layout_it_was_loaded_with(tmp_path):
    from conftest import build_family

    _, experts = build_family(tmp_path, {"sentiment": ["negative", "positive"]})
    assert "hm3" not in json.loads((experts["sentiment"] / "config.json").read_text())
    export.export_onnx(experts["sentiment"], tmp_path / "onnx")
    config = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert config["hm3"] == {"tasks": [SERVED_GROUPS[0]]}
    assert config["id2label"] == {"0": "negative", "1": "positive"}  # the rest as it was
