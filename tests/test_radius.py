"""Certified radius: hand-computed max-pool margins, chunked tangents, opt-in for large inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_pathwise import Explainer, InputError
from onnx_pathwise import explainer as explainer_mod
from onnx_pathwise.samples import tiny_cnn


def _pool_only() -> onnx.ModelProto:
    """x (1×2×4) → MaxPool 2×2 stride 2 → Flatten → Gemm(identity): no gates at all."""
    nodes = [
        helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_max_pool_margin_sets_the_radius() -> None:
    """Windows [[1, 5], [2, 3]] and [[7, 0], [6.5, 4]]: the tightest margin is 7 − 6.5 = 0.5
    between two input elements, whose gradient difference e_i − e_j has L2 norm √2 and L1
    norm 2: radii 0.5/√2 (L2) and 0.5/2 (L∞)."""
    x = np.array([[[[1, 5, 7, 0], [2, 3, 6.5, 4]]]], np.float32)
    r = Explainer(_pool_only(), device="cpu").certified_radius(x)
    np.testing.assert_allclose(r.l2, [0.5 / np.sqrt(2)], rtol=1e-6)
    np.testing.assert_allclose(r.linf, [0.25], rtol=1e-6)
    assert "window 1" in r.l2_unit[0]


def test_chunked_tangents_give_the_same_radius(monkeypatch: pytest.MonkeyPatch) -> None:
    ex = Explainer(tiny_cnn(), device="cpu")
    x = np.random.default_rng(0).normal(size=(3, 1, 4, 4)).astype(np.float32)
    whole = ex.certified_radius(x)
    monkeypatch.setattr(explainer_mod, "MAX_SWEEP_ELEMENTS", 50)  # one input element per chunk
    chunked = ex.certified_radius(x)
    np.testing.assert_allclose(chunked.l2, whole.l2, rtol=1e-6)
    np.testing.assert_allclose(chunked.linf, whole.linf, rtol=1e-6)
    assert chunked.l2_unit == whole.l2_unit


def test_radius_keeps_the_activation_pattern_inside_and_not_beyond() -> None:
    ex = Explainer(tiny_cnn(), device="cpu")
    x = np.random.default_rng(1).normal(size=(1, 1, 4, 4)).astype(np.float32)
    r = ex.certified_radius(x)
    base = ex.record(x)
    rng = np.random.default_rng(2)
    for _ in range(20):
        d = rng.normal(size=x.shape)
        d *= 0.99 * r.l2[0] / np.linalg.norm(d)
        rec = ex.record((x + d).astype(np.float32))
        for name, st in base.states.items():
            got = rec.states[name]
            if hasattr(st, "slope"):
                np.testing.assert_array_equal(got.slope, st.slope)
            else:
                np.testing.assert_array_equal(got.argmax, st.argmax)


def test_large_inputs_must_opt_in() -> None:
    ex = Explainer(tiny_cnn(), device="cpu")
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(InputError, match="max_input_size"):
        ex.certified_radius(x, max_input_size=8)
    assert np.isfinite(ex.certified_radius(x + 0.1, max_input_size=16).l2).all()
