"""A small interpreter over the input→output cone: frozen forward, forward tangents and the
backward (transpose) sweep.

The backward sweep walks the nodes in reverse of one deterministic topological order,
keeps an environment of cotangents keyed by tensor name, adds on fan-out and knows nothing
about any op: every op-specific step is a rule from :mod:`onnx_pathwise.rules`. Besides the
input cotangent it accumulates the *offset* term ⟨ȳ, c⟩ of every affine node
(c = the node's output at zero input), so one sweep gives both W and b of the frozen network.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from .ir import GATE, ROUTING, ModelIR, Node
from .rules import RULES, Ctx
from .rules.elementwise import Gate, GateState

Array = np.ndarray


@dataclass(frozen=True)
class Through:
    """A hook's answer at a gate without an offset: the cotangent at the gate's data input,
    the gate's own transpose (× slope) already applied, so the sweep skips it."""

    cotangent: Array


#: A hook sees the cotangents (m, n, *s) arriving at a node's first output and returns them
#: (possibly masked) before the node's offset and transpose are applied, or, at a gate, a
#: :class:`Through` that replaces the gate's transpose.
Hook = Callable[[Node, Array], "Array | Through"]
InputHook = Callable[[Any, Array], Array]


#: Sweeps up to this many rows run numpy's BLAS on one thread (its matrices are small).
SMALL_SWEEP_ROWS = 256


@functools.lru_cache(maxsize=1)
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


_single_blas = threading.local()


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """A context in which numpy's BLAS runs on one thread.

    The sweep's BLAS calls are small (K rows); OpenBLAS worker threads that busy-wait after
    them take the cores from onnxruntime's kernels that run next (measured: 120 → 100 ms per
    explanation of a VGG-style net on 2 cores). Inside one such context a nested one costs
    nothing: setting the limit costs 0.1 ms, 0.3 s over the 3,400 sweeps of a class-chunked
    ResNet-18 selection at K = 1,000, which now sets it once.
    """
    if getattr(_single_blas, "on", False):
        yield
        return
    with _blas().limit(limits=1, user_api="blas"):
        _single_blas.on = True
        try:
            yield
        finally:
            _single_blas.on = False


def blas_for(rows: int) -> contextlib.AbstractContextManager[None]:
    """The BLAS threads for a sweep of ``rows`` rows: one up to :data:`SMALL_SWEEP_ROWS`
    (:func:`single_threaded_blas`), else numpy's own."""
    return single_threaded_blas() if rows <= SMALL_SWEEP_ROWS else contextlib.nullcontext()


def _rows_of(c: Array, rows: Array | None) -> Array:
    """c (m, n, k) → c itself, or (1, n, k) holding row rows[i] of each sample i."""
    if rows is None:
        return c
    return c[rows, np.arange(c.shape[1])][None]


class RuleError(RuntimeError):
    """A rule returned something of the wrong arity or shape: a bug, reported with its node."""


@dataclass(frozen=True)
class Record:
    """The activation record at a batch x: every gate's and routing node's frozen state and
    the explained scores, from one onnxruntime forward pass."""

    x: Array
    scores: Array  # (n, K)
    states: Mapping[str, Any]
    preactivations: Mapping[str, Array]  # gate node name → z (n, *s)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


class Engine:
    """Frozen-network numerics for one :class:`ModelIR`."""

    def __init__(self, ir: ModelIR, kernels: Any = None, dtype: Any = np.float32) -> None:
        self.ir = ir
        self.dtype = np.dtype(dtype)
        self.kernels = kernels
        self.nodes = list(ir.nodes)
        self.ctx: dict[str, Ctx] = {}
        for node in self.nodes:
            if node.op_type not in RULES:
                raise KeyError(f"no rule for {node.op_type}")
            self.ctx[node.name] = Ctx(
                n=1,
                in_shapes=tuple(ir.shapes.get(t) if d else None for t, d in zip(node.inputs, node.data)),
                out_shapes=tuple(ir.shapes.get(t) for t in node.outputs),
                const=tuple(
                    None if d or not t else ir.constants[t] for t, d in zip(node.inputs, node.data)
                ),
                kernels=kernels,
            )
        self.gate_nodes = [n for n in self.nodes if n.role == GATE]
        self.routing_nodes = [n for n in self.nodes if n.role == ROUTING]
        first = next((i for i, n in enumerate(self.nodes) if n.role in (GATE, ROUTING)), 0)
        #: the last node before the first gate or routing node, or None when none comes before:
        #: the transpose sweep from there down is the same linear map at every input
        self.linear_base: str | None = self.nodes[first - 1].name if first > 0 else None
        self.offsets = self._static_offsets()

    # ------------------------------------------------------------------ helpers

    def _ctx(self, node: Node, n: int, state: Any = None) -> Ctx:
        c = self.ctx[node.name]
        # the constructor, not dataclasses.replace: this runs once per node per sweep
        return Ctx(n, c.in_shapes, c.out_shapes, c.const, state, c.kernels)

    def _inputs(self, node: Node, env: Mapping[str, Array]) -> list[Array | None]:
        out: list[Array | None] = []
        for t, d in zip(node.inputs, node.data):
            if d:
                out.append(env[t])
            elif t:
                out.append(self.ir.constants[t])
            else:
                out.append(None)
        return out

    def _static_offsets(self) -> dict[str, list[Array | None]]:
        """c = node(0) for every non-gate node, in float64, None where it is zero."""
        offsets: dict[str, list[Array | None]] = {}
        for node in self.nodes:
            if node.role in (GATE, ROUTING):
                continue
            rule = RULES[node.op_type]
            if rule.at_zero is not None:
                outs = rule.at_zero(node, self._ctx(node, 1))
            else:
                env = {t: np.zeros((1,) + self.ir.shapes[t], np.float64) for t in node.data_inputs}
                outs = rule.forward(node, self._inputs(node, env), self._ctx(node, 1))
            offsets[node.name] = [
                o.astype(self.dtype) if o.size and np.any(o != 0) else None for o in outs
            ]
        return offsets

    # ------------------------------------------------------------------ record

    def states_from(self, values: Mapping[str, Array]) -> tuple[dict[str, Any], dict[str, Array]]:
        """Frozen states from recorded values: each gate's input z when it was recorded (the
        pre-activations are then returned too), else its output h; routing nodes' inputs."""
        states: dict[str, Any] = {}
        pre: dict[str, Array] = {}
        for node in self.gate_nodes + self.routing_nodes:
            rule = RULES[node.op_type]
            z_name = node.data_inputs[0]
            if node.role == GATE and z_name not in values:
                h = np.asarray(values[node.outputs[0]])
                states[node.name] = Gate.record_output(node, h, self._ctx(node, h.shape[0]))
                continue
            assert rule.record is not None
            env = {t: np.asarray(values[t]) for t in node.data_inputs}
            n = next(iter(env.values())).shape[0]
            states[node.name] = rule.record(node, self._inputs(node, env), self._ctx(node, n))
            if node.role == GATE:
                pre[node.name] = env[z_name]
        return states, pre

    def recorded_tensors(self, preactivations: bool = False) -> list[str]:
        """Tensors the forward record must expose: each gate's output (or its input z when
        ``preactivations`` is asked for, or when the output alone cannot tell the slope),
        routing inputs and the scores. Exposing gate outputs rather than inputs leaves
        onnxruntime free to fuse Conv+Relu (measured: a 4× faster record on a VGG-style net)."""
        names = []
        for node in self.gate_nodes:
            z_name = node.data_inputs[0]
            use_z = preactivations or not Gate.output_tells_slope(node, self._ctx(node, 1))
            names.append(z_name if use_z else node.outputs[0])
        names += [t for n in self.routing_nodes for t in n.data_inputs]
        return list(dict.fromkeys(names + [self.ir.output_name]))

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: Array,
        record: Record | None = None,
        masks: Mapping[str, Array] | None = None,
        keep: bool = False,
    ) -> dict[str, Array]:
        """Evaluate the cone in numpy: at the recorded gates (``record``), or free when None.
        ``masks`` multiplies gate outputs (n, *s) — the masked network of a path."""
        n = x.shape[0]
        env: dict[str, Array] = {self.ir.input_name: x}
        for node in self.nodes:
            state = record.states[node.name] if record is not None and node.name in record.states else None
            outs = RULES[node.op_type].forward(node, self._inputs(node, env), self._ctx(node, n, state))
            if masks is not None and node.name in masks:
                outs[0] = outs[0] * masks[node.name]
            env.update(zip(node.outputs, outs))
        return env if keep else {self.ir.output_name: env[self.ir.output_name]}

    def tangent_env(self, t: Array, record: Record) -> dict[str, Array]:
        """Push tangents t (D, n, *input shape) through the frozen linear part of the network;
        returns every tensor's tangents as rows (D·n, *s)."""
        D, n = t.shape[:2]
        env: dict[str, Array] = {self.ir.input_name: t.reshape((D * n,) + t.shape[2:])}
        for node in self.nodes:
            state = record.states.get(node.name)
            outs = RULES[node.op_type].forward(node, self._inputs(node, env), self._ctx(node, n, state))
            if node.role == GATE:
                st: GateState = state  # type: ignore[assignment]
                if st.offset is not None:
                    outs[0] = (outs[0].reshape((D, n) + outs[0].shape[1:]) - st.offset).reshape(outs[0].shape)
            else:
                for i, off in enumerate(self.offsets.get(node.name, [])):
                    if off is not None:
                        outs[i] = outs[i] - off
            env.update(zip(node.outputs, outs))
        return env

    def tangents(self, t: Array, record: Record) -> dict[str, Array]:
        """Tangents (D, n, *s) of every gate's pre-activation for input tangents t (D, n, ...)."""
        D, n = t.shape[:2]
        env = self.tangent_env(t, record)
        out = {}
        for node in self.gate_nodes:
            z = env[node.data_inputs[0]]
            out[node.name] = z.reshape((D, n) + z.shape[1:])
        return out

    # ------------------------------------------------------------------ backward

    def backward(
        self,
        seeds: Mapping[str, Array],
        record: Record,
        hooks: Mapping[str, Hook] | None = None,
        input_hook: InputHook | None = None,
        bias_rows: Array | None = None,
        narrow_after: str | None = None,
    ) -> tuple[Array, Array]:
        """Transpose sweep from ``seeds`` {tensor: (m, n, *s)} down to the input.

        Returns (cotangent at the input (m, n, *input shape), offset term (m, n)): for seeds
        at the scores, W and b of the frozen network's scores. With ``bias_rows`` (one row
        index per sample) the offset term is accumulated for those rows only and comes back
        as (1, n). With ``narrow_after`` too (a node name, or "" for the seeds themselves), the
        sweep keeps only those rows once that node is done: the rows below need no other
        cotangent, and the input cotangent comes back as (1, n, *input shape). A hook at that
        node may answer with those rows alone (1, n, *s): the sweep is narrowed before the
        node's own transpose.
        """
        with blas_for(next(iter(seeds.values())).shape[0] * record.n):
            return self._backward(seeds, record, hooks, input_hook, bias_rows, narrow_after)

    def backward_to(
        self, seeds: Mapping[str, Array], record: Record, stop_before: str, hooks: Mapping[str, Hook] | None = None,
    ) -> dict[str, Array]:
        """The transpose sweep from ``seeds`` up to node ``stop_before`` (not run): every
        cotangent pending there, {tensor: (m, n, *s)} — a cut of the graph that is all a later
        sweep needs to resume from (as its seeds), residual branches included."""
        cut: dict[str, Array] = {}
        with blas_for(next(iter(seeds.values())).shape[0] * record.n):
            self._backward(seeds, record, hooks, None, None, None, stop_before, cut)
        return cut

    def _backward(
        self,
        seeds: Mapping[str, Array],
        record: Record,
        hooks: Mapping[str, Hook] | None,
        input_hook: InputHook | None,
        bias_rows: Array | None,
        narrow_after: str | None,
        stop_before: str | None = None,
        cut: dict[str, Array] | None = None,
    ) -> tuple[Array, Array]:
        n = record.n
        m = next(iter(seeds.values())).shape[0]
        rows = m * n
        env: dict[str, Array] = {
            t: np.asarray(s, self.dtype).reshape((rows,) + self.ir.shapes[t]) for t, s in seeds.items()
        }
        bias = np.zeros((m if bias_rows is None else 1, n), np.float64)
        with_offsets = cut is None  # a sweep to a cut returns cotangents only: no offset term

        def narrow() -> None:
            nonlocal m, rows, bias_rows
            assert bias_rows is not None
            for t, c in env.items():
                env[t] = c.reshape((m, n) + c.shape[1:])[bias_rows, np.arange(n)]
            m, rows, bias_rows = 1, n, None

        if narrow_after == "":
            narrow()
        for node in reversed(self.nodes):
            if node.name == stop_before:
                assert cut is not None
                cut.update({t: c.reshape((m, n) + c.shape[1:]) for t, c in env.items()})
                return np.zeros(0, self.dtype), bias
            cots = [env.pop(o, None) for o in node.outputs]
            if all(c is None for c in cots):
                continue
            through: Array | None = None
            narrowed = False
            if hooks is not None and node.name in hooks and cots[0] is not None:
                g = cots[0]
                answer = hooks[node.name](node, g.reshape((m, n) + g.shape[1:]))
                value = answer.cotangent if isinstance(answer, Through) else answer
                if node.name == narrow_after and m > 1 and value.shape[0] == 1:
                    # the hook kept the ``bias_rows`` alone (all the sweep needs below): the
                    # other pending cotangents are narrowed now, not after the node
                    narrow()
                    narrowed = True
                shape = (m * n,) + g.shape[1:]  # gates keep their shape
                if isinstance(answer, Through):
                    through = value.reshape(shape)
                else:
                    cots[0] = value.reshape(shape)
            state = record.states.get(node.name)
            if node.role == GATE:
                st: GateState = state  # type: ignore[assignment]
                if through is not None and st.offset is not None:
                    raise RuleError(f"a hook passed through gate {node.name}, which has an offset")
                if with_offsets and st.offset is not None and cots[0] is not None:
                    sel_g = _rows_of(cots[0].reshape(m, n, -1), bias_rows)
                    bias += np.einsum("mnk,nk->mn", sel_g, st.offset.reshape(n, -1))
            elif with_offsets:
                for c, off in zip(cots, self.offsets.get(node.name, [])):
                    if c is not None and off is not None:
                        sel = _rows_of(c.reshape(m, n, -1), bias_rows)
                        bias += (sel.reshape(-1, sel.shape[2]) @ off.reshape(-1)).reshape(sel.shape[:2])
            if through is not None:
                ins = [through if i == node.data.index(True) else None for i in range(len(node.inputs))]
            else:
                ins = RULES[node.op_type].transpose(node, cots, self._ctx(node, n, state))
            if len(ins) != len(node.inputs):
                raise RuleError(
                    f"rule for {node.name} ({node.op_type}) returned {len(ins)} cotangents "
                    f"for {len(node.inputs)} inputs"
                )
            for t, d, c in zip(node.inputs, node.data, ins):
                if not d:
                    continue
                if c is None:
                    continue
                want = (rows,) + self.ir.shapes[t]
                if c.shape != want:
                    raise RuleError(
                        f"rule for {node.name} ({node.op_type}) returned a cotangent of shape "
                        f"{c.shape} for input {t!r} of shape {want}"
                    )
                env[t] = env[t] + c if t in env else c
            if node.name == narrow_after and not narrowed:
                narrow()
        shape = (m, n) + self.ir.input_shape
        g_in = env.get(self.ir.input_name)
        w = np.zeros(shape, self.dtype) if g_in is None else g_in.reshape(shape)
        if input_hook is not None:
            w = input_hook(None, w)
        return w, bias
