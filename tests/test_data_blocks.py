"""The `data:` and `calibration:` blocks and the readers under them, on hand-written input: the
validation split a search scores on, what a block writes back, which source is a file and
which a hub dataset (a stand-in `datasets` module), each task's calibration record."""

from __future__ import annotations

import hashlib
import sys
import types
import warnings

import pytest

from hm3.data import blocks, calibration as calibration_module, tables
from hm3.data.blocks import (
    CalibrationSpec,
    load_data_block,
    parse_calibration_block,
    parse_data_block,
)
from hm3.data.calibration import load_calibration, source_texts, text_hash, text_key
from hm3.data.tables import Dataset, load_dataset, looks_like_path, read_table, read_texts
from hm3.errors import Hm3Error, Hm3Warning

# --- data: the validation part a search scores on ------------------------------------------------


def test_the_test_part_is_each_tasks_path_with_its_options():
    block = {"a": "a.jsonl",
             "b": {"path": "org/b", "subset": "en", "split": "test", "text_column": "body",
                   "label_column": "y", "limit": 3, "expect": {"a": "x"},
                   "validation": {"split": "dev"}}}
    assert parse_data_block(block) == {
        "a": {"spec": "a.jsonl", "task": "a", "expect": {}},
        "b": {"spec": "org/b", "task": "b", "subset": "en", "split": "test",
              "text_column": "body", "label_column": "y", "limit": 3, "expect": {"a": "x"}}}


def test_the_validation_part_overlays_a_split_or_replaces_the_source_keeping_its_columns():
    block = {"a": {"path": "org/a", "subset": "en", "split": "test", "text_column": "body",
                   "validation": {"split": "validation"}},
             "b": {"path": "org/b", "subset": "en", "split": "test", "limit": 4,
                   "validation": "dev.jsonl"}}
    assert parse_data_block(block, part="validation") == {
        "a": {"spec": "org/a", "task": "a", "subset": "en", "split": "validation",
              "text_column": "body", "expect": {}},
        # another source: the test data's subset and split do not apply, columns and limit do
        "b": {"spec": "dev.jsonl", "task": "b", "limit": 4, "expect": {}}}


def test_a_search_without_validation_data_says_how_to_add_it():
    with pytest.raises(Hm3Error, match=r"^data\.a: no `validation` data; a search scores its "
                                       r"trials on a validation split, e\.g\. `a: \{path: "
                                       r"test\.jsonl, validation: validation\.jsonl\}`$"):
        parse_data_block({"a": "a.jsonl"}, part="validation")
    with pytest.raises(ValueError, match="part must be 'test' or 'validation', got 'train'"):
        parse_data_block({"a": "a.jsonl"}, part="train")


@pytest.mark.parametrize("validation, message", [
    ({}, r"^data\.a\.validation: expected a path or hub id, or a mapping such as "
         r"`\{split: validation\}`$"),
    (3, r"^data\.a\.validation: expected a path or hub id"),
    ({"path": 3}, r"^data\.a\.validation: expected a path or hub id"),
    ({"split": "dev", "expect": {}}, r"^data\.a\.validation: unknown field\(s\) expect; allowed: "
                                     r"path, subset, split, text_column, label_column, limit$"),
    ({"split": 1}, r"^data\.a\.validation\.split: expected a string, got 1$"),
    ({"limit": 0}, r"^data\.a\.validation\.limit: expected a positive integer, got 0$"),
])
def test_a_bad_validation_entry_names_itself(validation, message):
    with pytest.raises(Hm3Error, match=message):
        parse_data_block({"a": {"path": "a.jsonl", "validation": validation}})


@pytest.mark.parametrize("block, message", [
    ({"": "a.jsonl"}, r"^data\.: expected a task name as the key$"),
    ({1: "a.jsonl"}, r"^data\.1: expected a task name as the key$"),
    ({"a": {"split": "x"}}, r"^data\.a: expected a path or hub id, or a mapping with `path`$"),
    ({"a": 3}, r"^data\.a: expected a path or hub id"),
    ({"a": {"path": "x", "text_column": 2}}, r"^data\.a\.text_column: expected a string, got 2$"),
    ({"a": {"path": "x", "label_column": None}}, r"^data\.a\.label_column: expected a string"),
    ({"a": {"path": "x", "subset": 1}}, r"^data\.a\.subset: expected a string"),
    ({"a": {"path": "x", "expect": ["b"]}}, r"^data\.a\.expect: expected a mapping of other "
                                            r"task to a label, e\.g\. `expect: \{spam: ham\}`$"),
    ({"a": {"path": "x", "expect": {"b": True}}}, r"^data\.a\.expect: expected a mapping"),
    ({"a": {"path": "x", "expect": {"b": 1.5}}}, r"^data\.a\.expect: expected a mapping"),
])
def test_a_bad_data_entry_names_itself(block, message):
    with pytest.raises(Hm3Error, match=message):
        parse_data_block(block)


def test_expectations_may_be_a_name_an_id_or_a_list():
    specs = parse_data_block({"a": {"path": "x", "expect": {"b": "n", "c": 2, "d": ["p", "q"]}}},
                             tasks=["a", "b", "c", "d"])
    assert specs["a"]["expect"] == {"b": "n", "c": 2, "d": ["p", "q"]}


def test_relative_paths_are_taken_from_the_root_only_where_the_file_is(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text('{"text": "t", "label": "x"}\n')
    monkeypatch.chdir(tmp_path.parent)
    got = load_data_block({"a": "a.jsonl"}, root=tmp_path)
    assert [d.source for d in got] == [str(tmp_path / "a.jsonl")]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other").mkdir()
    got = load_data_block({"a": "a.jsonl"}, root=tmp_path / "other")  # not there: as written
    assert [d.source for d in got] == ["a.jsonl"]
    (tmp_path / "dev.jsonl").write_text('{"text": "dev text", "label": "x"}\n')
    got = load_data_block({"a": {"path": "a.jsonl", "validation": "dev.jsonl"}},
                          root=tmp_path / "other", part="validation")
    assert got[0].texts == ["dev text"]


# --- calibration: the block ----------------------------------------------------------------------

def test_the_calibration_block_has_defaults_and_writes_back_what_it_holds():
    spec = parse_calibration_block({"texts": {"a": "a.txt"}, "shared": "t.txt"}, ["a", "b"])
    assert (spec.limit, spec.max_length, spec.batch_size) == (1024, 128, 32)
    assert spec.to_dict() == {"texts": {"a": {"path": "a.txt", "text_column": "text"}},
                              "shared": {"path": "t.txt", "text_column": "text"},
                              "limit": 1024, "max_length": 128, "batch_size": 32}
    assert spec.all_sources() == [{"path": "a.txt", "text_column": "text"},
                                  {"path": "t.txt", "text_column": "text"}]
    own = parse_calibration_block({"texts": {"a": "a.txt"}, "limit": 5, "max_length": 2,
                                   "batch_size": 1}, ["a"])
    assert own.to_dict() == {"texts": {"a": {"path": "a.txt", "text_column": "text"}},
                             "limit": 5, "max_length": 2, "batch_size": 1}
    assert own.all_sources() == [{"path": "a.txt", "text_column": "text"}]
    assert parse_calibration_block(None, ["a"]) is None


@pytest.mark.parametrize("field, value, message", [
    ("limit", 0, r"^calibration\.limit: expected a positive integer, got 0$"),
    ("limit", True, r"^calibration\.limit: expected a positive integer, got True$"),
    ("batch_size", 2.0, r"^calibration\.batch_size: expected a positive integer, got 2\.0$"),
    ("max_length", 1, r"^calibration\.max_length: expected at least 2 tokens, got 1$"),
])
def test_calibration_numbers_are_checked(field, value, message):
    with pytest.raises(Hm3Error, match=message):
        parse_calibration_block({"texts": "t.txt", field: value}, ["a"])


def test_a_shared_hub_source_keeps_subset_and_split_and_only_these():
    spec = parse_calibration_block({"shared": {"path": "org/x", "subset": "en", "split": "dev"}},
                                   ["a"])
    assert spec.shared == {"path": "org/x", "text_column": "text", "subset": "en", "split": "dev"}
    with pytest.raises(Hm3Error, match=r"^calibration\.texts\.a: expected a file path"):
        parse_calibration_block({"texts": {"a": {"path": ""}}}, ["a"])
    with pytest.raises(Hm3Error, match=r"^calibration\.shared\.subset: expected a string"):
        parse_calibration_block({"shared": {"path": "org/x", "subset": 1}}, ["a"])


# --- calibration: reading the texts --------------------------------------------------------------

def test_texts_are_the_same_text_whatever_their_case_and_spacing():
    assert text_key("  Good\tFILM \n today ") == "good film today"
    assert text_hash("Good  film") == text_hash("good film") == hashlib.sha256(
        b"good film").hexdigest()[:16]
    assert text_hash("good films") != text_hash("good film")


def test_a_source_is_a_file_by_its_suffix_or_path_else_a_hub_dataset(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(calibration_module, "hub_texts",
                        lambda *args: asked.append(args) or ["hub text"])
    assert source_texts({"path": "org/traffic", "text_column": "body"}) == ["hub text"]
    assert source_texts({"path": "org/traffic", "text_column": "t", "subset": "en",
                         "split": "dev"}) == ["hub text"]
    assert asked == [("org/traffic", None, "train", "body"), ("org/traffic", "en", "dev", "t")]
    (tmp_path / "traffic").write_text("one\ntwo\n")  # no suffix, but there: a file
    with pytest.raises(Hm3Error, match="unknown file type"):
        source_texts({"path": str(tmp_path / "traffic"), "text_column": "text"})
    for path in ("missing.txt", "./missing", "a/b/c"):
        with pytest.raises(Hm3Error, match="does not exist"):
            source_texts({"path": path, "text_column": "text"})
    with pytest.raises(Hm3Error, match=r"^calibration t\.txt: subset and split apply to Hugging "
                                       "Face datasets only$"):
        source_texts({"path": "t.txt", "text_column": "text", "split": "train"})
    assert len(asked) == 2


def own_and_shared(tmp_path, own_text: str, shared_text: str):
    """Task a's own text file and a shared one, with these contents: (own path, shared path,
    the calibration spec reading both)."""
    (tmp_path / "a.txt").write_text(own_text)
    (tmp_path / "t.txt").write_text(shared_text)
    own, shared = str(tmp_path / "a.txt"), str(tmp_path / "t.txt")
    spec = CalibrationSpec({"a": {"path": own, "text_column": "text"}},
                           shared={"path": shared, "text_column": "text"})
    return own, shared, spec


def test_each_tasks_record_names_the_sources_that_gave_texts_and_hashes_them(tmp_path):
    own, shared, spec = own_and_shared(tmp_path, "x one\n  \nx two\n", "x one\n")
    with pytest.warns(Hm3Warning, match=r"^calibration texts of a: only 2; label-free steps "
                                        "fitted to fewer than 128 texts lose points"):
        got = load_calibration(spec, ["a"])
    assert got.texts == {"a": ["x one", "x two"]}
    assert got.provenance["a"] == {
        "path": own,  # the shared source gave nothing new
        "sources": [{"path": own, "shared": False, "texts": 2},
                    {"path": shared, "shared": True, "texts": 0}],
        "texts": 2, "held_out_removed": 0,
        "sha256_16": hashlib.sha256(b"x one\nx two").hexdigest()[:16]}


def test_exactly_the_limit_of_texts_is_kept_and_enough_texts_are_not_warned_about(tmp_path):
    lines = [f"text number {i}" for i in range(130)]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n")
    spec = CalibrationSpec({"a": {"path": str(tmp_path / "a.txt"), "text_column": "text"}},
                           limit=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = load_calibration(spec, ["a"])
    assert got.texts["a"] == lines[:128]
    assert got.provenance["a"]["sources"][0]["texts"] == 128
    spec = CalibrationSpec(dict(spec.sources), limit=3)
    with pytest.warns(Hm3Warning, match="only 3"):
        assert load_calibration(spec, ["a"]).texts["a"] == lines[:3]


def test_a_task_without_usable_texts_names_its_sources(monkeypatch):
    monkeypatch.setattr(calibration_module, "source_texts", lambda source: ["same"])
    spec = CalibrationSpec({"a": {"path": "a.txt", "text_column": "text"}},
                           shared={"path": "t.txt", "text_column": "text"})
    with pytest.raises(Hm3Error, match=r"^calibration texts of a: a\.txt and t\.txt gave no "
                                       r"usable texts \(empty, or every text is also in the "
                                       r"held-out data\)$"):
        load_calibration(spec, ["a"], {"x": ["SAME"]})


# --- tables --------------------------------------------------------------------------------------

@pytest.mark.parametrize("reference, path", [
    ("./x", True), ("../x", True), ("/x", True), ("~/x", True), (".x", True), ("a/b/c", True),
    ("org/name", False), ("name", False), ("name.csv", False)])
def test_a_reference_is_meant_as_a_path_by_its_start_or_its_slashes(reference, path):
    assert looks_like_path(reference) is path


def test_tsv_json_and_json_lines_tables(tmp_path):
    (tmp_path / "t.tsv").write_text("text\tlabel\na, b\tx\n")
    assert read_table(tmp_path / "t.tsv") == [{"text": "a, b", "label": "x"}]
    (tmp_path / "t.json").write_text('{"text": "a"}\n\n{"text": "b"}\n')  # JSON lines in .json
    assert read_table(tmp_path / "t.json") == [{"text": "a"}, {"text": "b"}]
    (tmp_path / "t.json").write_text('{"text": "a"}')
    with pytest.raises(Hm3Error, match=r"t\.json: expected a JSON list of objects, or JSON lines"):
        read_table(tmp_path / "t.json")
    (tmp_path / "t.json").write_text('[{"text": "a"}, 3]')
    with pytest.raises(Hm3Error, match="expected a JSON list of objects"):
        read_table(tmp_path / "t.json")
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n[1]\n')
    with pytest.raises(Hm3Error, match=r"t\.jsonl:2: expected a JSON object with text and label "
                                       "fields"):
        read_table(tmp_path / "t.jsonl")
    with pytest.raises(Hm3Error, match=r"is a folder; give a data file \(\.csv, \.tsv"):
        read_table(tmp_path)


def test_json_lines_texts_are_strings_or_objects_with_the_column(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('"plain"\n\n{"body": "named"}\n')
    assert read_texts(path, "body") == ["plain", "named"]
    path.write_text('"plain"\n{"body": 3}\n')
    with pytest.raises(Hm3Error, match=r"t\.jsonl:2 has no text field 'body'; name the column "
                                       r"that holds the text with --text-column"):
        read_texts(path, "body")
    path.write_text("nope\n")
    with pytest.raises(Hm3Error, match=r"t\.jsonl:1 is not JSON; expected one JSON string or "
                                       "object per line"):
        read_texts(path)
    (tmp_path / "t.csv").write_text("body,y\n5,x\n")
    assert read_texts(tmp_path / "t.csv", "body") == ["5"]
    with pytest.raises(Hm3Error, match=r"t\.csv has no column 'text' \(columns: body, y\)"):
        read_texts(tmp_path / "t.csv")
    with pytest.raises(Hm3Error, match=r"^text file .*none\.txt does not exist; give a \.txt "
                                       r"file \(one text per line\) or a table \(\.csv"):
        read_texts(tmp_path / "none.txt")


def test_a_table_row_needs_a_text_string_and_a_label(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": 5, "label": "x"}\n')
    with pytest.raises(Hm3Error, match=r"t\.jsonl row 2: 'text' is 5, not a text$"):
        load_dataset(path, "t")
    path.write_text('{"text": "a", "label": NaN}\n')
    with pytest.raises(Hm3Error, match=r"row 1: no label in 'label'$"):
        load_dataset(path, "t")
    path.write_text("")
    with pytest.raises(Hm3Error, match=r"t\.jsonl has no rows$"):
        load_dataset(path, "t")


def test_a_dataset_checks_its_lengths_and_its_cross_checks():
    with pytest.raises(Hm3Error, match="^src: no examples to score$"):
        Dataset("t", [], [], source="src")
    with pytest.raises(Hm3Error, match="^t: 2 texts but 1 labels$"):
        Dataset("t", ["a", "b"], ["x"])
    with pytest.raises(Hm3Error, match="^t: `expect` names the dataset's own task 't'"):
        Dataset("t", ["a"], ["x"], expect={"t": "x"})
    assert Dataset("t", ("a",), ("x",)).texts == ["a"]


class FakeClassLabel:
    names = ["neg", "pos"]

    def int2str(self, value):
        return self.names[value]


class FakeSplit:
    """The little of a `datasets.Dataset` that hm3 reads."""

    def __init__(self, columns: dict, features: dict):
        self.columns, self.features = columns, features
        self.column_names = list(columns)

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, name):
        return self.columns[name]

    def select(self, indices):
        return FakeSplit({k: [v[i] for i in indices] for k, v in self.columns.items()},
                         self.features)


@pytest.fixture
def fake_hub(monkeypatch):
    asked = []
    split = FakeSplit({"text": ["good", "bad", "fine"], "label": [1, 0, 1],
                       "tags": [[0], [0, 1], []]},
                      {"label": FakeClassLabel(), "tags": types.SimpleNamespace(
                          feature=FakeClassLabel()), "text": object()})

    def load(name, subset, split_name):
        asked.append((name, subset, split_name))
        if name == "broken":
            raise ConnectionError("no network")
        return split

    module = types.SimpleNamespace(load_dataset=lambda name, subset, split: load(name, subset,
                                                                                  split))
    monkeypatch.setitem(sys.modules, "datasets", module)
    return asked


def test_hub_labels_are_class_names_and_limits_select_the_first_rows(fake_hub):
    data = load_dataset("org/sst", "tone", limit=2)
    assert (data.texts, data.labels) == (["good", "bad"], ["pos", "neg"])
    tags = load_dataset("org/sst", "tags", label_column="tags", subset="en", split="train")
    assert tags.labels == [["neg"], ["neg", "pos"], []]
    assert fake_hub == [("org/sst", None, "test"), ("org/sst", "en", "train")]
    assert load_dataset("org/sst", "t", label_column="text", limit=5).labels == [
        "good", "bad", "fine"]
    assert tables.hub_texts("org/sst", None, "train", "text") == ["good", "bad", "fine"]


def test_hub_errors_name_the_dataset_and_the_column(fake_hub):
    with pytest.raises(Hm3Error, match=r"^cannot load Hugging Face dataset broken \(split test\): "
                                       "no network$"):
        load_dataset("broken", "t")
    with pytest.raises(Hm3Error, match=r"^org/sst has no column 'body' \(columns: text, label, "
                                       r"tags\); name the right one with --text-column"):
        load_dataset("org/sst", "t", text_column="body")
    with pytest.raises(Hm3Error, match=r"^org/sst has no column 'y' .*--label-column"):
        load_dataset("org/sst", "t", label_column="y")
    with pytest.raises(Hm3Error, match=r"^org/sst has no column 'body' \(columns: text, label, "
                                       r"tags\); name the right one with text_column$"):
        tables.hub_texts("org/sst", None, "train", "body")


def test_blocks_reads_through_the_one_loader(monkeypatch):
    seen = []
    monkeypatch.setattr(blocks, "load_dataset", lambda **spec: seen.append(spec) or spec)
    load_data_block({"a": {"path": "/abs/a.jsonl", "limit": 2}})
    assert seen == [{"spec": "/abs/a.jsonl", "task": "a", "limit": 2, "expect": {}}]


def test_hub_texts_read_the_subset_and_split_asked_for(fake_hub):
    assert tables.hub_texts("org/sst", "en", "dev", "text") == ["good", "bad", "fine"]
    assert fake_hub == [("org/sst", "en", "dev")]


def test_a_hub_row_without_a_label_is_named_by_the_dataset(fake_hub, monkeypatch):
    split = FakeSplit({"text": ["good", "bad"], "label": ["pos", None]}, {"label": object()})
    monkeypatch.setattr(tables, "_hub_split", lambda name, subset, split_name: split)
    with pytest.raises(Hm3Error, match=r"^org/gaps row 2: no label in 'label'$"):
        load_dataset("org/gaps", "t")


def test_data_items_split_at_the_first_equals_sign():
    from hm3.data.items import data_block, parse_expectation

    assert data_block(["topic=a=b.csv"]) == {"topic": {"path": "a=b.csv", "text_column": "text",
                                                       "label_column": "label"}}
    assert parse_expectation("spam:topic=a=b") == ("spam", "topic", "a=b")


def test_a_data_block_without_a_root_reads_relative_paths_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"text": "t", "label": "x"}\n')
    assert [d.source for d in load_data_block({"a": "a.jsonl"})] == ["a.jsonl"]
    with pytest.raises(Hm3Error, match=r"^data\.a: unknown task 'a'; known tasks are b$"):
        load_data_block({"a": "a.jsonl"}, tasks=["b"])


def test_unknown_fields_are_all_listed_with_what_is_allowed():
    with pytest.raises(Hm3Error, match=r"^data\.a: unknown field\(s\) colour, size; allowed: "
                                       r"path, subset, split, text_column, label_column, limit, "
                                       r"expect, validation$"):
        parse_data_block({"a": {"path": "x", "size": 1, "colour": 2}})
    with pytest.raises(Hm3Error, match=r"^data\.a\.validation: unknown field\(s\) colour, "
                                       r"expect; allowed: path,"):
        parse_data_block({"a": {"path": "x", "validation": {"expect": 1, "colour": 2}}})
    with pytest.raises(Hm3Error, match=r"^data: expected a mapping of task name to dataset, e\.g\. "
                                       r"`data: \{spam: splits/spam/test\.jsonl\}`$"):
        parse_data_block("x.jsonl")


def test_every_held_out_text_left_out_is_counted(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\nthree\nfour\n")
    spec = CalibrationSpec({"a": {"path": str(tmp_path / "a.txt"), "text_column": "text"}})
    with pytest.warns(Hm3Warning) as caught:
        got = load_calibration(spec, ["a"], {"a": ["TWO"], "b": ["four"]})
    assert [str(w.message).split(";")[0] for w in caught] == [
        "calibration texts of a: 2 also appear in the held-out (validation or test) data and "
        "were left out", "calibration texts of a: only 2"]
    assert got.texts["a"] == ["one", "three"] and got.provenance["a"]["held_out_removed"] == 2


def test_a_local_source_reads_its_column_and_refuses_a_subset(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"body": "from body", "text": "from text"}\n')
    assert source_texts({"path": str(path), "text_column": "body"}) == ["from body"]
    with pytest.raises(Hm3Error, match="subset and split apply to Hugging Face datasets only"):
        source_texts({"path": str(path), "text_column": "text", "subset": "en"})


def test_a_limit_of_one_keeps_one_row(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    assert load_dataset(path, "t", limit=1).texts == ["a"]


def test_a_missing_file_named_with_a_table_suffix_is_not_looked_up_on_the_hub(tmp_path,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tables, "_hub_split", lambda *a: pytest.fail("looked up on the hub"))
    for name in ("spam.csv", "spam.JSONL"):
        with pytest.raises(Hm3Error, match=f"^data file {name} does not exist"):
            load_dataset(name, "spam")


def test_a_quoted_csv_field_keeps_its_own_line_breaks(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b'text,label\r\n"two\r\nlines",x\r\n')
    assert read_texts(path) == ["two\r\nlines"]


def test_calibration_lengths_and_columns_are_checked_by_name():
    with pytest.raises(Hm3Error, match=r"^calibration\.max_length: expected a positive integer, "
                                       r"got 0$"):
        parse_calibration_block({"texts": "t.txt", "max_length": 0}, ["a"])
    with pytest.raises(Hm3Error, match=r"^calibration\.texts\.a\.text_column: expected a string, "
                                       r"got 3$"):
        parse_calibration_block({"texts": {"a": {"path": "a.txt", "text_column": 3}}}, ["a"])


def test_standard_input_is_read_as_utf8_bytes_its_byte_order_mark_dropped(monkeypatch):
    import io

    stdin = types.SimpleNamespace(buffer=io.BytesIO("\ufeffgood film\n\ncafé\n".encode("utf-8")),
                                  read=lambda: pytest.fail("read as text"))
    monkeypatch.setattr("sys.stdin", stdin)
    assert read_texts("-") == ["good film", "café"]
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(b"caf\xe9\n")))
    with pytest.raises(Hm3Error, match=r"^standard input is not UTF-8 text \(byte 0xe9"):
        read_texts("-")


def test_a_task_that_read_two_sources_records_both(tmp_path):
    own, shared, spec = own_and_shared(tmp_path, "own text\n", "shared text\n")
    with pytest.warns(Hm3Warning, match="only 2"):
        got = load_calibration(spec, ["a"])
    assert got.provenance["a"]["path"] == f"{own} + {shared}"
