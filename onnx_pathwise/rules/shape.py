"""Shape ops: Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Concat, Split, Slice, Gather,
Expand, Pad — all linear maps that move, copy or pad elements, never across samples."""

from __future__ import annotations

import numpy as np

from ..ir import Node
from . import Ctx, register, unbroadcast

Array = np.ndarray


def _out(ctx: Ctx, rows: int, i: int = 0) -> tuple[int, ...]:
    return (rows,) + tuple(ctx.out_shapes[i] or ())


def _in(ctx: Ctx, rows: int, i: int = 0) -> tuple[int, ...]:
    return (rows,) + tuple(ctx.in_shapes[i] or ())


def _none_after(first: Array | None, node: Node) -> list[Array | None]:
    return [first] + [None] * (len(node.inputs) - 1)


@register("Reshape", "Flatten", "Squeeze", "Unsqueeze")
class Reshape:
    """Y = X with the recorded output shape (row-major order kept). Adjoint: reshape back.
    https://onnx.ai/onnx/operators/onnx__Reshape.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x = inputs[0]
        assert x is not None
        return [x.reshape(_out(ctx, x.shape[0]))]

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        return _none_after(g.reshape(_in(ctx, g.shape[0])), node)


@register("Transpose")
class Transpose:
    """Y = Xᵀ under ``perm`` (perm[0] = 0). Adjoint: transpose by the inverse permutation.
    https://onnx.ai/onnx/operators/onnx__Transpose.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x = inputs[0]
        assert x is not None
        return [x.transpose(node.attrs["perm"])]

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        return [g.transpose(np.argsort(node.attrs["perm"]))]


@register("Concat")
class Concat:
    """Y = concatenation along ``axis`` (constant operands broadcast over rows).
    Adjoint: split Ȳ into the operands' extents. https://onnx.ai/onnx/operators/onnx__Concat.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        rows = next(x for x, d in zip(inputs, node.data) if d)
        assert rows is not None
        parts = []
        for x, d in zip(inputs, node.data):
            assert x is not None
            if not d:
                x = np.broadcast_to(x.astype(rows.dtype), (rows.shape[0],) + x.shape[1:])
            parts.append(x)
        return [np.concatenate(parts, axis=node.attrs["axis"])]

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        axis = node.attrs["axis"]
        out: list[Array | None] = []
        start = 0
        for i, d in enumerate(node.data):
            size = (ctx.in_shapes[i] or ())[axis - 1] if d else ctx.const[i].shape[axis]  # type: ignore[union-attr]
            if d:
                index = [slice(None)] * g.ndim
                index[axis] = slice(start, start + size)
                out.append(g[tuple(index)])
            else:
                out.append(None)
            start += size
        return out


@register("Split")
class Split:
    """Y_i = consecutive pieces of X along ``axis`` (sizes as recorded).
    Adjoint: concatenate the pieces' cotangents (zeros where none arrived).
    https://onnx.ai/onnx/operators/onnx__Split.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x = inputs[0]
        assert x is not None
        axis = node.attrs["axis"]
        cuts = np.cumsum(node.attrs["sizes"])[:-1]
        return list(np.split(x, cuts, axis=axis))

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        like = next(g for g in cots if g is not None)
        axis = node.attrs["axis"]
        parts = []
        for g, size in zip(cots, node.attrs["sizes"]):
            if g is None:  # a piece no path reached (possibly outside the cone: no recorded shape)
                shape = list(_in(ctx, like.shape[0]))
                shape[axis] = size
                g = np.zeros(shape, like.dtype)
            parts.append(g)
        return _none_after(np.concatenate(parts, axis=axis), node)


@register("Slice")
class Slice:
    """Y = X[index] with the canonical per-axis (start, stop, step) from the operator's
    clamping rules. Adjoint: zeros with Ȳ written at ``index``.
    https://onnx.ai/onnx/operators/onnx__Slice.html"""

    @staticmethod
    def _index(node: Node) -> tuple[slice, ...]:
        return tuple(slice(*t) for t in node.attrs["index"])

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x = inputs[0]
        assert x is not None
        return [x[Slice._index(node)]]

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        dx = np.zeros(_in(ctx, g.shape[0]), g.dtype)
        dx[Slice._index(node)] = g
        return _none_after(dx, node)


@register("Gather")
class Gather:
    """Y = take(X, indices, axis) with constant indices. Adjoint: scatter-add Ȳ (repeated
    indices accumulate). https://onnx.ai/onnx/operators/onnx__Gather.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x = inputs[0]
        assert x is not None
        return [np.take(x, node.attrs["indices"], axis=node.attrs["axis"])]

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        axis = node.attrs["axis"]
        idx = node.attrs["indices"]
        dx = np.zeros(_in(ctx, g.shape[0]), g.dtype)
        moved = np.moveaxis(dx, axis, 0)
        gm = np.moveaxis(g, tuple(range(axis, axis + idx.ndim)), tuple(range(idx.ndim)))
        np.add.at(moved, idx, gm)
        return [dx, None]


@register("Expand")
class Expand:
    """Y = X broadcast to the recorded output shape. Adjoint: sum back over broadcast axes.
    https://onnx.ai/onnx/operators/onnx__Expand.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x = inputs[0]
        assert x is not None
        return [np.broadcast_to(x, _out(ctx, x.shape[0])).copy()]

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        return [unbroadcast(g, _in(ctx, g.shape[0])), None]


def _pad_index(pads: list[int], in_shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Matching windows of input and output under pads (negative pads crop)."""
    r = len(in_shape)
    src, dst = [], []
    for i in range(r):
        b, e = pads[i], pads[r + i]
        src.append(slice(max(-b, 0), in_shape[i] - max(-e, 0)))
        length = in_shape[i] - max(-b, 0) - max(-e, 0)
        dst.append(slice(max(b, 0), max(b, 0) + length))
    return tuple(src), tuple(dst)


@register("Pad")
class Pad:
    """Y = X padded with a constant (negative pads crop); mode 'constant' only.
    Adjoint: X̄ = the window of Ȳ that X occupies (zeros where X was cropped).
    https://onnx.ai/onnx/operators/onnx__Pad.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x = inputs[0]
        assert x is not None
        y = np.full(_out(ctx, x.shape[0]), node.attrs["value"], x.dtype)
        src, dst = _pad_index(list(node.attrs["pads"]), x.shape)
        y[dst] = x[src]
        return [y]

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        shape = _in(ctx, g.shape[0])
        dx = np.zeros(shape, g.dtype)
        src, dst = _pad_index(list(node.attrs["pads"]), shape)
        dx[src] = g[dst]
        return _none_after(dx, node)
