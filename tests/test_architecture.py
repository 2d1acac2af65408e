"""The package's layers only look down and its import graph has no cycle (docs/design.md §8).

An AST walk over ``onnx_pathwise/**/*.py``: every import that runs (at module level or inside a
function; imports under ``if TYPE_CHECKING:`` are type hints only and do not count) must go to a
module in the same layer or a lower one, and the module graph must have no cycle. A new module
gets its place in ``LAYERS`` (and §8's table), or this test fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

import onnx_pathwise

PKG = Path(onnx_pathwise.__file__).parent
#: Lowest first. A name covers the module and, for a package, every module below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("errors", "limits", "text", "io", "preprocess", "data")),
    ("loader", ("load", "runtime", "kernels", "tiers")),  # runtime: the onnxruntime boundary, reads no file
    ("analysis", ("analysis", "frontend", "ir", "rules", "passes", "graph")),
    ("engine", ("engine", "sweep", "graphsweep")),
    ("methods", ("pathwise", "selection", "scores", "explain", "decompose", "unwrap", "baselines", "metrics", "radius")),
    ("api", ("", "explainer", "audit", "audit_edits", "stream", "ray_engine", "samples")),  # "": onnx_pathwise/__init__
    ("render", ("render", "plots", "report")),
    ("cli", ("cli", "__main__")),
]
#: Modules over ~600 lines say why at their top ("Over 600 lines: ...").
LONG, LONG_EXEMPT = 650, set[str]()
#: Import edges allowed against the rules, each with its reason (none today).
KNOWN: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = ("onnx_pathwise",) + path.relative_to(PKG).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that ``name`` imports at run time."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "onnx_pathwise")
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            if target.split(".")[0] == "onnx_pathwise":
                found.update(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found - {name}


def layer_of(module: str) -> int:
    rest = module.removeprefix("onnx_pathwise").removeprefix(".")
    for rank, (_, names) in enumerate(LAYERS):
        if any(rest == n or (n and rest.startswith(n + ".")) for n in names):
            return rank
    raise AssertionError(f"{module} has no layer: add it to LAYERS here and to docs/design.md §8")


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        graph.add_edges_from((name, t) for t in _imports(name, path, modules) if (name, t) not in KNOWN)
    return graph


def test_imports_only_look_down() -> None:
    graph = import_graph()
    up = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
          for a, b in graph.edges if layer_of(b) > layer_of(a)]
    assert not up, "imports that look up a layer:\n" + "\n".join(sorted(up))


def test_no_import_cycle() -> None:
    cycle = next(iter(nx.simple_cycles(import_graph())), None)
    assert cycle is None, "import cycle: " + " -> ".join(cycle + cycle[:1])


@pytest.mark.parametrize("name", sorted(set(_modules()) - LONG_EXEMPT))
def test_long_modules_say_why(name: str) -> None:
    text = _modules()[name].read_text(encoding="utf-8")
    if text.count("\n") > LONG:
        assert "Over 600 lines:" in text[:3000], f"{name} is {text.count(chr(10))} lines: split it or say why at its top"
