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
