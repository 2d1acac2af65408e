"""Shape ops: Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Concat, Split, Slice, Gather,
Expand, Pad — all linear maps that move, copy or pad elements, never across samples."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ModelError
from ..ir import AFFINE, SHAPE, Node
from . import Ctx, register, unbroadcast
from .attrs import axis_canonical, const_input, data_first, data_first_rest_constant, rank

Array = np.ndarray


def _out(ctx: Ctx, rows: int, i: int = 0) -> tuple[int, ...]:
    return (rows,) + tuple(ctx.out_shapes[i] or ())


def _in(ctx: Ctx, rows: int, i: int = 0) -> tuple[int, ...]:
    return (rows,) + tuple(ctx.in_shapes[i] or ())


def _none_after(first: Array | None, node: Node) -> list[Array | None]:
    return [first] + [None] * (len(node.inputs) - 1)


def _squeeze_canonical(
    node: Node, a: dict[str, Any], consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    op = node.op_type
    if node.opset >= 13:
        axes = const_input(node, 1, consts)
        a["axes"] = [int(x) for x in axes] if axes is not None else None
    r = rank(node, shapes) + (len(a["axes"]) if op == "Unsqueeze" else 0)
    if a.get("axes") is not None:
        a["axes"] = [int(x) % r for x in a["axes"]]
        if 0 in a["axes"]:
            raise ModelError(f"{op} on the batch axis is not supported")


@register("Reshape", role=SHAPE, check=data_first_rest_constant, notes="constant shape")
@register("Flatten", role=SHAPE, check=data_first, canonical=axis_canonical, notes="axis ≥ 1")
@register("Squeeze", "Unsqueeze", role=SHAPE, check=data_first_rest_constant, canonical=_squeeze_canonical,
          notes="constant axes, not the batch axis")
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

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        assert g is not None
        return [b.op("Reshape", [g, b.shape(ctx.in_shapes[0])])] + [None] * (len(node.inputs) - 1)


def _transpose_canonical(
    node: Node, a: dict[str, Any], consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    r = rank(node, shapes)
    perm = a.get("perm") or list(reversed(range(r)))
    if perm[0] != 0:
        raise ModelError(f"Transpose perm {perm} moves the batch axis")
    a["perm"] = [int(p) for p in perm]


@register("Transpose", role=SHAPE, check=data_first, canonical=_transpose_canonical,
          notes="perm keeps the batch axis first")
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

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        assert g is not None
        return [b.op("Transpose", [g], perm=[int(p) for p in np.argsort(node.attrs["perm"])])]


@register("Concat", role=SHAPE, merges=True, canonical=axis_canonical,
          notes="not along the batch axis; of two or more computed tensors a merge (branches)")
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

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        assert g is not None
        axis = node.attrs["axis"]
        sizes = [(ctx.in_shapes[i] or ())[axis - 1] if d else ctx.const[i].shape[axis]  # type: ignore[union-attr]
                 for i, d in enumerate(node.data)]
        parts = b.ops("Split", [g, b.const(np.array(sizes, np.int64))], len(sizes), axis=axis)
        return [p if d else None for p, d in zip(parts, node.data)]


def _split_canonical(
    node: Node, a: dict[str, Any], consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    r = rank(node, shapes)
    a["axis"] = int(a.get("axis", 0)) % r
    if a["axis"] == 0:
        raise ModelError("Split along the batch axis is not supported")
    # sizes from the operator's spec, not from recorded shapes: outputs outside the cone
    # (a Split whose other pieces are unused) have none
    dim = shapes[node.inputs[0]][a["axis"] - 1]
    split = const_input(node, 1, consts) if node.opset >= 13 else a.get("split")
    k = len(node.outputs)
    if split is not None and len(split):
        sizes = [int(s) for s in split]
    else:  # equal pieces; with Split-18 num_outputs the last one may be smaller
        chunk = -(-dim // k)
        sizes = [chunk] * (k - 1) + [dim - chunk * (k - 1)]
    if sum(sizes) != dim or len(sizes) != k or any(
        o in shapes and shapes[o][a["axis"] - 1] != s for o, s in zip(node.outputs, sizes)
    ):
        raise ModelError(f"Split sizes {sizes} do not fit axis {a['axis']} of length {dim}")
    a["sizes"] = sizes


@register("Split", role=SHAPE, check=data_first_rest_constant, canonical=_split_canonical,
          notes="constant sizes, not along the batch axis")
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

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        like = next(g for g in cots if g is not None)
        axis = node.attrs["axis"]
        parts = []
        for g, size in zip(cots, node.attrs["sizes"]):
            if g is None:
                shape = list(ctx.in_shapes[0] or ())
                shape[axis - 1] = size
                g = b.op("ConstantOfShape", [b.rows_shape(like, shape)], value=b.zero())
            parts.append(g)
        dx = parts[0] if len(parts) == 1 else b.op("Concat", parts, axis=axis)
        return [dx] + [None] * (len(node.inputs) - 1)


def _onnx_slice(start: int, end: int, step: int, dim: int) -> tuple[int, int | None, int]:
    """ONNX Slice clamping (operator spec) turned into a numpy slice triple."""
    if step == 0:
        raise ModelError("Slice step 0")
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start = min(max(start, 0), dim)
        end = min(max(end, 0), dim)
        return (start, end, step)
    start = min(max(start, 0), dim - 1)
    end = min(max(end, -1), dim - 1)
    return (start, None if end < 0 else end, step)


def _slice_canonical(
    node: Node, a: dict[str, Any], consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    r = rank(node, shapes)
    if node.opset >= 10:
        starts = const_input(node, 1, consts)
        ends = const_input(node, 2, consts)
        axes = const_input(node, 3, consts)
        steps = const_input(node, 4, consts)
    else:
        starts, ends = np.array(a["starts"]), np.array(a["ends"])
        axes = np.array(a["axes"]) if a.get("axes") else None
        steps = None
    assert starts is not None and ends is not None
    axes_l = [int(x) % r for x in (axes if axes is not None else range(len(starts)))]
    steps_l = [int(s) for s in (steps if steps is not None else [1] * len(starts))]
    full_shape = (1,) + shapes[node.inputs[0]]
    index: list[tuple[int, int | None, int]] = [(0, None, 1)] * r
    for axis_i, st, en, sp in zip(axes_l, starts, ends, steps_l):
        index[axis_i] = _onnx_slice(int(st), int(en), sp, full_shape[axis_i])
    if index[0] != (0, None, 1) and index[0] != (0, 1, 1):
        raise ModelError("Slice of the batch axis is not supported")
    index[0] = (0, None, 1)
    a["index"] = index


@register("Slice", role=SHAPE, check=data_first_rest_constant, canonical=_slice_canonical,
          notes="constant starts, ends, axes and steps; not of the batch axis")
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

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        assert g is not None
        dims = (0,) + tuple(ctx.in_shapes[0] or ())
        before, after = [], []
        for (start, stop, step), dim in zip(node.attrs["index"], dims):
            if step != 1:
                raise NotImplementedError("Slice with a step other than 1")
            stop = dim if stop is None else stop
            before.append(start if dim else 0)
            after.append(dim - stop if dim else 0)
        # zeros around Ȳ where X was cut away: padding by what the slice removed
        dx = b.op("Pad", [g, b.const(np.array(before + after, np.int64)), b.const(np.zeros((), np.float32))],
                  mode="constant")
        return [dx] + [None] * (len(node.inputs) - 1)


def _gather_canonical(
    node: Node, a: dict[str, Any], consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    idx = const_input(node, 1, consts)
    assert idx is not None
    r = rank(node, shapes)
    a["axis"] = int(a.get("axis", 0)) % r
    if a["axis"] == 0:
        raise ModelError("Gather along the batch axis is not supported")
    dim = shapes[node.inputs[0]][a["axis"] - 1]
    a["indices"] = np.where(idx < 0, idx + dim, idx).astype(np.int64)


@register("Gather", role=SHAPE, check=data_first_rest_constant, canonical=_gather_canonical,
          notes="constant indices, not along the batch axis")
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

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        assert g is not None
        axis = node.attrs["axis"]
        idx = np.asarray(node.attrs["indices"])
        if idx.ndim > 1:
            raise NotImplementedError("Gather with indices of more than one axis")
        out = list(ctx.in_shapes[0] or ())
        out[axis - 1] = idx.size
        if idx.ndim == 0:  # the axis was dropped: put it back, of length 1
            g = b.op("Unsqueeze", [g, b.const(np.array([axis], np.int64))])
        # each element of Ȳ added at its index along the axis (repeated indices accumulate)
        where = np.broadcast_to(idx.reshape([-1 if i == axis - 1 else 1 for i in range(len(out))]), out)
        index = b.op("Expand", [b.const(np.ascontiguousarray(where)[None]), b.rows_shape(g, out)])
        zeros = b.op("ConstantOfShape", [b.rows_shape(g, tuple(ctx.in_shapes[0] or ()))], value=b.zero())
        return [b.op("ScatterElements", [zeros, index, g], axis=axis, reduction="add"), None]


@register("Expand", role=SHAPE, since=8, check=data_first_rest_constant, notes="constant shape")
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

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        assert g is not None
        return [b.unbroadcast(g, ctx.out_shapes[0], ctx.in_shapes[0]), None]


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


def _pad_canonical(
    node: Node, a: dict[str, Any], consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    r = rank(node, shapes)
    if node.opset >= 11:
        pads_in = const_input(node, 1, consts)
        value = const_input(node, 2, consts)
        pad_axes = const_input(node, 3, consts)
        pads_l = [int(p) for p in (pads_in if pads_in is not None else [])]
        if pad_axes is not None:
            full = [0] * (2 * r)
            ax = [int(x) % r for x in pad_axes]
            for j, x in enumerate(ax):
                full[x] = pads_l[j]
                full[r + x] = pads_l[len(ax) + j]
            pads_l = full
        a["pads"] = pads_l
        a["value"] = float(value.reshape(-1)[0]) if value is not None and value.size else 0.0
    else:
        a["pads"] = [int(p) for p in (a.get("pads") or a.get("paddings") or [])]
        a["value"] = float(a.get("value", 0.0))
    if a.get("mode", "constant") != "constant":
        raise ModelError(f"Pad mode {a.get('mode')!r} is not supported (only 'constant')")
    if len(a["pads"]) != 2 * r:
        raise ModelError(f"Pad has {len(a['pads'])} pads for rank {r}")
    if a["pads"][0] != 0 or a["pads"][r] != 0:
        raise ModelError("Pad on the batch axis is not supported")


@register("Pad", role=AFFINE, check=data_first_rest_constant, canonical=_pad_canonical,
          notes="constant mode and pads (negative pads crop), not on the batch axis")
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

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        assert g is not None
        # the adjoint of padding by p is padding by −p with zeros (negative pads crop)
        pads = b.const(-np.array(node.attrs["pads"], np.int64))
        dx = b.op("Pad", [g, pads, b.const(np.zeros((), np.float32))], mode="constant")
        return [dx] + [None] * (len(node.inputs) - 1)
