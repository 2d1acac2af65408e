"""Legacy opsets (≤ 6): ``broadcast``/``axis`` on Add/Sub/Mul/Div and Gemm follow the spec.

The oracle is a numpy float64 implementation of the legacy semantics written here from the
operator changelog (Add-1/Add-6: B is broadcast to A's shape; its shape is a contiguous run of
A's shape starting at ``axis``, suffix matching when ``axis`` is not set). Each model is checked
three ways: the oracle, onnxruntime on the rewritten model, and our unwrap W_x x + b_x.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import SAMPLES as ROOT_SAMPLES
from helpers import runner
from onnx import TensorProto, helper, numpy_helper, version_converter

from onnx_pathwise import Explainer, load, runtime
from onnx_pathwise.cli import app
from onnx_pathwise.errors import ModelError


def legacy_broadcast(a: np.ndarray, b: np.ndarray, axis: int | None) -> np.ndarray:
    """B laid out against A as the legacy rule says (then numpy may combine them)."""
    if b.size == 1:
        return b.reshape(())
    start = a.ndim - b.ndim if axis is None else axis
    assert a.shape[start:start + b.ndim] == b.shape, (a.shape, b.shape, axis)
    return b.reshape(b.shape + (1,) * (a.ndim - start - b.ndim))


BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
}


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], in_shape: list[int | str],
           out: str, opset: int) -> onnx.ModelProto:
    """An IR-3 model: every initializer is also listed as a graph input, as old exporters did."""
    tensors = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)] + [
        helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in tensors]
    graph = helper.make_graph(nodes, "legacy", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                              initializer=tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3
    return model


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    upgraded = load.upgrade_old_opset(model)
    out = upgraded.graph.output[0].name
    return np.asarray(runtime.probe(upgraded, [out], {"x": x})[out], np.float64)


def _check_exact(model: onnx.ModelProto, x: np.ndarray, expected: np.ndarray) -> None:
    """onnxruntime on the rewritten model and W_x x + b_x both equal the legacy oracle."""
    np.testing.assert_allclose(_ort(model, x), expected, rtol=1e-5, atol=1e-5)
    res = Explainer(model, device="cpu").unwrap(x)
    n, k = res.bias.shape
    w, xf = res.weight.reshape(n, k, -1).astype(np.float64), x.reshape(n, -1).astype(np.float64)
    affine = np.einsum("nki,ni->nk", w, xf) + res.bias
    np.testing.assert_allclose(affine, expected.reshape(len(x), -1), rtol=1e-5, atol=1e-5)
    assert float(res.delta.max()) < 1e-4


# --------------------------------------------------------------------------- broadcast cases

#: (label, op, B's shape, axis) on A = Relu(x) of shape (N, 3, 4, 5); None: attribute not set.
CASES = [
    ("axis1-channel", "Add", (3,), 1),
    ("axis1-channel-mul", "Mul", (3,), 1),
    ("axis1-channel-sub", "Sub", (3,), 1),
    ("axis1-channel-div", "Div", (3,), 1),
    ("axis1-two-dims", "Add", (3, 4), 1),
    ("axis2", "Mul", (4,), 2),
    ("axis-last", "Add", (5,), 3),
    ("suffix", "Add", (5,), None),
    ("suffix-two-dims", "Mul", (4, 5), None),
    ("scalar", "Add", (), None),
    ("one-element-with-axis", "Mul", (1,), 1),
]


def _broadcast_model(op: str, b_shape: tuple[int, ...], axis: int | None, *, opset: int = 6,
                     broadcast: int = 1) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(sum(b_shape) + (axis or 0))
    b = rng.uniform(0.5, 2.0, size=b_shape) * rng.choice([-1.0, 1.0], size=b_shape)
    kw = {"broadcast": broadcast} | ({} if axis is None else {"axis": axis})
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node(op, ["a", "b"], ["y"], name="legacy_op", **kw),
    ]
    return _model(nodes, {"b": b}, ["N", 3, 4, 5], "y", opset), b


@pytest.mark.parametrize("opset", [6, 1])
@pytest.mark.parametrize(("label", "op", "b_shape", "axis"), CASES, ids=[c[0] for c in CASES])
def test_legacy_broadcast_is_exact(label: str, op: str, b_shape: tuple[int, ...], axis: int | None,
                                   opset: int) -> None:
    model, b = _broadcast_model(op, b_shape, axis, opset=opset)
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 5)).astype(np.float32)
    a = np.maximum(x.astype(np.float64), 0)
    expected = BINARY[op](a, legacy_broadcast(a, b.astype(np.float32).astype(np.float64), axis))
    _check_exact(model, x, expected)


def test_broadcast_zero_same_shape() -> None:
    """broadcast=0: two computed tensors of one shape (a merge), and a constant of the shape of
    one sample's row (batch 1)."""
    rng = np.random.default_rng(2)
    w1, w2, c = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(1, 3))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["x", "w2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["r1", "h2"], ["s"], broadcast=0, name="merge"),
        helper.make_node("Sub", ["s", "c"], ["y"], broadcast=0, name="shift"),
    ]
    model = _model(nodes, {"w1": w1, "w2": w2, "c": c[:1]}, ["N", 4], "y", 6)
    x = rng.normal(size=(2, 4)).astype(np.float32)
    f = lambda v: v.astype(np.float32).astype(np.float64)  # noqa: E731
    xd = f(x)
    expected = np.maximum(xd @ f(w1), 0) + xd @ f(w2) - f(c)
    _check_exact(model, x[:1], expected[:1])


def test_onnx_converter_mistranslates_axis_broadcast() -> None:
    """Why the rewrite exists: onnx's version converter turns Add(A (1, 3, 3), B (3,), broadcast=1,
    axis=1) into Add(A, Unsqueeze(B, axes=[1, 2])), i.e. B (3, 1, 1), which numpy broadcasts
    against the batch axis: the output has shape (3, 3, 3) instead of (1, 3, 3). Our rewrite
    gives the spec's answer."""
    b = np.array([1.0, 2.0, 3.0])
    nodes = [helper.make_node("Add", ["x", "b"], ["y"], broadcast=1, axis=1, name="add")]
    model = _model(nodes, {"b": b}, [1, 3, 3], "y", 6)
    x = np.zeros((1, 3, 3), np.float32)
    expected = x + b.reshape(3, 1)
    converted = version_converter.convert_version(model, 7)
    del converted.graph.value_info[:]  # the converter leaves an untyped entry onnxruntime refuses
    wrong = np.asarray(runtime.probe(converted, ["y"], {"x": x})["y"])
    assert wrong.shape == (3, 3, 3)
    np.testing.assert_allclose(_ort(model, x), expected)
    _check_exact(model, x, expected)


def test_broadcast_that_does_not_fit_is_refused() -> None:
    model, _ = _broadcast_model("Add", (4,), 1)  # A's axis 1 has length 3, not 4
    with pytest.raises(ModelError, match=r"legacy_op.*\(Add, broadcast=1, axis=1\).*does not match"):
        Explainer(model, device="cpu")
    model, _ = _broadcast_model("Add", (3, 4, 5), 2)  # runs past A's last axis
    with pytest.raises(ModelError, match=r"legacy_op.*does not fit A of rank 4 from axis 2"):
        Explainer(model, device="cpu")


def test_broadcast_that_does_not_fit_exits_3(tmp_path: Path, model_files: Callable[..., tuple[Path, Path]]) -> None:
    model, _ = _broadcast_model("Add", (4,), 1)
    path, inputs = model_files(model, np.zeros((1, 3, 4, 5), np.float32))
    result = runner.invoke(app, ["unwrap", str(path), str(inputs), "--out", str(tmp_path / "u.npz"), "--device", "cpu"])
    assert result.exit_code == ModelError.exit_code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-pathwise: error: ")
    assert "'legacy_op' (Add, broadcast=1, axis=1)" in lines[0] and not (tmp_path / "u.npz").exists()


def test_rewrite_is_a_no_op_for_new_opsets() -> None:
    model, _ = _broadcast_model("Add", (5,), None)
    model.opset_import[0].version = 13
    for node in model.graph.node:
        del node.attribute[:]
    assert load.upgrade_old_opset(model) is model


# --------------------------------------------------------------------------- other legacy ops


def test_legacy_ops_on_the_supported_list() -> None:
    """Opset 3: Conv, Add(axis=1), BatchNormalization-1 (is_test, consumed_inputs, spatial),
    Relu-1 (consumed_inputs), Dropout-1 (is_test), Mul (suffix), Sub (scalar), Concat-1 (default
    axis 1), Reshape-1 (``shape`` attribute), Gemm-1 (broadcast C)."""
    rng = np.random.default_rng(3)
    p = {
        "w": rng.normal(size=(3, 2, 3, 3)) * 0.5, "cb": rng.normal(size=3) * 0.1,
        "scale": rng.uniform(0.5, 1.5, size=3), "bias": rng.normal(size=3) * 0.1,
        "mean": rng.normal(size=3) * 0.1, "var": rng.uniform(0.5, 1.5, size=3),
        "s": rng.uniform(0.5, 1.5, size=4), "k": np.array(0.25), "g": rng.normal(size=(96, 5)) * 0.2,
        "gc": rng.normal(size=5) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3], name="conv"),
        helper.make_node("Add", ["c", "cb"], ["c2"], broadcast=1, axis=1, name="conv_bias"),
        helper.make_node("BatchNormalization", ["c2", "scale", "bias", "mean", "var"], ["bn"], is_test=1,
                         epsilon=1e-5, consumed_inputs=[0, 0, 0, 1, 1], spatial=1, name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], consumed_inputs=[0], name="relu"),
        helper.make_node("Dropout", ["r"], ["d"], is_test=1, ratio=0.3, name="dropout"),
        helper.make_node("Mul", ["d", "s"], ["m"], broadcast=1, name="scale_w"),
        helper.make_node("Sub", ["m", "k"], ["m2"], broadcast=1, name="shift"),
        helper.make_node("Concat", ["m2", "d"], ["cat"], name="concat"),
        helper.make_node("Reshape", ["cat"], ["flat"], shape=[-1, 96], name="flatten"),
        helper.make_node("Gemm", ["flat", "g", "gc"], ["logits"], broadcast=1, name="fc"),
    ]
    model = _model(nodes, p, ["N", 2, 4, 4], "logits", 3)
    x = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)

    f = {k: np.asarray(v, np.float32).astype(np.float64) for k, v in p.items()}
    xd = x.astype(np.float64)
    xp = np.pad(xd, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((3, 3, 4, 4))
    for i in range(4):
        for j in range(4):
            conv[:, :, i, j] = np.einsum("nchw,ochw->no", xp[:, :, i:i + 3, j:j + 3], f["w"])
    c2 = conv + legacy_broadcast(conv, f["cb"], 1)
    per_channel = lambda v: v.reshape(3, 1, 1)  # noqa: E731
    bn = per_channel(f["scale"]) * (c2 - per_channel(f["mean"])) / np.sqrt(per_channel(f["var"]) + 1e-5)
    bn = bn + per_channel(f["bias"])
    r = np.maximum(bn, 0)
    m2 = r * legacy_broadcast(r, f["s"], None) - f["k"]
    flat = np.concatenate([m2, r], axis=1).reshape(3, 96)
    expected = flat @ f["g"] + f["gc"]
    _check_exact(model, x, expected)


def _sample_mlp_at(opset: int) -> onnx.ModelProto:
    """samples/mlp.onnx rebuilt at ``opset``: Gemm's C needs ``broadcast=1`` at opset ≤ 6; IR 3
    lists every initializer as a graph input too."""
    model = onnx.load(str(ROOT_SAMPLES / "mlp.onnx"))
    model.opset_import[0].version = opset
    if opset <= 6:
        model.ir_version = 3
        model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in model.graph.initializer)
        for node in model.graph.node:
            if node.op_type == "Gemm":
                node.attribute.append(helper.make_attribute("broadcast", 1))
    return model


def test_sample_mlp_at_opset_6_explains_as_at_opset_13() -> None:
    x = np.load(ROOT_SAMPLES / "mlp_inputs.npy")[:4].astype(np.float32)
    new, old = Explainer(_sample_mlp_at(13), device="cpu"), Explainer(_sample_mlp_at(6), device="cpu")
    assert old.ir.peeled == new.ir.peeled == ("Softmax",)
    a, b = new.unwrap(x), old.unwrap(x)
    np.testing.assert_allclose(b.weight, a.weight, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b.bias, a.bias, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b.output, a.output, rtol=1e-6, atol=1e-6)
    pa, pb = new.explain(x, width="50%"), old.explain(x, width="50%")
    np.testing.assert_allclose(pb.attribution, pa.attribution, rtol=1e-6, atol=1e-6)


def test_big_weights_listed_as_inputs_are_shared_and_fed() -> None:
    """An IR-3 model lists its initializers as graph inputs too: the analysis run, which feeds
    big weights as inputs, and the record session, which shares them, take them all the same."""
    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(300, 64)).astype(np.float32)  # 76.8 kB: shared, not copied
    w2 = rng.normal(size=(64, 5)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    model = _model(nodes, {"w1": w1, "w2": w2}, ["N", 300], "y", 9)
    x = rng.normal(size=(3, 300)).astype(np.float32)
    ex = Explainer(model, device="cpu")
    assert ex.proto.ByteSize() < model.ByteSize() - 70_000  # the explainer keeps no copy of w1's data
    a = np.maximum(x.astype(np.float64) @ w1.astype(np.float64), 0)
    _check_exact(model, x, a @ w2.astype(np.float64))
    np.testing.assert_allclose(ex.record(x).scores, _ort(model, x), rtol=1e-5, atol=1e-5)
