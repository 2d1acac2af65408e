"""Elementwise ops: affine arithmetic with constants (Add, Sub, Mul, Div, Sum), merges of
computed tensors (Add/Sum), pass-throughs (Identity, Dropout, Cast) and gates (Relu,
LeakyRelu, PRelu, Clip, Max(x, 0)) frozen at the recorded slopes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import helper

from ..errors import ModelError
from ..ir import AFFINE, GATE, Node
from . import Ctx, register, unbroadcast
from .attrs import FLOAT_TYPES, const_input, constant_weights, data_first, is_data, not_bilinear

Array = np.ndarray


def _full(ctx: Ctx, i: int, rows: int) -> tuple[int, ...]:
    return (rows,) + tuple(ctx.in_shapes[i] or ())


def _cast(v: Array, like: Array) -> Array:
    return v.astype(like.dtype, copy=False)


@register("Add", "Sum", role=AFFINE, merges=True,
          notes="with constants; of two or more computed tensors a merge (residual connections)")
@register("Sub", role=AFFINE, notes="with a constant, or of two computed tensors")
class AddSub:
    """Y = A + B (Sub: A − B; Sum: Σ inputs), numpy broadcasting; constants add an offset.
    Adjoint: each computed input gets ±Ȳ summed over the axes it was broadcast along.
    https://onnx.ai/onnx/operators/onnx__Add.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        like = next(x for x, d in zip(inputs, node.data) if d)
        assert like is not None
        vals = [_cast(v, like) for v in inputs if v is not None]
        if node.op_type == "Sub":
            return [vals[0] - vals[1]]
        y = vals[0]
        for v in vals[1:]:
            y = y + v
        return [y]

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        out: list[Array | None] = []
        for i, d in enumerate(node.data):
            if not d:
                out.append(None)
                continue
            gi = -g if node.op_type == "Sub" and i == 1 else g
            out.append(unbroadcast(gi, _full(ctx, i, g.shape[0])))
        return out

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        assert g is not None
        out: list[str | None] = []
        for i, d in enumerate(node.data):
            gi = b.op("Neg", [g]) if d and node.op_type == "Sub" and i == 1 else g
            out.append(b.unbroadcast(gi, ctx.out_shapes[0], ctx.in_shapes[i]) if d else None)
        return out


def _div_check(node: Node) -> str:
    if sum(node.data) > 1 or not is_data(node, 0):
        return "Div by a computed tensor is not linear"
    return ""


@register("Mul", role=AFFINE, check=not_bilinear, notes="with a constant")
@register("Div", role=AFFINE, check=_div_check, notes="by a constant")
class MulDiv:
    """Y = X·c or X/c with c constant (broadcast). Adjoint: X̄ = Ȳ·c (Ȳ/c), un-broadcast.
    https://onnx.ai/onnx/operators/onnx__Mul.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        a, b = inputs
        assert a is not None and b is not None
        like = a if node.data[0] else b
        a, b = _cast(a, like), _cast(b, like)
        return [a * b if node.op_type == "Mul" else a / b]

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        i = 0 if node.data[0] else 1
        c = ctx.const[1 - i]
        assert c is not None
        c = _cast(c, g)
        gi = g * c if node.op_type == "Mul" else g / c
        out: list[Array | None] = [None, None]
        out[i] = unbroadcast(gi, _full(ctx, i, g.shape[0]))
        return out

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        assert g is not None
        i = 0 if node.data[0] else 1
        c = ctx.const[1 - i]
        assert c is not None
        gi = b.op(node.op_type, [g, b.const(np.asarray(c, np.float32))])
        out: list[str | None] = [None, None]
        out[i] = b.unbroadcast(gi, ctx.out_shapes[0], ctx.in_shapes[i])
        return out


def _dropout_canonical(
    node: Node, a: dict[str, Any], consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    if node.opset >= 12:
        tm = const_input(node, 2, consts)
        if tm is not None and bool(np.asarray(tm).reshape(-1)[0]):
            raise ModelError("Dropout in training mode")


def _cast_canonical(
    node: Node, a: dict[str, Any], consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    if a["to"] not in FLOAT_TYPES:
        raise ModelError(
            f"Cast to {helper.tensor_dtype_to_np_dtype(a['to'])} is not a float type"
        )


@register("Identity", role=AFFINE, check=data_first, notes="dropped by a pass")
@register("Dropout", role=AFFINE, check=data_first, canonical=_dropout_canonical, notes="inference")
@register("Cast", role=AFFINE, check=data_first, canonical=_cast_canonical, notes="between float types")
class PassThrough:
    """Y = X (Dropout in inference; Cast between float types is the identity on values up to
    rounding, and the engine keeps one dtype). Adjoint: X̄ = Ȳ.
    https://onnx.ai/onnx/operators/onnx__Dropout.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x = inputs[0]
        assert x is not None
        extra = [np.ones(x.shape, bool)] if node.op_type == "Dropout" and len(node.outputs) > 1 else []
        return [x] + extra

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        return [cots[0]] + [None] * (len(node.inputs) - 1)

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        return [cots[0]] + [None] * (len(node.inputs) - 1)


@dataclass(frozen=True)
class GateState:
    """A gate frozen at the recorded pre-activations z: h = slope·z + offset elementwise."""

    slope: Array  # (n, *s)
    offset: Array | None  # (n, *s), nonzero only where Clip holds a unit at a bound
    value: Array  # h at the recorded pass, (n, *s)


def _gate_params(node: Node, z: Array, ctx: Ctx) -> tuple[Array, Array | None]:
    op = node.op_type
    pos = z > 0
    if op in ("Relu", "Max"):
        return pos.astype(z.dtype), None
    if op == "LeakyRelu":
        return np.where(pos, 1.0, float(node.attrs.get("alpha", 0.01))).astype(z.dtype), None
    if op == "PRelu":
        c = ctx.const[1]
        assert c is not None
        return np.where(pos, np.ones((), z.dtype), _cast(c, z)).astype(z.dtype), None
    if op == "Clip":
        lo, hi = float(node.attrs["min"]), float(node.attrs["max"])
        inside = (z > lo) & (z < hi)
        slope = inside.astype(z.dtype)
        # the bound where a unit is held at one (clip(z) is exactly that bound), ±0 inside;
        # None when every held unit sits at a zero bound (ReLU6 below its top, the common
        # case): one test per nonzero bound instead of building the offset (a fifth of IG-32's
        # time on MobileNet-V2). np.where on a mixed mask is slow (45 ms for 38 MB, the
        # product 7 ms): nested np.where in float64 took a third of IG-32's time there.
        if lo < hi and not (lo != 0 and np.any(z <= lo)) and not (hi != 0 and np.any(z >= hi)):
            return slope, None
        offset = np.clip(z, lo, hi) * ~inside
        return slope, (offset if np.any(offset) else None)
    raise KeyError(op)


def _data_index(node: Node) -> int:
    return next(i for i, d in enumerate(node.data) if d)


def _clip_check(node: Node) -> str:
    if sum(node.data) > 1:
        return "Clip of computed tensors is not supported (needs constant bounds)"
    return data_first(node)


def _clip_canonical(
    node: Node, a: dict[str, Any], consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    if node.opset >= 11:
        lo = const_input(node, 1, consts)
        hi = const_input(node, 2, consts)
        for key, bound, default in (("min", lo, -np.inf), ("max", hi, np.inf)):
            if bound is not None and bound.size != 1:
                raise ModelError(f"Clip {key} has shape {bound.shape}; it must hold one value")
            a[key] = float(bound.reshape(-1)[0]) if bound is not None else default
    else:
        a["min"] = float(a.get("min", -3.4028234663852886e38))
        a["max"] = float(a.get("max", 3.4028234663852886e38))


def _max_check(node: Node) -> str:
    if sum(node.data) > 1:
        return "Max of computed tensors is not supported (needs constant bounds)"
    if len([i for i in node.inputs if i]) != 2:
        return "Max is supported with exactly two operands (x, 0)"
    return ""


def _max_canonical(
    node: Node, a: dict[str, Any], consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    const_i = [i for i, d in enumerate(node.data) if not d and node.inputs[i]]
    c = const_input(node, const_i[0], consts) if const_i else None
    if c is None or np.any(c != 0):
        raise ModelError("Max is supported only as Max(x, 0)")


@register("Relu", "LeakyRelu", role=GATE, check=data_first, notes="z = 0 counts as off")
@register("PRelu", role=GATE, check=constant_weights, notes="constant slopes")
@register("Clip", role=GATE, check=_clip_check, canonical=_clip_canonical,
          notes="constant bounds (ReLU6 = Clip(0, 6)); a unit held at a bound contributes the bound")
@register("Max", role=GATE, check=_max_check, canonical=_max_canonical, notes="only Max(x, 0)")
class Gate:
    """Gates: Relu, LeakyRelu(α), PRelu(slope), Clip(min, max) and Max(x, 0).
    Frozen at the recorded z: Y = slope·X + offset (offset = the bound where Clip saturates).
    Policy: z = 0 counts as off (slope 0, or α). Adjoint: X̄ = slope·Ȳ.
    https://onnx.ai/onnx/operators/onnx__Relu.html"""

    @staticmethod
    def record(node: Node, inputs: list[Array | None], ctx: Ctx) -> GateState:
        z = inputs[_data_index(node)]
        assert z is not None
        slope, offset = _gate_params(node, z, ctx)
        value = slope * z if offset is None else slope * z + offset
        return GateState(slope, offset, value)

    @staticmethod
    def output_tells_slope(node: Node, ctx: Ctx) -> bool:
        """True when h alone gives the slope: h > 0 exactly where z > 0 (positive negative-side
        slopes), and Clip's h sits strictly inside its bounds exactly where z does."""
        if node.op_type == "LeakyRelu":
            return float(node.attrs.get("alpha", 0.01)) > 0
        if node.op_type == "PRelu":
            c = ctx.const[1]
            return c is not None and bool(np.all(c > 0))
        return True

    @staticmethod
    def record_output(node: Node, h: Array, ctx: Ctx) -> GateState:
        """The frozen state from the recorded gate output h (see :meth:`output_tells_slope`)."""
        # h > 0 exactly where z > 0, and Clip's h is inside its bounds exactly where z is (its
        # bound elsewhere): slopes and offsets follow from h as from z
        slope, offset = _gate_params(node, h, ctx)
        return GateState(slope, offset, h)

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        i = _data_index(node)
        z = inputs[i]
        assert z is not None
        if ctx.state is None:
            return [Gate.record(node, inputs, ctx).value]
        st: GateState = ctx.state
        zm = ctx.per_sample(z)
        y = zm * st.slope
        if st.offset is not None:
            y = y + st.offset
        return [y.reshape(z.shape)]

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        st: GateState = ctx.state
        out: list[Array | None] = [None] * len(node.inputs)
        out[_data_index(node)] = (ctx.per_sample(g) * st.slope).reshape(g.shape)
        return out

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        assert g is not None
        out: list[str | None] = [None] * len(node.inputs)
        out[_data_index(node)] = b.op("Mul", [g, b.state(node.name, "slope", lambda st: st.slope)])
        return out
