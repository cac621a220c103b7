"""The map of the code (docs/layout.md) stays true: `sr/` is packages by layer and no module imports from a layer
above its own, each module imports from `sr/` exactly what the map says, no function grows past ~60 lines, and
`sr/` never imports gradio or the app."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the layers, bottom up: a module imports from its own layer and those before it only ("" is `sr/` itself: the
# basics, which import only basics; `cli` and `__main__` are the entry points on top)
LAYERS = ["", "quant", "model", "run", "tune", "lab"]
ENTRY_POINTS = {"cli", "__main__"}


def _modules() -> dict[str, Path]:
    """Every module of `sr/` by its dotted name below `sr` ("store", "quant.calibrate")."""
    found = {}
    for path in (ROOT / "sr").rglob("*.py"):
        if path.stem == "__init__" or "__pycache__" in path.parts:
            continue
        found[".".join(path.relative_to(ROOT / "sr").with_suffix("").parts)] = path
    return found


def _map() -> dict[str, set[str]]:
    section = (ROOT / "docs" / "layout.md").read_text()
    rows = re.findall(r"^\| `sr/([\w/]+)\.py` \| [^|]+ \| ([^|]+) \|$", section, re.M)
    return {name.replace("/", "."): ({"*"} if "all of the above" in text else set(re.findall(r"[a-z_.]+", text)) - {"-"})
            for name, text in rows}


def _imports(path: Path) -> set[str]:
    """The `sr` modules a module imports (function-level imports included), by dotted name below `sr`."""
    package = path.parent.relative_to(ROOT / "sr").parts  # () for the top level
    modules, found = set(_modules()), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = list(package[: len(package) - (node.level - 1)])
        stem = [*base, *(node.module.split(".") if node.module else [])]
        candidates = [".".join(stem)] if node.module else [".".join([*stem, alias.name]) for alias in node.names]
        found |= {c for c in candidates if c in modules}
    return found


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0] if "." in module else "")


def test_every_module_is_on_the_map():
    assert set(_map()) == set(_modules()) - {"__main__"}


@pytest.mark.parametrize("name", sorted(set(_modules()) - {"__main__"}))
def test_module_imports_what_the_map_says(name):
    expected = _map()[name]
    if expected == {"*"}:
        return
    assert _imports(_modules()[name]) == expected


@pytest.mark.parametrize("name", sorted(set(_modules()) - ENTRY_POINTS))
def test_no_module_imports_from_a_layer_above_its_own(name):
    above = sorted(other for other in _imports(_modules()[name])
                   if _layer(other) > _layer(name) or other in ENTRY_POINTS)
    assert not above, f"{name} (layer {LAYERS[_layer(name)] or 'sr'}) imports {above}"


def test_no_long_functions_and_no_ui_in_the_library():
    for path in [*sorted(_modules().values()), ROOT / "app.py", ROOT / "app_jobs.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 60, f"{path.name}:{node.name} is {node.end_lineno - node.lineno + 1} lines"
        if ROOT / "sr" in path.parents:
            imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                        for alias in node.names}
            imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
            assert not imported & {"gradio", "app", "app_jobs", "pandas"}, path.name


def test_no_import_cycle_in_the_library():
    """Function-level imports included (ast.walk sees them): the flow runs one way."""
    graph = {name: _imports(path) for name, path in _modules().items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path, name))
        if name in done:
            return
        for other in graph.get(name, ()):
            visit(other, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())


# what tells a user's ONNX model from a lab weight file: only `sr.model.models` may ask (the stages ask `ModelInfo`)
_KIND_QUESTIONS = re.compile(r"\.uploaded\b|\bis_uploaded\(|== *[\"']onnx[\"']|startswith\([\"']onnx:|\bPREFIX\b")


def test_only_the_model_type_asks_which_kind_a_model_is():
    asking = sorted(name for name, p in _modules().items()
                    if p.stem not in ("models", "usermodel") and _KIND_QUESTIONS.search(p.read_text()))
    assert asking == []


def test_the_public_calls_come_from_the_modules_that_define_them():
    """`sr.<name>` for every name `sr/__init__.py` lists: it resolves, and the module it names defines it (not a
    module that re-exports it); importing `sr` alone imports no layer."""
    import subprocess
    import sys

    import sr

    for name in sr.__all__[1:]:
        value = getattr(sr, name)
        assert value.__module__ == sr._PUBLIC[name], (name, value.__module__)
    light = subprocess.run([sys.executable, "-c", "import sys, sr; print(sorted(m for m in sys.modules "
                            "if m.startswith('sr.')))"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert light.stdout.strip() == "[]", light.stdout
