"""The package's layers (docs/architecture.md, "The layers"): imports point down only, with no
cycle, counting imports inside functions too."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# Top to bottom, as drawn in docs/architecture.md; a module may import from its own row or any
# row below.
ROWS = [
    ("hm3.cli", "hm3.demo", "hm3.serve"),
    ("hm3.export",),
    ("hm3.search",),
    ("hm3.pipeline",),
    ("hm3.label_free",),  # the label-free steps (their registry sits lower, with the recipe)
    ("hm3.zoo",),
    ("hm3.model", "hm3.evaluate", "hm3.check", "hm3.bench", "hm3.onnx_model", "hm3.predictions"),
    ("hm3.engine", "hm3.heads", "hm3.checkpoint", "hm3.card"),
    ("hm3.recipe", "hm3.mergekit_yaml", "hm3.data", "hm3.label_free.registry"),
    ("hm3.methods",),
    ("hm3.errors", "hm3.table", "hm3.plots"),
]


def modules() -> dict[str, Path]:
    out = {}
    for file in (SRC / "hm3").rglob("*.py"):
        parts = file.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


def row(module: str) -> int | None:
    """The row of the most specific name that covers `module` (`hm3.label_free.registry`
    before `hm3.label_free`)."""
    matches = [(len(name), index) for index, names in enumerate(ROWS) for name in names
               if module == name or module.startswith(name + ".")]
    return max(matches)[1] if matches else None


def imports(module: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The hm3 modules `module` imports, anywhere in the file."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1],
                                 *([base] if base else [])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != "hm3" and name != module:
                found.add(name)
    return found


def test_every_module_has_a_layer():
    assert [m for m in modules() if m != "hm3" and row(m) is None] == []


def test_imports_point_down_only():
    known = modules()
    upward = []
    for module, file in known.items():
        if module == "hm3":
            continue  # the package's public names come from every layer
        for target in imports(module, file, known):
            if row(target) < row(module):
                upward.append(f"{module} imports {target}")
    assert upward == []


def test_no_import_cycles():
    known = modules()
    edges = {m: imports(m, f, known) for m, f in known.items() if m != "hm3"}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in edges.get(module, ()):
            # A package's __init__ importing its own submodules is not a cycle of layers.
            if target.startswith(module + "."):
                continue
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path, module, target]))
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in edges:
        if module not in state:
            visit(module, [])
