"""Pooling and reductions: AveragePool, GlobalAveragePool, ReduceMean, ReduceSum (linear) and
MaxPool, GlobalMaxPool (routing, frozen at the recorded argmax)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import helper as onnx_helper

from .. import tiers
from ..errors import ModelError
from ..ir import AFFINE, ROUTING, Node
from . import Ctx, register
from .attrs import const_input, data_first_rest_constant, rank, window_canonical
from .windows import col2im, crop, pad_spatial, padded_size, windows

Array = np.ndarray


def _geometry(node: Node, ctx: Ctx) -> tuple[list[int], list[int], list[int], list[int], list[int], list[int]]:
    a = node.attrs
    spatial = list((ctx.in_shapes[0] or ())[1:])
    out = list((ctx.out_shapes[0] or ())[1:])
    return spatial, out, list(a["kernel_shape"]), list(a["strides"]), list(a["dilations"]), list(a["pads"])


def _avg_divisor(node: Node, ctx: Ctx, dtype: np.dtype) -> Array:
    """How many elements each window averages (count_include_pad counts explicit pads only)."""
    spatial, out, kernel, strides, dilations, pads = _geometry(node, ctx)
    ones = np.ones((1, 1) + tuple(spatial), dtype)
    fill = 1.0 if node.attrs.get("count_include_pad", 0) else 0.0
    n = len(spatial)
    padded = np.pad(ones, [(0, 0), (0, 0)] + [(pads[i], pads[n + i]) for i in range(n)], constant_values=fill)
    padded = pad_spatial(padded, [0] * (2 * n), out, kernel, strides, dilations, 0.0)
    win = windows(padded, out, kernel, strides, dilations)
    return win.sum(axis=tuple(range(2 + n, 2 + 2 * n)))[0, 0]


@register("AveragePool", role=AFFINE, canonical=window_canonical,
          notes="pads, strides, dilations, ceil_mode, count_include_pad, auto_pad")
class AveragePool:
    """Y = mean over each window (pads, strides, dilations, ceil_mode, count_include_pad).
    Adjoint: each window's cotangent divided by its count, scattered back over the window.
    https://onnx.ai/onnx/operators/onnx__AveragePool.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x = inputs[0]
        assert x is not None
        spatial, out, kernel, strides, dilations, pads = _geometry(node, ctx)
        n = len(out)
        xp = pad_spatial(x, pads, out, kernel, strides, dilations, 0.0)
        s = windows(xp, out, kernel, strides, dilations).sum(axis=tuple(range(2 + n, 2 + 2 * n)))
        return [s / _avg_divisor(node, ctx, x.dtype)]

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        spatial, out, kernel, strides, dilations, pads = _geometry(node, ctx)
        n = len(out)
        scaled = g / _avg_divisor(node, ctx, g.dtype)
        cols = np.broadcast_to(scaled[(Ellipsis,) + (None,) * n], g.shape + tuple(kernel))
        xp = col2im(cols, padded_size(spatial, pads, out, kernel, strides, dilations), strides, dilations)
        return [crop(xp, pads, spatial)]

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        assert g is not None
        spatial, out, kernel, strides, dilations, pads = _geometry(node, ctx)
        scaled = b.op("Div", [g, b.const(_avg_divisor(node, ctx, np.dtype(np.float32)))])
        C = int((ctx.in_shapes[0] or (0,))[0])
        ones = np.ones((C, 1) + tuple(kernel), np.float32)  # each channel's window summed alone
        return [b.conv_adjoint(scaled, ones, out, spatial, strides, dilations, pads, C)]


@register("GlobalAveragePool", role=AFFINE, notes="1D/2D/3D")
class GlobalAveragePool:
    """Y[b, c] = mean of X[b, c] over the spatial axes. Adjoint: X̄ = Ȳ / size, broadcast.
    https://onnx.ai/onnx/operators/onnx__GlobalAveragePool.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x = inputs[0]
        assert x is not None
        return [x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)]

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        shape = (g.shape[0],) + tuple(ctx.in_shapes[0] or ())
        size = int(np.prod(shape[2:], dtype=np.int64))
        return [np.broadcast_to(g / size, shape).copy()]

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        assert g is not None
        shape = tuple(ctx.in_shapes[0] or ())
        size = int(np.prod(shape[1:], dtype=np.int64))
        scaled = b.op("Div", [g, b.const(np.float32(size))])
        return [b.op("Expand", [scaled, b.const(np.array((1,) + shape, np.int64))])]


def _reduce_canonical(
    node: Node, a: dict[str, Any], consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    op = node.op_type
    axes_from_input = (op == "ReduceSum" and node.opset >= 13) or (
        op == "ReduceMean" and node.opset >= 18
    )
    if axes_from_input:
        axes = const_input(node, 1, consts)
        a["axes"] = [int(x) for x in axes] if axes is not None and axes.size else None
    r = rank(node, shapes)
    if a.get("axes") is None:
        if a.get("noop_with_empty_axes", 0):
            a["axes"] = []
        else:
            raise ModelError(f"{op} over all axes would reduce the batch axis")
    a["axes"] = sorted(int(x) % r for x in a["axes"])
    if 0 in a["axes"]:
        raise ModelError(f"{op} over the batch axis is not supported")


@register("ReduceMean", "ReduceSum", role=AFFINE, check=data_first_rest_constant, canonical=_reduce_canonical,
          notes="constant axes, not over the batch axis")
class Reduce:
    """Y = sum (or mean) of X over ``axes`` (never the batch axis), keepdims as set.
    Adjoint: Ȳ broadcast back over the reduced axes (divided by their size for the mean).
    https://onnx.ai/onnx/operators/onnx__ReduceSum.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x = inputs[0]
        assert x is not None
        axes = tuple(node.attrs["axes"])
        if not axes:
            return [x.copy()]
        keep = bool(node.attrs.get("keepdims", 1))
        fn = np.mean if node.op_type == "ReduceMean" else np.sum
        return [fn(x, axis=axes, keepdims=keep)]

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        shape = (g.shape[0],) + tuple(ctx.in_shapes[0] or ())
        axes = tuple(node.attrs["axes"])
        if not axes:
            return [g] + [None] * (len(node.inputs) - 1)
        if not node.attrs.get("keepdims", 1):
            g = np.expand_dims(g, axes)
        if node.op_type == "ReduceMean":
            g = g / int(np.prod([shape[a] for a in axes], dtype=np.int64))
        return [np.broadcast_to(g, shape).copy()] + [None] * (len(node.inputs) - 1)

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        assert g is not None
        shape = (1,) + tuple(ctx.in_shapes[0] or ())
        axes = tuple(node.attrs["axes"])
        rest: list[str | None] = [None] * (len(node.inputs) - 1)
        if not axes:
            return [g] + rest
        if not node.attrs.get("keepdims", 1):
            g = b.op("Unsqueeze", [g, b.const(np.array(axes, np.int64))])
        if node.op_type == "ReduceMean":
            g = b.op("Div", [g, b.const(np.float32(int(np.prod([shape[a] for a in axes], dtype=np.int64))))])
        return [b.op("Expand", [g, b.const(np.array(shape, np.int64))])] + rest


@dataclass(frozen=True)
class Routing:
    """Recorded argmax of a max pooling: for each output element of each sample, the flat
    (row-major, per-sample) index of the input element it copies."""

    argmax: Array  # (n, P) int64
    disjoint: bool = False  # no two windows share an element, so no two positions copy the same one

    @functools.cached_property
    def adjoint(self) -> list[tuple[Array, Array, list[tuple[Array, Array]]]]:
        """Per sample, how the adjoint adds cotangents (computed once per record, on first use):
        ``first`` the output positions that are the first (in order) to copy their input
        element, ``targets`` those elements, and in rounds the positions that copy an element
        already copied (overlapping windows can share a maximum), each with the slot in
        ``first`` it adds to. Round r holds every position with r earlier positions on the same
        element, so adding round by round is the order of a sequential scatter-add."""
        out = []
        for am in self.argmax:
            order = np.argsort(am, kind="stable")
            ranked = am[order]
            start = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
            lead = np.repeat(start, np.diff(np.r_[start, am.size]))  # sorted index of each group's head
            rank = np.empty(am.size, np.int64)
            rank[order] = np.arange(am.size) - lead
            head = np.empty(am.size, np.int64)
            head[order] = order[lead]  # the first position on the same element
            first = np.flatnonzero(rank == 0)
            slot = np.empty(am.size, np.int64)
            slot[first] = np.arange(first.size)
            rounds = [(p, slot[head[p]]) for p in (np.flatnonzero(rank == r) for r in range(1, int(rank.max(initial=0)) + 1))]
            out.append((first, am[first], rounds))
        return out


def _window_index(spatial: list[int], out: list[int], kernel: list[int], strides: list[int],
                  dilations: list[int], pads: list[int]) -> Array:
    """Per-channel flat input index of every (output position, kernel offset); -1 in padding."""
    return _window_table(*(tuple(v) for v in (spatial, out, kernel, strides, dilations, pads)))


@functools.lru_cache(maxsize=64)
def _window_table(spatial: tuple[int, ...], out: tuple[int, ...], kernel: tuple[int, ...],
                  strides: tuple[int, ...], dilations: tuple[int, ...], pads: tuple[int, ...]) -> Array:
    n = len(spatial)
    grids = np.meshgrid(*[np.arange(o) for o in out], *[np.arange(k) for k in kernel], indexing="ij")
    flat = np.zeros(grids[0].shape, np.int64)
    valid = np.ones(grids[0].shape, bool)
    for i in range(n):
        coord = grids[i] * strides[i] - pads[i] + grids[n + i] * dilations[i]
        valid &= (coord >= 0) & (coord < spatial[i])
        flat = flat * spatial[i] + coord
    table = np.where(valid, flat, -1).reshape(int(np.prod(out)), -1)
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=64)
def _windows_disjoint(*geometry: tuple[int, ...]) -> bool:
    """No input element lies in two windows of this geometry (:func:`_window_table`'s): once per
    geometry, not at every record."""
    used = _window_table(*geometry)
    return bool(np.bincount(used[used >= 0]).max(initial=0) <= 1)


def _gather(x: Array, state: Routing, ctx: Ctx) -> Array:
    rows = x.shape[0]
    flat = ctx.per_sample(x.reshape(rows, -1))  # (m, n, size)
    idx = np.broadcast_to(state.argmax[None], (flat.shape[0],) + state.argmax.shape)
    return np.take_along_axis(flat, idx, axis=2).reshape((rows,) + tuple(ctx.out_shapes[0] or ()))


def _scatter(g: Array, state: Routing, ctx: Ctx) -> Array:
    """The adjoint of a recorded routing: dx[r, i, argmax[i, p]] += g[r, i, p], in p order
    (numpy: the shared maxima summed first on the compact positions, then one scatter; or the
    compiled loop, same bits: :mod:`onnx_pathwise.tiers`)."""
    rows = g.shape[0]
    in_shape = (rows,) + tuple(ctx.in_shapes[0] or ())
    size = int(np.prod(in_shape[1:], dtype=np.int64))
    g = g.reshape(rows // ctx.n, ctx.n, -1)
    kernels = tiers.compiled()
    if kernels is not None:
        return kernels.scatter_add(g, state.argmax, size).reshape(in_shape)
    with tiers.timed():
        dx = np.zeros((rows // ctx.n, ctx.n, size), g.dtype)
        if state.disjoint:
            for i, targets in enumerate(state.argmax):
                dx[:, i, targets] = g[:, i]
            return dx.reshape(in_shape)
        for i, (first, targets, rounds) in enumerate(state.adjoint):
            gi = g[:, i]
            acc = gi[:, first]
            for p, slot in rounds:
                acc[:, slot] += gi[:, p]
            dx[:, i, targets] = acc
        return dx.reshape(in_shape)


def _emit_scatter(node: Node, g: str | None, ctx: Ctx, b: Any) -> str:
    """:func:`_scatter` as ONNX nodes: a ScatterElements that adds each row's cotangents at the
    recorded argmax of the sample (one sample per graph run)."""
    assert g is not None
    in_shape = tuple(ctx.in_shapes[0] or ())
    P = int(np.prod(ctx.out_shapes[0] or (), dtype=np.int64))
    size = int(np.prod(in_shape, dtype=np.int64))
    flat = b.op("Reshape", [g, b.shape((P,))])
    argmax = b.state(node.name, "argmax", lambda st: st.argmax, np.int64)  # (1, P)
    index = b.op("Expand", [argmax, b.rows_shape(flat, (P,))])
    zeros = b.op("ConstantOfShape", [b.rows_shape(flat, (size,))],
                 value=onnx_helper.make_tensor("", onnx_helper.np_dtype_to_tensor_dtype(np.dtype(np.float32)), [1], [0.0]))
    dx = b.op("ScatterElements", [zeros, index, flat], axis=1, reduction="add")
    return b.op("Reshape", [dx, b.shape(in_shape)])


#: window outputs (N·C·P) above which the compiled routing splits its channels across threads
PARALLEL_WINDOWS = 1 << 16


def window_argmax(x: Array, table: Array) -> Array:
    """Max-pool routing: x (N, C, S) flattened spatial, table (P, W) the flat index of each
    window's elements (-1 in padding) → (N, C, P) the flat index of each window's first
    maximum, per channel. Padding never wins: it reads as the lowest value, and a window whose
    elements all equal that value picks its first element. numpy, or the compiled loop (same
    result, :mod:`onnx_pathwise.tiers`; channels split across threads on large tensors)."""
    N, C, S = x.shape
    out = np.empty((N, C, table.shape[0]), np.int64)
    kernels = tiers.compiled()
    if kernels is not None:
        tiers.in_parallel([functools.partial(kernels.window_argmax, x[:, a:b], table, out[:, a:b])
                           for a, b in tiers.ranges(C, out.size, PARALLEL_WINDOWS)])
        return out
    with tiers.timed():
        low = -np.inf if np.issubdtype(x.dtype, np.floating) else np.iinfo(x.dtype).min
        first = table[np.arange(table.shape[0]), (table < 0).argmin(axis=1)]  # first element in the image
        padded = np.empty((C, S + 1), x.dtype)
        padded[:, S] = low
        for i in range(N):  # one sample at a time: the gathered windows are W× its size
            padded[:, :S] = x[i]
            pick = padded[:, table].argmax(axis=2)  # index -1 is the padding column
            out[i] = np.take_along_axis(np.broadcast_to(table, (C,) + table.shape), pick[..., None], axis=2)[..., 0]
            np.copyto(out[i], first, where=out[i] < 0)
        return out


@register("MaxPool", role=ROUTING, canonical=window_canonical,
          notes="argmax recorded; ties go to the first maximum in row-major window order, padding never wins")
class MaxPool:
    """Y = max over each window (pads, strides, dilations, ceil_mode); routing op.
    Frozen: Y copies the input element at the recorded argmax. Ties go to the first maximum in
    the window (row-major kernel order); padding never wins. Adjoint: scatter-add Ȳ to the argmax.
    storage_order only affects the optional Indices output, which the cone never reads.
    https://onnx.ai/onnx/operators/onnx__MaxPool.html"""

    @staticmethod
    def record(node: Node, inputs: list[Array | None], ctx: Ctx) -> Routing:
        x = inputs[0]
        assert x is not None
        spatial, out, kernel, strides, dilations, pads = _geometry(node, ctx)
        N, C = x.shape[:2]
        S = int(np.prod(spatial, dtype=np.int64))
        geometry = tuple(tuple(v) for v in (spatial, out, kernel, strides, dilations, pads))
        table = _window_table(*geometry)  # (P, K)
        within = window_argmax(np.ascontiguousarray(x).reshape(N, C, S), table)  # first maximum
        flat = within + (np.arange(C, dtype=np.int64) * S)[None, :, None]
        return Routing(flat.reshape(N, -1), disjoint=_windows_disjoint(*geometry))

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x = inputs[0]
        assert x is not None
        state = ctx.state if ctx.state is not None else MaxPool.record(node, inputs, ctx)
        outs = [_gather(x, state, ctx)]
        return outs + [np.zeros(0)] * (len(node.outputs) - 1)

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        g = cots[0]
        assert g is not None
        return [_scatter(g, ctx.state, ctx)]

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        return [_emit_scatter(node, cots[0], ctx, b)]


@register("GlobalMaxPool", role=ROUTING, notes="argmax recorded; ties go to the first maximum")
class GlobalMaxPool:
    """Y[b, c] = max of X[b, c] over the spatial axes; routing op, frozen at the recorded
    argmax (ties: first in row-major order). Adjoint: scatter-add Ȳ to the argmax.
    https://onnx.ai/onnx/operators/onnx__GlobalMaxPool.html"""

    @staticmethod
    def record(node: Node, inputs: list[Array | None], ctx: Ctx) -> Routing:
        x = inputs[0]
        assert x is not None
        N, C = x.shape[:2]
        arg = x.reshape(N, C, -1).argmax(axis=2)
        S = int(np.prod(x.shape[2:], dtype=np.int64))
        return Routing(arg + (np.arange(C, dtype=np.int64) * S)[None, :], disjoint=True)

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x = inputs[0]
        assert x is not None
        state = ctx.state if ctx.state is not None else GlobalMaxPool.record(node, inputs, ctx)
        return [_gather(x, state, ctx)]

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        return [_scatter(g, ctx.state, ctx)]

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        return [_emit_scatter(node, cots[0], ctx, b)]
