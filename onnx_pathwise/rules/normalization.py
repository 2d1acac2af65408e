"""BatchNormalization in inference mode: a per-channel affine map."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ModelError
from ..ir import AFFINE, Node
from . import Ctx, register
from .attrs import const_input, constant_weights

Array = np.ndarray


def batchnorm_affine(node: Node, ctx: Ctx) -> tuple[Array, Array]:
    """Per-channel (scale, shift) with Y = scale·X + shift, computed in float64."""
    scale, bias, mean, var = (np.asarray(c, np.float64) for c in ctx.const[1:5])
    a = scale / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    return a, bias - a * mean


def _batchnorm_canonical(
    node: Node, a: dict[str, Any], consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    if a.get("training_mode", 0):
        raise ModelError("BatchNormalization in training mode")
    scale = const_input(node, 1, consts)
    if scale is not None and scale.ndim != 1:
        raise ModelError(
            f"BatchNormalization with per-activation statistics (spatial=0, scale shape "
            f"{scale.shape}) is not supported; only per-channel"
        )


@register("BatchNormalization", role=AFFINE, check=constant_weights, canonical=_batchnorm_canonical,
          notes="inference, per-channel statistics")
class BatchNormalization:
    """Y = (X − mean)/sqrt(var + ε)·scale + B per channel (axis 1), inference mode.
    Adjoint: X̄ = Ȳ·scale/sqrt(var + ε). https://onnx.ai/onnx/operators/onnx__BatchNormalization.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x = inputs[0]
        assert x is not None
        a, b = batchnorm_affine(node, ctx)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        y = x * a.astype(x.dtype).reshape(shape) + b.astype(x.dtype).reshape(shape)
        return [y] + [np.zeros(0)] * (len(node.outputs) - 1)

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        g = cots[0]
        assert g is not None
        a, _ = batchnorm_affine(node, ctx)
        shape = (1, -1) + (1,) * (g.ndim - 2)
        return [g * a.astype(g.dtype).reshape(shape)] + [None] * (len(node.inputs) - 1)

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        g = cots[0]
        assert g is not None
        a, _ = batchnorm_affine(node, ctx)
        shape = (1, -1) + (1,) * (len(ctx.in_shapes[0] or ()) - 1)
        return [b.op("Mul", [g, b.const(a.astype(np.float32).reshape(shape))])] + [None] * (len(node.inputs) - 1)
