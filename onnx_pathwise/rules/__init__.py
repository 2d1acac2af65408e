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
* ``at_zero(node, ctx) -> outputs`` — optional: the outputs, in float64 and for one sample,
  when every computed input is zero (the op's constant term), for ops that can say it
  without running their product: the engine's static offsets otherwise run ``forward`` on
  zeros in float64, which for a Gemm or Conv widens the weights to float64 and multiplies them
  by zero (VGG-16: 3.2 s and 0.8 GB at every load). Equal, bit for bit, to ``forward`` on zeros.
* ``emit(node, cotangents, ctx, builder) -> one cotangent per ONNX input`` — optional: the
  transpose as ONNX nodes, for the selection graph that runs a pathwise sweep inside
  onnxruntime on the device (:mod:`onnx_pathwise.graphsweep`). Cotangents are tensor names of
  shape (rows, *s) for one sample; ``ctx.state`` is None, and the recorded state comes in as
  graph inputs (``builder.state``). An op without it (or an emit that raises
  NotImplementedError for some attributes) keeps its models on the host sweep.

Each entry of :data:`RULES` also says what the loader needs to know about the op
(docs/design.md §9): its ``role`` (and whether it becomes a merge when two or more of its
inputs are computed), the first opset version it covers (``since``; every later version the
onnx package knows is covered too), ``check(node) -> problem`` (structural checks decidable
before any numerics: which inputs must be constant, which must carry the data) and
``canonical(node, attrs, consts, shapes)`` (turns every opset's attributes into the one form
the rule reads, refusing unsupported values with :class:`~onnx_pathwise.errors.ModelError`).
Every module of this package is imported below, so a new family module registers itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..ir import AFFINE, GATE, MERGE, ROUTING, SHAPE, TERMINAL, Node

Array = np.ndarray
Forward = Callable[[Node, "list[Array | None]", "Ctx"], "list[Array]"]
Transpose = Callable[[Node, "list[Array | None]", "Ctx"], "list[Array | None]"]
Record = Callable[[Node, "list[Array | None]", "Ctx"], Any]
AtZero = Callable[[Node, "Ctx"], "list[Array]"]
#: ``emit(node, cotangent names, ctx, builder) -> one cotangent name per input``: the transpose
#: written as ONNX nodes into a :class:`onnx_pathwise.graphsweep.Builder` (duck-typed here).
Emit = Callable[[Node, "list[str | None]", "Ctx", Any], "list[str | None]"]
#: ``check(node) -> problem``: ``node.attrs`` holds the node's own (int, float, string) attributes
#: without schema defaults, ``node.data`` which inputs are computed; "" when nothing is wrong.
Check = Callable[[Node], str]
#: ``canonical(node, attrs, consts, shapes)`` rewrites ``attrs`` (a copy of ``node.attrs`` with
#: schema defaults) in place; ``consts`` maps constant tensors to values, ``shapes`` data
#: tensors to per-sample shapes.
Canonical = Callable[[Node, "dict[str, Any]", Mapping[str, np.ndarray], Mapping[str, "tuple[int, ...]"]], None]


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
    """Everything the tool knows about one ONNX op of the default domain."""

    forward: Forward
    transpose: Transpose
    record: Record | None = None
    doc: str = field(default="")
    op_type: str = ""
    role: str = AFFINE
    since: int = 1
    merges: bool = False
    check: Check | None = None
    canonical: Canonical | None = None
    notes: str = ""
    at_zero: AtZero | None = None
    emit: Emit | None = None

    def node_role(self, data: Sequence[bool]) -> str:
        """The role of a node of this op whose computed inputs are ``data``."""
        return MERGE if self.merges and sum(data) > 1 else self.role


RULES: dict[str, Rule] = {}


def register(
    *op_types: str,
    role: str,
    since: int = 1,
    merges: bool = False,
    check: Check | None = None,
    canonical: Canonical | None = None,
    notes: str = "",
    record: Record | None = None,
) -> Callable[[type], type]:
    """Class decorator: a class with ``forward``/``transpose`` (static) methods becomes the rule
    of ``op_types``, with the role, checks and canonicalisation given (see the module doc).
    Stack several decorators on one class when its ops differ in those."""

    def wrap(cls: type) -> type:
        for op in op_types:
            if op in RULES:
                raise ValueError(f"{op} is registered twice")
            RULES[op] = Rule(getattr(cls, "forward"), getattr(cls, "transpose"),  # noqa: B009 (classes, not instances)
                             getattr(cls, "record", None) or record, cls.__doc__ or "", op, role, since,
                             merges, check, canonical, notes, getattr(cls, "at_zero", None),
                             getattr(cls, "emit", None))
        return cls

    return wrap


def supported_ops() -> dict[str, str]:
    """op_type → role of every op that may sit on the input→output path."""
    return {op: r.role for op, r in RULES.items() if r.role != TERMINAL}


def terminal_ops() -> frozenset[str]:
    """Ops peeled off after the last layer (explanations target their input)."""
    return frozenset(op for op, r in RULES.items() if r.role == TERMINAL)


#: Ops of the default domain that are known not to be piecewise linear (or not linear in the
#: input): a refusal names the reason. Ops neither here nor in RULES are "not supported".
NOT_PIECEWISE_LINEAR = frozenset(
    {
        "Tanh", "Gelu", "Elu", "Selu", "Softplus", "Softsign", "HardSigmoid", "HardSwish",
        "Exp", "Log", "Sqrt", "Pow", "Erf", "LRN", "LpNormalization", "InstanceNormalization",
        "LayerNormalization", "GroupNormalization", "Mish", "Sin", "Cos", "Abs", "Min",
        "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1", "ReduceLogSumExp",
        "Softmax", "LogSoftmax", "Sigmoid", "QuantizeLinear", "DequantizeLinear", "QLinearConv",
        "QLinearMatMul", "ConvInteger", "MatMulInteger", "If", "Loop", "Scan", "Where", "TopK",
        "Round", "Floor", "Ceil", "Sign", "Reciprocal", "Neg",
    }
)


_ROLE_ORDER = (AFFINE, SHAPE, GATE, ROUTING, TERMINAL)


def supported_table() -> str:
    """The README's "Supported operations" table (Markdown), generated from :data:`RULES`."""
    rows = ["| op | role | opsets | notes |", "| --- | --- | --- | --- |"]
    for op, rule in sorted(RULES.items(), key=lambda kv: (_ROLE_ORDER.index(kv[1].role), kv[0])):
        role = f"{rule.role} / merge" if rule.merges else rule.role
        rows.append(f"| {op} | {role} | {rule.since}+ | {rule.notes} |")
    return "\n".join(rows) + "\n"


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


for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
