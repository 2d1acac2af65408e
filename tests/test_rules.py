"""Every registered rule tested three ways from one case table (STYLE habit #11).

Each case is a tiny ONNX model (data input ``x`` with a symbolic batch dimension, constants
as initializers) read through :func:`onnx_pathwise.frontend.load`, so the rules see the
canonical attributes the loader produces. For every case, in float64:

1. the engine's forward pass (free, and frozen at the gates/argmax recorded at ``x``) agrees
   with onnxruntime;
2. the adjoint identity ⟨A v, u⟩ = ⟨v, Aᵀu⟩ holds for random u, v, where A is the frozen
   linear part (forward(v) − forward(0)) and Aᵀu comes from the backward sweep;
3. Aᵀu equals the dense matrix built by pushing basis vectors through the linear part.

Inputs are seeded and kept away from kinks and ties (|z| > 0.2 for gates, distinct values
for max pooling). A meta-test fails when a registered op_type has no case.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_pathwise import frontend, graphsweep, runtime
from onnx_pathwise.engine import Engine, Record
from onnx_pathwise.errors import UnsupportedModelError
from onnx_pathwise.ir import TERMINAL
from onnx_pathwise.rules import RULES, supported_table
from onnx_pathwise.sweep import slice_record

FLOAT = TensorProto.FLOAT
BATCH = 2
INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min

_weights = np.random.default_rng(20240501)


def W(*shape: int, low: float | None = None) -> np.ndarray:
    """A seeded float32 constant; ``low`` keeps |values| ≥ low (divisors, scales)."""
    w = _weights.standard_normal(shape).astype(np.float32)
    if low is not None:
        w = np.where(w < 0, -1.0, 1.0).astype(np.float32) * (low + np.abs(w))
    return w


def I(*values: Any) -> np.ndarray:  # noqa: E743 — int64 constant, as ONNX shape inputs want
    return np.array(values, np.int64)


# ---------------------------------------------------------------------------- model builders


def model(
    nodes: Sequence[onnx.NodeProto],
    in_shape: Sequence[int],
    inits: dict[str, np.ndarray] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    """A model reading ``x`` (N, *in_shape) and writing ``y``; old IR versions list their
    initializers among the graph inputs, as exporters of that time did."""
    tensors = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    opsets = [helper.make_opsetid("", opset)]
    try:
        ir_version = max(3, helper.find_min_ir_version_for(opsets))
    except ValueError:  # opsets of no onnx release (2-4) have no entry in onnx's table
        ir_version = 3
    inputs = [helper.make_tensor_value_info("x", FLOAT, ["N", *in_shape])]
    if ir_version < 4:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in tensors]
    graph = helper.make_graph(
        list(nodes), "case", inputs, [helper.make_tensor_value_info("y", FLOAT, None)], initializer=tensors
    )
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)


def op(
    op_type: str,
    in_shape: Sequence[int],
    inputs: Sequence[Any] = ("x",),
    opset: int = 17,
    outputs: Sequence[str] = ("y",),
    **attrs: Any,
) -> onnx.ModelProto:
    """A single-op model: ``inputs`` holds "x", constants (arrays) or None (absent)."""
    inputs = list(inputs)
    while inputs and inputs[-1] is None:
        inputs.pop()
    names: list[str] = []
    inits: dict[str, np.ndarray] = {}
    for i, v in enumerate(inputs):
        if isinstance(v, str):
            names.append(v)
        elif v is None:
            names.append("")
        else:
            names.append(f"c{i}")
            inits[f"c{i}"] = np.asarray(v)
    node = helper.make_node(op_type, names, list(outputs), **attrs)
    return model([node], in_shape, inits, opset)


def node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op_type, list(inputs), list(outputs), **attrs)


# ---------------------------------------------------------------------------- the case table


@dataclass(frozen=True)
class Case:
    id: str
    model: onnx.ModelProto
    #: how to draw x: "normal"; "gate" (|x| ≥ 0.2); "clip" (≥ 0.2 from 0 and 6);
    #: "distinct" (no ties, for max pooling)
    inputs: str = "normal"

    @property
    def in_shape(self) -> tuple[int, ...]:
        dims = self.model.graph.input[0].type.tensor_type.shape.dim[1:]
        return tuple(int(d.dim_value) for d in dims)


def _merge(first: onnx.NodeProto, second: onnx.NodeProto, join: str, in_shape: Sequence[int],
           inits: dict[str, np.ndarray], opset: int = 17, **attrs: Any) -> onnx.ModelProto:
    """x → first → a, x → second → b, y = join(a, b)."""
    return model([first, second, node(join, ["a", "b"], ["y"], **attrs)], in_shape, inits, opset)


def _split_concat(split: onnx.NodeProto, order: Sequence[str], in_shape: Sequence[int],
                  inits: dict[str, np.ndarray], opset: int, axis: int) -> onnx.ModelProto:
    return model([split, node("Concat", order, ["y"], axis=axis)], in_shape, inits, opset)


def _concat_with_constant() -> onnx.ModelProto:
    """Concat of two computed tensors and a constant broadcast over the batch (the constant
    is expanded with Shape(x), as exporters do for class tokens)."""
    nodes = [
        node("Mul", ["x", "c1"], ["a"]),
        node("Add", ["x", "c2"], ["b"]),
        node("Shape", ["x"], ["s"]),
        node("Slice", ["s", "zero", "one"], ["nb"]),
        node("Concat", ["nb", "tail"], ["shp"], axis=0),
        node("Expand", ["k", "shp"], ["kb"]),
        node("Concat", ["a", "kb", "b"], ["y"], axis=1),
    ]
    inits = {"c1": W(3, 4), "c2": W(4), "zero": I(0), "one": I(1), "tail": I(2, 4), "k": W(1, 2, 4)}
    return model(nodes, (3, 4), inits, 13)


def _tiny_cnn() -> onnx.ModelProto:
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        node("Relu", ["c"], ["r"]),
        node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Flatten", ["p"], ["f"]),
        node("Gemm", ["f", "w2", "b2"], ["y"], transB=1),
    ]
    inits = {"w1": W(3, 2, 3, 3), "b1": W(3), "w2": W(4, 12), "b2": W(4)}
    return model(nodes, (2, 4, 4), inits, 13)


CASES: list[Case] = [
    # ---------------------------------------------------------------- Gemm, MatMul
    Case("Gemm-transB0-bias", op("Gemm", (4,), ["x", W(4, 3), W(3)])),
    Case("Gemm-transB1-alpha-beta", op("Gemm", (4,), ["x", W(3, 4), W(1, 3)], transB=1, alpha=0.5, beta=2.0)),
    Case("Gemm-no-bias", op("Gemm", (5,), ["x", W(5, 2)], opset=13, alpha=-1.5)),
    Case("MatMul-x@W", op("MatMul", (3, 4), ["x", W(4, 5)])),
    Case("MatMul-x@W-batched-W", op("MatMul", (2, 3, 4), ["x", W(2, 4, 5)])),
    Case("MatMul-W@x", op("MatMul", (4, 5), [W(3, 4), "x"])),
    Case("MatMul-x@w-1d", op("MatMul", (3, 4), ["x", W(4)])),
    Case("MatMul-w@x-1d", op("MatMul", (4, 5), [W(4), "x"])),
    Case("MatMul-2d-x@W", op("MatMul", (4,), ["x", W(4, 5)])),
    Case("MatMul-2d-x@w-1d", op("MatMul", (4,), ["x", W(4)])),
    # ---------------------------------------------------------------- Conv
    Case("Conv1d-stride2-asympad-bias", op("Conv", (2, 9), ["x", W(4, 2, 3), W(4)], strides=[2], pads=[1, 2])),
    Case("Conv2d-groups2-dil-stride-asympad", op(
        "Conv", (4, 6, 5), ["x", W(6, 2, 3, 3)], group=2, dilations=[2, 1], strides=[1, 2], pads=[1, 0, 2, 1])),
    Case("Conv2d-depthwise-bias", op("Conv", (3, 5, 5), ["x", W(3, 1, 3, 3), W(3)], group=3, pads=[1, 1, 1, 1])),
    Case("Conv2d-same-upper-stride2", op("Conv", (2, 7, 6), ["x", W(3, 2, 3, 2)], auto_pad="SAME_UPPER", strides=[2, 2])),
    Case("Conv2d-same-lower-stride2", op("Conv", (2, 6, 7), ["x", W(3, 2, 2, 3)], auto_pad="SAME_LOWER", strides=[2, 2])),
    Case("Conv2d-valid-stride2", op("Conv", (2, 7, 7), ["x", W(2, 2, 3, 3)], auto_pad="VALID", strides=[2, 2])),
    Case("Conv2d-kernel-shape-opset11", op("Conv", (1, 5, 4), ["x", W(2, 1, 2, 2)], opset=11, kernel_shape=[2, 2])),
    Case("Conv3d-groups2-dil-stride-asympad", op(
        "Conv", (4, 4, 5, 3), ["x", W(4, 2, 2, 3, 2), W(4)], group=2, strides=[1, 2, 1], dilations=[2, 1, 1],
        pads=[0, 1, 1, 1, 0, 0])),
    Case("Conv1d-even-kernel-same-lower", op("Conv", (2, 8), ["x", W(3, 2, 4)], auto_pad="SAME_LOWER")),
    # ---------------------------------------------------------------- ConvTranspose
    Case("ConvTranspose1d-stride2-pads-outpad", op(
        "ConvTranspose", (3, 4), ["x", W(3, 2, 3)], strides=[2], pads=[1, 0], output_padding=[1])),
    Case("ConvTranspose2d-groups2-dil-stride", op(
        "ConvTranspose", (4, 3, 3), ["x", W(4, 1, 3, 2), W(2)], group=2, strides=[2, 1], dilations=[1, 2],
        pads=[0, 1, 1, 0])),
    Case("ConvTranspose2d-output-shape", op(
        "ConvTranspose", (2, 3, 3), ["x", W(2, 3, 3, 3)], strides=[2, 2], output_shape=[6, 7])),
    Case("ConvTranspose2d-same-upper", op(
        "ConvTranspose", (2, 3, 2), ["x", W(2, 2, 3, 3)], strides=[2, 2], auto_pad="SAME_UPPER")),
    Case("ConvTranspose2d-same-lower", op(
        "ConvTranspose", (2, 3, 2), ["x", W(2, 2, 2, 3)], strides=[2, 3], auto_pad="SAME_LOWER")),
    Case("ConvTranspose1d-output-shape-outpad", op(
        "ConvTranspose", (2, 4), ["x", W(2, 3, 3)], strides=[3], output_shape=[12], output_padding=[1])),
    Case("ConvTranspose1d-output-shape-past-natural", op(
        "ConvTranspose", (2, 3), ["x", W(2, 2, 3)], strides=[5], output_shape=[15])),
    Case("ConvTranspose2d-same-upper-output-shape-past-natural", op(
        "ConvTranspose", (2, 3, 2), ["x", W(2, 1, 3, 2)], strides=[4, 2], output_shape=[12, 5], auto_pad="SAME_UPPER")),
    Case("ConvTranspose1d-dilation-stride1", op(
        "ConvTranspose", (2, 5), ["x", W(2, 3, 3)], dilations=[2], pads=[1, 2])),
    Case("ConvTranspose3d-stride-outpad-bias", op(
        "ConvTranspose", (2, 2, 3, 2), ["x", W(2, 2, 2, 2, 2), W(2)], strides=[2, 2, 2],
        output_padding=[1, 0, 1])),
    # ---------------------------------------------------------------- BatchNormalization
    Case("BatchNormalization-opset15", op(
        "BatchNormalization", (3, 4, 2), ["x", W(3), W(3), W(3), np.abs(W(3)) + 0.5], epsilon=1e-3, opset=15)),
    Case("BatchNormalization-2d-input-opset9", op(
        "BatchNormalization", (3,), ["x", W(3), W(3), W(3), np.abs(W(3)) + 0.5], opset=9)),
    Case("BatchNormalization-opset6", op(
        "BatchNormalization", (3, 4), ["x", W(3), W(3), W(3), np.abs(W(3)) + 0.5], opset=6, is_test=1)),
    # ---------------------------------------------------------------- arithmetic with constants
    Case("Add-x+c-broadcast", op("Add", (3, 4), ["x", W(4)])),
    Case("Add-c+x-bigger-c", op("Add", (1, 4), [W(3, 4), "x"])),
    Case("Sub-x-c", op("Sub", (3, 4), ["x", W(3, 1)])),
    Case("Sub-c-x", op("Sub", (3, 4), [W(4), "x"])),
    Case("Mul-x*c-broadcast", op("Mul", (3, 4), ["x", W(1, 4)])),
    Case("Mul-scalar*x", op("Mul", (3, 4), [np.float32(-2.5), "x"])),
    Case("Div-x/c", op("Div", (3, 4), ["x", W(3, 1, low=0.5)])),
    Case("Sum-single-input", op("Sum", (3, 4))),
    Case("Sum-x-two-constants", op("Sum", (3, 4), ["x", W(4), W(3, 1)])),
    # ---------------------------------------------------------------- merges of computed tensors
    Case("Add-two-computed", _merge(
        node("Mul", ["x", "c1"], ["a"]), node("Sub", ["x", "c2"], ["b"]), "Add", (3, 4),
        {"c1": W(4), "c2": W(3, 4)})),
    Case("Add-two-computed-broadcast", _merge(
        node("Mul", ["x", "c1"], ["a"]), node("ReduceSum", ["x"], ["b"], axes=[2], keepdims=1), "Add", (3, 4),
        {"c1": W(4)}, opset=11)),
    Case("Sub-two-computed", _merge(
        node("Mul", ["x", "c1"], ["a"]), node("Identity", ["x"], ["b"]), "Sub", (3, 4), {"c1": W(3, 4)})),
    Case("Gemm-computed-C", model(
        [node("Mul", ["x", "c1"], ["a"]), node("Gemm", ["x", "w"], ["b"], transB=1),
         node("Gemm", ["a", "w2", "b"], ["y"], beta=-0.5)],
        (4,), {"c1": W(4), "w": W(3, 4), "w2": W(4, 3)})),
    Case("Gemm-computed-C-broadcast", model(
        [node("Gemm", ["x", "w"], ["b"], transB=1), node("ReduceSum", ["b"], ["r"], axes=[1], keepdims=1),
         node("Gemm", ["x", "w2", "r"], ["y"], alpha=2.0)],
        (4,), {"w": W(3, 4), "w2": W(4, 3)}, opset=11)),
    Case("Sum-three-computed", model(
        [node("Mul", ["x", "c1"], ["a"]), node("Relu", ["x"], ["b"]), node("Sum", ["a", "b", "x"], ["y"])],
        (3, 4), {"c1": W(4)}), "gate"),
    # ---------------------------------------------------------------- pooling, reductions
    Case("AveragePool2d-pads-exclude-pad", op(
        "AveragePool", (2, 7, 6), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    Case("AveragePool2d-pads-include-pad", op(
        "AveragePool", (2, 7, 6), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 2], count_include_pad=1)),
    Case("AveragePool2d-ceil-exclude-pad", op(
        "AveragePool", (2, 6, 7), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 0], ceil_mode=1)),
    Case("AveragePool2d-ceil-include-pad", op(
        "AveragePool", (2, 6, 7), kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 0], ceil_mode=1,
        count_include_pad=1)),
    Case("AveragePool1d-stride2", op("AveragePool", (2, 9), kernel_shape=[2], strides=[2])),
    Case("AveragePool3d-asympad", op(
        "AveragePool", (1, 4, 4, 3), kernel_shape=[2, 2, 2], strides=[2, 1, 2], pads=[0, 1, 1, 1, 0, 0])),
    Case("AveragePool2d-dilations-opset19", op(
        "AveragePool", (2, 7, 7), kernel_shape=[2, 2], dilations=[2, 2], strides=[1, 2], opset=19)),
    Case("AveragePool2d-same-upper", op(
        "AveragePool", (2, 5, 6), kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")),
    Case("AveragePool2d-same-lower", op(
        "AveragePool", (2, 5, 6), kernel_shape=[2, 3], strides=[2, 2], auto_pad="SAME_LOWER")),
    Case("AveragePool2d-same-upper-include-pad", op(
        "AveragePool", (2, 5, 6), kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER", count_include_pad=1)),
    Case("GlobalAveragePool2d", op("GlobalAveragePool", (3, 4, 5))),
    Case("GlobalAveragePool1d", op("GlobalAveragePool", (3, 5))),
    Case("ReduceSum-attr-keepdims1-opset11", op("ReduceSum", (3, 4, 2), axes=[2], keepdims=1, opset=11)),
    Case("ReduceSum-input-keepdims0-opset13", op("ReduceSum", (3, 4, 2), ["x", I(-1, 1)], keepdims=0, opset=13)),
    Case("ReduceSum-noop-empty-axes-opset13", op("ReduceSum", (3, 4), noop_with_empty_axes=1, opset=13)),
    Case("ReduceMean-attr-keepdims0-opset13", op("ReduceMean", (3, 4, 2), axes=[1, -1], keepdims=0, opset=13)),
    Case("ReduceMean-input-keepdims1-opset18", op("ReduceMean", (3, 4, 2), ["x", I(2)], keepdims=1, opset=18)),
    # ---------------------------------------------------------------- Pad
    Case("Pad-opset6-attrs", op("Pad", (3, 4), opset=6, pads=[0, 1, 2, 0, 0, 1], value=1.5)),
    Case("Pad-opset11-inputs-negative", op("Pad", (3, 5), ["x", I(0, 1, -1, 0, -1, 2), np.float32(0.5)], opset=11)),
    Case("Pad-opset13-default-value", op("Pad", (2, 3), ["x", I(0, 0, 1, 0, 2, 0)], opset=13)),
    Case("Pad-opset18-axes", op("Pad", (2, 3, 4), ["x", I(1, -1, 2, 1), np.float32(-1.0), I(-1, 1)], opset=18)),
    # ---------------------------------------------------------------- pass-throughs
    Case("Dropout-opset6", op("Dropout", (3, 4), opset=6, is_test=1)),
    Case("Dropout-opset7-mask", op("Dropout", (3, 4), opset=7, outputs=("y", "mask"), ratio=0.3)),
    Case("Dropout-opset13-ratio-training-false", op(
        "Dropout", (3, 4), ["x", np.float32(0.2), np.array(False)], opset=13, outputs=("y", "mask"))),
    Case("Identity", op("Identity", (3, 4))),
    Case("Cast-float-to-float", op("Cast", (3, 4), to=FLOAT)),
    Case("Cast-float-double-float", model(
        [node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE), node("Cast", ["d"], ["y"], to=FLOAT)], (3, 4))),
    # ---------------------------------------------------------------- shape ops
    Case("Reshape-zero-and-minus-one", op("Reshape", (3, 4), ["x", I(0, 2, -1)])),
    Case("Reshape-to-4d", op("Reshape", (3, 4), ["x", I(-1, 2, 3, 2)])),
    Case("Flatten-default-axis", op("Flatten", (2, 3, 2))),
    Case("Flatten-axis1-opset13", op("Flatten", (2, 3), axis=1, opset=13)),
    Case("Transpose-perm", op("Transpose", (2, 3, 4), perm=[0, 3, 1, 2])),
    Case("Squeeze-opset11-attr", op("Squeeze", (3, 1, 4), axes=[2], opset=11)),
    Case("Squeeze-opset13-input-negative", op("Squeeze", (3, 4, 1), ["x", I(-1)], opset=13)),
    Case("Unsqueeze-opset11-attr", op("Unsqueeze", (3, 4), axes=[1, -1], opset=11)),
    Case("Unsqueeze-opset13-input", op("Unsqueeze", (3, 4), ["x", I(2)], opset=13)),
    Case("Concat-two-computed-and-constant", _concat_with_constant()),
    Case("Concat-x-with-itself-negative-axis", op("Concat", (2, 3), ["x", "x"], axis=-1)),
    Case("Split-opset13-input-reordered", _split_concat(
        node("Split", ["x", "sp"], ["a", "b"], axis=1), ["b", "a"], (4, 3), {"sp": I(1, 3)}, 13, 1)),
    Case("Split-opset13-one-output-used", model(
        [node("Split", ["x", "sp"], ["a", "b"], axis=-1), node("Identity", ["b"], ["y"])], (2, 5),
        {"sp": I(2, 3)}, 13)),
    Case("Split-opset18-num-outputs-uneven", _split_concat(
        node("Split", ["x"], ["a", "b", "c"], axis=-1, num_outputs=3), ["c", "a", "b"], (2, 7), {}, 18, 2)),
    Case("Split-opset11-attr", _split_concat(
        node("Split", ["x"], ["a", "b"], axis=2, split=[3, 1]), ["b", "a"], (2, 4), {}, 11, 2)),
    Case("Slice-opset9-attrs", op("Slice", (4, 5), opset=9, starts=[1, 0], ends=[3, 100], axes=[1, 2])),
    Case("Slice-opset13-negative-step", op(
        "Slice", (4, 5), ["x", I(-1, 3), I(INT64_MIN, 0), I(2, 1), I(-2, -1)], opset=13)),
    Case("Slice-opset13-negative-step-stop-inside", op(
        "Slice", (6,), ["x", I(4), I(-6), I(1), I(-3)], opset=13)),
    Case("Slice-opset10-inputs-no-steps", op("Slice", (4, 5), ["x", I(1, -3), I(10, -1), I(1, 2)], opset=10)),
    Case("Slice-opset13-positive-steps-clamped", op(
        "Slice", (7, 3), ["x", I(-100, 1), I(100, 3), I(1, 2), I(3, 1)], opset=13)),
    Case("Slice-opset13-batch-axis-full", op(
        "Slice", (4, 5), ["x", I(0, 1), I(INT64_MAX, -1), I(0, -1), I(1, 2)], opset=13)),
    Case("Gather-1d-indices-negative", op("Gather", (4, 3), ["x", I(2, 0, -1, 2)], axis=1)),
    Case("Gather-2d-indices", op("Gather", (3, 4), ["x", I([0, 1], [-1, 1])], axis=2)),
    Case("Gather-2d-indices-middle-axis", op("Gather", (4, 3), ["x", I([3, 0], [3, -4])], axis=1)),
    Case("Gather-scalar-index", op("Gather", (3, 4), ["x", np.array(-2, np.int64)], axis=-1)),
    Case("Expand-inner-axis", op("Expand", (3, 1), ["x", I(1, 3, 4)])),
    Case("Expand-new-middle-axis", op("Expand", (1, 4), ["x", I(1, 3, 4)])),
    Case("DepthToSpace-DCR", op("DepthToSpace", (8, 2, 3), blocksize=2)),
    Case("DepthToSpace-CRD", op("DepthToSpace", (8, 2, 3), blocksize=2, mode="CRD")),
    Case("DepthToSpace-CRD-blocksize3-opset13", op("DepthToSpace", (18, 2, 1), blocksize=3, mode="CRD", opset=13)),
    Case("DepthToSpace-opset1", op("DepthToSpace", (9, 2, 2), blocksize=3, opset=1)),
    Case("SpaceToDepth", op("SpaceToDepth", (3, 4, 6), blocksize=2)),
    Case("SpaceToDepth-opset1-blocksize3", op("SpaceToDepth", (2, 3, 6), blocksize=3, opset=1)),
    # ---------------------------------------------------------------- gates
    Case("Relu", op("Relu", (3, 4)), "gate"),
    Case("LeakyRelu-alpha0.2", op("LeakyRelu", (3, 4), alpha=0.2), "gate"),
    Case("LeakyRelu-default-alpha", op("LeakyRelu", (5,)), "gate"),
    Case("PRelu-per-channel", op("PRelu", (3, 2, 2), ["x", W(3, 1, 1)]), "gate"),
    Case("PRelu-single-slope", op("PRelu", (4,), ["x", np.array([0.25], np.float32)]), "gate"),
    Case("Clip-opset6-attrs", op("Clip", (3, 4), opset=6, min=0.0, max=6.0), "clip"),
    Case("Clip-opset10-attrs", op("Clip", (3, 4), opset=10, min=0.0, max=6.0), "clip"),
    Case("Clip-opset13-inputs", op("Clip", (3, 4), ["x", np.float32(0), np.float32(6)], opset=13), "clip"),
    Case("Clip-opset11-inputs", op("Clip", (3, 4), ["x", np.float32(0), np.float32(6)], opset=11), "clip"),
    Case("Clip-opset13-min-only", op("Clip", (3, 4), ["x", np.float32(0)], opset=13), "clip"),
    Case("Max-x-zero", op("Max", (3, 4), ["x", np.float32(0)]), "gate"),
    Case("Max-zero-x", op("Max", (3, 4), [np.zeros((1, 4), np.float32), "x"]), "gate"),
    # ---------------------------------------------------------------- routing
    Case("MaxPool1d-pads-stride", op("MaxPool", (2, 11), kernel_shape=[3], strides=[2], pads=[1, 1]), "distinct"),
    Case("MaxPool2d-pads-stride", op(
        "MaxPool", (2, 7, 7), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), "distinct"),
    Case("MaxPool2d-dilation-ceil", op(
        "MaxPool", (2, 7, 8), kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 2], ceil_mode=1, opset=12),
        "distinct"),
    Case("MaxPool2d-asympad-indices", op(
        "MaxPool", (2, 5, 6), kernel_shape=[2, 3], strides=[1, 2], pads=[1, 0, 0, 1], outputs=("y", "idx")),
        "distinct"),
    Case("MaxPool2d-same-upper-opset8", op(
        "MaxPool", (2, 5, 5), kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER", opset=8), "distinct"),
    Case("MaxPool2d-same-lower", op(
        "MaxPool", (2, 5, 6), kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_LOWER"), "distinct"),
    Case("MaxPool1d-dilation-pads-ceil-opset10", op(
        "MaxPool", (2, 10), kernel_shape=[3], strides=[3], dilations=[2], pads=[2, 1], ceil_mode=1, opset=10),
        "distinct"),
    Case("MaxPool3d-ceil", op("MaxPool", (2, 4, 5, 3), kernel_shape=[2, 2, 2], strides=[2, 2, 2], ceil_mode=1),
         "distinct"),
    Case("GlobalMaxPool2d", op("GlobalMaxPool", (3, 4, 5)), "distinct"),
    Case("GlobalMaxPool1d", op("GlobalMaxPool", (2, 6)), "distinct"),
    # ---------------------------------------------------------------- a small network
    Case("tiny-cnn-conv-relu-maxpool-gemm", _tiny_cnn()),
]
CASE_BY_ID = {c.id: c for c in CASES}
assert len(CASE_BY_ID) == len(CASES), "case ids must be unique"
IDS = [c.id for c in CASES]


# ---------------------------------------------------------------------------- helpers


@dataclass
class Loaded:
    case: Case
    proto: onnx.ModelProto
    engine: Engine
    x: np.ndarray  # (BATCH, *in_shape), float64 values exactly representable in float32
    record: Record


def draw(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Seeded inputs away from kinks and ties."""
    if kind == "gate":
        return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.2, 2.0, shape)
    if kind == "clip":
        pieces = [rng.uniform(-3.0, -0.2, shape), rng.uniform(0.2, 5.8, shape), rng.uniform(6.2, 9.0, shape)]
        return np.choose(rng.integers(0, 3, shape), pieces)
    if kind == "distinct":
        n = shape[0]
        size = int(np.prod(shape[1:]))
        # all values negative-leaning and at least 0.1 apart: padding must never win
        return np.stack([rng.permutation(size) - 0.7 * size for _ in range(n)]).reshape(shape) * 0.1
    return rng.standard_normal(shape)


def seeded(case_id: str, salt: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{case_id}/{salt}".encode()))


def make_record(engine: Engine, x: np.ndarray) -> Record:
    """Gates and argmax frozen at x, from the values of the gate/routing inputs."""
    values = engine.forward(x, keep=True)
    states, pre = engine.states_from(values)
    scores = values[engine.ir.output_name].reshape(x.shape[0], -1)
    return Record(x=x, scores=scores, states=states, preactivations=pre)


@functools.cache
def loaded(case_id: str) -> Loaded:
    case = CASE_BY_ID[case_id]
    proto, ir = frontend.load(case.model)
    engine = Engine(ir, kernels=None, dtype=np.float64)
    x = draw(case.inputs, (BATCH,) + case.in_shape, seeded(case_id, "x"))
    x = x.astype(np.float32).astype(np.float64)
    return Loaded(case, proto, engine, x, make_record(engine, x))


def onnxruntime_output(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = runtime.session(proto, "cpu")
    return np.asarray(sess.run(["y"], {"x": x.astype(np.float32)})[0], np.float64)


def linear_part(lo: Loaded, v: np.ndarray) -> np.ndarray:
    """A v: the frozen network at v minus the frozen network at 0 (v: (BATCH, *in))."""
    y = lo.engine.ir.output_name
    return lo.engine.forward(v, lo.record)[y] - lo.engine.forward(np.zeros_like(v), lo.record)[y]


def transpose_apply(lo: Loaded, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Aᵀu (BATCH, *in) and the offset term (BATCH,) from one backward sweep."""
    w, bias = lo.engine.backward({lo.engine.ir.output_name: u[None]}, lo.record)
    assert w.shape == (1,) + lo.x.shape
    return w[0], bias[0]


def out_shape(lo: Loaded) -> tuple[int, ...]:
    return (BATCH,) + lo.engine.ir.shapes[lo.engine.ir.output_name]


def close(actual: np.ndarray, expected: np.ndarray, rtol: float, what: str) -> None:
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


# ---------------------------------------------------------------------------- the three tests


@pytest.mark.parametrize("case_id", IDS)
def test_forward_agrees_with_onnxruntime(case_id: str) -> None:
    lo = loaded(case_id)
    expected = onnxruntime_output(lo.proto, lo.x)
    y = lo.engine.ir.output_name
    free = lo.engine.forward(lo.x)[y]
    assert free.shape == expected.shape
    close(free, expected, 1e-5, "free forward")
    frozen = lo.engine.forward(lo.x, lo.record)[y]
    close(frozen, expected, 1e-5, "frozen forward at the recorded gates")


@pytest.mark.parametrize("case_id", IDS)
def test_adjoint_identity(case_id: str) -> None:
    lo = loaded(case_id)
    rng = seeded(case_id, "uv")
    v = rng.standard_normal(lo.x.shape)
    u = rng.standard_normal(out_shape(lo))
    av = linear_part(lo, v)
    atu, bias = transpose_apply(lo, u)
    lhs = np.sum(av * u)
    rhs = np.sum(v * atu)
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10 * (1 + np.abs(av * u).sum()))
    # the sweep's offset term is ⟨u, f(0)⟩ of the frozen network, per sample
    y = lo.engine.ir.output_name
    f0 = lo.engine.forward(np.zeros_like(lo.x), lo.record)[y]
    close(bias, (u * f0).reshape(BATCH, -1).sum(axis=1), 1e-10, "offset term")


@pytest.mark.parametrize("case_id", IDS)
def test_transpose_equals_dense_matrix(case_id: str) -> None:
    lo = loaded(case_id)
    d = int(np.prod(lo.x.shape[1:]))
    basis = np.broadcast_to(np.eye(d)[:, None, :], (d, BATCH, d)).reshape((d,) + lo.x.shape)
    env = lo.engine.tangent_env(basis, lo.record)
    columns = env[lo.engine.ir.output_name].reshape(d, BATCH, -1)  # A e_i per sample
    dense = np.transpose(columns, (1, 2, 0))  # (BATCH, out, in)
    rng = seeded(case_id, "dense")
    v = rng.standard_normal(lo.x.shape)
    close(
        np.einsum("noi,ni->no", dense, v.reshape(BATCH, d)),
        linear_part(lo, v).reshape(BATCH, -1),
        1e-10,
        "tangents of basis vectors = frozen linear part",
    )
    # several cotangents per sample in one sweep: rows are laid out (m·n), sample-minor
    m = 3
    u = rng.standard_normal((m,) + out_shape(lo))
    atu, _ = lo.engine.backward({lo.engine.ir.output_name: u}, lo.record)
    assert atu.shape == (m,) + lo.x.shape
    expected = np.einsum("noi,mno->mni", dense, u.reshape(m, BATCH, -1))
    close(atu.reshape(m, BATCH, d), expected, 1e-10, "Aᵀu versus the dense matrix")


AT_ZERO_IDS = [c.id for c in CASES if any(RULES[n.op_type].at_zero for n in c.model.graph.node if n.op_type in RULES)]


@pytest.mark.parametrize("case_id", AT_ZERO_IDS)
def test_at_zero_equals_forward_on_zeros(case_id: str) -> None:
    """A rule's shortcut for its constant term (the engine's static offsets) gives what its
    forward gives on zero inputs in float64, to the bit."""
    lo = loaded(case_id)
    engine = lo.engine
    checked = 0
    for node in engine.nodes:
        rule = RULES[node.op_type]
        if rule.at_zero is None:
            continue
        ctx = engine._ctx(node, 1)
        env = {t: np.zeros((1,) + engine.ir.shapes[t], np.float64) for t in node.data_inputs}
        expected = rule.forward(node, engine._inputs(node, env), ctx)
        got = rule.at_zero(node, ctx)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.dtype == np.float64 and g.shape == e.shape
            np.testing.assert_array_equal(g, e)
        checked += 1
    assert checked


EMIT_IDS = [c.id for c in CASES if any(RULES[n.op_type].emit for n in c.model.graph.node if n.op_type in RULES)]


@pytest.mark.parametrize("case_id", EMIT_IDS)
def test_emitted_transpose_equals_the_rule(case_id: str) -> None:
    """A rule's transpose written as ONNX nodes (``emit``, run by onnxruntime in float32 with
    each sample's recorded state fed in) equals its numpy transpose on random cotangents."""
    lo = loaded(case_id)
    engine, rng = lo.engine, seeded(case_id, "emit")
    checked, refused = 0, []
    for node in engine.nodes:
        rule = RULES[node.op_type]
        if rule.emit is None:
            continue
        # one cotangent per output that has a recorded shape (a Split's unused pieces get none)
        names = [f"g{k}" if o in engine.ir.shapes else None for k, o in enumerate(node.outputs)]
        b = graphsweep.Builder()
        try:
            ins = rule.emit(node, names, engine._ctx(node, 1), b)
        except NotImplementedError as exc:
            refused.append(str(exc))  # these attributes stay on the host sweep
            continue
        outs = [(i, c) for i, (d, c) in enumerate(zip(node.data, ins)) if d and c is not None]
        inputs = [(name, onnx.TensorProto.FLOAT) for name in names if name is not None]
        sess = runtime.session(b.model(inputs, [c for _, c in outs]), "cpu", shared=b.shared)
        for i in range(lo.record.n):
            gs = [None if name is None else rng.standard_normal((3,) + engine.ir.shapes[o]).astype(np.float32)
                  for name, o in zip(names, node.outputs)]
            states = slice_record(lo.record, i, i + 1).states
            feeds = {name: g for name, g in zip(names, gs) if name is not None}
            feeds |= {f.name: np.asarray(f.get(states[f.node]), f.dtype) for f in b.feeds}
            got = sess.run([c for _, c in outs], feeds)
            want = rule.transpose(node, [None if g is None else g.astype(np.float64) for g in gs],
                                  engine._ctx(node, 1, states.get(node.name)))
            for (k, _), value in zip(outs, got):
                expected = want[k]
                assert expected is not None and value.shape == expected.shape, (node.name, k)
                np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5 * (np.abs(expected).max() + 1e-30),
                                           err_msg=f"{node.name} input {k}")
        checked += 1
    assert checked or all(refused)


def test_every_registered_op_has_a_case() -> None:
    covered = {n.op_type for c in CASES for n in c.model.graph.node}
    swept = {op for op, rule in RULES.items() if rule.role != TERMINAL}  # terminal ops are peeled
    missing = sorted(swept - covered)
    assert not missing, f"registered ops without a case in CASES: {missing}"


def test_registry_opsets_match_the_onnx_schemas() -> None:
    """Each entry's first covered opset is the op's first version in onnx's schemas."""
    first: dict[str, int] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        if schema.domain == "":
            first[schema.name] = min(first.get(schema.name, schema.since_version), schema.since_version)
    wrong = {op: (rule.since, first.get(op)) for op, rule in RULES.items() if rule.since != first.get(op)}
    assert not wrong, f"registry 'since' differs from onnx's first version: {wrong}"


def test_design_role_table_names_every_registered_op_under_its_role() -> None:
    """docs/design.md §1's role table names each op of the registry in the row of its role."""
    design = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text(encoding="utf-8")
    section = design.split("## 1. Models it accepts", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in section.splitlines()
            if line.startswith("| ") and line.count("|") >= 3}
    words = {role: set(re.findall(r"[A-Za-z]+", row)) for role, row in rows.items()}
    missing = [f"{op} ({rule.role})" for op, rule in RULES.items() if op not in words.get(rule.role, set())]
    merges = [op for op, rule in RULES.items() if rule.merges and op not in words.get("merge", set())]
    assert not missing and not merges, f"docs/design.md §1 does not list {missing + merges}"


def test_readme_supported_operations_table_is_generated_from_the_registry() -> None:
    """The README's table between the ops-table markers is exactly ``supported_table()``;
    regenerate it with ``python -c "from onnx_pathwise.rules import supported_table as t; print(t())"``."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- ops-table:start -->\n", "<!-- ops-table:end -->"
    assert start in readme and end in readme, "README lacks the ops-table markers"
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table.strip() == supported_table().strip(), "README's supported-ops table is out of date"


class CountingKernels(runtime.OpKernels):
    """OpKernels that count the adjoints they computed (the rule falls back to numpy when
    the geometry does not fit a ConvTranspose)."""

    adjoint_calls = 0

    def conv_adjoint(self, *args: Any, **kwargs: Any) -> np.ndarray:
        out = super().conv_adjoint(*args, **kwargs)
        self.adjoint_calls += 1
        return out


CONV_IDS = [c.id for c in CASES if any(n.op_type == "Conv" for n in c.model.graph.node)]


@pytest.mark.parametrize("case_id", CONV_IDS)
def test_conv_adjoint_onnxruntime_kernels_match_numpy(case_id: str) -> None:
    """The ConvTranspose fast path (float32, onnxruntime) gives the numpy adjoint."""
    lo = loaded(case_id)
    kernels = CountingKernels("cpu")
    fast = Engine(lo.engine.ir, kernels=kernels, dtype=np.float32)
    record = make_record(fast, lo.x.astype(np.float32))
    rng = seeded(case_id, "kernels")
    u = rng.standard_normal(out_shape(lo))
    w_fast, _ = fast.backward({fast.ir.output_name: u[None].astype(np.float32)}, record)
    w_numpy, _ = lo.engine.backward({lo.engine.ir.output_name: u[None]}, lo.record)
    assert w_fast.dtype == np.float32
    assert kernels.adjoint_calls > 0, "the onnxruntime adjoint was not used"
    close(w_fast.astype(np.float64), w_numpy, 1e-4, "onnxruntime ConvTranspose adjoint")
    y_fast = fast.forward(lo.x.astype(np.float32), record)[fast.ir.output_name]
    close(y_fast.astype(np.float64), lo.engine.forward(lo.x, lo.record)[lo.engine.ir.output_name], 1e-4,
          "onnxruntime Conv forward")


def test_per_activation_batchnorm_is_refused() -> None:
    """BatchNormalization-7/8 with spatial=0 (statistics per activation, not per channel) is
    refused before any numerics rather than mis-broadcast."""
    stats = [W(3, 2), W(3, 2), W(3, 2), np.abs(W(3, 2)) + 0.5]
    with pytest.raises(UnsupportedModelError, match="per-activation"):
        frontend.load(op("BatchNormalization", (3, 2), ["x", *stats], opset=7, spatial=0))


@pytest.mark.parametrize("ceil_mode", [0, 1])
def test_maxpool_routing_ties_go_to_the_first_maximum(ceil_mode: int) -> None:
    """Integer inputs tie within windows: the unwrapped weight picks the first maximum in
    row-major kernel order, never padding (an independent loop over the windows)."""
    from onnx_pathwise import Explainer

    k, s, p, size = 3, 2, 1, 6
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p],
                            ceil_mode=ceil_mode)
    flat = helper.make_node("Flatten", ["y"], ["z"])
    graph = helper.make_graph(
        [node, flat], "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, size, size])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = np.random.default_rng(3).integers(0, 3, (1, 2, size, size)).astype(np.float32)
    W = Explainer(model, device="cpu").unwrap(x).weight[0].reshape(-1, 2, size, size)
    rows = 0
    out = (size + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    for c in range(2):
        for oy in range(out):
            for ox in range(out):
                best = None
                for ky in range(k):
                    for kx in range(k):
                        iy, ix = oy * s - p + ky, ox * s - p + kx
                        if 0 <= iy < size and 0 <= ix < size and (best is None or x[0, c, iy, ix] > x[0, c, best[0], best[1]]):
                            best = (iy, ix)
                assert best is not None
                expected = np.zeros((2, size, size), np.float32)
                expected[c, best[0], best[1]] = 1.0
                np.testing.assert_array_equal(W[rows], expected)
                rows += 1
    assert rows == W.shape[0]


def test_products_leave_out_only_all_zero_columns() -> None:
    """Gemm/MatMul adjoints skip cotangent columns that are zero in every row (cut units):
    the result equals the dense product, whether few or many columns are live."""
    from onnx_pathwise.rules.linear import _product_of_live_columns

    rng = np.random.default_rng(5)
    w = rng.standard_normal((256, 40)).astype(np.float32)
    for live in (0, 3, 60, 256):
        g = np.zeros((3, 7, 256), np.float32)
        cols = rng.choice(256, live, replace=False)
        g[..., cols] = rng.standard_normal((3, 7, live))
        g[0, 0, cols[:1]] = 0.0  # a live column may hold zeros in some rows
        np.testing.assert_allclose(_product_of_live_columns(g, w), g @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geometry", [
    ((9, 9), (5, 5), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1)),  # overlapping, padded (ResNet's stem)
    ((8, 8), (4, 4), (2, 2), (2, 2), (1, 1), (0, 0, 0, 0)),  # disjoint (VGG)
    ((7, 8), (3, 4), (2, 2), (2, 2), (2, 2), (0, 0, 0, 0)),  # dilated
])
@pytest.mark.parametrize("kind", ["normal", "ties", "minus-inf", "int"])
@pytest.mark.parametrize("tier", ["numpy", "compiled", "compiled-threads"])
def test_max_pool_routing_and_adjoint_match_sequential_loops(geometry: tuple, kind: str, tier: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Both forms of the max-pool routing (numpy, and the compiled loop: onnx_pathwise.tiers,
    on one thread or with the channels split across threads) equal a plain loop (first maximum
    in window order, padding never wins), and their adjoints equal a sequential scatter-add
    (np.add.at: unbuffered, in index order) bit for bit, shared maxima of overlapping windows
    included."""
    from types import SimpleNamespace

    from onnx_pathwise import tiers
    from onnx_pathwise.rules import pooling
    from onnx_pathwise.rules.pooling import Routing, _scatter, _window_table, window_argmax

    monkeypatch.setenv("ONNX_PATHWISE_KERNELS", tier.split("-")[0])
    split = tier.endswith("threads")
    monkeypatch.setattr(pooling, "PARALLEL_WINDOWS", 1 if split else 1 << 30)
    monkeypatch.setattr(tiers, "workers", lambda: 2 if split else 1)

    spatial, out = geometry[0], geometry[1]
    table = _window_table(*geometry)
    N, C, S, P = 3, 2, int(np.prod(spatial)), table.shape[0]
    rng = np.random.default_rng(len(kind) + S)
    x = rng.standard_normal((N, C, S)).astype(np.float32)
    if kind == "ties":
        x = np.round(x)
    elif kind == "minus-inf":
        x[0] = -np.inf
        x[1, :, ::3] = -np.inf
    elif kind == "int":
        x = rng.integers(-3, 3, (N, C, S)).astype(np.int32)
        x[0] = np.iinfo(np.int32).min
    got = window_argmax(x, table)
    for i in range(N):
        for c in range(C):
            for p in range(P):
                best = -1
                for t in table[p]:
                    if t >= 0 and (best < 0 or x[i, c, t] > x[i, c, best]):
                        best = t
                assert got[i, c, p] == best, (i, c, p)
    argmax = (got + (np.arange(C) * S)[None, :, None]).reshape(N, -1)
    m = 4
    g = rng.standard_normal((m, N, C * P)).astype(np.float32)
    ctx = SimpleNamespace(n=N, in_shapes=[(C, *spatial)])
    ref = np.zeros((m, N, C * S), np.float32)
    for i in range(N):
        np.add.at(ref[:, i], (slice(None), argmax[i]), g[:, i])
    disjoint = bool(np.bincount(table[table >= 0]).max() <= 1)
    assert disjoint == (geometry[2] == (2, 2) and geometry[4] == (1, 1))  # VGG's pools only
    for routing in [Routing(argmax), Routing(argmax, disjoint=disjoint)]:  # the shortcut where it holds
        dx = _scatter(g.reshape(m * N, C, *out), routing, ctx).reshape(m, N, -1)
        assert np.array_equal(dx.view(np.uint32) & 0x7FFFFFFF, ref.view(np.uint32) & 0x7FFFFFFF)
    if geometry[2] == (3, 3) and kind == "ties":
        assert any(len(rounds) for _, _, rounds in Routing(argmax).adjoint)  # shared maxima were met


def test_plain_explanations_never_load_numba(tmp_path: Path) -> None:
    """numba costs about a second per process (import and first dispatch) and more after an
    install (compilation): an explanation of a max-pool CNN, its unwrapping and gradient, and the
    command line, run without it (and without networkx, 60–100 ms, needed for segments, the
    layer graph and decompositions); it loads for exact IG (and class chunks, and once a process
    has done enough work: test_kernels_load_once_the_work_pays_and_change_no_bit)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    code = (
        "import sys, numpy as np\n"
        "from onnx_pathwise import Explainer\n"
        "from onnx_pathwise.cli.shell import main\n"
        f"sys.argv = ['onnx-pathwise', 'explain', {str(repo / 'samples/cnn.onnx')!r}, "
        f"{str(repo / 'samples/cnn_inputs.npy')!r}, '--out', 'out', '--device', 'cpu']\n"
        "try:\n    main()\nexcept SystemExit as stop:\n    assert not stop.code, stop.code\n"
        "assert 'numba' not in sys.modules, 'the command line loaded numba'\n"
        "assert 'networkx' not in sys.modules, 'the command line loaded networkx'\n"
        f"ex = Explainer({str(repo / 'samples/cnn.onnx')!r}, device='cpu')\n"
        f"x = np.load({str(repo / 'samples/cnn_inputs.npy')!r})[:2]\n"
        "ex.explain(x); ex.unwrap(x); ex.attribute(x, 'gradient')\n"
        "assert 'networkx' not in sys.modules, 'networkx was loaded'\n"
        "ex.decompose(x)\n"
        "assert 'numba' not in sys.modules, 'numba was loaded'\n"
        "ex.attribute(x[:1], 'integrated_gradients', exact=True)\n"
        "assert 'numba' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_kernels_load_once_the_work_pays_and_change_no_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiers: numpy until a process has spent COMPILE_AFTER seconds in the tiered loops,
    then the compiled kernels; explanations before and after are the same bits, and the
    setting refuses what it does not know."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    code = (
        "import sys, numpy as np\n"
        "from onnx_pathwise import Explainer, tiers\n"
        "tiers.COMPILE_AFTER = 0.02\n"
        f"ex = Explainer({str(repo / 'samples/cnn.onnx')!r}, device='cpu')\n"
        f"x = np.load({str(repo / 'samples/cnn_inputs.npy')!r})\n"
        "first = ex.explain(x)\n"
        "assert 'numba' not in sys.modules, 'loaded before the work paid'\n"
        "for _ in range(30):\n"
        "    ex.explain(x)\n"
        "    if 'numba' in sys.modules: break\n"
        "assert 'numba' in sys.modules, 'never loaded'\n"
        "later = ex.explain(x)\n"
        "assert np.array_equal(first.attribution, later.attribution) and np.array_equal(first.bias, later.bias)\n"
        "assert all(np.array_equal(a.kept, b.kept) for p, q in zip(first.path, later.path) for a, b in zip(p, q))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from onnx_pathwise import tiers
    from onnx_pathwise.errors import PathwiseError

    monkeypatch.setenv("ONNX_PATHWISE_KERNELS", "fast")
    with pytest.raises(PathwiseError, match="ONNX_PATHWISE_KERNELS='fast': expected one of auto, compiled, numpy"):
        tiers.compiled()


@pytest.mark.parametrize("lo, hi", [(0.0, 6.0), (-1.0, 1.0), (0.0, np.inf), (-np.inf, 0.0), (-2.0, 0.0), (0.5, 3.0)])
@pytest.mark.parametrize("held", ["on every bound", "at zero bounds only"])
def test_clip_gate_state_skips_the_offset_only_where_it_is_zero(lo: float, hi: float, held: str) -> None:
    """A Clip gate's frozen state: the slope is 1 strictly inside the bounds, and the offset (the
    bound a held unit sits at, ±0 inside) is the array clip(z)·[outside] bit for bit, or None
    exactly when that array is all zeros (its shortcut tests only the nonzero bounds)."""
    from types import SimpleNamespace

    from onnx_pathwise.rules.elementwise import _gate_params

    z = (np.random.default_rng(7).standard_normal((2, 300)) * 8).astype(np.float32)
    if held == "on every bound":
        z[0, :2] = [max(lo, -1e30), min(hi, 1e30)]
    else:  # units below or above a nonzero bound are moved inside it
        z = np.clip(z, lo + 0.25 if lo != 0 else -np.inf, hi - 0.25 if hi != 0 else np.inf).astype(np.float32)
    node = SimpleNamespace(op_type="Clip", attrs={"min": lo, "max": hi})
    slope, offset = _gate_params(node, z, SimpleNamespace())  # type: ignore[arg-type]
    inside = (z > lo) & (z < hi)
    assert np.array_equal(slope, inside.astype(np.float32))
    full = np.clip(z, lo, hi) * ~inside
    if np.any(full):
        assert offset is not None and np.array_equal(offset.view(np.uint32), full.view(np.uint32))
    else:
        assert offset is None
    assert (offset is None) == (held != "on every bound" or (lo == 0.0 and hi == np.inf) or (lo == -np.inf and hi == 0.0))
