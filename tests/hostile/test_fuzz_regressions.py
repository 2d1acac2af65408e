"""Regression tests for the bugs tests/hostile/test_fuzz.py found, one each, smallest case."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnx_pathwise import Explainer, ModelError
from onnx_pathwise.cli import app

PREFIX = "onnx-pathwise: error: "


def _refused(tmp_path: Path, command: str, *fragments: str, extra: tuple[str, ...] = ()) -> None:
    """``command`` on tmp_path/m.onnx and tmp_path/x.npy: exit 3, one error line, nothing written."""
    out = tmp_path / "out"
    args = [command, str(tmp_path / "m.onnx")]
    if command in ("unwrap", "explain", "decompose"):
        args += [str(tmp_path / "x.npy"), "--out", str(out / "w.npz" if command == "unwrap" else out)]
    if command in ("explain", "decompose"):
        args.append("--no-png")
    args += list(extra)
    if command != "inspect":
        args += ["--device", "cpu"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 3, (command, res.exit_code, res.stdout, res.stderr, res.exception)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), res.stderr
    assert "Traceback" not in res.stdout + res.stderr and "Warning" not in res.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not out.exists()


def _mlp(w2_value: float, w1_value: float = 1e3) -> onnx.ModelProto:
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
        [numpy_helper.from_array(np.full((4, 3), w1_value, np.float32), "w1"),
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
    _refused(tmp_path, "unwrap", "NaN or infinite", "overflow")
    _refused(tmp_path, "explain", "NaN or infinite", "overflow")
    with pytest.raises(ModelError, match="NaN or infinite"):  # the scores-only pass of the metrics too
        Explainer(_mlp(-3.4e38), device="cpu").scores(np.ones((2, 3), np.float32))


def _chain(w1: float, w2: float) -> onnx.ModelProto:
    """x (N, 1) -> Gemm(w1) -> Relu -> Gemm(w2) -> y (N, 1)."""
    graph = helper.make_graph([
        helper.make_node("Gemm", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2"], ["y"]),
    ], "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.array([[w1]], np.float32), "w1"),
         numpy_helper.from_array(np.array([[w2]], np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_local_affine_model_that_overflows_where_the_output_does_not_is_refused(tmp_path: Path) -> None:
    """Fuzz mutant 580: on a small input the output is finite (0.01 * 3e38 * 3 = 9e36) but the
    weight W = 3e38 * 3 overflows float32: unwrap exited 0 with an infinite W and delta, explain
    with an infinite attribution, both with numpy's overflow warnings on stderr."""
    onnx.save(_chain(3e38, 3.0), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.full((1, 1), 0.01, np.float32))
    _refused(tmp_path, "unwrap", "local affine model of sample 0 overflows float32")
    _refused(tmp_path, "explain", "explanation of sample 0 overflows float32")
    # the same guard on every method and the decomposition (they exited 0 with infinities)
    _refused(tmp_path, "decompose", "decomposition of sample 0 overflows float32")
    for method in ("gradient", "input_x_gradient", "integrated_gradients", "guided_backprop"):
        _refused(tmp_path, "explain", f"the {method} attribution of sample 0 overflows float32",
                 extra=("--method", method))


def test_a_nan_attribute_is_refused_not_explained_as_nan(tmp_path: Path) -> None:
    """Fuzz mutant 256: Gemm alpha = NaN made every score NaN; unwrap exited 0 with a NaN delta."""
    model = _chain(1.0, 1.0)
    model.graph.node[2].attribute.append(helper.make_attribute("alpha", float("nan")))
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.ones((1, 1), np.float32))
    _refused(tmp_path, "unwrap", "'y' is NaN or infinite on sample 0")


def test_an_attribute_string_that_is_not_utf8_is_refused_by_its_place(tmp_path: Path) -> None:
    """Fuzz mutant 402: a string attribute holding b'\\xff' (on any node, even one that ignores it)
    raised UnicodeDecodeError: a traceback. It is a text field like the names: exit 3, by place."""
    model = _chain(1.0, 1.0)
    model.graph.node[1].attribute.append(helper.make_attribute("note", b"\xff\xfe"))
    model.graph.node[0].attribute.append(helper.make_attribute("tags", [b"ok", b"bad\xc3("]))
    for node, where in ((1, "model.graph.node[1].attribute[0].s"), (0, "model.graph.node[0].attribute[0].strings[1]")):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        del m.graph.node[1 - node].attribute[:]
        onnx.save(m, tmp_path / "m.onnx")
        np.save(tmp_path / "x.npy", np.ones((1, 1), np.float32))
        for command in ("inspect", "unwrap", "explain"):
            _refused(tmp_path, command, where, "not valid UTF-8")


def test_audit_of_a_model_with_a_1e38_weight_warns_nothing(tmp_path: Path) -> None:
    """Fuzz mutants 62 and 1034: the randomisation check computed a float32 mean and standard
    deviation of a weight holding 1e38, and numpy printed overflow warnings under the report."""
    onnx.save(_mlp(1e38, w1_value=1e-3), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.full((2, 3), 1e-3, np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = CliRunner().invoke(app, ["audit", str(tmp_path / "m.onnx"), "--inputs", str(tmp_path / "x.npy"),
                                       "--device", "cpu"])
    assert res.exit_code in (0, 1) and res.stderr == "", (res.exit_code, res.stderr, res.exception)
    assert "randomised weights" in res.stdout and "RuntimeWarning" not in res.stdout


def test_a_large_finite_weight_that_does_not_overflow_is_still_explained(tmp_path: Path) -> None:
    onnx.save(_mlp(1e30), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.ones((2, 3), np.float32))
    res = CliRunner().invoke(app, ["unwrap", str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"),
                                   "--out", str(tmp_path / "w.npz"), "--device", "cpu"])
    assert res.exit_code == 0, res.stderr
    with np.load(tmp_path / "w.npz") as z:
        assert np.all(np.isfinite(z["weight"])) and np.all(np.isfinite(z["delta"]))
