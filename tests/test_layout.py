"""The map of the code (docs/layout.md) stays true: each module imports from `sr/` exactly what the map says, no
function grows past ~60 lines, and `sr/` never imports gradio or the app."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _map() -> dict[str, set[str]]:
    section = (ROOT / "docs" / "layout.md").read_text()
    rows = re.findall(r"^\| `sr/(\w+)\.py` \| [^|]+ \| ([^|]+) \|$", section, re.M)
    return {name: ({"*"} if "all of the above" in text else set(re.findall(r"[a-z_]+", text)) - {"-"})
            for name, text in rows}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
    return found - {"__init__", "__version__"}


def test_every_module_is_on_the_map():
    modules = {p.stem for p in (ROOT / "sr").glob("*.py")} - {"__init__", "__main__"}
    assert set(_map()) == modules


@pytest.mark.parametrize("name", sorted(_map()))
def test_module_imports_what_the_map_says(name):
    expected = _map()[name]
    if expected == {"*"}:
        return
    assert _imports(ROOT / "sr" / f"{name}.py") == expected


def test_no_long_functions_and_no_ui_in_the_library():
    for path in [*sorted((ROOT / "sr").glob("*.py")), ROOT / "app.py", ROOT / "app_jobs.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 60, f"{path.name}:{node.name} is {node.end_lineno - node.lineno + 1} lines"
        if path.parent.name == "sr":
            imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                        for alias in node.names}
            imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
            assert not imported & {"gradio", "app", "app_jobs", "pandas"}, path.name


def test_no_import_cycle_in_the_library():
    """Function-level imports included (ast.walk sees them): the flow runs one way."""
    graph = {p.stem: _imports(p) for p in (ROOT / "sr").glob("*.py")}
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


# what tells a user's ONNX model from a lab weight file: only `sr.models` may ask (the stages ask `ModelInfo`)
_KIND_QUESTIONS = re.compile(r"\.uploaded\b|\bis_uploaded\(|== *[\"']onnx[\"']|startswith\([\"']onnx:|\bPREFIX\b")


def test_only_the_model_type_asks_which_kind_a_model_is():
    asking = sorted(p.name for p in (ROOT / "sr").glob("*.py")
                    if p.stem not in ("models", "usermodel") and _KIND_QUESTIONS.search(p.read_text()))
    assert asking == []
