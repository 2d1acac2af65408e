"""Hand-computable sample models (Captum ``basic_models`` style) for docs, tests and the CLI.

Each returns an ``onnx.ModelProto`` small enough to check on paper.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], in_shape: list[int | str],
           out: str = "logits", opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "sample",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="onnx_pathwise.samples")
    model.ir_version = 8
    return model


def tiny_mlp() -> onnx.ModelProto:
    """x (2) → Gemm(W1, b1) → Relu → Gemm(W2, b2) → logits (2).

    W1 = [[1, 0], [0, 1], [1, 1]], b1 = [0, 0, -10]: the third unit is off for small inputs.
    W2 = [[1, 0, 5], [0, 1, 5]], b2 = [0.5, -0.5].
    At x = (1, 2): h = (1, 2, 0), logits = (1.5, 1.5); W_x = I, b_x = (0.5, -0.5).
    """
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["z1"], ["h1"], name="relu1"),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["logits"], transB=1, name="fc2"),
    ]
    inits = {
        "w1": np.array([[1, 0], [0, 1], [1, 1]]),
        "b1": np.array([0, 0, -10]),
        "w2": np.array([[1, 0, 5], [0, 1, 5]]),
        "b2": np.array([0.5, -0.5]),
    }
    return _model(nodes, inits, ["N", 2])


def tiny_cnn() -> onnx.ModelProto:
    """x (1×4×4) → Conv 2×3×3 (pad 1) → Relu → MaxPool 2×2 → Flatten → Gemm → Softmax.

    Small enough to print, big enough to have a routing layer and a peeled terminal Softmax.
    """
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Flatten", ["p1"], ["f1"], name="flatten"),
        helper.make_node("Gemm", ["f1", "fw", "fb"], ["logits"], transB=1, name="fc"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1, name="softmax"),
    ]
    inits = {
        "cw": rng.normal(size=(2, 1, 3, 3)),
        "cb": np.array([0.1, -0.1]),
        "fw": rng.normal(size=(3, 8)),
        "fb": np.zeros(3),
    }
    return _model(nodes, inits, ["N", 1, 4, 4], out="probs")
