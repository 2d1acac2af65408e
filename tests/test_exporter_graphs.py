"""Whole models shaped like what other exporters write (tf2onnx/Keras, Keras MLPs with input
normalisation, jax2onnx, multi-branch joins, Split/Concat gates), built by hand with
onnx.helper: the unwrapped affine model must reproduce onnxruntime's scores and the central
finite differences of a float64 reference run of the same graph, batches must equal
per-sample results, ``explain`` must give weight ⊙ x and ``inspect`` must describe them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_models import check_affine_model, float64_copy, rel_err
from test_models import fd_jacobian as _fd_jacobian
from typer.testing import CliRunner

from onnx_pathwise import Explainer, ModelError
from onnx_pathwise.cli import app

N = 3
TOL = 1e-4


def _init(name: str, value: Any, dtype: Any = np.float32) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def _save(nodes: list[onnx.NodeProto], name: str, inp: onnx.ValueInfoProto, out: onnx.ValueInfoProto,
          inits: list[TensorProto], path: Path, opset: int, producer: str) -> Path:
    graph = helper.make_graph(nodes, name, [inp], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------- the graphs


def tf2onnx_cnn(path: Path, auto_pad: str = "SAME_UPPER", shape_of: str = "max_pooling2d/MaxPool__12:0") -> Path:
    """NHWC input with tf2onnx's symbolic batch 'unk__0' → Transpose to NCHW → Conv(3×3,
    ``auto_pad``) without bias + Add of a (C, 1, 1) bias → Relu → MaxPool(3, stride 2,
    ``auto_pad``) → Transpose back to NHWC → Reshape to (Gather(Shape(``shape_of``), 0), -1) →
    MatMul + Add → Softmax 'dense_1'."""
    rng = np.random.default_rng(20)
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["conv2d/Conv2D__6:0"], perm=[0, 3, 1, 2],
                         name="conv2d/Conv2D__6"),
        helper.make_node("Conv", ["conv2d/Conv2D__6:0", "conv2d/kernel"], ["conv2d/Conv2D:0"],
                         kernel_shape=[3, 3], auto_pad=auto_pad, name="conv2d/Conv2D"),
        helper.make_node("Add", ["conv2d/Conv2D:0", "conv2d/bias"], ["conv2d/BiasAdd:0"], name="conv2d/BiasAdd"),
        helper.make_node("Relu", ["conv2d/BiasAdd:0"], ["conv2d/Relu:0"], name="conv2d/Relu"),
        helper.make_node("MaxPool", ["conv2d/Relu:0"], ["max_pooling2d/MaxPool:0"], kernel_shape=[3, 3],
                         strides=[2, 2], auto_pad=auto_pad, name="max_pooling2d/MaxPool"),
        helper.make_node("Transpose", ["max_pooling2d/MaxPool:0"], ["max_pooling2d/MaxPool__12:0"],
                         perm=[0, 2, 3, 1], name="max_pooling2d/MaxPool__12"),
        helper.make_node("Shape", [shape_of], ["flatten/Shape:0"], name="flatten/Shape"),
        helper.make_node("Gather", ["flatten/Shape:0", "const_zero"], ["flatten/strided_slice:0"], axis=0,
                         name="flatten/strided_slice"),
        helper.make_node("Unsqueeze", ["flatten/strided_slice:0", "const_axes0"], ["flatten/Reshape/shape_Unsqueeze:0"],
                         name="flatten/Reshape/shape_Unsqueeze"),
        helper.make_node("Concat", ["flatten/Reshape/shape_Unsqueeze:0", "const_fold_opt__20"],
                         ["flatten/Reshape/shape:0"], axis=0, name="flatten/Reshape/shape"),
        helper.make_node("Reshape", ["max_pooling2d/MaxPool__12:0", "flatten/Reshape/shape:0"],
                         ["flatten/Reshape:0"], name="flatten/Reshape"),
        helper.make_node("MatMul", ["flatten/Reshape:0", "dense/kernel"], ["dense/MatMul:0"], name="dense/MatMul"),
        helper.make_node("Add", ["dense/MatMul:0", "dense/bias"], ["dense/BiasAdd:0"], name="dense/BiasAdd"),
        helper.make_node("Softmax", ["dense/BiasAdd:0"], ["dense_1"], axis=-1, name="dense/Softmax"),
    ]
    inits = [
        _init("conv2d/kernel", rng.normal(size=(4, 3, 3, 3)) * 0.4),
        _init("conv2d/bias", rng.normal(size=(4, 1, 1)) * 0.2),
        _init("const_zero", 0, np.int64),
        _init("const_axes0", [0], np.int64),
        _init("const_fold_opt__20", [-1], np.int64),
        _init("dense/kernel", rng.normal(size=(4 * 4 * 4, 5)) * 0.3),
        _init("dense/bias", rng.normal(size=5) * 0.1),
    ]
    return _save(nodes, "tf2onnx", helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__0", 8, 8, 3]),
                 helper.make_tensor_value_info("dense_1", TensorProto.FLOAT, ["unk__0", 5]), inits, path, 13, "tf2onnx")


def keras_mlp(path: Path, bound_shape: tuple[int, ...] = ()) -> Path:
    """(x − mean) / std by Sub and Div, Dense as MatMul + Add, ReLU6 as Clip-11 with min/max
    inputs, a ReLU as Clip(z, 0, '') (omitted max), Identity before the output. The Clip
    bounds have ``bound_shape``: scalars as the spec says, or (1,) as some converters write."""
    rng = np.random.default_rng(21)
    nodes = [
        helper.make_node("Sub", ["input", "norm/mean"], ["norm/sub:0"], name="normalization/sub"),
        helper.make_node("Div", ["norm/sub:0", "norm/std"], ["norm/truediv:0"], name="normalization/truediv"),
        helper.make_node("MatMul", ["norm/truediv:0", "dense/kernel"], ["dense/MatMul:0"], name="dense/MatMul"),
        helper.make_node("Add", ["dense/MatMul:0", "dense/bias"], ["dense/BiasAdd:0"], name="dense/BiasAdd"),
        helper.make_node("Clip", ["dense/BiasAdd:0", "clip_min", "clip_max"], ["dense/Relu6:0"], name="dense/Relu6"),
        helper.make_node("MatMul", ["dense/Relu6:0", "dense_1/kernel"], ["dense_1/MatMul:0"], name="dense_1/MatMul"),
        helper.make_node("Add", ["dense_1/MatMul:0", "dense_1/bias"], ["dense_1/BiasAdd:0"], name="dense_1/BiasAdd"),
        helper.make_node("Clip", ["dense_1/BiasAdd:0", "clip_min", ""], ["dense_1/Relu:0"], name="dense_1/Relu"),
        helper.make_node("MatMul", ["dense_1/Relu:0", "dense_2/kernel"], ["dense_2/MatMul:0"], name="dense_2/MatMul"),
        helper.make_node("Add", ["dense_2/MatMul:0", "dense_2/bias"], ["dense_2/BiasAdd:0"], name="dense_2/BiasAdd"),
        helper.make_node("Identity", ["dense_2/BiasAdd:0"], ["dense_2"], name="Identity"),
    ]
    inits = [
        _init("norm/mean", rng.normal(size=6)),
        _init("norm/std", 0.5 + rng.random(6)),
        _init("dense/kernel", rng.normal(size=(6, 10)) * 2.5),
        _init("dense/bias", rng.normal(size=10) + 2.0),
        _init("clip_min", np.full(bound_shape, 0.0)),
        _init("clip_max", np.full(bound_shape, 6.0)),
        _init("dense_1/kernel", rng.normal(size=(10, 8)) * 0.5),
        _init("dense_1/bias", rng.normal(size=8) * 0.3),
        _init("dense_2/kernel", rng.normal(size=(8, 3))),
        _init("dense_2/bias", rng.normal(size=3) * 0.1),
    ]
    return _save(nodes, "keras_mlp", helper.make_tensor_value_info("input", TensorProto.FLOAT, ["unk__0", 6]),
                 helper.make_tensor_value_info("dense_2", TensorProto.FLOAT, ["unk__0", 3]), inits, path, 11, "tf2onnx")


def jax_mlp(path: Path) -> Path:
    """Batch fixed at 1; weights are Cast(float64 → float32) of double initializers; Gemm →
    Max(·, 0.0) → Unsqueeze/Squeeze around a Gemm → Max(·, 0.0) → Reshape (1, 3, 4) →
    ReduceSum over a constant axes input → Gemm(transB)."""
    rng = np.random.default_rng(22)
    cast = [helper.make_node("Cast", [f"{w}_f64"], [w], to=TensorProto.FLOAT, name=f"cast_{w}")
            for w in ("w1", "b1", "w2", "b2", "w3", "b3")]
    nodes = cast + [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["dense1"], name="jax/dense1"),
        helper.make_node("Max", ["dense1", "zero"], ["relu1"], name="jax/relu1"),
        helper.make_node("Unsqueeze", ["relu1", "axis1"], ["relu1_3d"], name="jax/expand_dims"),
        helper.make_node("Squeeze", ["relu1_3d", "axis1"], ["relu1_2d"], name="jax/squeeze"),
        helper.make_node("Gemm", ["relu1_2d", "w2", "b2"], ["dense2"], alpha=0.5, beta=2.0, name="jax/dense2"),
        helper.make_node("Unsqueeze", ["dense2", "axis1"], ["dense2_3d"], name="jax/expand_dims2"),
        helper.make_node("Max", ["dense2_3d", "zero"], ["relu2"], name="jax/relu2"),
        helper.make_node("Reshape", ["relu2", "shape134"], ["groups"], name="jax/reshape"),
        helper.make_node("ReduceSum", ["groups", "axis2"], ["pooled"], keepdims=0, name="jax/reduce_sum"),
        helper.make_node("Gemm", ["pooled", "w3", "b3"], ["logits"], transB=1, name="jax/dense3"),
    ]
    inits = [
        _init("w1_f64", rng.normal(size=(12, 16)) * 0.5, np.float64),
        _init("b1_f64", rng.normal(size=16) * 0.2, np.float64),
        _init("w2_f64", rng.normal(size=(16, 12)) * 0.6, np.float64),
        _init("b2_f64", rng.normal(size=12) * 0.1, np.float64),
        _init("w3_f64", rng.normal(size=(4, 3)), np.float64),
        _init("b3_f64", rng.normal(size=4) * 0.1, np.float64),
        _init("zero", 0.0),
        _init("axis1", [1], np.int64),
        _init("axis2", [2], np.int64),
        _init("shape134", [1, 3, 4], np.int64),
    ]
    return _save(nodes, "jax_mlp", helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12]),
                 helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4]), inits, path, 18, "jax2onnx")


def three_branches(path: Path) -> Path:
    """Conv→Relu, Conv→Relu and a 1×1 Conv of x joined by Sum of three computed tensors →
    LeakyRelu → GlobalMaxPool and GlobalAveragePool → Concat → Expand to 2×2 → Mul by a
    per-channel scale that is itself an Expand of a constant → LeakyRelu → Flatten → Gemm."""
    rng = np.random.default_rng(23)
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["ca"], pads=[1, 1, 1, 1], name="branch_a/conv"),
        helper.make_node("Relu", ["ca"], ["ra"], name="branch_a/relu"),
        helper.make_node("Conv", ["x", "wb", "bb"], ["cb"], kernel_shape=[3, 3], pads=[2, 2, 2, 2],
                         dilations=[2, 2], name="branch_b/conv"),
        helper.make_node("Relu", ["cb"], ["rb"], name="branch_b/relu"),
        helper.make_node("Conv", ["x", "wc"], ["cc"], name="branch_c/conv1x1"),
        helper.make_node("Sum", ["ra", "rb", "cc"], ["joined"], name="join/sum"),
        helper.make_node("LeakyRelu", ["joined"], ["lr"], alpha=0.2, name="join/leaky"),
        helper.make_node("GlobalMaxPool", ["lr"], ["gmax"], name="pool/max"),
        helper.make_node("GlobalAveragePool", ["lr"], ["gavg"], name="pool/avg"),
        helper.make_node("Concat", ["gmax", "gavg"], ["pooled"], axis=1, name="pool/concat"),
        helper.make_node("Expand", ["pooled", "spatial"], ["tiled"], name="tile/expand"),
        helper.make_node("Expand", ["scale", "scale_shape"], ["scale_full"], name="scale/expand"),
        helper.make_node("Mul", ["tiled", "scale_full"], ["scaled"], name="scale/mul"),
        helper.make_node("LeakyRelu", ["scaled"], ["lr2"], alpha=0.05, name="head/leaky"),
        helper.make_node("Flatten", ["lr2"], ["flat"], name="head/flatten"),
        helper.make_node("Gemm", ["flat", "fw", "fb"], ["logits"], transB=1, name="head/fc"),
    ]
    inits = [
        _init("wa", rng.normal(size=(4, 2, 3, 3)) * 0.4), _init("ba", rng.normal(size=4) * 0.1),
        _init("wb", rng.normal(size=(4, 2, 3, 3)) * 0.4), _init("bb", rng.normal(size=4) * 0.1),
        _init("wc", rng.normal(size=(4, 2, 1, 1))),
        _init("spatial", [1, 1, 2, 2], np.int64),
        _init("scale", rng.normal(size=(8, 1, 1))),
        _init("scale_shape", [8, 2, 2], np.int64),
        _init("fw", rng.normal(size=(3, 8 * 4))), _init("fb", rng.normal(size=3) * 0.1),
    ]
    return _save(nodes, "three_branches", helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6]),
                 helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]), inits, path, 17, "hand")


def split_gates(path: Path) -> Path:
    """Gemm → Split into two computed halves → Relu on each (two gate layers at one depth) →
    Slice with step −2 on one half → Concat → Gemm."""
    rng = np.random.default_rng(24)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
        helper.make_node("Split", ["h", "sizes"], ["h_left", "h_right"], axis=1, name="split"),
        helper.make_node("Relu", ["h_left"], ["r_left"], name="relu_left"),
        helper.make_node("Relu", ["h_right"], ["r_right"], name="relu_right"),
        helper.make_node("Slice", ["r_right", "starts", "ends", "axes", "steps"], ["r_right_rev"], name="reverse"),
        helper.make_node("Concat", ["r_left", "r_right_rev"], ["joined"], axis=-1, name="concat"),
        helper.make_node("Gemm", ["joined", "w2", "b2"], ["logits"], transB=1, name="fc2"),
    ]
    inits = [
        _init("w1", rng.normal(size=(13, 10)) * 0.5), _init("b1", rng.normal(size=13) * 0.2),
        _init("sizes", [6, 7], np.int64),
        _init("starts", [-1], np.int64), _init("ends", [-100], np.int64),
        _init("axes", [1], np.int64), _init("steps", [-2], np.int64),
        _init("w2", rng.normal(size=(4, 6 + 4))), _init("b2", rng.normal(size=4) * 0.1),
    ]
    return _save(nodes, "split_gates", helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 10]),
                 helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4]), inits, path, 18, "hand")


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "tf2onnx_cnn": tf2onnx_cnn,
    "tf2onnx_cnn_lower": lambda path: tf2onnx_cnn(path, "SAME_LOWER", "input_1"),
    "keras_mlp": keras_mlp,
    "jax_mlp": jax_mlp,
    "three_branches": three_branches,
    "split_gates": split_gates,
}
NAMES = list(BUILDERS)
INPUT_SHAPES = {
    "tf2onnx_cnn": (8, 8, 3),
    "tf2onnx_cnn_lower": (8, 8, 3),
    "keras_mlp": (6,),
    "jax_mlp": (12,),
    "three_branches": (2, 6, 6),
    "split_gates": (10,),
}
#: (gate op_types in order, gate units, routing nodes, peeled terminal ops, explained tensor)
STRUCTURE: dict[str, tuple[list[str], list[int], int, tuple[str, ...], str]] = {
    "tf2onnx_cnn": (["Relu"], [4 * 8 * 8], 1, ("Softmax",), "dense/BiasAdd:0"),
    "tf2onnx_cnn_lower": (["Relu"], [4 * 8 * 8], 1, ("Softmax",), "dense/BiasAdd:0"),
    "keras_mlp": (["Clip", "Clip"], [10, 8], 0, (), "dense_2/BiasAdd:0"),
    "jax_mlp": (["Max", "Max"], [16, 12], 0, (), "logits"),
    "three_branches": (["Relu", "Relu", "LeakyRelu", "LeakyRelu"], [4 * 36, 4 * 36, 4 * 36, 8 * 4], 1, (),
                       "logits"),
    "split_gates": (["Relu", "Relu"], [6, 7], 0, (), "logits"),
}


class Graphs:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._paths: dict[str, Path] = {}
        self._explainers: dict[str, Explainer] = {}

    def path(self, name: str) -> Path:
        if name not in self._paths:
            self._paths[name] = BUILDERS[name](self.folder / f"{name}.onnx")
        return self._paths[name]

    def explainer(self, name: str) -> Explainer:
        if name not in self._explainers:
            self._explainers[name] = Explainer(self.path(name), device="cpu")
        return self._explainers[name]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> Graphs:
    return Graphs(tmp_path_factory.mktemp("exporter_graphs"))


def sample(name: str, n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n,) + INPUT_SHAPES[name]).astype(np.float32)


def away_from_kinks(ex: Explainer, name: str, n: int = N, seed: int = 0) -> np.ndarray:
    """The n of 16·n random inputs with the largest certified L∞ radius."""
    cand = sample(name, 16 * n, seed)
    order = np.argsort(-ex.certified_radius(cand).linf, kind="stable")
    return cand[np.sort(order[:n])]


# --------------------------------------------------------------------------- oracles


def reference_fn(ex: Explainer, path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """x → the explained tensor, from onnx's reference evaluator on a float64 copy of the
    file (one sample per run when the file fixes the batch at 1)."""
    from onnx.reference import ReferenceEvaluator

    ref = ReferenceEvaluator(float64_copy(onnx.load(str(path))))

    def run(v: np.ndarray) -> np.ndarray:
        (out,) = ref.run([ex.ir.output_name], {ex.input_name: v})
        return np.asarray(out, np.float64).reshape(v.shape[0], -1)

    def f(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, np.float64)
        if ex.ir.batch_fixed:
            return np.concatenate([run(v[i : i + 1]) for i in range(v.shape[0])])
        return run(v)

    return f


def fd_jacobian(ex: Explainer, path: Path, x: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Finite differences of the float64 reference run of these graphs (one sample at a time
    where the batch is fixed)."""
    return _fd_jacobian(ex, path, x, eps, f=reference_fn(ex, path))


def numpy_logits(name: str, path: Path, x: np.ndarray) -> np.ndarray | None:
    """An independent float64 numpy forward of the dense models (None for the others)."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in onnx.load(str(path)).graph.initializer}
    v = x.astype(np.float64).reshape(x.shape[0], -1)
    relu = lambda z: np.maximum(z, 0.0)  # noqa: E731
    if name == "keras_mlp":
        h = np.clip((v - w["norm/mean"]) / w["norm/std"] @ w["dense/kernel"] + w["dense/bias"], 0.0, 6.0)
        h = relu(h @ w["dense_1/kernel"] + w["dense_1/bias"])
        return h @ w["dense_2/kernel"] + w["dense_2/bias"]
    if name == "jax_mlp":
        h = relu(v @ w["w1_f64"] + w["b1_f64"])
        h = relu(0.5 * (h @ w["w2_f64"]) + 2.0 * w["b2_f64"])
        return h.reshape(-1, 3, 4).sum(axis=2) @ w["w3_f64"].T + w["b3_f64"]
    if name == "split_gates":
        h = v @ w["w1"].T + w["b1"]
        h = np.concatenate([relu(h[:, :6]), relu(h[:, 6:])[:, ::-1][:, ::2]], axis=1)
        return h @ w["w2"].T + w["b2"]
    return None


def torch_cnn(name: str, path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, Jacobian (n, K, 8, 8, 3)) of the tf2onnx CNNs from an independent float64
    PyTorch forward with the SAME pads written out: the 3×3 conv pads 1 on each side; the
    3×3 stride-2 max pool on 8 pads 1 at the end (SAME_UPPER) or at the start (SAME_LOWER)."""
    import torch
    import torch.nn.functional as F

    w = {t.name: torch.from_numpy(numpy_helper.to_array(t).astype(np.float64))
         for t in onnx.load(str(path)).graph.initializer if t.data_type == TensorProto.FLOAT}
    pool_pad = (1, 0, 1, 0) if name == "tf2onnx_cnn_lower" else (0, 1, 0, 1)

    def f(v: Any) -> Any:
        t = F.conv2d(F.pad(v.permute(0, 3, 1, 2), (1, 1, 1, 1)), w["conv2d/kernel"]) + w["conv2d/bias"]
        t = F.max_pool2d(F.pad(torch.relu(t), pool_pad, value=-np.inf), 3, 2)
        return t.permute(0, 2, 3, 1).reshape(v.shape[0], -1) @ w["dense/kernel"] + w["dense/bias"]

    xt = torch.from_numpy(x.astype(np.float64))
    with torch.no_grad():
        scores = f(xt).numpy()
    jac = torch.autograd.functional.jacobian(lambda v: f(v).sum(0), xt, vectorize=True)
    return scores, jac.numpy().swapaxes(0, 1)


# --------------------------------------------------------------------------- every graph


@pytest.mark.parametrize("name", NAMES)
def test_unwrap_reproduces_onnxruntime_and_jacobian(graphs: Graphs, name: str) -> None:
    ex = graphs.explainer(name)
    x = away_from_kinks(ex, name)
    res = check_affine_model(ex, x, INPUT_SHAPES[name])

    path = graphs.path(name)
    oracles = []
    if name != "tf2onnx_cnn_lower":  # onnx's reference MaxPool makes SAME_LOWER's output 3×3, not 4×4
        ref_scores, ref_jac = fd_jacobian(ex, path, x)
        oracles.append((ref_scores, ref_jac))
    if name.startswith("tf2onnx_cnn"):
        oracles.append(torch_cnn(name, path, x))
    independent = numpy_logits(name, path, x)
    if independent is not None:
        assert rel_err(ref_scores, independent) < 1e-12
    for ref_scores, ref_jac in oracles:
        assert rel_err(res.output, ref_scores) < TOL
        assert rel_err(res.weight, ref_jac) < TOL, f"W differs from the Jacobian by {rel_err(res.weight, ref_jac):.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_batch_equals_per_sample(graphs: Graphs, name: str) -> None:
    ex = graphs.explainer(name)
    x = sample(name, n=4, seed=1)
    batch = ex.unwrap(x)
    for i in range(len(x)):
        one = ex.unwrap(x[i])
        assert one.weight.shape == (1,) + batch.weight.shape[1:]
        assert rel_err(one.weight[0], batch.weight[i]) < 1e-5
        assert rel_err(one.bias[0], batch.bias[i]) < 1e-5
        np.testing.assert_allclose(one.output[0], batch.output[i], rtol=1e-5, atol=1e-6)
    assert float(batch.delta.max()) < TOL * np.abs(batch.output).max()


@pytest.mark.parametrize("name", NAMES)
def test_explain_attribution_is_weight_times_x(graphs: Graphs, name: str) -> None:
    ex = graphs.explainer(name)
    x = sample(name, n=4, seed=2)
    e = ex.explain(x, width="10%")
    assert e.attribution.shape == (4,) + INPUT_SHAPES[name]
    np.testing.assert_allclose(e.attribution, e.weight * x, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(e.target, ex.record(x).scores.argmax(axis=1))
    for i in range(4):
        assert len(e.path[i]) == len(ex.gate_layers)
        for layer, gate in zip(e.path[i], ex.gate_layers):
            assert layer.node == gate.name
            assert 1 <= len(layer.kept) <= max(1, round(gate.units * 0.1))
        # the masked network is affine in x: W_p·x + b_p is its score
        masked = float((e.weight[i].astype(np.float64) * x[i]).sum() + e.bias[i])
        assert abs(masked - float(e.masked_score[i])) < 1e-4 * max(1.0, abs(masked))
        one = ex.explain(x[i], width="10%")
        assert rel_err(one.attribution[0], e.attribution[i]) < 1e-5
    full = ex.explain(x, depth=0)
    np.testing.assert_allclose(full.weight, ex.unwrap(x).weight[np.arange(4), full.target], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_structure_and_inspect(graphs: Graphs, name: str) -> None:
    ex = graphs.explainer(name)
    gates, units, routing, peeled, explained = STRUCTURE[name]
    assert [g.op_type for g in ex.gate_layers] == gates
    assert [g.units for g in ex.gate_layers] == units
    assert [g.index for g in ex.gate_layers] == list(range(len(gates)))
    assert len(ex.engine.routing_nodes) == routing
    assert ex.ir.peeled == peeled
    assert ex.ir.output_name == explained
    assert ex.input_shape == INPUT_SHAPES[name]
    members = [m for s in ex.segments for m in s.nodes]
    assert sorted(members) == sorted(n.name for n in ex.ir.nodes if n.role in ("affine", "shape", "merge"))

    result = CliRunner().invoke(app, ["inspect", str(graphs.path(name)), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    info = json.loads(result.stdout)
    assert info["analysable"] is True
    assert info["input"]["shape"] == ["N", *INPUT_SHAPES[name]]
    assert info["input"]["batch_fixed_in_file"] is (name == "jax_mlp")
    assert info["output"]["explained"] == explained
    assert info["output"]["peeled"] == list(peeled)
    assert info["output"]["classes"] == ex.num_classes
    assert [g["name"] for g in info["gate_layers"]] == [g.name for g in ex.gate_layers]
    text = CliRunner().invoke(app, ["inspect", str(graphs.path(name))])
    assert text.exit_code == 0, (text.output, text.exception)
    assert all(g.name in text.stdout for g in ex.gate_layers)


# --------------------------------------------------------------------------- per graph


@pytest.mark.parametrize("name", ["tf2onnx_cnn", "tf2onnx_cnn_lower"])
def test_tf2onnx_shape_subgraph_is_evaluated_not_differentiated(graphs: Graphs, name: str) -> None:
    ex = graphs.explainer(name)
    model = onnx.load(str(graphs.path(name)))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "unk__0"
    assert {"Shape", "Gather", "Unsqueeze", "Concat"} <= {n.op_type for n in model.graph.node}
    ops = sorted(n.op_type for n in ex.ir.nodes)
    assert ops == sorted(["Transpose", "Conv", "Add", "Relu", "MaxPool", "Transpose", "Reshape", "MatMul", "Add"])
    conv = next(n for n in ex.ir.nodes if n.op_type == "Conv")
    pool = next(n for n in ex.ir.nodes if n.op_type == "MaxPool")
    assert list(conv.attrs["pads"]) == [1, 1, 1, 1]
    # SAME_UPPER puts the odd pad at the end, SAME_LOWER at the start
    assert list(pool.attrs["pads"]) == ([1, 1, 0, 0] if name == "tf2onnx_cnn_lower" else [0, 0, 1, 1])
    assert ex.num_classes == 5
    x = sample(name, n=5, seed=3)
    res = ex.unwrap(x)
    assert res.weight.shape == (5, 5, 8, 8, 3)
    probs = np.exp(res.output - res.output.max(1, keepdims=True))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(graphs.path(name)), providers=["CPUExecutionProvider"])
    (ort_probs,) = sess.run(["dense_1"], {"input_1": x})
    np.testing.assert_allclose(probs / probs.sum(1, keepdims=True), ort_probs, atol=1e-6)


def test_keras_relu6_uses_all_three_pieces(graphs: Graphs) -> None:
    ex = graphs.explainer("keras_mlp")
    relu6, relu = (ex.ir.node(g.name) for g in ex.gate_layers)
    assert (relu6.attrs["min"], relu6.attrs["max"]) == (0.0, 6.0)
    assert relu.attrs["min"] == 0.0 and relu.attrs["max"] == np.inf
    assert all(n.op_type != "Identity" for n in ex.ir.nodes)
    rec = ex.record(sample("keras_mlp", n=16, seed=4), preactivations=True)
    z = rec.preactivations[relu6.name]
    assert (z > 6).any() and (z < 0).any() and ((z > 0) & (z < 6)).any()


def test_clip_bounds_of_shape_one(graphs: Graphs, tmp_path: Path) -> None:
    """Clip-11 bounds stored as shape (1,) (onnxruntime runs them) read like scalars; bounds
    that hold more than one value are refused."""
    ex = Explainer(keras_mlp(tmp_path / "bounds1.onnx", bound_shape=(1,)), device="cpu")
    relu6, relu = (ex.ir.node(g.name) for g in ex.gate_layers)
    assert (relu6.attrs["min"], relu6.attrs["max"]) == (0.0, 6.0)
    assert (relu.attrs["min"], relu.attrs["max"]) == (0.0, np.inf)
    x = sample("keras_mlp", n=4, seed=7)
    ref = graphs.explainer("keras_mlp").unwrap(x)
    res = ex.unwrap(x)
    np.testing.assert_array_equal(res.weight, ref.weight)
    np.testing.assert_array_equal(res.bias, ref.bias)
    with pytest.raises(ModelError):
        Explainer(keras_mlp(tmp_path / "bounds2.onnx", bound_shape=(2,)), device="cpu")


def test_jax_fixed_batch_and_cast_weights(graphs: Graphs) -> None:
    ex = graphs.explainer("jax_mlp")
    assert ex.ir.batch_fixed
    assert all(n.op_type != "Cast" for n in ex.ir.nodes)  # weights folded to constants
    reduce = next(n for n in ex.ir.nodes if n.op_type == "ReduceSum")
    assert reduce.attrs["axes"] == [2]
    x = sample("jax_mlp", n=5, seed=5)
    res = ex.unwrap(x)
    assert res.weight.shape == (5, 4, 12)
    np.testing.assert_allclose(res.output, numpy_logits("jax_mlp", graphs.path("jax_mlp"), x), rtol=1e-5, atol=1e-5)


def test_three_branch_sum_is_one_segment_with_three_inputs(graphs: Graphs) -> None:
    ex = graphs.explainer("three_branches")
    joins = [s for s in ex.segments if any(ex.ir.node(m).op_type == "Sum" for m in s.nodes)]
    assert len(joins) == 1
    assert len(joins[0].inputs) == 3 and ex.input_name in joins[0].inputs
    assert ex.ir.node("join/sum").role == "merge"
    assert ex.ir.node("pool/concat").role == "merge"
    assert all(n.name != "scale/expand" for n in ex.ir.nodes)  # the constant Expand is folded
    assert [n.op_type for n in ex.engine.routing_nodes] == ["GlobalMaxPool"]


def test_split_halves_are_two_gate_layers_at_one_depth(graphs: Graphs) -> None:
    ex = graphs.explainer("split_gates")
    assert [g.name for g in ex.gate_layers] == ["relu_left", "relu_right"]
    sl = ex.ir.node("reverse")
    assert [tuple(t) for t in sl.attrs["index"]] == [(0, None, 1), (6, None, -2)]
    x = sample("split_gates", n=4, seed=6)
    e = ex.explain(x, width=2, depth=1)
    assert [[p.node for p in path] for path in e.path] == [["relu_right"]] * 4
    e2 = ex.explain(x, width=2)
    assert all(len(path) == 2 for path in e2.path)
