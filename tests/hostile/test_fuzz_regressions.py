"""Regression tests for the bugs tests/hostile/test_fuzz.py found, one each, smallest case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnx_pathwise.cli import app

PREFIX = "onnx-pathwise: error: "


def _mlp(w2_value: float) -> onnx.ModelProto:
    """x (N, 3) -> Gemm -> Relu -> Gemm -> y (N, 2), with one second-layer weight set to ``w2_value``."""
    g = np.random.default_rng(0)
    w2 = g.standard_normal((2, 4)).astype(np.float32)
    w2[0, 0] = w2_value
    graph = helper.make_graph([
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1),
    ], "overflow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.full((4, 3), 1e3, np.float32), "w1"),
         numpy_helper.from_array(np.zeros(4, np.float32), "b1"),
         numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(2, np.float32), "b2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_finite_weights_whose_output_overflows_are_refused_not_explained_as_nan(tmp_path: Path) -> None:
    """Fuzz mutant 167: a weight of -3.4e38 (finite) made the output -inf; unwrap exited 0 with
    a NaN delta and numpy's overflow warnings on stderr. Now: one error line, exit 3, nothing written."""
    onnx.save(_mlp(-3.4e38), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.ones((2, 3), np.float32))
    for args in (["unwrap", "m.onnx", "x.npy", "--out", "out/w.npz"],
                 ["explain", "m.onnx", "x.npy", "--out", "out/e", "--no-png"]):
        res = CliRunner().invoke(app, [*(str(tmp_path / a) if a.endswith((".onnx", ".npy")) or a.startswith("out")
                                         else a for a in args), "--device", "cpu"])
        assert res.exit_code == 3, (res.exit_code, res.stdout, res.stderr)
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(PREFIX) and "overflow" in lines[0], res.stderr
        assert not (tmp_path / "out").exists()


def test_a_large_finite_weight_that_does_not_overflow_is_still_explained(tmp_path: Path) -> None:
    onnx.save(_mlp(1e30), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.ones((2, 3), np.float32))
    res = CliRunner().invoke(app, ["unwrap", str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"),
                                   "--out", str(tmp_path / "w.npz"), "--device", "cpu"])
    assert res.exit_code == 0, res.stderr
    with np.load(tmp_path / "w.npz") as z:
        assert np.all(np.isfinite(z["weight"])) and np.all(np.isfinite(z["delta"]))
