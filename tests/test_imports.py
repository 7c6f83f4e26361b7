"""The layout's promises, checked over the import graph of ``src/gatelab`` (read with ``ast``).

- no module imports one that imports it back, directly or through others (no cycles);
- systems depend on the core, never on each other;
- nothing in the package cites a file that is not in the repository.
"""

import ast
from pathlib import Path

import gatelab

ROOT = Path(gatelab.__file__).parent
SYSTEMS = {"gmoe", "moe", "exits", "edge", "comm"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every gatelab module ``path`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from a.b import c` imports a.b.c when c is a module, else a.b
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import gatelab.x.y` names a module or package
                target = target.rpartition(".")[0]
            if target.startswith("gatelab.") and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    # a package's __init__ is not an edge target for its own submodules' relative parents
    return {name: _imports(path, name, known) - {"gatelab"} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = _graph()
    assert "gatelab.runs" in graph and graph["gatelab.cli"], "the graph was not read"
    assert _cycles(graph) == []


def test_systems_depend_on_the_core_never_on_each_other():
    offending = []
    for name, targets in _graph().items():
        parts = name.split(".")
        if len(parts) < 2 or parts[1] not in SYSTEMS:
            continue
        for target in targets:
            other = target.split(".")[1]
            if other in SYSTEMS and other != parts[1]:
                offending.append(f"{name} -> {target}")
    assert offending == []


def test_nothing_cites_a_file_outside_the_repository():
    citing = [str(p) for p in ROOT.rglob("*.py") if "papers.md" in p.read_text()]
    assert citing == []
