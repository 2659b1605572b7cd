"""`hm3 export --format openvino [--quantize int8 --calibration FILE]`, loaded and served; every
supported architecture through both export formats."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

pytest.importorskip("onnx")
ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install "
                         "'hm3[openvino]')")

from hm3 import load, merge, parse_recipe  # noqa: E402
from hm3.bench import SAMPLE_TEXTS  # noqa: E402
from hm3.cli import main  # noqa: E402
from hm3.errors import Hm3Error  # noqa: E402
from hm3.export import export_onnx, export_openvino  # noqa: E402
from hm3.onnx_model import (  # noqa: E402
    BF16_F32_NODES,
    choose_precision,
    cpu_capabilities,
    describe_precision,
    split_graph,
)

from conftest import (  # noqa: E402
    SERVED_TASKS as TASKS,
    TINY,
    Server,
    build_family,
    classifier_tolerance,
    recipe_dict,
    texts_for,
)

# bf16 keeps 8 significant bits: each rounding is within 2^-8 relative. Over the tiny model's few
# layers the logits stay within a few such steps of f32 on the scale of the largest logit
# (measured: 2.6 steps on this CPU), and its probabilities, near 1/2, within 1e-4 (6e-5 measured).
BF16_STEPS = 4 * 2.0 ** -8
BF16_PROBABILITIES = 1e-3
TEXTS = ["good film", "bad news today", "free money win call phone now", "hello",
         "what market vote sport great awful who where"]


@pytest.fixture(scope="module")
def exported(served_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("openvino") / "f32"
    return out, export_openvino(served_model, out, precision="f32")  # PyTorch's scores


@pytest.mark.numeric
def test_openvino_export_answers_as_the_torch_model(served_model, exported):
    folder, report = exported
    torch_model = load(served_model, device="cpu")
    # OpenVINO's kernels sum in their own order: float32 rounding, bounded by conftest
    assert report["file"] == "openvino_model.xml"
    assert report["max_abs_diff"] < classifier_tolerance(torch_model, SAMPLE_TEXTS)
    assert (folder / "openvino_model.bin").is_file() and not (folder / "model.onnx").exists()
    layout = json.loads((folder / "hm3_onnx.json").read_text())
    assert layout["format"] == "openvino" and layout["quantized"] is None
    # the graph keeps the per-task probability outputs for plain OpenVINO consumers
    graph = ov.Core().read_model(str(folder / "openvino_model.xml"))
    assert [o.get_any_name() for o in graph.outputs] == [
        "logits", *(f"probabilities.{task}" for task in TASKS)]
    model = load(folder)
    assert model.model.backend == "openvino" and model.tasks == list(TASKS)
    np.testing.assert_allclose(model.logits(TEXTS, batch_size=2),
                               torch_model.logits(TEXTS, batch_size=2), rtol=0,
                               atol=classifier_tolerance(torch_model, TEXTS))
    for got, want in zip(model.predict(TEXTS), torch_model.predict(TEXTS)):
        for task in TASKS:
            assert got[task]["label"] == want[task]["label"]


def test_openvino_int8_needs_calibration_texts_and_keeps_the_head_fp32(served_model, tmp_path,
                                                                      capsys):
    out = tmp_path / "int8"
    assert main(["export", str(served_model), "-o", str(out), "--format", "openvino",
                 "--quantize", "int8"]) == 2
    assert "give at least 16 (got 0)" in capsys.readouterr().err and not out.exists()
    texts = tmp_path / "traffic.txt"
    texts.write_text("\n".join(texts_for(0, 10)) + "\n")
    assert main(["export", str(served_model), "-o", str(out), "--format", "openvino",
                 "--quantize", "int8", "--calibration", str(texts)]) == 2
    assert "(got 10)" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(served_model), "-o", str(out), "--calibration", str(texts)]) == 2
    assert "--calibration is for --format openvino" in capsys.readouterr().err
    texts.write_text("\n".join(texts_for(0, 64)) + "\n")
    assert main(["export", str(served_model), "-o", str(out), "--format", "openvino",
                 "--quantize", "int8", "--calibration", str(texts), "--max-length", "12"]) == 0
    layout = json.loads((out / "hm3_onnx.json").read_text())
    assert layout["quantized"] == "int8" and layout["calibration_texts"] == 64
    assert layout["max_length"] == 12 and load(out).max_length == 12  # served as calibrated
    assert load(out, max_length=20).max_length == 20
    graph = ov.Core().read_model(str(out / "openvino_model.xml"))
    quantized = [op.get_friendly_name() for op in graph.get_ops()
                 if op.get_type_name() == "FakeQuantize"]
    assert any("encoder/layer.0/attention" in name for name in quantized)
    assert not any("classifier" in name for name in quantized)
    model = load(out)
    probs = model.predict_proba(TEXTS)
    assert np.allclose(probs["topic"].sum(axis=1), 1.0, atol=1e-5)
    want = load(served_model, device="cpu").predict_proba(TEXTS)
    assert max(np.abs(probs[task] - want[task]).max() for task in TASKS) < 0.1


def test_openvino_int8_takes_exactly_the_minimum_of_calibration_texts(served_model, tmp_path,
                                                                      monkeypatch):
    """16 texts (MIN_CALIBRATION_TEXTS) are enough, 15 are not; NNCF itself is stood in for:
    the count is what is tested."""
    from hm3 import export

    quantised = []
    monkeypatch.setattr(export, "_nncf_int8",
                        lambda graph, _classifier, texts, _exclude:
                        quantised.append(texts) or graph)
    texts = texts_for(1, export.MIN_CALIBRATION_TEXTS)
    with pytest.raises(Hm3Error, match=r"give at least 16 \(got 15\)"):
        export_openvino(served_model, tmp_path / "fewer", quantize="int8", calibration=texts[:-1])
    export_openvino(served_model, tmp_path / "int8", quantize="int8", calibration=texts)
    assert quantised == [texts]


@pytest.mark.numeric
def test_openvino_export_answers_threads_at_once(served_model, exported):
    """Threads sharing one loaded export (the serving worker, a user's thread pool) each get
    their own texts' logits: an infer request serves one thread at a time."""
    from concurrent.futures import ThreadPoolExecutor

    folder, _ = exported
    model = load(folder)
    batches = [texts_for(seed, 1 + seed % 4) for seed in range(48)]
    alone = [model.logits(batch) for batch in batches]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(model.logits, batches))
    tolerance = classifier_tolerance(load(served_model, device="cpu"), sum(batches, []))
    for got, want in zip(together, alone):
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)


def test_export_refuses_an_export_and_serve_checks_the_backend(exported, tmp_path, capsys):
    folder, _ = exported
    with pytest.raises(Hm3Error, match="already an OpenVINO export"):
        export_openvino(folder, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    assert main(["serve", str(folder), "--backend", "onnx"]) == 2
    assert "is an OpenVINO export; serve it with --backend openvino" in capsys.readouterr().err


def test_openvino_export_served_under_concurrent_load(served_model, exported):
    import httpx

    folder, _ = exported
    srv = Server(folder, "--backend", "openvino", "--max-batch-size", "8", "--precision", "auto")
    chosen = choose_precision(cpu_capabilities())  # whichever this CPU gives: the server says it
    try:
        health = httpx.get(srv.url + "/health").json()
        assert health["backend"] == "openvino" and health["precision"] == chosen
        assert httpx.get(srv.url + "/v1/tasks").json()["precision"] == chosen
        texts = texts_for(0, 24)
        expected = load(served_model, device="cpu").predict(texts)

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/v1/classify", json={"texts": [t]})
                                              for t in texts))

        answers = asyncio.run(run())
        assert [a.status_code for a in answers] == [200] * len(texts)
        for answer, want in zip(answers, expected):
            (got,) = answer.json()["results"]
            for task in TASKS:
                assert got[task]["label"] == want[task]["label"]
                assert got[task]["probabilities"] == pytest.approx(want[task]["probabilities"],
                                                                   abs=BF16_PROBABILITIES)
    finally:
        srv.stop()
    assert f"on openvino at {chosen} (auto: this CPU" in srv.output()


@pytest.mark.numeric
@pytest.mark.parametrize("model_type", sorted(TINY))
def test_every_architecture_exports_to_both_runtimes(tmp_path, model_type):
    tasks = {"sentiment": ["negative", "positive"], "topic": ["news", "sport", "film"]}
    base, experts = build_family(tmp_path, tasks, model_type=model_type)
    merge(parse_recipe(recipe_dict(base, experts)), tmp_path / "merged", progress=False)
    torch_model = load(tmp_path / "merged", device="cpu")
    want = torch_model.logits(TEXTS)
    tolerance = classifier_tolerance(torch_model, TEXTS)
    export_onnx(tmp_path / "merged", tmp_path / "onnx")
    export_openvino(tmp_path / "merged", tmp_path / "openvino")
    for runtime in ("onnx", "openvino"):
        model = load(tmp_path / runtime, precision="f32")  # the OpenVINO default is auto
        assert model.model.backend == runtime
        np.testing.assert_allclose(model.logits(TEXTS), want, rtol=0, atol=tolerance,
                                   err_msg=runtime)
    # at bf16 the architecture's head is found and kept f32 (a second, f32 model)
    bf16 = load(tmp_path / "openvino", precision="bf16")
    assert bf16.model.f32_node_count > 0 and len(bf16.model.stages) == 2
    np.testing.assert_allclose(bf16.logits(TEXTS), want, rtol=0,
                               atol=tolerance + BF16_STEPS * np.abs(want).max())


def test_choose_precision_follows_the_cpu_capabilities():
    assert choose_precision(["BF16", "WINOGRAD", "FP32", "INT8", "BIN", "EXPORT_IMPORT"]) == "bf16"
    assert choose_precision(["FP32", "INT8", "BIN"]) == "f32"  # VNNI but no bf16: int8 is an export
    assert choose_precision(["FP16", "FP32"]) == "f32"  # a CPU with fp16 units only
    assert choose_precision([]) == "f32"


@pytest.mark.numeric
def test_auto_precision_is_what_the_cpu_reports_and_stays_near_f32(exported):
    folder, _ = exported
    f32, auto = load(folder), load(folder, precision="auto")
    capabilities = cpu_capabilities()
    assert f32.model.precision == "f32" and f32.model.detected is None
    assert auto.model.precision == choose_precision(capabilities) in ("f32", "bf16")
    assert auto.model.detected == capabilities
    assert describe_precision(auto.model).startswith(f"{auto.model.precision} (auto: this CPU")
    want, got = f32.logits(TEXTS), auto.logits(TEXTS)
    np.testing.assert_allclose(got, want, rtol=0, atol=BF16_STEPS * np.abs(want).max())
    # bf16 asked for outright: the same bound (where the CPU lacks bf16 units OpenVINO runs f32)
    bf16 = load(folder, precision="bf16")
    assert bf16.model.precision == "bf16" and bf16.model.detected is None
    np.testing.assert_allclose(bf16.logits(TEXTS), want, rtol=0,
                               atol=BF16_STEPS * np.abs(want).max())


def _runtime_precisions(compiled) -> dict[str, str]:
    """Each matrix product of a compiled model: its name and the precision it computes at."""
    return {node.get_friendly_name(): node.get_rt_info()["runtimePrecision"].astype(str)
            for node in compiled.get_runtime_model().get_ops()
            if node.get_rt_info()["layerType"].astype(str) in ("FullyConnected", "MatMul")}


@pytest.mark.numeric
def test_bf16_keeps_the_head_at_f32(exported):
    folder, _ = exported
    f32 = load(folder)
    bf16, all_bf16 = load(folder, precision="bf16"), load(folder, precision="bf16")
    all_bf16.model = type(bf16.model)(folder, precision="bf16", f32_nodes=())
    assert len(all_bf16.model.stages) == 1 and all_bf16.model.f32_node_count == 0
    encoder, head = bf16.model.stages
    assert describe_precision(bf16.model) == "bf16 (head f32)"
    # the head (pooler and classifier, then the logits' bias and the per-task softmaxes) is the
    # second model, compiled at f32: its matrix products compute in f32 on any CPU
    kept = _runtime_precisions(head)
    assert kept and all(precision == "f32" for precision in kept.values())
    assert any("classifier" in name or name == "logits" for name in kept)
    assert any("pooler" in name for name in kept)
    if "BF16" in cpu_capabilities():  # the encoder's matrix products do run in bf16 here
        assert set(_runtime_precisions(encoder).values()) == {"bf16"}
    # the head at f32 adds no error of its own: bf16's bound holds (see BF16_STEPS)
    want = f32.logits(TEXTS)
    for model in (bf16, all_bf16):
        np.testing.assert_allclose(model.logits(TEXTS), want, rtol=0,
                                   atol=BF16_STEPS * np.abs(want).max())
    outputs = bf16.model.run(**bf16.encode(TEXTS))  # every output comes back, by name
    assert sorted(outputs) == sorted(["logits", *(f"probabilities.{t}" for t in TASKS)])


@pytest.mark.numeric
def test_the_split_graph_at_f32_is_the_graph(exported):
    """Both parts compiled at f32 and run one after the other give the unsplit graph's outputs:
    the cut feeds the head the encoder's tensors and the inputs it reads itself."""
    folder, _ = exported
    core = ov.Core()
    whole = core.compile_model(str(folder / "openvino_model.xml"), "CPU",
                               {"INFERENCE_PRECISION_HINT": "f32"})
    (first, second), sources = split_graph(core.read_model(str(folder / "openvino_model.xml")),
                                           BF16_F32_NODES)
    assert split_graph(core.read_model(str(folder / "openvino_model.xml")),
                       (r"no such node",))[1] == []
    first, second = (core.compile_model(part, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                     for part in (first, second))
    model = load(folder)
    feed = {name: np.asarray(value, dtype=np.int64)
            for name, value in model.encode(TEXTS).items()}
    want = whole(feed)
    early = [first(feed)[port] for port in first.outputs]
    got = second([feed[s] if isinstance(s, str) else early[s] for s in sources])
    for port in second.outputs:
        np.testing.assert_allclose(got[port], want[port.get_any_name()], rtol=0, atol=1e-5)


def test_export_records_the_precision_and_says_what_it_ran_at(served_model, tmp_path, capsys):
    out = tmp_path / "auto"
    assert main(["export", str(served_model), "-o", str(out), "--format", "openvino"]) == 0
    chosen = choose_precision(cpu_capabilities())
    summary = capsys.readouterr().out  # auto, the default: what this CPU does best
    assert f"runs at {chosen} (auto: this CPU" in summary and "resolved again" in summary
    assert json.loads((out / "hm3_onnx.json").read_text())["precision"] == "auto"
    f32 = tmp_path / "f32"
    assert main(["export", str(served_model), "-o", str(f32), "--format", "openvino",
                 "--precision", "f32"]) == 0
    summary = capsys.readouterr().out
    assert "runs at f32 precision here\n" in summary and "resolved again" not in summary
    assert json.loads((f32 / "hm3_onnx.json").read_text())["precision"] == "f32"
    assert load(f32).model.precision == "f32"
    assert load(out).model.precision == chosen  # the recorded default, resolved at load
    assert load(out, precision="f32").model.precision == "f32"  # overridden
    assert main(["export", str(served_model), "-o", str(tmp_path / "onnx"),
                 "--precision", "bf16"]) == 2
    assert "--precision is for --format openvino" in capsys.readouterr().err


def test_bf16_is_refused_where_hm3_computes_in_f32(served_model):
    with pytest.raises(Hm3Error, match="is a PyTorch model, which hm3 runs in f32"):
        load(served_model, precision="bf16")
    with pytest.raises(Hm3Error, match="precision must be one of auto, f32, bf16, got 'fp16'"):
        load(served_model, precision="fp16")
    assert load(served_model, device="cpu", precision="auto").tasks == list(TASKS)


def test_eval_predict_and_bench_take_the_exports_precision(served_model, exported, tmp_path,
                                                           capsys):
    """Scoring an export: `--precision` picks what it runs at (f32 gives PyTorch's scores on any
    CPU); without it, what the export recorded; `hm3 eval` says which on standard error."""
    folder, _ = exported  # recorded f32
    data = tmp_path / "sentiment.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": ["negative", "positive"][i % 2]}) + "\n"
                            for i, t in enumerate(texts_for(3, 12))))
    assert main(["eval", str(folder), "--data", f"sentiment={data}"]) == 0
    assert f"scoring {folder} on openvino at f32 precision" in capsys.readouterr().err
    assert main(["eval", str(folder), "--data", f"sentiment={data}", "--precision", "auto"]) == 0
    chosen = choose_precision(cpu_capabilities())
    assert f"on openvino at {chosen} (auto: this CPU" in capsys.readouterr().err
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", str(folder), *TEXTS, "--precision", "f32", "--logits",
                 "--output", str(out)]) == 0
    got = np.array([json.loads(line)["logits"] for line in out.read_text().splitlines()])
    want = load(served_model, device="cpu")
    np.testing.assert_allclose(got, want.logits(TEXTS), rtol=0,
                               atol=classifier_tolerance(want, TEXTS))
    # bf16 is for OpenVINO exports: a PyTorch model refuses it, saying so
    assert main(["predict", str(served_model), "good film", "--precision", "bf16"]) == 2
    assert "runs in f32; bf16 is for OpenVINO" in capsys.readouterr().err
    assert main(["bench", str(folder), "--experts", str(served_model), "--precision", "bf16",
                 "--batch-sizes", "2", "--repeats", "1", "--warmup", "0", "--no-progress"]) == 0


def test_check_takes_the_exports_precision_and_runs_the_experts_as_they_are(
        served_model, exported, tmp_path, capsys):
    """`hm3 check EXPORT --precision bf16`: the export runs at bf16, the recorded PyTorch experts
    as they are (bf16 would be refused for them); the same flag on a PyTorch merge is refused."""
    folder, _ = exported
    texts = tmp_path / "traffic.txt"
    texts.write_text("\n".join(texts_for(5, 40)) + "\n")
    report = tmp_path / "check.json"
    assert main(["check", str(folder), "--texts", str(texts), "--precision", "bf16",
                 "--json", str(report)]) in (0, 1)  # a verdict, not a refusal
    assert sorted(json.loads(report.read_text())["experts"]) == sorted(TASKS)
    capsys.readouterr()
    assert main(["check", str(served_model), "--texts", str(texts), "--precision", "bf16"]) == 2
    assert "runs in f32; bf16 is for OpenVINO" in capsys.readouterr().err
