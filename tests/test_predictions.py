"""`hm3.predictions`: predictions as JSONL or as a CSV / TSV table."""

import csv
import io
import json

import pytest

from hm3 import Hm3Error
from hm3.heads import TaskGroup
from hm3.predictions import check_format, prediction_lines, prediction_table, write_predictions

GROUPS = [TaskGroup("mood", ("sad", "glad"), 0), TaskGroup("tags", ("a", "b"), 2, True)]
RESULTS = [{"mood": {"label": "glad", "score": 0.75, "probabilities": {"sad": 0.25, "glad": 0.75}},
            "tags": {"label": ["a", "b"], "probabilities": {"a": 0.9, "b": 0.6}},
            "logits": [-1.0, 1.0, 2.0, 0.5]}]


def test_a_table_has_a_label_column_per_task_then_a_probability_column_per_label():
    rows = list(csv.reader(io.StringIO(prediction_table(GROUPS, ["hi, you"], RESULTS, "\t")),
                           delimiter="\t"))
    assert rows[0] == ["text", "mood", "tags", "mood/sad", "mood/glad", "tags/a", "tags/b",
                       "logit/mood/sad", "logit/mood/glad", "logit/tags/a", "logit/tags/b"]
    assert rows[1] == ["hi, you", "glad", "a|b", "0.25", "0.75", "0.9", "0.6",
                       "-1.0", "1.0", "2.0", "0.5"]


def test_jsonl_is_the_text_then_the_answer(tmp_path):
    assert [json.loads(line) for line in prediction_lines(["hé"], RESULTS).splitlines()] == [
        {"text": "hé", **RESULTS[0]}]
    write_predictions(tmp_path / "p.CSV", GROUPS, ["x"], RESULTS)
    assert (tmp_path / "p.CSV").read_text().startswith("text,mood,tags,")
    write_predictions(tmp_path / "p.ndjson", GROUPS, ["x"], RESULTS)
    assert json.loads((tmp_path / "p.ndjson").read_text())["text"] == "x"


def test_an_unknown_format_is_refused():
    with pytest.raises(Hm3Error, match="expected a .jsonl, .csv or .tsv file name"):
        check_format("p.xlsx")
