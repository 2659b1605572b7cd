"""The options the `hm3` commands share are declared once (`hm3.cli.options`): every command that
loads models takes the same model-loading options, `--allow-pickle` included, and `hm3 check` /
`hm3 bench` / `hm3 export` load a pickle-only expert only when given it."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hm3 import merge, parse_recipe
from hm3.cli import COMMANDS, build_parser, main

from conftest import build_family, random_texts, recipe_dict

# command -> the model-loading options it takes; export runs on the CPU, and a merge reads its
# label-free steps' batch size and max length from the recipe
LOADS_MODELS = {
    "merge": {"--device", "--allow-pickle"},
    "predict": {"--device", "--max-length", "--batch-size", "--allow-pickle"},
    "eval": {"--device", "--max-length", "--batch-size", "--allow-pickle"},
    "bench": {"--device", "--max-length", "--allow-pickle"},
    "check": {"--device", "--max-length", "--batch-size", "--allow-pickle"},
    "search": {"--device", "--max-length", "--batch-size", "--allow-pickle"},
    "self-merge": {"--device", "--max-length", "--batch-size", "--allow-pickle"},
    "serve": {"--device", "--max-length", "--allow-pickle"},
    "export": {"--max-length", "--allow-pickle"},
}
MODEL_OPTIONS = {"--device", "--max-length", "--batch-size", "--allow-pickle"}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {name: action for action in parser._actions for name in action.option_strings}


def test_every_command_that_loads_models_takes_the_model_options():
    commands = subparsers()
    assert set(commands) == set(COMMANDS)
    for name, parser in commands.items():
        taken = MODEL_OPTIONS & set(options(parser))
        assert taken == LOADS_MODELS.get(name, set()), name


def test_a_shared_option_reads_the_same_in_every_command():
    """Declared once: the same default, type and help wherever a command takes it (merge and
    export say more of --device / --max-length; search's batches are larger)."""
    seen: dict[str, dict[str, tuple]] = {}
    for command, parser in subparsers().items():
        for flag, action in options(parser).items():
            seen.setdefault(flag, {})[command] = (action.dest, action.default, action.type,
                                                  action.help)
    del seen["--json"]["inspect"]  # prints the model's hm3 block as JSON: another option
    own_help = {("--device", "merge"), ("--max-length", "export"), ("--text-column", "export"),
                ("--limit", "eval"), ("--limit", "check"), ("--no-progress", "demo"),
                ("--batch-size", "search"), ("--batch-size", "self-merge"),
                ("--json", "bench")}
    for flag in ("--device", "--max-length", "--batch-size", "--allow-pickle", "--text-column",
                 "--label-column", "--limit", "--no-progress", "--json"):
        assert len({(dest, type_) for dest, _, type_, _ in seen[flag].values()}) == 1, flag
        helps = {help_ for command, (*_, help_) in seen[flag].items()
                 if (flag, command) not in own_help}
        assert len(helps) <= 1, (flag, seen[flag])
    for flag in ("--device", "--max-length", "--allow-pickle", "--text-column", "--label-column",
                 "--limit", "--no-progress", "--json"):
        assert len({default for _, default, _, _ in seen[flag].values()}) == 1, flag
    assert {v[1] for v in seen["--batch-size"].values()} == {32, 64}
    assert {c for c, v in seen["--batch-size"].items() if v[1] == 64} == {"search", "self-merge"}
    assert {v[1] for v in seen["--text-column"].values()} == {"text"}


def test_check_counts_are_the_librarys():
    from hm3.check import COUNTS

    assert tuple(options(subparsers()["check"])["--count"].choices) == COUNTS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hm3 {command}")
    if command in LOADS_MODELS:
        assert "--allow-pickle" in out


# --- pickle-only experts -------------------------------------------------------------------------

TASKS = {"sentiment": ["negative", "positive"], "topic": ["news", "sport", "film"]}


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    """A merged model, and a pickle-only (.bin) copy of its topic expert."""
    root = tmp_path_factory.mktemp("pickle")
    base, experts = build_family(root / "models", TASKS)
    merged = root / "merged"
    merge(parse_recipe(recipe_dict(base, experts, "ties")), merged, progress=False)
    folder = root / "topic"
    model = AutoModelForSequenceClassification.from_pretrained(experts["topic"])
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(experts["topic"]).save_pretrained(folder)
    assert not list(folder.glob("*.safetensors")) and list(folder.glob("*.bin"))
    texts = root / "texts.txt"
    texts.write_text("\n".join(random_texts(12, seed=3)) + "\n")
    return merged, folder, texts


def test_check_loads_a_pickle_expert_only_with_allow_pickle(pickled, capsys):
    merged, expert, texts = pickled
    args = ["check", str(merged), "--experts", f"topic={expert}", "--texts", str(texts),
            "--min-agreement", "0"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "has only pickle (.bin) weights" in captured.err and "--allow-pickle" in captured.err
    assert captured.out == ""
    assert main([*args, "--allow-pickle"]) == 0
    out = capsys.readouterr().out
    assert "topic" in out and "not checked (no expert given): sentiment" in out


def test_bench_loads_a_pickle_expert_only_with_allow_pickle(pickled, capsys):
    merged, expert, texts = pickled
    args = ["bench", str(merged), "--experts", str(expert), "--input", str(texts),
            "--batch-sizes", "4", "--repeats", "1", "--warmup", "0", "--no-progress"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "has only pickle (.bin) weights" in captured.err and "--allow-pickle" in captured.err
    assert main([*args, "--allow-pickle"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[0] == "batch"


def test_export_reads_a_pickle_model_only_with_allow_pickle(pickled, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    _, expert, _ = pickled
    out = tmp_path / "onnx"
    assert main(["export", str(expert), "-o", str(out)]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert not out.exists()
    assert main(["export", str(expert), "-o", str(out), "--allow-pickle"]) == 0
    assert "exported" in capsys.readouterr().out
    assert main(["predict", str(out), "good film"]) == 0


def test_serve_says_it_cannot_serve_pickle_weights_yet(pickled, capsys):
    # hm3.serve's serve functions take no allow_pickle: refused before anything starts
    _, expert, _ = pickled
    assert main(["serve", str(expert), "--allow-pickle", "--port", "1"]) == 2
    assert "does not load pickle (.bin) weights yet" in capsys.readouterr().err
