"""Small whole models from real exporters, for tests and benchmarks.

Every builder takes a destination path, writes an ONNX file there and returns
``(path, module)``: the PyTorch module in eval mode (float32) when the model came from
PyTorch, else ``None``. The scikit-learn builder returns the fitted estimator instead.
Builders are deterministic (seeded) and fast: PyTorch models go through the legacy
TorchScript exporter, except :func:`residual_dynamo`, which exercises ``torch.export``.

Input shapes are in :data:`INPUT_SHAPES` (per sample, without the batch axis).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PathLike = str | Path

#: Per-sample input shape of each builder's model.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "mlp": (6,),
    "cnn": (2, 12, 12),
    "residual": (3, 10, 10),
    "residual_dynamo": (3, 10, 10),
    "branches": (2, 8, 8),
    "activations": (2, 9, 9),
    "fixed_batch": (1, 7, 7),
    "multi_output": (5,),
    "unsupported": (4,),
    "sklearn_mlp": (5,),
    "constant_weights": (5,),
    "ir3": (4,),
    "opset6_mlp": (5,),
    "opset6_conv": (2, 6, 6),
    "pixel_shuffle": (2, 6, 6),
    "space_to_depth": (2, 6, 6),
}


# --------------------------------------------------------------------------- PyTorch


def _torch() -> Any:
    import torch

    return torch


def _export(module: Any, shape: tuple[int, ...], path: PathLike, *, dynamic: bool = True,
            output_names: list[str] | None = None) -> Path:
    """Legacy (TorchScript) export, opset 17, symbolic batch axis unless ``dynamic=False``."""
    torch = _torch()
    path = Path(path)
    module.eval()
    x = torch.randn((2 if dynamic else 1,) + tuple(shape))
    kwargs: dict[str, Any] = {}
    if dynamic:
        kwargs["dynamic_axes"] = {"x": {0: "N"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), str(path), dynamo=False, input_names=["x"],
            output_names=output_names or ["logits"], opset_version=17, **kwargs,
        )
    return path


def _randomise_batchnorm(module: Any, seed: int) -> None:
    """Non-trivial running statistics and affine parameters for every BatchNorm."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))


def mlp(path: PathLike) -> tuple[Path, Any]:
    """Linear(6,16) → ReLU → Linear(16,12) → ReLU → Linear(12,4) → Softmax (peeled)."""
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4), nn.Softmax(dim=1)
    )
    return _export(model, INPUT_SHAPES["mlp"], path), model


def cnn(path: PathLike) -> tuple[Path, Any]:
    """Conv+BN+ReLU+MaxPool(2), Conv+BN+ReLU+MaxPool(3, stride 2, pad 1, ceil_mode), Linear."""
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 5),
    )
    _randomise_batchnorm(model, 1)
    model.eval()
    return _export(model, INPUT_SHAPES["cnn"], path), model


def _residual_module(seed: int) -> Any:
    torch = _torch()
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                              nn.BatchNorm2d(cout))

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + self.shortcut(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            self.block1 = Block(4, 4, 1)  # identity shortcut
            self.block2 = Block(4, 6, 2)  # strided 1×1 conv + BN shortcut
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(6, 3)

        def forward(self, x: Any) -> Any:
            y = self.block2(self.block1(self.stem(x)))
            return self.fc(torch.flatten(self.pool(y), 1))

    torch.manual_seed(seed)
    model = Net()
    _randomise_batchnorm(model, seed)
    return model.eval()


def residual(path: PathLike) -> tuple[Path, Any]:
    """Stem, an identity-shortcut block, a block with a strided 1×1 conv + BN shortcut,
    AdaptiveAvgPool2d(1) (GlobalAveragePool), Linear."""
    model = _residual_module(2)
    return _export(model, INPUT_SHAPES["residual"], path), model


def residual_dynamo(path: PathLike) -> tuple[Path, Any]:
    """The residual network through the ``torch.export`` (dynamo) exporter (slow: seconds)."""
    torch = _torch()
    model = _residual_module(3)
    path = Path(path)
    x = torch.randn((2,) + INPUT_SHAPES["residual_dynamo"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model, (x,), dynamo=True, input_names=["x"], output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("N")}}, verbose=False,
        )
        prog.save(str(path))
    return path, model


def branches(path: PathLike) -> tuple[Path, Any]:
    """Two parallel conv branches joined by torch.cat; one pads with nn.ZeroPad2d (exported as
    a Pad whose pads come from a ConstantOfShape/Slice/Concat subgraph); the flatten reads the
    batch size through Shape(x) (a shape subgraph, as tf2onnx writes it)."""
    torch = _torch()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU())
            self.b = nn.Sequential(nn.ZeroPad2d((1, 2, 0, 1)), nn.Conv2d(2, 2, (2, 4)), nn.ReLU())
            self.fc = nn.Linear(5 * 8 * 8, 4)

        def forward(self, x: Any) -> Any:
            y = torch.relu(torch.cat([self.a(x), self.b(x)], dim=1) - 0.05)
            return self.fc(y.reshape(y.shape[0], -1))  # Shape → Gather → Concat → Reshape

    torch.manual_seed(4)
    model = Net().eval()
    return _export(model, INPUT_SHAPES["branches"], path), model


def activations(path: PathLike) -> tuple[Path, Any]:
    """Conv → LeakyReLU(0.1) → AvgPool(3, stride 2, pad 1, count_include_pad=False) → Conv →
    PReLU(per channel) → AvgPool(2) → Linear → ReLU6 (Clip) → Linear."""
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(5)
    prelu = nn.PReLU(3)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.2, -0.3, 0.5]))
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.LeakyReLU(0.1),
        nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        nn.Conv2d(4, 3, 3, padding=1), prelu, nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(3 * 2 * 2, 10), nn.ReLU6(), nn.Linear(10, 3),
    )
    with torch.no_grad():
        model[7].weight.mul_(80.0)  # push some ReLU6 units past 6
        model[7].bias.add_(3.0)
    return _export(model, INPUT_SHAPES["activations"], path), model.eval()


def fixed_batch(path: PathLike) -> tuple[Path, Any]:
    """A small CNN exported with a fixed batch dimension of 1 (no dynamic_axes): its Reshape
    bakes in the batch size 1."""
    torch = _torch()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)
            self.fc1 = nn.Linear(3 * 5 * 5, 8)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.conv(x))
            y = y.reshape(1, -1)  # a hard-coded batch of 1, as in many exported models
            return self.fc2(torch.relu(self.fc1(y)))

    torch.manual_seed(6)
    model = Net().eval()
    return _export(model, INPUT_SHAPES["fixed_batch"], path, dynamic=False), model


def multi_output(path: PathLike) -> tuple[Path, Any]:
    """An MLP with two float outputs: ``logits`` and the hidden ``features``."""
    torch = _torch()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(5, 7)
            self.fc2 = nn.Linear(7, 3)

        def forward(self, x: Any) -> Any:
            h = torch.relu(self.fc1(x))
            return self.fc2(h), h * 2.0

    torch.manual_seed(7)
    model = Net().eval()
    return _export(model, INPUT_SHAPES["multi_output"], path, output_names=["logits", "features"]), model


def unsupported(path: PathLike) -> tuple[Path, Any]:
    """Three nodes that are not piecewise linear on the path: a Tanh and a Sigmoid inside the
    network and a MatMul of two computed tensors (named ``/Tanh``, ``/Sigmoid``, ``/MatMul``)."""
    torch = _torch()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 6)
            self.fc2 = nn.Linear(6, 6)
            self.fc3 = nn.Linear(36, 2)

        def forward(self, x: Any) -> Any:
            h = torch.tanh(self.fc1(x))
            g = torch.sigmoid(self.fc2(h))
            outer = torch.matmul(g.unsqueeze(2), h.unsqueeze(1))
            return self.fc3(torch.flatten(outer, 1))

    torch.manual_seed(8)
    model = Net().eval()
    return _export(model, INPUT_SHAPES["unsupported"], path), model


# --------------------------------------------------------------------------- scikit-learn


def sklearn_dataset(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small random 3-class problem with 5 features."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(120, 5)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] ** 2 - X[:, 2] > 0.5).astype(np.int64) + (X[:, 3] > 0.8)
    return X, y


def sklearn_mlp(path: PathLike, zipmap: bool = True) -> tuple[Path, Any]:
    """MLPClassifier (16, 8) on :func:`sklearn_dataset` through skl2onnx: Cast, MatMul+Add,
    Relu, Softmax, an ArgMax label branch and (by default) a ZipMap of probabilities."""
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    X, y = sklearn_dataset()
    clf = MLPClassifier(hidden_layer_sizes=(16, 8), max_iter=300, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(X, y)
    options = None if zipmap else {id(clf): {"zipmap": False}}
    onx = to_onnx(clf, X[:1], options=options, target_opset={"": 17, "ai.onnx.ml": 3})
    path = Path(path)
    onnx.save(onx, str(path))
    return path, clf


# --------------------------------------------------------------------------- hand-built


def _save(graph: onnx.GraphProto, path: PathLike, opset: int, ir_version: int) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="tests.zoo")
    model.ir_version = ir_version
    path = Path(path)
    onnx.save(model, str(path))
    return path


def _init(name: str, value: np.ndarray, dtype: Any = np.float32) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def constant_weights(path: PathLike) -> tuple[Path, None]:
    """A hand-built MLP whose weights are computed from constants: W1 = Identity(w1_init) +
    ConstantOfShape(0.05); b1 = Cast(float64 initializer); W2 from a Constant node through
    Identity; Gemm+Relu, MatMul+Add+Relu, Gemm."""
    rng = np.random.default_rng(10)
    nodes = [
        helper.make_node("Identity", ["w1_init"], ["w1_id"]),
        helper.make_node("ConstantOfShape", ["w1_shape"], ["w1_fill"],
                         value=numpy_helper.from_array(np.array([0.05], np.float32))),
        helper.make_node("Add", ["w1_id", "w1_fill"], ["w1"]),
        helper.make_node("Cast", ["b1_f64"], ["b1"], to=TensorProto.FLOAT),
        helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"], name="fc1"),
        helper.make_node("Relu", ["z1"], ["h1"], name="relu1"),
        helper.make_node("Constant", [], ["w2_const"],
                         value=numpy_helper.from_array(rng.normal(size=(8, 6)).astype(np.float32))),
        helper.make_node("Identity", ["w2_const"], ["w2"]),
        helper.make_node("MatMul", ["h1", "w2"], ["m2"], name="fc2"),
        helper.make_node("ConstantOfShape", ["b2_shape"], ["b2"],
                         value=numpy_helper.from_array(np.array([-0.1], np.float32))),
        helper.make_node("Add", ["m2", "b2"], ["z2"], name="fc2_bias"),
        helper.make_node("Relu", ["z2"], ["h2"], name="relu2"),
        helper.make_node("Cast", ["w3_f64"], ["w3"], to=TensorProto.FLOAT),
        helper.make_node("Gemm", ["h2", "w3"], ["logits"], transB=1, name="fc3"),
    ]
    inits = [
        _init("w1_init", rng.normal(size=(5, 8))),
        _init("w1_shape", [5, 8], np.int64),
        _init("b1_f64", rng.normal(size=8) * 0.1, np.float64),
        _init("b2_shape", [6], np.int64),
        _init("w3_f64", rng.normal(size=(3, 6)), np.float64),
    ]
    graph = helper.make_graph(
        nodes, "constant_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=inits,
    )
    return _save(graph, path, 17, 8), None


def ir3(path: PathLike) -> tuple[Path, None]:
    """IR version 3 (opset 8) with every initializer also listed as a graph input, as old
    exporters wrote them: Gemm → Relu → Gemm."""
    rng = np.random.default_rng(11)
    w1, b1 = rng.normal(size=(7, 4)), rng.normal(size=7) * 0.1
    w2, b2 = rng.normal(size=(3, 7)), rng.normal(size=3) * 0.1
    inits = [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", b2)]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["z1"], ["h1"], name="relu1"),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["logits"], transB=1, name="fc2"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])] + [
        helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits
    ]
    graph = helper.make_graph(
        nodes, "ir3", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=inits,
    )
    return _save(graph, path, 8, 3), None


def opset6_mlp(path: PathLike) -> tuple[Path, None]:
    """Opset 6: Gemm(broadcast=1) → Relu → Gemm(broadcast=1) → Softmax, initializers as inputs."""
    rng = np.random.default_rng(12)
    inits = [
        _init("w1", rng.normal(size=(5, 9))), _init("b1", rng.normal(size=9) * 0.1),
        _init("w2", rng.normal(size=(9, 4))), _init("b2", rng.normal(size=4) * 0.1),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"], broadcast=1, name="fc1"),
        helper.make_node("Relu", ["z1"], ["h1"], name="relu1"),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["logits"], broadcast=1, name="fc2"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])] + [
        helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits
    ]
    graph = helper.make_graph(
        nodes, "opset6_mlp", inputs, [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 4])],
        initializer=inits,
    )
    return _save(graph, path, 6, 3), None


def opset6_conv(path: PathLike) -> tuple[Path, None]:
    """Opset 6: Conv → BatchNormalization-6 (is_test=1) → Relu → Pad-2 (``pads`` attribute) →
    AveragePool → Reshape-5 → Gemm(broadcast=1)."""
    rng = np.random.default_rng(13)
    inits = [
        _init("cw", rng.normal(size=(3, 2, 3, 3)) * 0.3), _init("cb", rng.normal(size=3) * 0.1),
        # BN shifts of ±1.5 keep most units clearly on or off (room for finite differences)
        _init("scale", 0.8 + 0.4 * rng.random(3)), _init("bias", [1.5, -1.5, 1.5]),
        _init("mean", rng.normal(size=3) * 0.3), _init("var", 0.5 + rng.random(3)),
        _init("shape", [0, -1], np.int64),
        _init("fw", rng.normal(size=(4, 3 * 3 * 2))), _init("fb", rng.normal(size=4) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["bn"],
                         is_test=1, epsilon=1e-3, name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Pad", ["r"], ["p"], pads=[0, 0, 1, 1, 0, 0, 1, 0], name="pad"),
        helper.make_node("AveragePool", ["p"], ["a"], kernel_shape=[2, 2], strides=[2, 2], name="avg"),
        helper.make_node("Reshape", ["a", "shape"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1, broadcast=1, name="fc"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])] + [
        helper.make_tensor_value_info(t.name, helper.np_dtype_to_tensor_dtype(numpy_helper.to_array(t).dtype),
                                      list(t.dims))
        for t in inits
    ]
    graph = helper.make_graph(
        nodes, "opset6_conv", inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], initializer=inits,
    )
    return _save(graph, path, 6, 3), None


def pixel_shuffle(path: PathLike) -> tuple[Path, Any]:
    """Conv → ReLU → PixelShuffle(2) (DepthToSpace, CRD) → Conv → ReLU → PixelUnshuffle(2) (a 6-D
    Reshape/Transpose/Reshape) → Flatten → Linear."""
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(12)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.PixelShuffle(2),
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.PixelUnshuffle(2),
        nn.Flatten(), nn.Linear(16 * 6 * 6, 5),
    )
    model.eval()
    return _export(model, INPUT_SHAPES["pixel_shuffle"], path), model


def space_to_depth(path: PathLike) -> tuple[Path, None]:
    """A hand-built CNN (no exporter writes SpaceToDepth): Conv → Relu → SpaceToDepth(2) →
    Conv 1×1 → Relu → DepthToSpace(2, DCR) → Flatten → Gemm."""
    rng = np.random.default_rng(13)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["h1"], name="relu1"),
        helper.make_node("SpaceToDepth", ["h1"], ["s2d"], blocksize=2, name="s2d"),
        helper.make_node("Conv", ["s2d", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["h2"], name="relu2"),
        helper.make_node("DepthToSpace", ["h2"], ["d2s"], blocksize=2, mode="DCR", name="d2s"),
        helper.make_node("Flatten", ["d2s"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], transB=1, name="fc"),
    ]
    inits = [
        _init("w1", rng.normal(size=(4, 2, 3, 3)) * 0.5), _init("b1", rng.normal(size=4) * 0.1),
        _init("w2", rng.normal(size=(8, 16, 1, 1)) * 0.5), _init("b2", rng.normal(size=8) * 0.1),
        _init("w3", rng.normal(size=(4, 2 * 6 * 6)) * 0.3), _init("b3", rng.normal(size=4) * 0.1),
    ]
    graph = helper.make_graph(
        nodes, "space_to_depth",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        initializer=inits,
    )
    return _save(graph, path, 17, 8), None


#: Every builder by name (the names of :data:`INPUT_SHAPES`).
BUILDERS = {
    "mlp": mlp,
    "cnn": cnn,
    "residual": residual,
    "residual_dynamo": residual_dynamo,
    "branches": branches,
    "activations": activations,
    "fixed_batch": fixed_batch,
    "multi_output": multi_output,
    "unsupported": unsupported,
    "sklearn_mlp": sklearn_mlp,
    "constant_weights": constant_weights,
    "ir3": ir3,
    "opset6_mlp": opset6_mlp,
    "opset6_conv": opset6_conv,
    "pixel_shuffle": pixel_shuffle,
    "space_to_depth": space_to_depth,
}
