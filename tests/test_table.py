"""Plain-text tables (`hm3.table.format_table`)."""

from __future__ import annotations

from hm3.table import format_table


def test_columns_are_as_wide_as_their_widest_cell_and_numbers_align_right():
    out = format_table(["task", "f1"], [["spam", 0.9], ["sentiment", None], ["topic", "12.5%"]])
    assert out.splitlines() == ["task           f1",
                                "spam       0.9000",
                                "sentiment       -",
                                "topic       12.5%"]


def test_a_table_without_rows_is_its_header():
    assert format_table(["task", "agreement"], [], indent="  ") == "  task  agreement"
