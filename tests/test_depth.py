"""``depth`` from 0 to (gate layers + 3) against a float64 re-implementation of docs/design.md §4.

The reference sees each model as dense matrices: z_l = A_l h_{l-1} + c_l, h_l = relu(z_l),
logits = A_{L+1} h_L + c_{L+1} (a CNN's convolutions written out as matrices from basis
vectors). Gates are frozen at x; for each path layer, last first, J = ∂logits/∂h through the
masked layers above, C = h·Jᵀ, units ranked by softmax(C_i)[c] (ties to the lower index), the
first ``width`` kept when P > 1/K, else the first one; W_p = ∂y_c/∂x of the masked network,
b_p = y_c(masked)(x) − W_p·x. A depth beyond the number of gate layers means all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_pathwise import Explainer


@dataclass
class Dense:
    """The network as dense float64 matrices between gate layers."""

    A: list[np.ndarray]  # L+1 matrices: A[l] maps h_{l-1} (h_{-1} = x flattened) to z_l
    c: list[np.ndarray]  # L+1 offsets


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], in_shape: tuple[int, ...]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "depth", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def mlp(layers: int, seed: int, width: int = 7, d_in: int = 6, classes: int = 4) -> tuple[onnx.ModelProto, Dense]:
    """x → (Gemm → Relu) × layers → Gemm."""
    rng = np.random.default_rng(seed)
    sizes = [d_in] + [width] * layers + [classes]
    nodes, inits, A, c = [], [], [], []
    prev = "x"
    for i in range(layers + 1):
        w = (rng.normal(size=(sizes[i + 1], sizes[i])) * 1.3 / np.sqrt(sizes[i])).astype(np.float32)
        b = (rng.normal(size=sizes[i + 1]) * 0.3).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = "y" if i == layers else f"z{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out], transB=1, name=f"fc{i}"))
        if i < layers:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"], name=f"relu{i}"))
            prev = f"h{i}"
        A.append(w.astype(np.float64))
        c.append(b.astype(np.float64))
    return _model(nodes, inits, (d_in,)), Dense(A, c)


def _conv_dense(w: np.ndarray, b: np.ndarray, in_shape: tuple[int, int, int], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """A stride-1 Conv as a dense matrix, from its action on basis vectors (float64)."""
    C, H, W = in_shape
    M, _, k, _ = w.shape
    Ho, Wo = H + 2 * pad - k + 1, W + 2 * pad - k + 1
    D = C * H * W
    mat = np.zeros((M * Ho * Wo, D))
    for j in range(D):
        e = np.zeros(D)
        e[j] = 1.0
        xp = np.pad(e.reshape(C, H, W), [(0, 0), (pad, pad), (pad, pad)])
        y = np.zeros((M, Ho, Wo))
        for m in range(M):
            for r in range(Ho):
                for s in range(Wo):
                    y[m, r, s] = np.sum(w[m] * xp[:, r : r + k, s : s + k])
        mat[:, j] = y.reshape(-1)
    return mat, np.repeat(b, Ho * Wo)


def cnn(seed: int) -> tuple[onnx.ModelProto, Dense]:
    """x (2×5×5) → Conv 3×3 pad 1 → Relu → Conv 3×3 → Relu → Flatten → Gemm → Relu → Gemm."""
    rng = np.random.default_rng(seed)
    w0 = (rng.normal(size=(3, 2, 3, 3)) * 0.5).astype(np.float32)
    b0 = (rng.normal(size=3) * 0.2).astype(np.float32)
    w1 = (rng.normal(size=(4, 3, 3, 3)) * 0.4).astype(np.float32)
    b1 = (rng.normal(size=4) * 0.2).astype(np.float32)
    w2 = (rng.normal(size=(6, 36)) * 0.3).astype(np.float32)
    b2 = (rng.normal(size=6) * 0.2).astype(np.float32)
    w3 = (rng.normal(size=(5, 6)) * 0.6).astype(np.float32)
    b3 = (rng.normal(size=5) * 0.2).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["z0"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node("Relu", ["z0"], ["h0"], name="relu0"),
        helper.make_node("Conv", ["h0", "w1", "b1"], ["z1"], name="conv1"),
        helper.make_node("Relu", ["z1"], ["h1"], name="relu1"),
        helper.make_node("Flatten", ["h1"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["z2"], transB=1, name="fc2"),
        helper.make_node("Relu", ["z2"], ["h2"], name="relu2"),
        helper.make_node("Gemm", ["h2", "w3", "b3"], ["y"], transB=1, name="fc3"),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in
             dict(w0=w0, b0=b0, w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3).items()]
    A0, c0 = _conv_dense(w0.astype(np.float64), b0.astype(np.float64), (2, 5, 5), 1)
    A1, c1 = _conv_dense(w1.astype(np.float64), b1.astype(np.float64), (3, 5, 5), 0)
    dense = Dense([A0, A1, w2.astype(np.float64), w3.astype(np.float64)],
                  [c0, c1, b2.astype(np.float64), b3.astype(np.float64)])
    return _model(nodes, inits, (2, 5, 5)), dense


def _select(h: np.ndarray, J: np.ndarray, c: int, width: int) -> np.ndarray:
    """docs/design.md §4 steps 2–3 in float64: h (n,), J (K, n) → kept flat indices, ascending."""
    C = h[:, None] * J.T  # (n, K)
    top = C.max(axis=1, keepdims=True)
    log_p = C[:, c] - (top[:, 0] + np.log(np.exp(C - top).sum(axis=1)))
    order = sorted(range(len(h)), key=lambda i: (-log_p[i], i))
    first = order[:width]
    kept = [i for i in first if log_p[i] > -np.log(J.shape[0])]
    return np.array(sorted(kept or order[:1]), np.int64)


def reference(net: Dense, x: np.ndarray, depth: int, width: int | None, input_width: int | None = None) -> dict[str, object]:
    """docs/design.md §4 for one sample x (flattened, float64)."""
    L = len(net.A) - 1
    z, h = [], []
    prev = x
    for i in range(L):
        z.append(net.A[i] @ prev + net.c[i])
        h.append(np.maximum(z[-1], 0.0))
        prev = h[-1]
    logits = net.A[L] @ prev + net.c[L]
    c = int(np.argmax(logits))
    slope = [(zi > 0).astype(np.float64) for zi in z]
    masks = [np.ones_like(s) for s in slope]
    kept: list[np.ndarray] = []
    path = list(range(max(0, L - depth), L))
    above = net.A[L]  # ∂logits/∂h_l through the masked layers above l
    for layer in range(L - 1, -1, -1):
        if layer in path:
            k = _select(h[layer], above, c, width or h[layer].size)
            masks[layer] = np.zeros_like(masks[layer])
            masks[layer][k] = 1.0
            kept.insert(0, k)
        above = (above * (slope[layer] * masks[layer])) @ net.A[layer]
    input_kept = None
    if input_width is not None:
        input_kept = _select(x, above, c, input_width)
    W = above[c]
    if input_kept is not None:
        W = np.where(np.isin(np.arange(x.size), input_kept), W, 0.0)
    prev = x if input_kept is None else np.where(np.isin(np.arange(x.size), input_kept), x, 0.0)
    for i in range(L):
        prev = slope[i] * masks[i] * (net.A[i] @ prev + net.c[i])
    masked = float((net.A[L] @ prev + net.c[L])[c])
    if input_kept is not None:  # b_p of the masked network: its value at x minus W_p·x
        masked = float(W @ x) + masked - float(W @ np.where(np.isin(np.arange(x.size), input_kept), x, 0.0))
    return {"target": c, "kept": kept, "weight": W, "bias": masked - float(W @ x), "masked": masked,
            "input_kept": input_kept}


def _check(ex: Explainer, net: Dense, x: np.ndarray, depth: int, width: int | None, input_width: int | None = None) -> None:
    res = ex.explain(x, width=width, depth=depth, input_width=input_width)
    gates = [g.name for g in ex.gate_layers]
    for i in range(x.shape[0]):
        ref = reference(net, x[i].reshape(-1).astype(np.float64), depth, width, input_width)
        assert res.target[i] == ref["target"]
        want = gates[max(0, len(gates) - depth):]
        assert [p.node for p in res.path[i]] == want, (depth, [p.node for p in res.path[i]])
        for ours, theirs in zip(res.path[i], ref["kept"]):  # type: ignore[call-overload]
            np.testing.assert_array_equal(ours.kept, theirs, err_msg=f"depth {depth} layer {ours.node}")
        if input_width is not None:
            assert res.input_kept is not None
            np.testing.assert_array_equal(np.flatnonzero(res.input_kept[i]), ref["input_kept"])
        W = np.asarray(ref["weight"])
        scale = np.abs(W).max() + 1e-12
        np.testing.assert_allclose(res.weight[i].reshape(-1), W, atol=1e-5 * scale, rtol=1e-4)
        np.testing.assert_allclose(res.attribution[i].reshape(-1), W * x[i].reshape(-1), atol=1e-5 * scale * 4, rtol=1e-4)
        assert abs(res.bias[i] - ref["bias"]) < 1e-4 * (abs(float(ref["bias"])) + 1)  # type: ignore[arg-type]
        assert abs(res.masked_score[i] - ref["masked"]) < 1e-4 * (abs(float(ref["masked"])) + 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("layers", [1, 2, 5])
@pytest.mark.parametrize("width", [None, 2])
def test_mlp_every_depth(layers: int, width: int | None) -> None:
    model, net = mlp(layers, seed=10 + layers)
    ex = Explainer(model, device="cpu")
    assert len(ex.gate_layers) == layers
    x = np.random.default_rng(layers).normal(size=(4, 6)).astype(np.float32)
    for depth in range(layers + 4):
        _check(ex, net, x, depth, width)


def test_cnn_every_depth() -> None:
    model, net = cnn(seed=3)
    ex = Explainer(model, device="cpu")
    assert len(ex.gate_layers) == 3
    x = np.random.default_rng(4).normal(size=(3, 2, 5, 5)).astype(np.float32)
    for depth in range(3 + 4):
        for width in (None, 5):
            _check(ex, net, x, depth, width)


def test_depth_beyond_layers_with_input_width() -> None:
    model, net = mlp(2, seed=7)
    ex = Explainer(model, device="cpu")
    x = np.random.default_rng(8).normal(size=(3, 6)).astype(np.float32)
    for depth in range(0, 6):
        _check(ex, net, x, depth, 3, input_width=2)


def test_depth_one_past_the_layers_is_not_the_last_layer_alone() -> None:
    """The regression: with L gate layers, depth L+1 constrained only the last layer."""
    model, _ = mlp(2, seed=11)
    ex = Explainer(model, device="cpu")
    x = np.random.default_rng(0).normal(size=(2, 6)).astype(np.float32)
    every = ex.explain(x, width=1)
    for depth in (3, 4, 5):
        res = ex.explain(x, width=1, depth=depth)
        assert [len(p) for p in res.path] == [2, 2]
        np.testing.assert_array_equal(res.attribution, every.attribution)
