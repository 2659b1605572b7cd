"""The package's top level: what `import hm3` offers, and what it costs."""

import subprocess
import sys

import pytest

import hm3


@pytest.mark.parametrize("name", hm3.__all__)
def test_every_public_name_resolves_to_the_object_of_its_module(name):
    module = __import__(hm3._EXPORTS[name], fromlist=[name])
    assert getattr(hm3, name) is getattr(module, name)


def test_the_public_names_are_the_lazy_exports():
    assert sorted(hm3.__all__) == sorted(hm3._EXPORTS)
    assert set(hm3.__all__) <= set(dir(hm3))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        hm3.nonexistent  # noqa: B018


def test_importing_hm3_does_not_import_torch():
    code = "import sys, hm3; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_command_line_parser_loads_without_torch():
    """`hm3 --help` and a mistyped command answer without waiting for torch."""
    code = ("import sys; from hm3.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_check_commands_counts_are_the_libraries():
    from hm3.check import COUNTS
    from hm3.cli.check import COUNTS as CLI_COUNTS

    assert CLI_COUNTS == COUNTS
