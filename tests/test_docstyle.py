"""One docstring style under src/hm3 (STYLE.md): prose that names the arguments in backticks,
no NumPy or Google sections, so the API reference (mkdocstrings, `docstring_style: null`) reads
alike."""

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hm3"
# a NumPy section: a header line, then a line of dashes
NUMPY_SECTION = re.compile(
    r"^[ \t]*(Parameters|Other Parameters|Returns|Yields|Raises|Warns|Attributes|Methods|"
    r"Examples|Notes|See Also|References)[ \t]*\n[ \t]*-{3,}[ \t]*$", re.M)
# a Google section header on a line of its own
GOOGLE_SECTION = re.compile(r"^[ \t]*(Args|Arguments|Keyword Args):[ \t]*$", re.M)


def docstrings() -> list[tuple[str, str]]:
    """(where, docstring) of every module, class and function under src/hm3."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                text = ast.get_docstring(node, clean=False)
                if text:
                    line = node.body[0].lineno
                    found.append((f"{path.relative_to(SRC.parents[1])}:{line}", text))
    return found


def test_docstrings_are_found():
    assert len(docstrings()) > 100


@pytest.mark.parametrize("pattern", [NUMPY_SECTION, GOOGLE_SECTION], ids=["numpy", "google"])
def test_no_docstring_sections(pattern):
    offenders = [f"{where}: {m.group(1)}" for where, text in docstrings()
                 for m in pattern.finditer(text)]
    assert not offenders, ("docstring sections; write prose with `name`: meaning lines "
                           "instead (STYLE.md):\n" + "\n".join(offenders))


def test_the_check_catches_a_numpy_section():
    text = '"""Load it.\n\n    Parameters\n    ----------\n    path : where.\n    """'
    assert NUMPY_SECTION.search(text)
    assert not NUMPY_SECTION.search('"""Load it.\n\n    `path`: where.\n    """')
