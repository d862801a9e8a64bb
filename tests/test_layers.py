"""attend's import graph is layered (docs/architecture.md, "Layers"): no cycle, no module imports another
module's private (single underscore) name, and no module imports from a layer above its own.

Every module under src/attend is parsed with `ast` (nothing is imported), every `import` and `from ... import`
counted wherever it is written: at the top, inside a function (a lazy import is still an edge), under
`if TYPE_CHECKING`. Only edges between attend's own modules are kept. A module new on disk must be placed in
`LAYERS` (the first test fails until it is); a name in `LAYERS` with no module on disk is fine.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "attend"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# Lowest first. A module may import from its own layer or a lower one. `name.*` is a package: its
# `__init__` and every module in it. The package root (`attend/__init__`) may import anything: it only
# re-exports, and sits at the layer of the highest module it imports (so importing `attend.__version__`
# from the CLI or the benchmarks is not upward).
LAYERS: list[tuple[str, ...]] = [
    ("_helpers", "features"),
    ("inputs",),
    ("masks", "merge"),
    ("reference", "tiles"),
    ("grad2",),
    ("backends.*",),
    ("dispatch",),
    ("functional",),
    ("module", "compat", "kvcache", "varlen", "distributed"),
    ("integrations.*", "testing"),
    ("bench.*",),
    ("cli", "__main__"),
]


@dataclass(frozen=True)
class Edge:
    source: str  # dotted module names, `attend.backends.chunked`
    target: str
    line: int
    names: tuple[str, ...]  # the names imported from `target` (empty for `import target` / a submodule)
    lazy: bool  # written inside a function

    def __str__(self) -> str:
        what = f" ({', '.join(self.names)})" if self.names else ""
        where = "inside a function, " if self.lazy else ""
        return f"{self.source} -> {self.target}{what}  [{where}{_path(self.source)}:{self.line}]"


def _path(module: str) -> str:
    return str(_modules()[module].relative_to(SRC.parents[1]))


def _modules(root: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """{dotted name: file} of every module under `root` (a package's `__init__` under the package's name)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((package, *parts))] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports(module: str, source: str, is_package: bool, known: set[str]) -> list[Edge]:
    """Every import `module` (its `source`) makes of a module in `known`, lazy ones included."""
    edges: list[Edge] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    # `import a.b.c` binds and needs a.b.c: the longest known prefix of it
                    parts = alias.name.split(".")
                    for n in range(len(parts), 0, -1):
                        target = ".".join(parts[:n])
                        if target in known:
                            edges.append(Edge(module, target, child.lineno, (), inner))
                            break
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    # the package the relative import starts from: the module's own if it is a package's
                    # `__init__`, else its parent; each further dot goes one package up
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join([*base, child.module] if child.module else base)
                else:
                    target = child.module or ""
                names = []
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    if sub in known:  # `from . import tiles`: the submodule itself
                        edges.append(Edge(module, sub, child.lineno, (), inner))
                    else:
                        names.append(alias.name)
                if names and target in known:
                    edges.append(Edge(module, target, child.lineno, tuple(names), inner))
            visit(child, inner)

    visit(ast.parse(source), False)
    return [e for e in edges if e.target != module]


def _graph() -> list[Edge]:
    modules = _modules()
    known = set(modules)
    edges = []
    for name, path in modules.items():
        edges += imports(name, path.read_text(encoding="utf-8"), _is_package(path), known)
    return edges


def _layer_of(module: str) -> int | None:
    """The layer index of a module from `LAYERS`, None where it has none (the root has its own rule)."""
    rel = module[len(PACKAGE) + 1 :]
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            if entry.endswith(".*"):
                pkg = entry[:-2]
                if rel == pkg or rel.startswith(pkg + "."):
                    return index
            elif rel == entry:
                return index
    return None


def _layers(edges: list[Edge]) -> dict[str, int]:
    """{module: layer} of every placed module; the root at the highest layer it imports from."""
    out = {m: layer for m in _modules() if m != PACKAGE and (layer := _layer_of(m)) is not None}
    out[PACKAGE] = max((out[e.target] for e in edges if e.source == PACKAGE and e.target in out), default=0)
    return out


def _cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _report(title: str, edges: list[Edge]) -> str:
    return f"{title}:\n" + "\n".join(f"  {e}" for e in sorted(edges, key=lambda e: (e.source, e.line, e.target)))


# the checker itself, on made-up sources


def test_the_checker_reads_every_kind_of_import():
    known = {"attend", "attend.a", "attend.pkg", "attend.pkg.b", "attend.pkg.c"}
    source = """
import torch
import attend.pkg.c
from attend.a import thing
from . import c, helper
from .. import __version__

def later():
    from ..a import _private
"""
    edges = imports("attend.pkg.b", source, False, known)
    got = {(e.target, e.names, e.lazy) for e in edges}
    assert got == {
        ("attend.pkg.c", (), False),  # import attend.pkg.c; from . import c
        ("attend.a", ("thing",), False),
        ("attend.pkg", ("helper",), False),  # a name of the package's __init__, not a module
        ("attend", ("__version__",), False),
        ("attend.a", ("_private",), True),  # inside a function: still an edge
    }
    # a package's __init__: `.` is the package itself
    edges = imports("attend.pkg", "from .b import x\nfrom ..a import y\n", True, known)
    assert {(e.target, e.names) for e in edges} == {("attend.pkg.b", ("x",)), ("attend.a", ("y",))}
    cycle = [Edge("attend.x", "attend.y", 1, (), False), Edge("attend.y", "attend.x", 1, (), True)]
    assert _cycles(cycle) == [["attend.x", "attend.y"]]


# the package


def test_every_module_has_a_layer():
    """A new module must be placed in `LAYERS` (lowest first): the layering is only as good as the table."""
    missing = sorted(m for m in _modules() if m != PACKAGE and _layer_of(m) is None)
    assert not missing, (
        "modules missing from tests/test_layers.py's LAYERS (place each one in its layer): " + ", ".join(missing)
    )


def test_no_import_cycle():
    edges = _graph()
    cycles = _cycles(edges)
    messages = []
    for component in cycles:
        inside = [e for e in edges if e.source in component and e.target in component]
        messages.append(_report("import cycle among " + ", ".join(component), inside))
    assert not cycles, "\n".join(messages)


def test_no_module_imports_another_modules_private_name():
    """`_name` is private to its module; a name two modules share is public (the `_helpers` module itself is
    the package's shared toolbox: importing from it is fine, its names are public)."""
    private = []
    for e in _graph():
        names = tuple(n for n in e.names if n.startswith("_") and not n.startswith("__"))
        if names:
            private.append(Edge(e.source, e.target, e.line, names, e.lazy))
    assert not private, _report("private names imported from another attend module", private)


def test_no_upward_import():
    edges = _graph()
    layers = _layers(edges)
    upward = [
        e
        for e in edges
        if e.source != PACKAGE and e.source in layers and e.target in layers and layers[e.target] > layers[e.source]
    ]
    lines = [f"{e}  (layer {layers[e.source]} imports layer {layers[e.target]})" for e in upward]
    assert not upward, "upward imports (a module may import only its own layer or lower ones):\n  " + "\n  ".join(lines)
