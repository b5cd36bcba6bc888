"""The package's shape (src/neuron_effects, read with ast, nothing imported): its imports flow one
way (no circle among its modules, imports inside functions included), no module imports another
module's private name or reaches one through a module (``from .x import _y``, ``x._y``), and
every module is under 450 lines. The checks are first shown to catch each fault on small
made-up packages."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "neuron_effects"
MAX_LINES = 450


def package_sources(root: Path = PACKAGE) -> dict[str, str]:
    """Each module's dotted name (a package by its ``__init__``) -> its source."""
    sources = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        sources[".".join(parts)] = path.read_text()
    return sources


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imports(name: str, source: str, modules: set[str], is_package: bool
             ) -> tuple[set[str], list[str]]:
    """The package's modules that ``name`` imports (anywhere in it), and its uses of another
    module's private names: imported by name, or read as an attribute of an imported module."""
    tree = ast.parse(source)
    here = name.split(".") if is_package else name.split(".")[:-1]
    targets: set[str] = set()
    bound: dict[str, str] = {}  # local name -> the package module it is
    private = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    targets.add(alias.name)
                    if alias.asname:
                        bound[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1]) if node.level else ""
            base = ".".join(part for part in (base, node.module or "") if part)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                if child in modules:
                    targets.add(child)
                    bound[alias.asname or alias.name] = child
                elif base in modules:
                    targets.add(base)
                    if _is_private(alias.name):
                        private.append(f"{name} imports {base}.{alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id in bound and _is_private(node.attr):
            private.append(f"{name} reads {bound[node.value.id]}.{node.attr}")
    targets.discard(name)
    return targets, private


def import_graph(sources: dict[str, str]) -> tuple[dict[str, set[str]], list[str]]:
    """Each module's imports of the package's modules, and every private name used across
    modules (:func:`_imports`)."""
    modules = set(sources)
    graph, private = {}, []
    for name, source in sources.items():
        is_package = any(other.startswith(f"{name}.") for other in modules)
        graph[name], found = _imports(name, source, modules, is_package)
        private += found
    return graph, private


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of imports (its modules in order, the first repeated at the end), or []."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[module] = "done"
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return []


def test_the_checks_catch_a_circle_and_private_names():
    circle = {"pkg": "", "pkg.a": "from .b import f\n",
              "pkg.b": "def g():\n    from . import c\n", "pkg.c": "import pkg.a\n",
              "pkg.d": "from .a import x\n"}
    graph, private = import_graph(circle)
    assert import_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert not private
    fine = {**circle, "pkg.c": "from pkg import __version__\n"}
    assert import_cycle(import_graph(fine)[0]) == []
    leaks = {"pkg": "", "pkg.sub": "", "pkg.a": "_x = 1\n",
             "pkg.sub.b": "from ..a import _x, y\nfrom .. import a\nfrom .. import __version__\n"
                          "a._x + a.__doc__\n",
             "pkg.sub.c": "import pkg.a as m\nm._x\n"}
    assert sorted(import_graph(leaks)[1]) == ["pkg.sub.b imports pkg.a._x",
                                              "pkg.sub.b reads pkg.a._x",
                                              "pkg.sub.c reads pkg.a._x"]


def test_imports_flow_one_way_and_no_private_name_crosses_modules():
    sources = package_sources()
    assert "neuron_effects.jobs.shard" in sources and "neuron_effects.report" in sources
    graph, private = import_graph(sources)
    assert graph["neuron_effects.report"] >= {"neuron_effects.report_census",
                                               "neuron_effects.report_html"}
    assert import_cycle(graph) == []
    assert not private


def test_every_module_is_under_the_line_limit():
    sizes = {path.relative_to(PACKAGE.parent).as_posix(): len(path.read_text().splitlines())
             for path in PACKAGE.rglob("*.py")}
    assert len(sizes) > 30
    assert {path: n for path, n in sizes.items() if n >= MAX_LINES} == {}
