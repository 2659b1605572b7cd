"""Plain-text tables for reports printed on a terminal."""

from __future__ import annotations

from typing import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    """Columns padded to their widest cell: numeric columns right-aligned, others left-aligned.

    Floats are shown with 4 decimals and None as "-"; pass strings for any other format.
    """
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(str(h)), *(len(row[i]) for row in cells)]) for i, h in enumerate(header)]
    numeric = [bool(cells) and all(_looks_numeric(row[i]) for row in cells)
               for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        padded = [value.rjust(width) if right else value.ljust(width)
                  for value, width, right in zip(values, widths, numeric)]
        return (indent + "  ".join(padded)).rstrip()

    return "\n".join([line([str(h) for h in header]), *(line(row) for row in cells)])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _looks_numeric(cell: str) -> bool:
    try:
        float(cell.rstrip("%"))
    except ValueError:
        return cell in ("-", "")  # blanks keep a numeric column right-aligned
    return True
