"""The layout rules of ``docs/architecture.md``, checked on the source: imports point down the
layers, no import circle, no private name taken across modules, no function over 80 lines (the
training loop over 120)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tunesmith"

# lowest first: a package may import only from layers below its own (and from itself)
LAYERS = [
    {"errors"},
    {"io", "runtime"},
    {"config"},
    {"api", "data"},
    {"methods"},
    {"models"},
    {"generation"},
    {"training"},
    {"evaluation"},
    {"report"},
    {"runs"},
    {"deploy"},
    {"studies"},
    {"web"},
    {"cli"},
    {"tunesmith", "__main__"},  # the package's public API (``tunesmith/__init__.py``) and ``python -m tunesmith``
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
LONGEST = 80
LONGEST_LOOP = 120  # the training loop reads top to bottom in one function


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _unit(module: str) -> str:
    """The layer unit of a module: its package under tunesmith, or the top-level module's name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "tunesmith"


def _imports(modules: dict[str, Path]) -> list[tuple[str, str, str | None, int]]:
    """(importer, imported module, imported name or None, line) for every tunesmith import, at any depth."""
    found = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [(name, a.name, None, node.lineno) for a in node.names if a.name.startswith("tunesmith")]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                if not base.startswith("tunesmith"):
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    found.append((name, sub, None, node.lineno) if sub in modules else (name, base, a.name, node.lineno))
    return found


def test_every_package_has_a_layer():
    units = {_unit(m) for m in _modules()}
    assert units <= set(RANK), sorted(units - set(RANK))


def test_imports_point_down_the_layers():
    upward = [f"{a} -> {b} (line {line})" for a, b, _, line in _imports(_modules())
              if _unit(a) != _unit(b) and RANK[_unit(a)] <= RANK[_unit(b)]]
    assert not upward, upward


def test_no_import_circle():
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for a, b, _, _ in _imports(modules):
        if b in modules and a != b:
            edges[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in modules:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_no_private_name_is_taken_from_another_module():
    taken = [f"{a}:{line} takes {b}.{n}" for a, b, n, line in _imports(_modules())
             if n and n.startswith("_") and not n.startswith("__")]
    assert not taken, taken


def test_no_function_is_too_long():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                limit = LONGEST_LOOP if (name, node.name) == ("tunesmith.training.loop", "train") else LONGEST
                if lines > limit:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_the_rules_catch_what_they_are_about(tmp_path):
    """The checks above are not vacuous: the layout has the packages they rank, and an upward
    import would be seen."""
    modules = _modules()
    assert {"tunesmith.training.loop", "tunesmith.evaluation.evaluate", "tunesmith.runs.folder"} <= set(modules)
    assert any(_unit(a) == "runs" and _unit(b) == "training" for a, b, _, _ in _imports(modules))
    assert RANK["training"] < RANK["runs"]
