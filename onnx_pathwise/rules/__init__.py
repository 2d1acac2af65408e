"""The registry of per-op rules: forward (frozen or free) and transpose (adjoint).

Every rule sees arrays whose axis 0 is a *batch of rows*: ``B = m · n`` rows, row ``b``
belonging to sample ``b % n`` (``m`` cotangents or tangents per sample, sample-minor).
Per-sample shapes come from :class:`Ctx`; rules never read opset differences (the
loader canonicalises attributes) and never guess defaults (the schema fills them).

* ``forward(node, inputs, ctx) -> outputs`` — the op at the recorded gates/argmax
  (``ctx.state``), or the real nonlinearity when ``ctx.state`` is None (free mode, used by
  tests and graph passes). Constant inputs arrive as their values.
* ``transpose(node, cotangents, ctx) -> one cotangent per ONNX input`` — ``None`` for
  constant or missing inputs; output cotangents that no path reached arrive as ``None``.
* ``record(node, inputs, ctx) -> state`` — gates and routing only: the frozen state
  (slopes, offsets, argmax) from the values of one recorded forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..ir import Node

Array = np.ndarray
Forward = Callable[[Node, "list[Array | None]", "Ctx"], "list[Array]"]
Transpose = Callable[[Node, "list[Array | None]", "Ctx"], "list[Array | None]"]
Record = Callable[[Node, "list[Array | None]", "Ctx"], Any]


@dataclass(frozen=True)
class Ctx:
    """What a rule may know about its node beyond the attributes."""

    n: int
    in_shapes: tuple[tuple[int, ...] | None, ...]
    out_shapes: tuple[tuple[int, ...] | None, ...]
    const: tuple[Array | None, ...]
    state: Any = None
    kernels: Any = None

    def rows(self, x: Array) -> int:
        return int(x.shape[0])

    def per_sample(self, x: Array) -> Array:
        """View ``(m·n, *s)`` as ``(m, n, *s)``."""
        return x.reshape((x.shape[0] // self.n, self.n) + x.shape[1:])


@dataclass(frozen=True)
class Rule:
    forward: Forward
    transpose: Transpose
    record: Record | None = None
    doc: str = field(default="")


RULES: dict[str, Rule] = {}


def register(*op_types: str, record: Record | None = None) -> Callable[[type], type]:
    """Class decorator: a class with ``forward``/``transpose`` (static) methods becomes a rule."""

    def wrap(cls: type) -> type:
        rule = Rule(getattr(cls, "forward"), getattr(cls, "transpose"),  # noqa: B009 (classes, not instances)
                    getattr(cls, "record", None) or record, cls.__doc__ or "")
        for op in op_types:
            RULES[op] = rule
        return cls

    return wrap


def unbroadcast(cot: Array, target: Sequence[int]) -> Array:
    """Sum ``cot`` down to the shape ``target`` (the adjoint of numpy broadcasting)."""
    target = tuple(target)
    if cot.shape == target:
        return cot
    extra = cot.ndim - len(target)
    if extra > 0:
        cot = cot.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, (c, s) in enumerate(zip(cot.shape, target)) if s == 1 and c != 1)
    if axes:
        cot = cot.sum(axis=axes, keepdims=True)
    return cot.reshape(target)


def rows_shape(x: Array, per_sample: tuple[int, ...] | None) -> tuple[int, ...]:
    assert per_sample is not None
    return (x.shape[0],) + tuple(per_sample)


from . import elementwise, linear, normalization, pooling, shape  # noqa: E402,F401
