"""`hm3 export --format onnx [--quantize int8]`: per-task probabilities inside the graph."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from hm3 import load, merge, parse_recipe  # noqa: E402
from hm3.bench import SAMPLE_TEXTS  # noqa: E402
from hm3.cli import main  # noqa: E402
from hm3.export import export_onnx  # noqa: E402

from conftest import SERVED_TASKS as TASKS, build_family, classifier_tolerance, recipe_dict  # noqa: E402

TEXTS = ["good film", "bad news today", "free money win call phone now", "hello",
         "what market vote sport great awful who where"]


@pytest.fixture(scope="module")
def merged(served_model):
    return served_model


@pytest.fixture(scope="module")
def exported(merged, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    report = export_onnx(merged, out)
    return out, report


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.numeric
def test_graph_outputs_each_tasks_probabilities(merged, exported):
    folder, report = exported
    torch_model = load(merged, device="cpu")
    # ONNX Runtime's kernels sum in their own order: float32 rounding, bounded by conftest
    assert report["max_abs_diff"] < classifier_tolerance(torch_model, SAMPLE_TEXTS)
    want = torch_model.logits(TEXTS, batch_size=len(TEXTS))
    tolerance = classifier_tolerance(torch_model, TEXTS)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["logits", "probabilities.sentiment", "probabilities.topic",
                     "probabilities.tox"]
    # a plain consumer: the tokenizer files beside the graph, any batch size and length
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    for batch in (TEXTS[:1], TEXTS):
        enc = tokenizer(batch, padding=True, return_tensors="np")
        feed = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
        logits, sentiment, topic, tox = session.run(None, feed)
        rows = [TEXTS.index(t) for t in batch]
        np.testing.assert_allclose(logits, want[rows], rtol=0, atol=tolerance)
        np.testing.assert_allclose(sentiment, softmax(want[rows, 0:2]), rtol=0, atol=tolerance)
        np.testing.assert_allclose(topic, softmax(want[rows, 2:5]), rtol=0, atol=tolerance)
        np.testing.assert_allclose(tox, 1 / (1 + np.exp(-want[rows, 5:7])), rtol=0,
                                   atol=tolerance)
    layout = json.loads((folder / "hm3_onnx.json").read_text())
    assert [t["name"] for t in layout["tasks"]] == list(TASKS)
    metadata = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert [t["labels"] for t in json.loads(metadata["hm3_tasks"])] == list(TASKS.values())


@pytest.mark.numeric
def test_load_predicts_from_the_export_like_the_torch_model(merged, exported):
    folder, _ = exported
    model = load(folder)
    assert model.model.backend == "onnx" and model.tasks == list(TASKS)
    torch_model = load(merged, device="cpu")
    got, want = model.predict(TEXTS), torch_model.predict(TEXTS)
    # predict rounds probabilities to 6 decimals: 1e-6 on top of the float32 bound
    tolerance = classifier_tolerance(torch_model, TEXTS) + 1e-6
    for a, b in zip(got, want):
        for task in TASKS:
            assert a[task]["probabilities"] == pytest.approx(b[task]["probabilities"],
                                                             rel=0, abs=tolerance)
            assert a[task].get("label") == b[task].get("label")
            assert a[task].get("labels") == b[task].get("labels")


def test_int8_quantises_the_body_and_keeps_the_head_fp32(merged, tmp_path):
    out = tmp_path / "int8"
    assert main(["export", str(merged), "-o", str(out), "--quantize", "int8"]) == 0
    graph = onnx.load(str(out / "model.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    head = [node for node in graph.node if "classifier" in node.name]
    assert head and all(node.op_type in ("Gemm", "MatMul", "Add") for node in head)
    model = load(out)
    assert json.loads((out / "hm3_onnx.json").read_text())["quantized"] == "int8"
    probs = model.predict_proba(TEXTS)
    assert np.allclose(probs["topic"].sum(axis=1), 1.0, atol=1e-5)
    want = load(merged, device="cpu").predict_proba(TEXTS)
    assert np.abs(probs["topic"] - want["topic"]).max() < 0.1


def test_export_cli_errors_and_predict_on_the_export(merged, exported, tmp_path, capsys):
    folder, _ = exported
    assert main(["export", str(merged), "-o", str(folder)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", str(folder), "-o", str(tmp_path / "again")]) == 2
    assert "already an ONNX export" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
    assert main(["predict", str(folder), "good film"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert set(line) == {"text", *TASKS}
    assert main(["serve", str(folder), "--backend", "torch"]) == 2
    assert "ONNX export" in capsys.readouterr().err


def test_each_probability_output_holds_its_own_tasks_when_tasks_are_not_in_name_order(tmp_path):
    """Tasks topic then sentiment: outputs named in sorted order would hand sentiment's name to
    topic's probabilities (3 columns where 2 are expected) and the other way round."""
    tasks = {"topic": ["news", "sport", "film"], "sentiment": ["negative", "positive"]}
    base, experts = build_family(tmp_path, tasks)
    merge(parse_recipe(recipe_dict(base, experts)), tmp_path / "merged", progress=False)
    export_onnx(tmp_path / "merged", tmp_path / "onnx")
    model = load(tmp_path / "onnx")
    outputs = model.model.run(**model.encode(TEXTS))
    assert list(outputs) == ["logits", "probabilities.topic", "probabilities.sentiment"]
    logits = outputs["logits"]
    np.testing.assert_allclose(outputs["probabilities.topic"], softmax(logits[:, 0:3]),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(outputs["probabilities.sentiment"], softmax(logits[:, 3:5]),
                               rtol=0, atol=1e-6)


def test_export_into_a_new_folder_prints_no_tracer_warnings(merged, tmp_path, capsys, recwarn):
    """The tracer's "might not generalise" warnings are not the user's business: the export is
    checked against PyTorch on texts of other lengths instead (and warns if that differs)."""
    out = tmp_path / "not" / "yet" / "onnx"
    assert main(["export", str(merged), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    shown = [f"{w.category.__name__}: {w.message}" for w in recwarn
             if not issubclass(w.category, DeprecationWarning)]  # Python hides those
    assert shown == []
    assert (out / "model.onnx").is_file() and f"-> {out}" in captured.out
