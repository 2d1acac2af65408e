"""Dense and convolutional layers: Gemm, MatMul, Conv, ConvTranspose.

Heavy convolution adjoints run in onnxruntime (a ConvTranspose sharing the Conv's weights)
when the engine provides single-op kernels and works in float32; numpy otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ModelError
from ..ir import AFFINE, Node
from . import Ctx, register, unbroadcast
from .attrs import constant_weights, is_data, not_bilinear, window_canonical
from .windows import conv_nd, conv_nd_adjoint

Array = np.ndarray


def _gemm_b(node: Node, ctx: Ctx) -> Array:
    b = ctx.const[1]
    assert b is not None
    return b.T if node.attrs.get("transB", 0) else b


def _product_of_live_columns(g: Array, w: Array) -> Array:
    """g @ w for g (..., k), w (k, j), leaving out the columns of g that are zero in every row:
    units a path cut or a gate switched off. Pathwise sweeps keep a few per cent of each
    layer's units, so the product shrinks by as much."""
    k = g.shape[-1]
    if k < 64:
        return np.matmul(g, w)
    g2 = g.reshape(-1, k)
    live = np.flatnonzero(g2.any(axis=0))
    if live.size > k // 4:
        return np.matmul(g, w)
    return (g2[:, live] @ w[live]).reshape(g.shape[:-1] + (w.shape[1],))


def _gemm_check(node: Node) -> str:
    if is_data(node, 1):
        return "Gemm whose B is computed is bilinear, not linear"
    if not is_data(node, 0):
        return "Gemm whose computed operand is B (not A) is not supported"
    if node.attrs.get("transA", 0):
        return "Gemm with transA=1 on the computed operand would move the batch axis"
    return ""


def _gemm_canonical(
    node: Node, a: dict[str, Any], consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    if a.get("transA", 0):
        raise ModelError("Gemm transA=1 on the computed operand is not supported")


def _constant_term(ctx: Ctx, term: Array | None, scale: float = 1.0) -> list[Array]:
    """``at_zero`` of a product op: ``scale`` · ``term`` (a constant bias, broadcast to one
    sample's output) in float64, or zeros without one; a zero input times any finite weights
    adds exact zeros (the loader refuses non-finite constants)."""
    shape = (1,) + tuple(ctx.out_shapes[0] or ())
    if term is None:
        return [np.zeros(shape)]
    return [np.broadcast_to(scale * term.astype(np.float64), shape)]


@register("Gemm", role=AFFINE, merges=True, check=_gemm_check, canonical=_gemm_canonical,
          notes="constant B, transA = 0; a merge when the bias C is computed")
class Gemm:
    """Y = alpha·A·B' + beta·C with A computed (B' = Bᵀ when transB); C constant, or computed
    (then Gemm joins two computed tensors linearly). Adjoint: Ā = alpha·Ȳ·B'ᵀ, C̄ = beta·Ȳ.
    https://onnx.ai/onnx/operators/onnx__Gemm.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        a = inputs[0]
        assert a is not None
        y = float(node.attrs.get("alpha", 1.0)) * (a @ _gemm_b(node, ctx).astype(a.dtype, copy=False))
        if len(inputs) > 2 and inputs[2] is not None:
            y = y + float(node.attrs.get("beta", 1.0)) * inputs[2].astype(a.dtype, copy=False)
        return [y]

    @staticmethod
    def at_zero(node: Node, ctx: Ctx) -> list[Array]:
        c = ctx.const[2] if len(ctx.const) > 2 else None  # None also when C is computed (zero)
        return _constant_term(ctx, c, float(node.attrs.get("beta", 1.0)))

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        da = _product_of_live_columns(g, _gemm_b(node, ctx).T.astype(g.dtype, copy=False))
        alpha = float(node.attrs.get("alpha", 1.0))
        if alpha != 1.0:
            da *= alpha
        out: list[Array | None] = [da] + [None] * (len(node.inputs) - 1)
        if len(node.inputs) > 2 and node.data[2]:
            # a computed C joins the product: C̄ = beta·Ȳ, summed over the axes C was broadcast along
            shape = (g.shape[0],) + tuple(ctx.in_shapes[2] or ())
            out[2] = unbroadcast(float(node.attrs.get("beta", 1.0)) * g, shape)
        return out

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        assert g is not None
        if len(node.inputs) > 2 and node.data[2]:
            raise NotImplementedError("Gemm with a computed C")
        B = ctx.const[1]
        assert B is not None
        # Ā = alpha·Ȳ·B'ᵀ as one Gemm on B itself (B' = Bᵀ with transB): no transposed copy of
        # the weights (VGG-16's first dense layer: 411 MB)
        da = b.op("Gemm", [g, b.const(np.asarray(B, np.float32))], alpha=float(node.attrs.get("alpha", 1.0)),
                  transB=0 if node.attrs.get("transB", 0) else 1)
        return [da] + [None] * (len(node.inputs) - 1)


@register("MatMul", role=AFFINE, check=not_bilinear, notes="one operand constant")
class MatMul:
    """Y = X·W or Y = W·X with W constant (numpy matmul broadcasting, 1-D operands as numpy).
    Adjoint: X̄ = Ȳ·Wᵀ (or Wᵀ·Ȳ), summed over broadcast axes.
    https://onnx.ai/onnx/operators/onnx__MatMul.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        a, b = inputs
        assert a is not None and b is not None
        dt = a.dtype if node.data[0] else b.dtype
        return [np.matmul(a.astype(dt, copy=False), b.astype(dt, copy=False))]

    @staticmethod
    def at_zero(node: Node, ctx: Ctx) -> list[Array]:
        return _constant_term(ctx, None)

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        rows = g.shape[0]
        if node.data[0]:
            w = ctx.const[1]
            assert w is not None
            w = w.astype(g.dtype, copy=False)
            if w.ndim == 1:
                dx = g[..., None] * w
            elif w.ndim == 2:
                dx = _product_of_live_columns(g, w.T)
            else:
                dx = np.matmul(g, np.swapaxes(w, -1, -2))
            shape = (rows,) + tuple(ctx.in_shapes[0] or ())
            return [unbroadcast(dx, shape), None]
        w = ctx.const[0]
        assert w is not None
        w = w.astype(g.dtype, copy=False)
        shape = (rows,) + tuple(ctx.in_shapes[1] or ())
        if len(shape) == 1:
            raise ValueError("MatMul with a computed 1-D right operand moves the batch axis")
        if w.ndim == 1:
            dx = w[:, None] * g[..., None, :]
        else:
            dx = np.matmul(np.swapaxes(w, -1, -2), g)
        return [None, unbroadcast(dx, shape)]

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        w = ctx.const[1]
        if not node.data[0] or w is None or w.ndim != 2 or len(ctx.in_shapes[0] or ()) != 1:
            raise NotImplementedError("MatMul other than (rows, k) · constant (k, j)")
        assert g is not None
        return [b.op("Gemm", [g, b.const(np.asarray(w, np.float32))], transB=1), None]  # Ȳ·Wᵀ, no copy of W


def _conv_geometry(node: Node) -> tuple[list[int], list[int], list[int], int]:
    a = node.attrs
    return list(a["strides"]), list(a["dilations"]), list(a["pads"]), int(a["group"])


def _use_kernels(ctx: Ctx, x: Array) -> bool:
    return ctx.kernels is not None and x.dtype == np.float32


def _bias_shape(rank: int) -> tuple[int, ...]:
    return (1, -1) + (1,) * (rank - 2)


def _conv_at_zero(ctx: Ctx) -> list[Array]:
    """Conv's and ConvTranspose's ``at_zero``: the bias, one value per output channel."""
    b = ctx.const[2] if len(ctx.const) > 2 else None
    rank = 1 + len(ctx.out_shapes[0] or ())
    return _constant_term(ctx, None if b is None else b.reshape(_bias_shape(rank)))


@register("Conv", role=AFFINE, check=constant_weights, canonical=window_canonical,
          notes="1D/2D/3D, groups, dilations, strides, pads, auto_pad; constant weights")
class Conv:
    """Y = W ⋆ X + b (cross-correlation, groups, strides, dilations, explicit pads).
    Adjoint: X̄ = ConvTranspose(Ȳ; W) with the same geometry, cropped to X's size.
    https://onnx.ai/onnx/operators/onnx__Conv.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x, w = inputs[0], ctx.const[1]
        assert x is not None and w is not None
        strides, dilations, pads, group = _conv_geometry(node)
        out = tuple(ctx.out_shapes[0] or ())[1:]
        if _use_kernels(ctx, x):
            y = ctx.kernels.conv(x, w, strides, dilations, pads, group)
        else:
            y = conv_nd(x, w.astype(x.dtype, copy=False), out, strides, dilations, pads, group)
        if len(inputs) > 2 and inputs[2] is not None:
            y = y + inputs[2].astype(x.dtype, copy=False).reshape(_bias_shape(x.ndim))
        return [y]

    @staticmethod
    def at_zero(node: Node, ctx: Ctx) -> list[Array]:
        return _conv_at_zero(ctx)

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        w = ctx.const[1]
        assert g is not None and w is not None
        strides, dilations, pads, group = _conv_geometry(node)
        spatial = tuple(ctx.in_shapes[0] or ())[1:]
        dx = None
        if _use_kernels(ctx, g):
            try:
                dx = ctx.kernels.conv_adjoint(g, w, spatial, strides, dilations, pads, group)
            except ValueError:
                dx = None
        if dx is None:
            dx = conv_nd_adjoint(g, w.astype(g.dtype, copy=False), spatial, strides, dilations, pads, group)
        return [dx] + [None] * (len(node.inputs) - 1)

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        w = ctx.const[1]
        assert g is not None and w is not None
        strides, dilations, pads, group = _conv_geometry(node)
        dx = b.conv_adjoint(g, np.asarray(w, np.float32), tuple(ctx.out_shapes[0] or ())[1:],
                            tuple(ctx.in_shapes[0] or ())[1:], strides, dilations, pads, group)
        return [dx] + [None] * (len(node.inputs) - 1)


@register("ConvTranspose", role=AFFINE, check=constant_weights, canonical=window_canonical,
          notes="as Conv, also output_padding and output_shape")
class ConvTranspose:
    """Y = Convᵀ(X; W) + b: the adjoint of a Conv with weights W (C_in, C_out/g, *k).
    Adjoint: X̄ = Conv(Ȳ; W), the first X-sized windows.
    https://onnx.ai/onnx/operators/onnx__ConvTranspose.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x, w = inputs[0], ctx.const[1]
        assert x is not None and w is not None
        strides, dilations, pads, group = _conv_geometry(node)
        out_spatial = list(node.attrs["out_spatial"])
        y = conv_nd_adjoint(x, w.astype(x.dtype, copy=False), out_spatial, strides, dilations, pads, group)
        if len(inputs) > 2 and inputs[2] is not None:
            y = y + inputs[2].astype(x.dtype, copy=False).reshape(_bias_shape(x.ndim))
        return [y]

    @staticmethod
    def at_zero(node: Node, ctx: Ctx) -> list[Array]:
        return _conv_at_zero(ctx)

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        w = ctx.const[1]
        assert g is not None and w is not None
        strides, dilations, pads, group = _conv_geometry(node)
        spatial = tuple(ctx.in_shapes[0] or ())[1:]
        dx = conv_nd(g, w.astype(g.dtype, copy=False), spatial, strides, dilations, pads, group)
        return [dx] + [None] * (len(node.inputs) - 1)

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        w = ctx.const[1]
        assert g is not None and w is not None
        strides, dilations, pads, group = _conv_geometry(node)
        spatial = list((ctx.in_shapes[0] or ())[1:])
        n = len(spatial)
        y = list((ctx.out_shapes[0] or ())[1:])
        # a Conv with the same weights and geometry; its windows past X's size (an output_padding
        # of the forward) are cut off
        size = [(y[i] + pads[i] + pads[n + i] - dilations[i] * (w.shape[2 + i] - 1) - 1) // strides[i] + 1
                for i in range(n)]
        if any(s < L for s, L in zip(size, spatial)):
            raise NotImplementedError("ConvTranspose whose adjoint Conv is shorter than its input")
        dx = b.op("Conv", [g, b.const(np.asarray(w, np.float32), "w")], strides=strides, dilations=dilations,
                  pads=pads, group=group)
        if size != spatial:
            axes = list(range(2, 2 + n))
            dx = b.op("Slice", [dx, b.const(np.zeros(n, np.int64)), b.const(np.array(spatial, np.int64)),
                                b.const(np.array(axes, np.int64))])
        return [dx] + [None] * (len(node.inputs) - 1)
