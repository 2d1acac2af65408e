"""BatchNormalization in inference mode: a per-channel affine map."""

from __future__ import annotations

import numpy as np

from ..ir import Node
from . import Ctx, register

Array = np.ndarray


def batchnorm_affine(node: Node, ctx: Ctx) -> tuple[Array, Array]:
    """Per-channel (scale, shift) with Y = scale·X + shift, computed in float64."""
    scale, bias, mean, var = (np.asarray(c, np.float64) for c in ctx.const[1:5])
    a = scale / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    return a, bias - a * mean


@register("BatchNormalization")
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
