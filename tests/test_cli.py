"""Every `hm3` verb through `hm3.cli.main` on a tiny merged model, checking what it prints and
writes against values computed here with plain transformers, numpy and scikit-learn."""

from __future__ import annotations

import csv
import gc
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import f1_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hm3 import Hm3Warning, merge, parse_recipe
from hm3.cli import main

from conftest import build_family, random_texts, recipe_dict, spread_head

TASKS = {"sentiment": ["negative", "positive"], "topic": ["news", "sport", "film"],
         "tags": ["urgent", "spam", "personal"]}
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Three experts with spread heads (one multi-label), their merge, and labelled data."""
    root = tmp_path_factory.mktemp("cli")
    base, experts = build_family(root / "models", TASKS, multi_label=("tags",))
    texts = random_texts(40, seed=1)
    for i, folder in enumerate(experts.values()):
        spread_head(folder, texts, seed=i)
    merged = root / "merged"
    merge(parse_recipe(recipe_dict(base, experts, "ties")), merged, progress=False)
    rng = random.Random(5)
    data = {}
    for task in ("sentiment", "topic"):
        rows = [{"text": t, "label": rng.choice(TASKS[task])} for t in random_texts(24, 10)]
        data[task] = root / f"{task}.jsonl"
        data[task].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(root=root, base=base, experts=experts, merged=merged, data=data)


@torch.no_grad()
def reference_probabilities(folder: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """Per task, probabilities from plain transformers logits: a softmax over a single-label
    task's slice, a sigmoid per label of a multi-label task's."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.double().numpy()
    out, start = {}, 0
    for task, labels in TASKS.items():
        z = logits[:, start:start + len(labels)]
        start += len(labels)
        if task == "tags":
            out[task] = 1 / (1 + np.exp(-z))
        else:
            e = np.exp(z - z.max(1, keepdims=True))
            out[task] = e / e.sum(1, keepdims=True)
    return out


def read_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def check_predictions(rows: list[dict], texts: list[str], merged: Path) -> None:
    want = reference_probabilities(merged, texts)
    assert [r["text"] for r in rows] == texts
    for i, row in enumerate(rows):
        for task, labels in TASKS.items():
            p = want[task][i]
            got = row[task]
            assert list(got["probabilities"]) == labels
            np.testing.assert_allclose(list(got["probabilities"].values()), p, atol=5e-5)
            if task == "tags":  # multi-label: the labels over 0.5, under the same key
                assert got["label"] == [lab for lab, v in zip(labels, p) if v > 0.5]
            else:
                assert got["label"] == labels[int(p.argmax())]
                assert got["score"] == pytest.approx(p.max(), abs=5e-5)


# --- predict ---------------------------------------------------------------------------------

def test_predict_prints_one_json_line_per_text_with_every_tasks_answer(tiny, capsys):
    texts = ["good film today", "free money win", "who won the vote"]
    assert main(["predict", str(tiny.merged), *texts]) == 0
    check_predictions(read_jsonl(capsys.readouterr().out), texts, tiny.merged)


def test_predict_takes_options_between_the_model_and_the_texts(tiny, capsys):
    texts = ["good film today", "awful meeting"]
    assert main(["predict", str(tiny.merged), "--batch-size", "1", *texts]) == 0
    check_predictions(read_jsonl(capsys.readouterr().out), texts, tiny.merged)


def test_predict_reads_input_files_and_writes_jsonl(tiny, tmp_path, capsys):
    texts = random_texts(7, seed=3)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n")
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", str(tiny.merged), "--input", str(source), "--output", str(out),
                 "--batch-size", "3"]) == 0
    assert capsys.readouterr().out == ""
    check_predictions(read_jsonl(out.read_text()), texts, tiny.merged)
    table = tmp_path / "in.jsonl"  # JSONL objects with another text field
    table.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    assert main(["predict", str(tiny.merged), "--input", str(table), "--text-column", "body"]) == 0
    check_predictions(read_jsonl(capsys.readouterr().out), texts, tiny.merged)


def test_predict_writes_csv_for_a_csv_output(tiny, tmp_path):
    texts = ["good film today", "free money, win", 'say "hello"']
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(tiny.merged), *texts, "--output", str(out)]) == 0
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    want = reference_probabilities(tiny.merged, texts)
    assert [r["text"] for r in rows] == texts
    for i, row in enumerate(rows):
        assert row["sentiment"] == TASKS["sentiment"][int(want["sentiment"][i].argmax())]
        tags = [lab for lab, v in zip(TASKS["tags"], want["tags"][i]) if v > 0.5]
        assert row["tags"] == "|".join(tags)
        assert float(row["topic/sport"]) == pytest.approx(want["topic"][i][1], abs=5e-5)


def test_predict_refuses_an_output_format_it_cannot_write(tiny, tmp_path, capsys):
    assert main(["predict", str(tiny.merged), "good", "--output", str(tmp_path / "p.xlsx")]) == 2
    assert ".csv" in capsys.readouterr().err
    assert not (tmp_path / "p.xlsx").exists()


def test_predict_and_eval_refuse_pickle_only_models_without_allow_pickle(tiny, tmp_path, capsys):
    folder = tmp_path / "pickled"
    model = AutoModelForSequenceClassification.from_pretrained(tiny.experts["topic"])
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny.experts["topic"]).save_pretrained(folder)
    assert not list(folder.glob("*.safetensors")) and list(folder.glob("*.bin"))
    assert main(["predict", str(folder), "good film"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["eval", str(folder), "--data", f"topic={tiny.data['topic']}"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["predict", str(folder), "good film", "--allow-pickle"]) == 0
    (row,) = read_jsonl(capsys.readouterr().out)
    assert row["pickled"]["label"] in TASKS["topic"]


# --- eval ------------------------------------------------------------------------------------

def labelled(path: Path) -> tuple[list[str], list[str]]:
    rows = read_jsonl(path.read_text())
    return [r["text"] for r in rows], [r["label"] for r in rows]


def expected_f1(tiny, task: str) -> float:
    texts, labels = labelled(tiny.data[task])
    p = reference_probabilities(tiny.merged, texts)[task]
    predicted = [TASKS[task][i] for i in p.argmax(1)]
    return f1_score(labels, predicted, average="macro", labels=TASKS[task], zero_division=0)


def test_eval_prints_and_writes_the_scores_of_each_task(tiny, tmp_path, capsys):
    report = tmp_path / "scores.json"
    assert main(["eval", str(tiny.merged), "--data", f"sentiment={tiny.data['sentiment']}",
                 "--data", f"topic={tiny.data['topic']}", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    scores = json.loads(report.read_text())
    for task in ("sentiment", "topic"):
        assert scores["tasks"][task]["macro_f1"] == pytest.approx(expected_f1(tiny, task))
        assert scores["tasks"][task]["n"] == 24
        assert f"{scores['tasks'][task]['macro_f1']:.4f}"[:5] in printed
    mean = (expected_f1(tiny, "sentiment") + expected_f1(tiny, "topic")) / 2
    assert scores["mean_macro_f1"] == pytest.approx(mean)
    assert f"mean macro-F1 over 2 tasks: {mean:.4f}" in printed


def test_eval_cross_check_is_the_share_of_texts_given_the_expected_label(tiny, tmp_path, capsys):
    report = tmp_path / "scores.json"
    assert main(["eval", str(tiny.merged), "--data", f"sentiment={tiny.data['sentiment']}",
                 "--expect", "sentiment:topic=sport", "--json", str(report)]) == 0
    texts, _ = labelled(tiny.data["sentiment"])
    topic = reference_probabilities(tiny.merged, texts)["topic"]
    share = float(np.mean(topic.argmax(1) == 1))
    check = json.loads(report.read_text())["tasks"]["sentiment"]["cross_checks"]["topic"]
    assert check["agreement"] == pytest.approx(share) and check["expected"] == "sport"
    assert f"topic=sport {100 * share:.1f}%" in capsys.readouterr().out


def test_eval_expect_naming_a_task_the_model_lacks_is_an_error(tiny, capsys):
    assert main(["eval", str(tiny.merged), "--data", f"sentiment={tiny.data['sentiment']}",
                 "--expect", "sentiment:topik=sport"]) == 2
    err = capsys.readouterr().err
    assert "topik" in err and "sentiment, topic, tags" in err


def test_eval_takes_the_data_of_a_data_only_recipe(tiny, tmp_path, capsys):
    recipe = tmp_path / "data.yaml"
    recipe.write_text(yaml.safe_dump({"data": {
        "topic": {"path": tiny.data["topic"].name, "expect": {"sentiment": "positive"}}}}))
    (tmp_path / tiny.data["topic"].name).write_text(tiny.data["topic"].read_text())
    report = tmp_path / "scores.json"
    assert main(["eval", str(tiny.merged), "--recipe", str(recipe), "--json", str(report)]) == 0
    scores = json.loads(report.read_text())
    assert list(scores["tasks"]) == ["topic"]
    assert scores["tasks"]["topic"]["macro_f1"] == pytest.approx(expected_f1(tiny, "topic"))
    assert "sentiment=positive" in capsys.readouterr().out


def test_eval_of_one_expert_says_which_data_it_did_not_score(tiny, tmp_path, capsys):
    report = tmp_path / "scores.json"
    with pytest.warns(Hm3Warning, match="sentiment was not scored"):
        assert main(["eval", str(tiny.experts["topic"]), "--data", f"topic={tiny.data['topic']}",
                     "--data", f"sentiment={tiny.data['sentiment']}", "--json", str(report)]) == 0
    assert list(json.loads(report.read_text())["tasks"]) == ["topic"]


# --- inspect, merge --------------------------------------------------------------------------

def test_inspect_prints_the_layout_and_json_prints_the_hm3_block(tiny, capsys):
    assert main(["inspect", str(tiny.merged)]) == 0
    out = capsys.readouterr().out
    assert "3 tasks, 8 labels, method ties" in out
    assert "logits [2:5) single-label" in out and "news, sport, film" in out
    assert "logits [5:8) multi-label" in out
    assert main(["inspect", str(tiny.merged), "--json"]) == 0
    block = json.loads(capsys.readouterr().out)
    config = json.loads((tiny.merged / "config.json").read_text())
    assert block == config["hm3"]


def test_inspect_json_into_a_closed_pipe_is_quiet(tiny):
    read, write = os.pipe()
    os.close(read)  # the reader (`| head`) has gone before anything is written
    try:
        done = subprocess.run([sys.executable, "-m", "hm3.cli", "inspect", str(tiny.merged),
                               "--json"], stdout=write, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": SRC}, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 0
    assert b"Error" not in done.stderr and b"Traceback" not in done.stderr, done.stderr


def test_merge_prints_what_it_merged_and_writes_the_model(tiny, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny.base, {"topic": tiny.experts["topic"]},
                                                 "task_arithmetic")))
    out = tmp_path / "one"
    assert main(["merge", str(recipe), "-o", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("merged 1 expert (")
    assert "with task_arithmetic" in printed and "news, sport, film" in printed
    assert json.loads((out / "config.json").read_text())["hm3"]["method"] == "task_arithmetic"
    assert main(["merge", str(recipe), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" in err


def test_output_folders_get_the_mode_of_a_new_folder(tiny, tmp_path):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "moded"
        merge(parse_recipe(recipe_dict(tiny.base, tiny.experts, "ties")), out, progress=False)
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "config.json").stat().st_mode & 0o777 == 0o644


# --- bench -----------------------------------------------------------------------------------

def test_bench_times_every_batch_size_and_warns_when_it_repeats_texts(tiny, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(random_texts(6, seed=9)) + "\n")
    report = tmp_path / "bench.json"
    experts = [str(tiny.experts[t]) for t in TASKS]
    with pytest.warns(Hm3Warning, match="only 6 texts.*batches of 8 repeat them"):
        assert main(["bench", str(tiny.merged), "--experts", *experts, "--input", str(texts),
                     "--batch-sizes", "2,4,8", "--repeats", "2", "--warmup", "0",
                     "--json", str(report)]) == 0
    captured = capsys.readouterr()
    result = json.loads(report.read_text())
    assert result["n_experts"] == 3 and result["n_texts"] == 6 and result["repeats"] == 2
    assert [r["batch_size"] for r in result["rows"]] == [2, 4, 8]
    assert [r["batches"] for r in result["rows"]] == [3, 1, 1]
    for row in result["rows"]:
        assert row["merged_ms"] > 0 and row["experts_ms"] > 0
        assert row["reduction_pct"] == pytest.approx(100 * (1 - row["merged_ms"] /
                                                            row["experts_ms"]))
        assert row["ideal_pct"] == pytest.approx(100 * 2 / 3)
    lines = captured.out.splitlines()
    assert lines[0].split()[0] == "batch"
    assert [ln.split()[0] for ln in lines if ln.split()[0].isdigit()] == ["2", "4", "8"]
    assert "bench" in captured.err  # the progress bar


# --- bad input: one line on stderr, exit 2, nothing written ----------------------------------

def one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("hm3: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_files_that_are_not_utf8_are_one_error_line(tiny, tmp_path, capsys):
    texts, data = tmp_path / "texts.txt", tmp_path / "topic.csv"
    texts.write_bytes("café crème\n".encode("latin-1"))
    data.write_bytes("text,label\ncafé,news\n".encode("latin-1"))
    for argv in (["predict", str(tiny.merged), "--input", str(texts)],
                 ["eval", str(tiny.merged), "--data", f"topic={data}"],
                 ["check", str(tiny.merged), "--texts", str(texts)]):
        assert main(argv) == 2
        one_error_line(capsys, "is not UTF-8 text", "convert it to UTF-8")


def test_predict_of_an_empty_input_file_says_the_file_has_no_texts(tiny, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["predict", str(tiny.merged), "--input", str(empty)]) == 2
    assert "give texts as arguments" not in one_error_line(capsys, "empty.txt has no texts")


@pytest.mark.parametrize("device, message", [
    ("tpu", "device 'tpu' is not a device torch knows"),
    pytest.param("cuda", "this machine has no CUDA GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="the machine has a GPU")),
])
def test_a_device_the_machine_lacks_is_refused_before_loading(tiny, capsys, monkeypatch, device,
                                                              message):
    monkeypatch.setattr("transformers.AutoModelForSequenceClassification.from_pretrained",
                        lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["predict", str(tiny.merged), "good", "--device", device]) == 2
    one_error_line(capsys, message)


def test_a_typo_in_a_data_path_says_it_does_not_exist(tiny, capsys):
    assert main(["eval", str(tiny.merged), "--data", "topic=./dta/topic"]) == 2
    assert "Hugging Face" not in one_error_line(capsys, "does not exist")
    assert main(["predict", "./exprts/topic", "good"]) == 2
    one_error_line(capsys, "./exprts/topic does not exist")


def test_eval_names_the_flags_of_a_bad_column_and_a_bad_expected_label(tiny, capsys):
    data = f"sentiment={tiny.data['sentiment']}"
    assert main(["eval", str(tiny.merged), "--data", data, "--text-column", "body"]) == 2
    one_error_line(capsys, "no column 'body'", "--text-column")
    assert main(["eval", str(tiny.merged), "--data", data, "--expect", "sentiment:topic=x"]) == 2
    assert one_error_line(capsys).strip() == (
        "hm3: error: --expect sentiment:topic=x: unknown label 'x' for task topic (labels: "
        "news, sport, film)")


def test_outputs_into_folders_that_do_not_exist_are_written_and_named(tiny, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "predictions.csv"
    assert main(["predict", str(tiny.merged), "good", "bad", "--output", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3
    assert capsys.readouterr().err == f"hm3: wrote 2 predictions to {out}\n"
    report = tmp_path / "reports" / "eval.json"
    assert main(["eval", str(tiny.merged), "--data", f"topic={tiny.data['topic']}",
                 "--json", str(report)]) == 0
    assert json.loads(report.read_text())["tasks"]["topic"]["n"] == 24
    assert capsys.readouterr().err == f"hm3: wrote the report to {report}\n"


def test_an_output_that_cannot_be_written_is_one_error_line(tiny, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert main(["predict", str(tiny.merged), "good", "--output",
                 str(tmp_path / "file" / "p.jsonl")]) == 2
    one_error_line(capsys, "cannot write 1 prediction to")


def test_predict_reads_stdin_and_writes_stdout_for_a_dash(tiny, capsys, monkeypatch):
    import io

    texts = ["good film today", "free money win"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(texts) + "\n"))
    assert main(["predict", str(tiny.merged), "--input", "-", "--output", "-"]) == 0
    captured = capsys.readouterr()
    check_predictions(read_jsonl(captured.out), texts, tiny.merged)
    assert captured.err == ""
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["predict", str(tiny.merged), "--input", "-"]) == 2
    one_error_line(capsys, "standard input (--input -) has no texts")


def test_merge_never_imports_transformers_which_is_quiet_once_a_command_does(tiny, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny.base, tiny.experts, "linear")))
    script = (
        "import sys\n"
        "from hm3.cli import main\n"
        f"assert main(['merge', {str(recipe)!r}, '-o', {str(tmp_path / 'out')!r}, "
        "'--no-progress']) == 0\n"
        "print('transformers' in sys.modules)\n"
        "from transformers.utils import logging\n"
        "print(logging.get_verbosity() == logging.ERROR, logging.is_progress_bar_enabled())\n")
    env = {key: value for key, value in os.environ.items()
           if key not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": SRC}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == ["False", "True False"], done.stdout


# --- start-up --------------------------------------------------------------------------------

def test_a_command_imports_torch_with_the_collector_paused_and_freezes_it(tmp_path):
    """In a fresh process, `main` imports torch with the cyclic collector off, freezes what the
    import made (later collections skip it) and turns the collector back on."""
    script = (
        "import gc, sys\n"
        "from hm3.cli import main\n"
        "assert 'torch' not in sys.modules\n"
        f"code = main(['merge', {str(tmp_path / 'missing.yaml')!r}, '-o', {str(tmp_path)!r}])\n"
        "print(code, gc.isenabled(), gc.get_freeze_count() > 100_000, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.split() == ["2", "True", "True", "True"], done.stderr
    assert "missing.yaml" in done.stderr


def test_a_process_that_has_torch_freezes_nothing_of_its_own(tmp_path):
    frozen = gc.get_freeze_count()
    assert main(["merge", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "out")]) == 2
    assert gc.get_freeze_count() == frozen and gc.isenabled()
