"""Pieces that several registry entries share: structural checks (decided from the tensor
kinds alone, before any numerics) and helpers for canonical attributes (docs/design.md §9)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from onnx import TensorProto

from ..errors import ModelError
from ..ir import Node

#: The float element types (Cast between them is the identity on values, up to rounding).
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


# --------------------------------------------------------------------------- structural checks


def is_data(node: Node, i: int) -> bool:
    """Whether input ``i`` of ``node`` is present and computed."""
    return i < len(node.data) and node.data[i]


def data_first(node: Node) -> str:
    """The computed operand must be the first input."""
    if not is_data(node, 0):
        return f"{node.op_type}'s computed operand must be its first input"
    return ""


def data_first_rest_constant(node: Node) -> str:
    """The computed operand is the first input; indices, shapes and axes are constant."""
    problem = data_first(node)
    if not problem and sum(node.data) > 1:
        return f"{node.op_type} with computed indices/shape is not supported"
    return problem


def constant_weights(node: Node) -> str:
    """The first input is the only computed one (weights, statistics, slopes are constant)."""
    if not is_data(node, 0) or sum(node.data) > 1:
        return f"{node.op_type} needs constant weights (its parameters depend on the input)"
    return ""


def not_bilinear(node: Node) -> str:
    """At most one operand is computed."""
    if sum(node.data) > 1:
        return f"{node.op_type} of two computed tensors is bilinear, not linear"
    return ""


# --------------------------------------------------------------------------- canonical attributes


def const_input(node: Node, i: int, consts: Mapping[str, np.ndarray]) -> np.ndarray | None:
    if i >= len(node.inputs) or not node.inputs[i]:
        return None
    if node.data[i]:
        raise ModelError(f"input {i} must be constant")
    return np.asarray(consts[node.inputs[i]])


def rank(node: Node, shapes: Mapping[str, tuple[int, ...]], i: int = 0) -> int:
    return len(shapes[node.inputs[i]]) + 1


def explicit_pads(
    attrs: dict[str, Any],
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> list[int]:
    n = len(spatial)
    auto = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if auto in ("NOTSET", ""):
        pads = list(attrs.get("pads") or [0] * (2 * n))
        return [int(p) for p in pads]
    if auto == "VALID":
        return [0] * (2 * n)
    begins, ends = [], []
    for L, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-L // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - L)
        small, big = total // 2, total - total // 2
        if auto == "SAME_UPPER":
            begins.append(small)
            ends.append(big)
        else:
            begins.append(big)
            ends.append(small)
    return begins + ends


def window_canonical(
    node: Node, a: dict[str, Any], consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """Conv, ConvTranspose, MaxPool, AveragePool: kernel, strides, dilations and group spelled
    out, auto_pad turned into explicit pads (ConvTranspose: also its output size)."""
    op = node.op_type
    spatial = shapes[node.inputs[0]][1:]
    n = len(spatial)
    if op in ("Conv", "ConvTranspose"):
        w = const_input(node, 1, consts)
        assert w is not None
        kernel = list(a.get("kernel_shape") or w.shape[2:])
    else:
        kernel = list(a["kernel_shape"])
    strides = list(a.get("strides") or [1] * n)
    dilations = list(a.get("dilations") or [1] * n)
    a.update(kernel_shape=kernel, strides=strides, dilations=dilations)
    if op == "ConvTranspose":
        out_spatial = shapes[node.outputs[0]][1:]
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", "") or a.get("output_shape"):
            totals = [
                s * (L - 1) + op_ + (k - 1) * d + 1 - o
                for L, s, op_, k, d, o in zip(
                    spatial, strides, a.get("output_padding") or [0] * n, kernel, dilations, out_spatial
                )
            ]
            # a negative total (output_shape past the natural size): onnxruntime pads
            # nothing and leaves the extra outputs, zeros, at the end (a negative end pad)
            upper = a.get("auto_pad") == "SAME_UPPER"
            begins = [max(t, 0) // 2 if upper else max(t, 0) - max(t, 0) // 2 for t in totals]
            pads = begins + [t - b for t, b in zip(totals, begins)]
        else:
            pads = list(a.get("pads") or [0] * (2 * n))
        a["pads"] = [int(p) for p in pads]
        a["out_spatial"] = list(out_spatial)
    else:
        a["pads"] = explicit_pads(a, spatial, kernel, strides, dilations)
    a["auto_pad"] = "NOTSET"
    a.setdefault("group", 1)


def axis_canonical(
    node: Node, a: dict[str, Any], consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """Concat, Flatten, Softmax, LogSoftmax: a non-negative ``axis`` (of the first computed
    input), never the batch axis for Concat and Flatten."""
    op = node.op_type
    r = rank(node, shapes, next(i for i, d in enumerate(node.data) if d))
    a["axis"] = int(a.get("axis", 1)) % r if op != "Concat" else int(a["axis"]) % r
    if op == "Concat" and a["axis"] == 0:
        raise ModelError("Concat along the batch axis is not supported")
    if op == "Flatten" and a["axis"] == 0:
        raise ModelError("Flatten with axis=0 would merge the batch axis")
