"""The map of the code (docs/layout.md) stays true: `sr/` is packages by layer and no module imports from a layer
above its own, each module imports from `sr/` exactly what the map says, no function grows past ~60 lines, and
`sr/` never imports gradio or the app; the app's package `ui/` is in layers too (each module imports from `sr`
and from the `ui` modules before it only), each of its modules and `app.py` importing exactly what the map says."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the layers, bottom up: a module imports from its own layer and those before it only ("" is `sr/` itself: the
# basics, which import only basics; `cli` and `__main__` are the entry points on top)
LAYERS = ["", "quant", "model", "run", "tune", "lab"]
ENTRY_POINTS = {"cli", "__main__"}
# the app's package, bottom up: a module imports from `sr` and from the modules before it only (so no cycle);
# `app.py`, the entry point, sits on top
UI = ["jobs", "words", "server", "comparison", "handlers", "layout"]


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


_BLOCKS = (ast.For, ast.AsyncFor, ast.While, ast.If, ast.With, ast.AsyncWith, ast.Try)


def _nesting(node: ast.AST, depth: int = 0) -> int:
    """How deep the blocks (loops, ifs, withs, trys) of a function nest, nested functions counted on their own."""
    deepest = depth
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            deepest = max(deepest, _nesting(child, depth + isinstance(child, _BLOCKS)))
    return deepest


def test_functions_read_in_one_go_and_no_ui_in_the_library():
    """What a line cap was meant to protect: no function nests its blocks more than 4 deep (bench's timing loop
    was 8), and none is a page long (100 lines; a function that long is two). A planted 5-deep loop fails it."""
    planted = ast.parse("def f(a):\n for x in a:\n  for y in x:\n   if y:\n    with y:\n     while y:\n      pass\n")
    assert _nesting(planted.body[0]) == 5
    for path in [*sorted(_modules().values()), ROOT / "app.py", *sorted(_ui_modules().values())]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert _nesting(node) <= 4, f"{path.name}:{node.name} nests {_nesting(node)} blocks deep"
                assert node.end_lineno - node.lineno < 100, f"{path.name}:{node.name} is {node.end_lineno - node.lineno + 1} lines"
        if ROOT / "sr" in path.parents:
            imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                        for alias in node.names}
            imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
            assert not imported & {"gradio", "app", "ui", "pandas"}, path.name


def _ui_modules() -> dict[str, Path]:
    """Every module of `ui/` by its name ("words")."""
    return {path.stem: path for path in (ROOT / "ui").glob("*.py") if path.stem != "__init__"}


def _ui_map() -> dict[str, set[str]]:
    """The map's rows for `app.py` and `ui/` ("app", "ui.words"): what each imports, `sr` modules by their dotted
    name below `sr`, `ui` modules as "ui.<name>"."""
    section = (ROOT / "docs" / "layout.md").read_text()
    rows = re.findall(r"^\| `((?:ui/)?\w+)\.py` \| [^|]+ \| ([^|]+) \|$", section, re.M)
    return {name.replace("/", "."): set(re.findall(r"[a-z_.]+", text)) - {"-"} for name, text in rows}


def _outside_imports(path: Path) -> set[str]:
    """The `sr` modules ("store", "lab.compare"), `ui` modules ("ui.words") and the app ("app") that `app.py` or a
    module of `ui/` imports (function-level imports included; a relative import inside `ui/` counts as `ui.`)."""
    library, package, found = set(_modules()), set(_ui_modules()), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module if node.level == 0 else ".".join(filter(None, ["ui", node.module]))
            names = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name[3:] for name in names if name.startswith("sr.") and name[3:] in library}
        found |= {name for name in names if name.startswith("ui.") and name[3:] in package}
        found |= {"app" for name in names if name == "app" or name.startswith("app.")}
    return found


def test_the_app_package_is_on_the_map_in_its_order():
    assert sorted(_ui_modules()) == sorted(UI)
    assert set(_ui_map()) == {"app", *(f"ui.{name}" for name in UI)}


@pytest.mark.parametrize("name", ["app", *(f"ui.{name}" for name in UI)])
def test_app_module_imports_what_the_map_says(name):
    path = ROOT / "app.py" if name == "app" else _ui_modules()[name[3:]]
    assert _outside_imports(path) == _ui_map()[name]


@pytest.mark.parametrize("name", UI)
def test_no_app_module_imports_from_one_above_its_own(name):
    """Each module of `ui/` imports from `sr` and from the `ui` modules before it in UI only (never `app`)."""
    above = sorted(other for other in _outside_imports(_ui_modules()[name])
                   if other == "app" or other.startswith("ui.") and UI.index(other[3:]) >= UI.index(name))
    assert not above, f"ui.{name} imports {above}"


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


def test_only_the_run_layer_makes_onnx_runtime_sessions():
    """`InferenceSession(` appears in `sr/run/` only (`sr.run.sessions` makes them: threads, providers, a fixed
    input size, the observing mode; a user's model is probed by `sr.run.register`); never in the app."""
    making = sorted(name for name, path in _modules().items()
                    if not name.startswith("run.") and "InferenceSession(" in path.read_text())
    assert making == []
    app = [path.name for path in [ROOT / "app.py", *_ui_modules().values()] if "InferenceSession(" in path.read_text()]
    assert app == []
