"""Plain helpers shared by the test files (fixtures live in ``conftest.py``).

``tests/`` is on ``sys.path`` (pytest puts the folder of ``conftest.py`` there), so test files,
including those in ``tests/hostile/``, write ``from helpers import ...``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper
from typer.testing import CliRunner

from onnx_pathwise.cli import app

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
PREFIX = "onnx-pathwise: error: "

runner = CliRunner()


def invoke(*args: str | Path) -> Any:
    """``onnx-pathwise ARGS`` in this process, through Typer's CliRunner."""
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result: Any, code: int) -> str:
    """The result failed with ``code`` and exactly one ``onnx-pathwise: error:`` line on stderr."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(PREFIX)
    assert result.stdout == ""
    return lines[0]


def subprocess_env() -> dict[str, str]:
    """The environment for a real ``python -m onnx_pathwise`` process: this checkout first on PYTHONPATH."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def run_module(*args: object, cwd: Path | str | None = None, timeout: float | None = None,
               **kw: Any) -> subprocess.CompletedProcess[str]:
    """``python -m onnx_pathwise ARGS`` in a real process (text output captured)."""
    return subprocess.run([sys.executable, "-m", "onnx_pathwise", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=subprocess_env(), timeout=timeout, **kw)


def vi(name: str, shape: list[int | str] | None = None) -> onnx.ValueInfoProto:
    """A float tensor's value info."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def make_model(nodes: list[onnx.NodeProto], inits: list[TensorProto], *, name: str = "g",
               inputs: list[onnx.ValueInfoProto] | None = None, outputs: list[onnx.ValueInfoProto] | None = None,
               opset: int = 17, ir_version: int = 9, functions: list[onnx.FunctionProto] | None = None,
               extra_opsets: tuple[str, ...] = ()) -> onnx.ModelProto:
    """A model from ``nodes``: by default x (N, 2) → ... → y, default-domain ``opset`` (plus
    ``extra_opsets`` at version 1), the given IR version."""
    graph = helper.make_graph(nodes, name, inputs or [vi("x", ["N", 2])], outputs or [vi("y")],
                              initializer=inits)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, functions=functions or [])
    model.ir_version = ir_version
    return model


def run(*args: str | Path, code: int = 0) -> Any:
    """``onnx-pathwise ARGS`` through CliRunner; asserts the exit code (0 unless ``code``)."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    return result


def export_torch(module: Any, example: tuple[Any, ...], path: Path, **kw: Any) -> Path:
    """``torch.onnx.export`` with the legacy (TorchScript) exporter, input ``x`` with a dynamic batch
    axis ``N``, output ``logits``, opset 17 (each overridable through ``kw``)."""
    import torch

    options: dict[str, Any] = dict(dynamo=False, input_names=["x"], output_names=["logits"],
                                   dynamic_axes={"x": {0: "N"}}, opset_version=17)
    torch.onnx.export(module, example, str(path), **{**options, **kw})
    return path


def write_model_files(folder: Path, model: onnx.ModelProto, x: Any, *, name: str = "m.onnx",
                      inputs: str = "x.npy") -> tuple[Path, Path]:
    """``model`` and the input array ``x`` saved into ``folder`` (``m.onnx``, ``x.npy``); their paths."""
    import numpy as np

    path, data = folder / name, folder / inputs
    onnx.save(model, str(path))
    np.save(data, x)
    return path, data
