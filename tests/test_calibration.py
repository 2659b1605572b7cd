"""Calibration sources: one shared sample of traffic for every task, per-task sources, both
mixed; held-out texts removed; the merge says which texts each task used."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hm3 import Hm3Error, Hm3Warning, merge, parse_recipe, pipeline
from hm3.check import CALIBRATION_TEXTS
from hm3.cli import main
from hm3.data import CalibrationSpec, calibration as calibration_module
from hm3.data.calibration import load_calibration, text_hash
from hm3.label_free import calibration as label_free_calibration, heads_stage

from conftest import build_family, recipe_dict

TASKS = ["a", "b", "c"]


def parse(block: dict, tasks=TASKS) -> CalibrationSpec:
    experts = [{"model": f"/m/{t}", "task": t} for t in tasks]
    return parse_recipe({"base": "/m/base", "experts": experts, "recentre": True,
                         "calibration": block}).label_free.calibration


def test_one_file_is_shared_by_every_task():
    spec = parse({"texts": "traffic.txt", "limit": 10})
    assert spec.sources == {}
    assert spec.shared == {"path": "traffic.txt", "text_column": "text"}
    assert all(spec.sources_of(t) == [spec.shared] for t in TASKS)


def test_a_hub_split_is_shared_by_every_task():
    spec = parse({"texts": {"path": "org/traffic", "split": "train", "text_column": "prompt"}})
    assert spec.shared == {"path": "org/traffic", "split": "train", "text_column": "prompt"}
    assert spec.sources == {}


def test_per_task_and_shared_sources_mix_own_first():
    spec = parse({"shared": "traffic.txt", "texts": {"a": "a.txt"}})
    assert spec.sources_of("a") == [{"path": "a.txt", "text_column": "text"},
                                    {"path": "traffic.txt", "text_column": "text"}]
    assert spec.sources_of("b") == [{"path": "traffic.txt", "text_column": "text"}]


def test_a_task_named_path_is_still_a_task_mapping():
    spec = parse({"texts": {"path": "p.txt", "other": "o.txt"}}, tasks=["path", "other"])
    assert spec.shared is None
    assert spec.sources["path"] == {"path": "p.txt", "text_column": "text"}


@pytest.mark.parametrize("block", [{"texts": "traffic.txt", "limit": 7},
                                   {"shared": "t.txt", "texts": {"a": "a.txt"}},
                                   {"texts": {t: f"{t}.txt" for t in TASKS}}])
def test_the_block_survives_the_recipe_round_trip(block):
    experts = [{"model": f"/m/{t}", "task": t} for t in TASKS]
    recipe = parse_recipe({"base": "/m/base", "experts": experts, "recentre": True,
                           "calibration": block})
    again = parse_recipe(recipe.to_dict())
    assert again.label_free.calibration == recipe.label_free.calibration


BAD = {
    "no texts at all": ({"limit": 5}, r"calibration: expected \{texts: FILE\}"),
    "texts a list": ({"texts": ["a.txt"]}, r"calibration.texts: expected \{texts: FILE\}"),
    "missing task, no shared": ({"texts": {"a": "a.txt", "b": "b.txt"}},
                                "missing: c.*add `shared: FILE`"),
    "unknown task": ({"texts": {"a": "a.txt", "zz": "z.txt"}, "shared": "t.txt"},
                     "unknown task.*zz.*tasks are a, b, c.*shared: FILE"),
    "shared twice": ({"texts": "t.txt", "shared": "u.txt"}, "give the shared texts once"),
    "bad source field": ({"shared": {"path": "t.txt", "column": "x"}},
                         "calibration.shared: unknown field.*column.*allowed: path"),
    "shared not a path": ({"shared": 3}, "calibration.shared: expected a file path"),
    "unknown block field": ({"texts": "t.txt", "share": "u.txt"},
                            "unknown field.*share.*allowed: texts, shared"),
    "split not a string": ({"texts": {"path": "org/x", "split": 1}},
                           "calibration.texts.split: expected a string"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_calibration_blocks_say_what_is_wrong(case):
    block, message = BAD[case]
    with pytest.raises(Hm3Error, match=message):
        parse(block)


def write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_shared_texts_fill_after_a_tasks_own_held_out_removed_and_read_once(tmp_path,
                                                                            monkeypatch):
    shared = write(tmp_path / "traffic.txt", ["free money", "good film", "who won", "win call",
                                              "awful day", "hello there"])
    own = write(tmp_path / "a.txt", ["market news", "GOOD  film", "sport today"])
    reads = []
    real = calibration_module.source_texts
    monkeypatch.setattr(calibration_module, "source_texts",
                        lambda source: reads.append(source["path"]) or real(source))
    spec = CalibrationSpec({"a": {"path": own, "text_column": "text"}}, limit=4,
                           shared={"path": shared, "text_column": "text"})
    held_out = {"b": ["who won"]}  # any task's held-out text is kept out of every task
    with pytest.warns(Hm3Warning, match="left out"):
        calibration = load_calibration(spec, ["a", "b", "c"], held_out)
    # a: its own three, then the shared file: "good film" repeats "GOOD  film", so "free money"
    assert calibration.texts["a"] == ["market news", "GOOD  film", "sport today", "free money"]
    assert calibration.texts["b"] == ["free money", "good film", "win call", "awful day"]
    assert calibration.texts["c"] == calibration.texts["b"]
    assert reads.count(shared) == 1 and reads.count(own) == 1
    assert calibration.provenance["a"]["sources"] == [
        {"path": own, "shared": False, "texts": 3}, {"path": shared, "shared": True, "texts": 1}]
    assert calibration.provenance["b"]["sources"] == [{"path": shared, "shared": True,
                                                       "texts": 4}]
    assert calibration.provenance["b"]["held_out_removed"] == 1
    assert calibration.provenance["a"]["held_out_removed"] == 0  # stopped before "who won"


def test_a_text_in_a_tasks_own_source_and_the_shared_one_is_kept_once(tmp_path):
    """De-duplication runs over all of a task's sources, not within each one."""
    own = write(tmp_path / "a.txt", ["free money", "good film"])
    shared = write(tmp_path / "traffic.txt", ["Free  money", "win call", "good film"])
    spec = CalibrationSpec({"a": {"path": own, "text_column": "text"}},
                           shared={"path": shared, "text_column": "text"})
    calibration = load_calibration(spec, ["a", "b"])
    assert calibration.texts["a"] == ["free money", "good film", "win call"]
    assert calibration.texts["b"] == ["Free  money", "win call", "good film"]
    assert [s["texts"] for s in calibration.provenance["a"]["sources"]] == [2, 1]


def test_a_task_left_with_no_text_is_an_error(tmp_path):
    shared = write(tmp_path / "t.txt", ["free money"])
    spec = CalibrationSpec({}, shared={"path": shared, "text_column": "text"})
    with pytest.raises(Hm3Error, match="every text is also in the held-out data"):
        load_calibration(spec, ["a"], {"a": ["Free money"]})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    base, experts = build_family(root, {"sentiment": ["negative", "positive"],
                                        "topic": ["news", "sport", "film"]})
    traffic = ["good film today", "free money win", "who won the vote", "awful meeting",
               "market news today", "hello phone call", "great sport news", "bad film"]
    return root, base, experts, traffic


def test_cli_merge_with_one_shared_sample_records_what_each_task_used(tiny, tmp_path, capsys):
    root, base, experts, traffic = tiny
    traffic_file = write(tmp_path / "traffic.txt", traffic)
    recipe = recipe_dict(base, experts, "ties", recentre=True, align_heads=True,
                         calibration={"texts": "traffic.txt", "batch_size": 4})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(path), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "calibration texts: sentiment 8, topic 8" in printed
    assert f"shared calibration sample (read by every task): {Path(traffic_file).resolve()}" \
        in printed
    assert "on the calibration texts (optimistic" in printed
    label_free = json.loads((tmp_path / "out" / "config.json").read_text())["hm3"]["label_free"]
    for task in experts:
        entry = label_free["calibration"][task]
        assert entry["sources"] == [{"path": str(Path(traffic_file).resolve()), "shared": True,
                                     "texts": 8}]
        assert label_free["fidelity"]["tasks"][task]["n"] == 8
        assert label_free["fidelity"]["held_out"]["tasks"][task]["n"] == 8
    assert label_free["fidelity"]["optimistic"] is True
    assert label_free["fidelity"]["held_out"]["folds"] == 5
    assert "the same with the head steps fitted without each text (5-fold): sentiment " in printed
    recorded = json.loads((tmp_path / "out" / CALIBRATION_TEXTS).read_text())["tasks"]
    assert recorded == {task: [text_hash(t) for t in traffic] for task in experts}
    written = json.loads((tmp_path / "out" / "config.json").read_text())["hm3"]["recipe"]
    assert written["calibration"]["shared"]["path"] == str(Path(traffic_file).resolve())


def test_merge_drops_held_out_texts_from_the_shared_sample(tiny, tmp_path):
    root, base, experts, traffic = tiny
    shared = write(tmp_path / "traffic.txt", traffic)
    recipe = parse_recipe(recipe_dict(base, experts, "ties", recentre=True,
                                      calibration={"texts": shared}))
    with pytest.warns(Hm3Warning, match="1 also appear"):
        report = merge(recipe, tmp_path / "out", progress=False,
                       held_out={"topic": ["Bad film"]})
    assert report.label_free.to_dict()["calibration"]["sentiment"]["texts"] == 7
    assert report.label_free.to_dict()["calibration"]["topic"]["held_out_removed"] == 1


def test_a_shared_sample_runs_the_merged_model_once_for_every_task(tiny, tmp_path, monkeypatch):
    """Tasks reading one shared sample share its batches: the merged model's passes (head
    inputs, calibration fidelity) run once over them, not once per task, and the weights are
    those of running every task on its own."""
    root, base, experts, traffic = tiny
    shared = write(tmp_path / "traffic.txt", traffic)
    recipe = parse_recipe(recipe_dict(base, experts, "ties", recentre=True, align_heads=True,
                                      calibration={"texts": shared, "batch_size": 4}))
    passes = []

    def counted(module):
        real = module.run_batches

        def run(model, batches, before=None):
            passes.append(len(batches))
            return real(model, batches, before)
        monkeypatch.setattr(module, "run_batches", run)

    counted(heads_stage)
    counted(pipeline)
    merge(recipe, tmp_path / "once", progress=False)
    # head inputs: 8 texts in 2 batches, once; the fidelity report reads those inputs
    assert passes == [2]

    def every_task(batches, run):
        return {task: run(task_batches) for task, task_batches in batches.items()}

    for module in (heads_stage, pipeline, label_free_calibration):
        monkeypatch.setattr(module, "once_per_batches", every_task)
    passes.clear()
    merge(recipe, tmp_path / "each", progress=False)
    assert passes == [2, 2]  # the head inputs once per task
    once, each = (load_file(str(tmp_path / name / "model.safetensors"))
                  for name in ("once", "each"))
    assert all(torch.equal(once[name], each[name]) for name in once)


def test_calibration_texts_that_are_not_utf8_or_missing_say_so(tmp_path, monkeypatch):
    monkeypatch.setattr("hm3.data.tables._hub_split",
                        lambda *a: pytest.fail("looked up on the hub"))
    latin = tmp_path / "traffic.txt"
    latin.write_bytes("café crème\n".encode("latin-1"))
    with pytest.raises(Hm3Error, match=r"traffic.txt is not UTF-8 text"):
        load_calibration(parse({"texts": str(latin)}), TASKS)
    with pytest.raises(Hm3Error, match=r"does not exist"):
        load_calibration(parse({"texts": "./trafic/prompts"}), TASKS)


def test_a_task_with_few_calibration_texts_is_warned_about(tmp_path):
    """Under FEW_TEXTS texts a task gets a warning naming it and its count; at FEW_TEXTS, none."""
    few = calibration_module.FEW_TEXTS
    short = write(tmp_path / "short.txt", [f"text number {i}" for i in range(few - 1)])
    enough = write(tmp_path / "enough.txt", [f"other text {i}" for i in range(few)])
    spec = CalibrationSpec({"a": {"path": short, "text_column": "text"},
                            "b": {"path": enough, "text_column": "text"}}, limit=1024)
    with pytest.warns(Hm3Warning) as record:
        load_calibration(spec, ["a", "b"], {})
    messages = [str(w.message) for w in record if issubclass(w.category, Hm3Warning)]
    assert messages == [f"calibration texts of a: only {few - 1}; label-free steps fitted to "
                        f"fewer than {few} texts lose points (at base size give 500 or more of "
                        "the task's own domain; see docs/calibration.md)"]
