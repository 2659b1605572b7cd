"""Reading texts and tables from files (hm3.data.tables): what a spreadsheet export or a data
pipeline's JSON / Parquet can hold that a hand-written file does not."""

from __future__ import annotations

import json

import pytest

from hm3 import Hm3Error
from hm3.data.tables import load_dataset, read_table, read_texts


def test_a_csv_with_a_byte_order_mark_reads_its_first_column_by_name(tmp_path):
    """Spreadsheets save "UTF-8 CSV" with a byte-order mark before the header: without care
    the first column is named "\\ufefftext" and `text` is not found."""
    path = tmp_path / "export.csv"
    path.write_bytes("text,label\ngood film,positive\nawful day,negative\n".encode("utf-8-sig"))
    assert list(read_table(path)[0]) == ["text", "label"]
    assert read_texts(path) == ["good film", "awful day"]
    data = load_dataset(path, "sentiment")
    assert data.texts == ["good film", "awful day"] and data.labels == ["positive", "negative"]


def test_json_texts_a_row_without_the_column_names_the_row(tmp_path):
    path = tmp_path / "texts.json"
    path.write_text(json.dumps([{"text": "good film"}, {"body": "awful day"}]))
    with pytest.raises(Hm3Error) as error:
        read_texts(path)
    assert str(error.value) == (f"{path} row 2 has no field 'text' (its fields: body); "
                                "give every row its text")


def test_json_texts_a_null_text_is_an_error_not_the_text_none(tmp_path):
    path = tmp_path / "texts.json"
    path.write_text(json.dumps([{"text": "good film"}, {"text": None}]))
    with pytest.raises(Hm3Error, match=r"row 2: 'text' is empty \(null\); fill in the text or "
                                       "remove the row"):
        read_texts(path)


def test_parquet_texts_a_missing_value_is_an_error_not_the_text_none(tmp_path):
    pandas = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "texts.parquet"
    pandas.DataFrame({"text": ["good film", None, "awful day"]}).to_parquet(path)
    with pytest.raises(Hm3Error, match=r"texts.parquet row 2: 'text' is empty \(null\)"):
        read_texts(path)
    pandas.DataFrame({"text": ["good film", "awful day"]}).to_parquet(path)
    assert read_texts(path) == ["good film", "awful day"]


def test_a_short_csv_row_is_an_empty_text_error(tmp_path):
    path = tmp_path / "texts.csv"
    path.write_text("id,text\n1,good film\n2\n")
    with pytest.raises(Hm3Error, match=r"row 2: 'text' is empty \(null\)"):
        read_texts(path)


# --- files that are not what a reader expects: one line saying what to do ----------------------

LATIN1 = "café crème\nhello\n".encode("latin-1")


@pytest.mark.parametrize("name, data", [
    ("texts.txt", LATIN1),
    ("texts.csv", b"text,label\n" + "café,ham\n".encode("latin-1")),
    ("texts.jsonl", '{"text": "café", "label": "ham"}\n'.encode("latin-1")),
    ("texts.json", '[{"text": "café", "label": "ham"}]'.encode("latin-1")),
])
def test_a_file_that_is_not_utf8_says_so_and_how_to_convert_it(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    message = r"texts\.\w+ is not UTF-8 text \(byte 0xe9 at offset \d+\); convert it to UTF-8"
    with pytest.raises(Hm3Error, match=message):
        read_texts(path)
    if name != "texts.txt":
        with pytest.raises(Hm3Error, match=message):
            load_dataset(path, "spam")


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_a_file_without_texts_says_it_has_none(tmp_path, content):
    path = tmp_path / "texts.txt"
    path.write_text(content)
    with pytest.raises(Hm3Error, match=r"texts.txt has no texts"):
        read_texts(path)
    (tmp_path / "texts.jsonl").write_text(content)
    with pytest.raises(Hm3Error, match=r"texts.jsonl has no texts"):
        read_texts(tmp_path / "texts.jsonl")


def test_texts_from_standard_input(monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("good film\n\nawful day\n"))
    assert read_texts("-") == ["good film", "awful day"]
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(Hm3Error, match=r"^standard input \(--input -\) has no texts"):
        read_texts("-")


@pytest.mark.parametrize("spec", ["./dta/spam.csv", "./dta/spam", "../dta/spam", "data/dev/spam",
                                  "~/no-such-folder-hm3/spam"])
def test_a_path_that_does_not_exist_is_not_looked_up_on_the_hub(spec, monkeypatch):
    monkeypatch.setattr("hm3.data.tables._hub_split",
                        lambda *a: pytest.fail(f"{spec} was looked up on the hub"))
    with pytest.raises(Hm3Error, match=r"^data file .*spam(\.csv)? does not exist; check the path"):
        load_dataset(spec, "spam")


def test_a_local_file_without_a_table_extension_is_not_a_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr("hm3.data.tables._hub_split",
                        lambda *a: pytest.fail("looked up on the hub"))
    path = tmp_path / "spam-data"
    path.write_text('{"text": "a", "label": "ham"}\n')
    with pytest.raises(Hm3Error, match=r"spam-data: unknown file type \(none\); use one of "
                       r"\.csv, \.tsv, \.jsonl, \.json, \.parquet"):
        load_dataset(path, "spam")


def test_a_missing_column_names_the_option_that_picks_it(tmp_path):
    path = tmp_path / "spam.jsonl"
    path.write_text('{"body": "a", "label": "ham"}\n')
    with pytest.raises(Hm3Error, match=r"no column 'text' \(columns: body, label\); name the right "
                       r"one with --text-column \(text_column: in a recipe\)"):
        load_dataset(path, "spam")
