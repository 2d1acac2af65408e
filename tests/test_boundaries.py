"""The edges stay at the edges (docs/design.md §8), checked on the source with an AST walk:

- **The file system.** Only these modules touch it: ``load/`` reads models and their external
  data; ``io.py``, ``data.py`` and ``preprocess.py`` read the user's inputs; ``io.py``,
  ``stream.py`` and ``cli/`` write the outputs (``cli/`` checks and creates output
  folders); ``limits.py`` reads ``/proc/meminfo`` to size the memory budget. Everything else
  (analysis, engine, methods, rendering) gets protos, arrays and bytes. "Touching" is a call of
  ``open``, an ``os``/``os.path`` file function, a ``Path`` method that reads, writes, lists or
  stats, ``numpy``'s file readers and writers, ``onnx.load*``/``onnx.save*`` (the ``*_from_string``
  parsers excepted), ``shutil``, ``tempfile`` or ``io.open_regular``.
- **Protobuf.** Only these modules import ``onnx`` (outside ``if TYPE_CHECKING:``): ``load/``
  and ``analysis/`` (file → checked proto → IR), ``runtime.py`` (sessions), ``samples.py``
  (builds the sample models), ``audit_edits.py`` (the audit's weight randomisation), ``rules/``
  (element type codes in the op checks), ``ray_engine.py`` (parses the model bytes Ray ships
  to each worker) and ``graphsweep.py`` (builds the selection graph that runs on the device).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "onnx_pathwise"

FILE_SYSTEM_ALLOWED = ("load/", "io.py", "data.py", "preprocess.py", "stream.py", "cli/", "limits.py")
ONNX_ALLOWED = ("load/", "analysis/", "runtime.py", "samples.py", "audit_edits.py", "rules/", "ray_engine.py",
                "graphsweep.py")

_OS_FILE_FUNCTIONS = frozenset({
    "stat", "lstat", "fstat", "open", "fdopen", "read", "pread", "write", "pwrite", "listdir", "scandir",
    "walk", "remove", "unlink", "rename", "replace", "mkdir", "makedirs", "rmdir", "removedirs",
    "realpath", "readlink", "exists", "lexists", "isfile", "isdir", "islink", "getsize", "getmtime",
    "access", "chmod", "utime", "fsync", "symlink", "link", "truncate",
})
_PATH_METHODS = frozenset({
    "read_text", "read_bytes", "write_text", "write_bytes", "iterdir", "glob", "rglob", "mkdir", "touch",
    "unlink", "rmdir", "is_file", "is_dir", "is_symlink", "exists", "stat", "lstat", "open", "resolve",
    "samefile", "readlink", "chmod", "rename", "symlink_to", "tofile", "open_regular",
})
_NUMPY_FILE_FUNCTIONS = frozenset({
    "load", "save", "savez", "savez_compressed", "fromfile", "loadtxt", "genfromtxt", "savetxt", "memmap",
})


def _modules() -> list[str]:
    return [p.relative_to(PACKAGE).as_posix() for p in sorted(PACKAGE.rglob("*.py"))]


def _dotted(node: ast.expr) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def file_system_calls(source: str) -> list[str]:
    """``line: call`` for every call in ``source`` that touches the file system (see above)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func, name = node.func, _dotted(node.func)
        head = name.split(".")[0]
        if isinstance(func, ast.Name):
            hit = func.id in ("open", "open_regular")
        elif isinstance(func, ast.Attribute):
            hit = (
                (head == "os" and func.attr in _OS_FILE_FUNCTIONS)
                or head in ("shutil", "tempfile")
                or (head in ("np", "numpy") and func.attr in _NUMPY_FILE_FUNCTIONS)
                or (head == "onnx" and func.attr.startswith(("load", "save")) and not func.attr.endswith("from_string"))
                or func.attr in _PATH_METHODS
            )
        else:
            hit = False
        if hit:
            found.append(f"{node.lineno}: {name or ast.unparse(func)}")
    return found


def _runtime_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """Every module imported outside ``if TYPE_CHECKING:`` blocks (absolute names; relative
    imports come back with their leading dots)."""
    out: list[tuple[int, str]] = []

    def visit(nodes: list[Any]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _dotted(node.test).endswith("TYPE_CHECKING"):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                out.extend((node.lineno, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                out.append((node.lineno, "." * node.level + (node.module or "")))
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    visit([c for c in children if isinstance(c, (ast.stmt, ast.ExceptHandler))])

    visit(tree.body)
    return out


def onnx_imports(source: str) -> list[str]:
    """``line: module`` for every import of ``onnx`` (or a submodule) outside TYPE_CHECKING."""
    return [f"{line}: {name}" for line, name in _runtime_imports(ast.parse(source))
            if name == "onnx" or name.startswith("onnx.")]


def _allowed(module: str, allowed: tuple[str, ...]) -> bool:
    return any(module == a or (a.endswith("/") and module.startswith(a)) for a in allowed)


@pytest.mark.parametrize("module", _modules())
def test_only_the_edges_touch_the_file_system(module: str) -> None:
    if _allowed(module, FILE_SYSTEM_ALLOWED):
        return
    calls = file_system_calls((PACKAGE / module).read_text(encoding="utf-8"))
    assert not calls, (f"{module} touches the file system ({calls}): models are read in load/, user data "
                       "in io.py/data.py/preprocess.py, outputs written by io.py/stream.py/cli.py")


@pytest.mark.parametrize("module", _modules())
def test_protobuf_lives_at_the_edges(module: str) -> None:
    if _allowed(module, ONNX_ALLOWED):
        return
    imports = onnx_imports((PACKAGE / module).read_text(encoding="utf-8"))
    assert not imports, (f"{module} imports onnx ({imports}): protobuf stays in load/, analysis/ and the "
                         "other modules this test names; type hints go under `if TYPE_CHECKING:`")


def test_the_allowed_modules_exist() -> None:
    """Each exception names a module that exists and needs it (so the lists do not go stale)."""
    modules = _modules()
    for allowed, found in ((FILE_SYSTEM_ALLOWED, file_system_calls), (ONNX_ALLOWED, onnx_imports)):
        for entry in allowed:
            mine = [m for m in modules if _allowed(m, (entry,))]
            assert mine, f"{entry} names no module"
            assert any(found((PACKAGE / m).read_text(encoding="utf-8")) for m in mine), f"{entry} needs no exception"


def test_the_checks_can_fail() -> None:
    """The walkers find what they look for, and nothing else."""
    source = (
        "import os\nimport numpy as np\nfrom pathlib import Path\n"
        "open('x')\nos.stat('x')\nPath('x').read_text()\nnp.load('x')\nnp.asarray(1)\n"
        "onnx.load('m.onnx')\nonnx.load_model_from_string(b'')\n'a'.replace('a', 'b')\n"
    )
    assert file_system_calls(source) == ["4: open", "5: os.stat", "6: read_text", "7: np.load", "9: onnx.load"]
    imports = "import onnx\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from onnx import helper\n" \
              "def f():\n    from onnx import numpy_helper\n"
    assert onnx_imports(imports) == ["1: onnx", "6: onnx"]
