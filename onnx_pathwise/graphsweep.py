"""The pathwise selection as one onnxruntime graph, resident on the device (docs/design.md §4,
"The selection on the device").

The host sweep (:class:`onnx_pathwise.pathwise.PathSweep`) runs each op's adjoint as its own
onnxruntime or numpy call and selects units in numpy, so on CUDA every layer's K cotangents go
to the host and back. Here one ONNX graph, built once per model and set of path layers, does
the whole selection in onnxruntime: from the score seeds of one sample it carries every
competing row down to the lowest path layer, each op's adjoint written by its rule (``emit``,
:mod:`onnx_pathwise.rules`), and at each path layer it scores the units in float64 and keeps
them as :func:`onnx_pathwise.selection.select_units` does: P_i = softmax_k(h_i·J_ik)[c] > 1/K,
the first ``width`` by P (ties to the lower index), or the first unit by P when none favours the
target. Its inputs are the sample's seeds and recorded state (gate slopes, path-layer outputs,
max-pool argmax), copied to the device once; its outputs are the kept-unit masks, copied back.
W_p and b_p then come from the host's sweep of the target's row alone with those masks, so for
the same masks the explanation is the host's, bit for bit.

The scores follow the host's formula (:func:`onnx_pathwise.scores.unit_excess`: log1p of the
mean expm1, exact near P = 1/K), ONNX having neither: expm1(d) = 2·tanh(d/2)/(1 − tanh(d/2))
and log1p by Kahan's form; they agree with numpy's to a few ulps, so only a unit whose P lies
that close to 1/K could be decided differently. The tests compare the kept units with the
host's on every model. On the CPU provider the graph is several times slower than the host sweep (onnxruntime's
float64 element-wise kernels; benchmarks/README.md), so ``auto`` uses it on CUDA only.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import limits, runtime
from .engine import Engine, Record
from .errors import PathwiseError
from .rules import RULES

#: ``auto`` (the graph on CUDA, the host sweep on the CPU), ``graph`` or ``host``: which selection
#: a pathwise sweep runs; read at each sweep (tests and benchmarks set it).
ENV_VAR = "ONNX_PATHWISE_SELECTION"
MODES = ("auto", "graph", "host")
#: Constants at least this large are handed to onnxruntime from the arrays, not copied into the graph.
SHARED_BYTES = 1 << 16
#: Bytes per competing row and element while the graph runs: the float32 cotangents held at
#: once (the sweep's ``_live_max``) and ``LARGEST_EXTRA`` more of the largest tensor (a sum at a
#: fan-out, a cut copy, a max-pool adjoint's zeros and int64 routing). Measured on the CPU
#: provider, K = 100, scores in small slices, peak RSS without heap reuse: ResNet-18 1.43 GB,
#: MobileNet-V2 1.58 GB, where this gives 1.28 GB and 1.93 GB with the process's own record
#: and one-row sweep beside it; not measured on a device (cuDNN's workspaces come on top).
BYTES_PER_ROW_UNIT = 4
LARGEST_EXTRA = 3
#: The scores' float64 temporaries alive at once per row and unit: the products until the
#: shifted values exist, then tanh's two steps and their quotient, three at most since each
#: slice's maximum waits for its test (:meth:`Builder._scores`), four counted; and the most
#: they may take: a layer is scored in slices of units, one slice after another.
SCORE_BYTES_PER_ROW_UNIT = 8 * 4
SCORE_SLICE_BYTES = 1 << 31
OPSET = 17
_FLOAT = onnx.TensorProto.FLOAT
_DOUBLE = onnx.TensorProto.DOUBLE


def mode() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise PathwiseError(f"{ENV_VAR}={value!r}: expected one of {', '.join(MODES)}")
    return value


@dataclass(frozen=True)
class _Feed:
    """A graph input fed, per sample, from a node's recorded state."""

    name: str
    node: str
    get: Callable[[Any], np.ndarray]
    dtype: np.dtype


class Builder:
    """What a rule's ``emit`` writes into: the nodes, constants and state inputs of one graph
    whose tensors hold the rows of one sample, (rows, *per-sample shape)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shared: dict[str, np.ndarray] = {}
        self.feeds: list[_Feed] = []
        #: path layer → slices of units its scores go in (:meth:`select`)
        self.slices: dict[str, int] = {}
        self._ids = itertools.count()

    def _name(self, hint: str) -> str:
        return f"{hint}_{next(self._ids)}"

    def ops(self, op_type: str, inputs: Sequence[str], count: int, **attrs: Any) -> list[str]:
        outs = [self._name(op_type) for _ in range(count)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs

    def op(self, op_type: str, inputs: Sequence[str], **attrs: Any) -> str:
        return self.ops(op_type, inputs, 1, **attrs)[0]

    def const(self, value: Any, hint: str = "const") -> str:
        a = np.array(value, order="C", copy=None)  # ascontiguousarray would make scalars 1-D
        name = self._name(hint)
        if a.nbytes >= SHARED_BYTES:
            self.shared[name] = a
            self.initializers.append(runtime.shared_initializer(name, a))
        else:
            self.initializers.append(numpy_helper.from_array(a, name))
        return name

    def state(self, node: str, key: str, get: Callable[[Any], np.ndarray], dtype: Any = np.float32) -> str:
        """A graph input holding ``get(state)`` of ``node``'s recorded state, for one sample."""
        name = f"{key}:{node}"
        self.feeds.append(_Feed(name, node, get, np.dtype(dtype)))
        return name

    def zero(self) -> onnx.TensorProto:
        """ConstantOfShape's ``value``: one float32 zero."""
        return helper.make_tensor("", _FLOAT, [1], [0.0])

    def shape(self, per_sample: Sequence[int] | None) -> str:
        """The shape (-1, *per_sample) as a constant, for Reshape."""
        return self.const(np.array((-1,) + tuple(per_sample or ()), np.int64), "shape")

    def rows_shape(self, like: str, per_sample: Sequence[int]) -> str:
        """The shape (rows of ``like``, *per_sample), computed in the graph."""
        rows = self.op("Slice", [self.op("Shape", [like]), self.const(np.array([0])), self.const(np.array([1]))])
        return self.op("Concat", [rows, self.const(np.array(per_sample, np.int64))], axis=0)

    def unbroadcast(self, g: str, have: Sequence[int] | None, want: Sequence[int] | None) -> str:
        """Sum ``g`` (rows, *have) over the axes an input of per-sample shape ``want`` was
        broadcast along (same rank: every computed tensor has the rows axis)."""
        have, want = tuple(have or ()), tuple(want or ())
        if have == want:
            return g
        if len(have) != len(want):
            raise NotImplementedError("broadcasting across ranks")
        axes = [i + 1 for i, (h, w) in enumerate(zip(have, want)) if w == 1 and h != 1]
        return self.op("ReduceSum", [g, self.const(np.array(axes, np.int64))], keepdims=1)

    def conv_adjoint(self, g: str, w: np.ndarray, out_spatial: Sequence[int], in_spatial: Sequence[int],
                     strides: Sequence[int], dilations: Sequence[int], pads: Sequence[int], group: int) -> str:
        """The adjoint of a Conv with weights ``w`` with respect to its input, as the host's
        kernels run it (:func:`onnx_pathwise.runtime.adjoint_geometry`)."""
        try:
            op, attrs = runtime.adjoint_geometry(w.shape, out_spatial, in_spatial, strides, dilations, pads, group)
        except ValueError as exc:
            raise NotImplementedError(str(exc)) from None
        weights = runtime.flipped(w, group) if op == "Conv" else w
        return self.op(op, [g, self.const(weights, "w")], **attrs)

    def model(self, inputs: Sequence[tuple[str, int]], outputs: Sequence[str], output_type: int = _FLOAT,
              ) -> onnx.ModelProto:
        """The graph written so far: ``inputs`` (name, element type), then the state inputs."""
        values = [helper.make_tensor_value_info(name, kind, None) for name, kind in inputs]
        values += [helper.make_tensor_value_info(f.name, helper.np_dtype_to_tensor_dtype(f.dtype), None)
                   for f in self.feeds]
        results = [helper.make_tensor_value_info(name, output_type, None) for name in outputs]
        graph = helper.make_graph(self.nodes, "pathwise_selection", values, results, initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        return model

    # ------------------------------------------------------------------ selection

    def select(self, g: str, node: str, units: int, width: int, target: str, zero_row: bool = False,
               rows_max: int = 1) -> tuple[str, str]:
        """The kept-unit mask (1, u) of a path layer from the cotangents g (rows, *s) arriving
        at its gate, and those cotangents with the other units cut (rows, u). With ``zero_row``
        (a single score) a row of zeros is scored before the swept ones (as ``select_units`` with ``zero_row``).
        The float64 scores go in slices of units small enough that ``rows_max`` rows of a
        slice's temporaries take at most ``SCORE_SLICE_BYTES``: each unit's score is its own."""
        G = self.op("Reshape", [g, self.const(np.array([-1, units], np.int64))])
        h = self.op("Reshape", [self.state(node, "value", lambda st: st.value),
                                self.const(np.array([1, units], np.int64))])
        J = G
        if zero_row:
            zeros = self.op("ConstantOfShape", [self.const(np.array([1, units], np.int64))],
                            value=helper.make_tensor("", _FLOAT, [1], [0.0]))
            J = self.op("Concat", [zeros, G], axis=0)
        rows = self.op("Cast", [self.op("Shape", [J], start=0, end=1)], to=_DOUBLE)  # K, as a (1,) tensor
        step = max(1, SCORE_SLICE_BYTES // (SCORE_BYTES_PER_ROW_UNIT * max(1, rows_max)))
        parts: list[tuple[str, str]] = []
        after = None  # slices run one after another: each starts once the last one's results exist
        for a in range(0, units, step):
            if parts:
                after = self._zero_after(parts[-1])
            parts.append(self._scores(J, h, target, rows, a, min(units, a + step), units, after))
        self.slices[node] = len(parts)
        if len(parts) == 1:
            (test, e), = parts
        else:
            test = self.op("Concat", [t for t, _ in parts], axis=1)
            e = self.op("Concat", [x for _, x in parts], axis=1)
        axis0 = self.const(np.array([0], np.int64))
        candidate = self.op("And", [test, self.op("Greater", [e, self.const(np.zeros(1))])])
        if width < units:
            scores = self.op("Where", [candidate, e, self.const(np.array([-np.inf]))])
            values, index = self.ops("TopK", [scores, self.const(np.array([width], np.int64))], 2,
                                     axis=1, largest=1, sorted=1)
            kept = self.op("Cast", [self.op("Greater", [values, self.const(np.zeros(1))])], to=_FLOAT)
            zeros = self.op("ConstantOfShape", [self.const(np.array([1, units], np.int64))],
                            value=helper.make_tensor("", _FLOAT, [1], [0.0]))
            keep = self.op("ScatterElements", [zeros, index, kept], axis=1)
        else:
            keep = self.op("Cast", [candidate], to=_FLOAT)
        # nobody favours the target: the first unit by P alone (e = log P + log K)
        first = self.op("ArgMax", [e], axis=1, keepdims=1)
        span = self.op("Range", [self.const(np.array(0)), self.const(np.array(units)), self.const(np.array(1))])
        onehot = self.op("Cast", [self.op("Equal", [self.op("Unsqueeze", [span, axis0]), first])], to=_FLOAT)
        some = self.op("Greater", [self.op("ReduceMax", [keep], axes=[1], keepdims=1), self.const(np.zeros(1, np.float32))])
        keep = self.op("Where", [some, keep, onehot])
        return self.op("Cast", [keep], to=onnx.TensorProto.BOOL), self.op("Mul", [G, keep])

    def _zero_after(self, results: Sequence[str], to: int = onnx.TensorProto.INT64) -> str:
        """A zero of element type ``to`` (shape (1,)) computed from ``results`` (of shape (1, m):
        a bool tensor, then float ones): an input that makes onnxruntime run what reads it after
        them, which frees their inputs first (its order would otherwise be free to keep every
        slice's float64 products alive at once). Exact: an index times 0."""
        first = [self.op("ArgMax", [r if i else self.op("Cast", [r], to=_FLOAT)], axis=1, keepdims=0)
                 for i, r in enumerate(results)]
        total = first[0] if len(first) == 1 else self.op("Add", first)
        zero = self.op("Mul", [total, self.const(np.zeros(1, np.int64))])
        return zero if to == onnx.TensorProto.INT64 else self.op("Cast", [zero], to=to)

    def _scores(self, J: str, h: str, target: str, rows: str, a: int, b: int, units: int,
                after: str | None = None) -> tuple[str, str]:
        """The necessary test and the excess e = log(K·P) (both (1, b − a)) of units a … b − 1,
        started once ``after`` (an int64 zero, see :meth:`_zero_after`) exists."""
        if (a, b) != (0, units):
            start = self.const(np.array([a]))
            if after is not None:
                start = self.op("Add", [start, after])
            stop, axis1 = self.const(np.array([b])), self.const(np.array([1]))
            J = self.op("Slice", [J, start, stop, axis1])
            h = self.op("Slice", [h, start, stop, axis1])
        # C/2 = (h/2)·J, exact in float64 (a product of float32s fits a double, halving is
        # exact), so every difference and sum below is exactly half the one of C
        half = self.op("Mul", [self.op("Cast", [h], to=_DOUBLE), self.const(np.array([0.5]))])
        C = self.op("Mul", [self.op("Cast", [J], to=_DOUBLE), half])
        at = self.op("Expand", [target, self.const(np.array([1, b - a], np.int64))])
        axis0 = self.const(np.array([0], np.int64))
        # necessary test (Jensen): P > 1/K needs C_c above the mean over the rows
        mean = self.op("Div", [self.op("ReduceSum", [C, axis0], keepdims=1), rows])
        lead = self.op("GatherElements", [C, at], axis=0)
        test = self.op("Greater", [self.op("Sub", [lead, mean]), self.const(np.zeros(1))])
        # e = log(K·P) = d_c − log1p(mean_k expm1(d_k)) with d = C − max_k C ≤ 0, so that exp
        # never overflows: exact for every spread of d, where log-sum-exp loses the units
        # whose P sits within round-off of 1/K (tiny cotangents: MobileNet-V2's early layers).
        # expm1(d) = 2t/(1 − t) with t = tanh(d/2): within 4 ulps of numpy's expm1 for every
        # d ≤ 0 (1 − t ≥ 1 never cancels), in four passes and no branch. The maximum waits
        # for the test (+ 0), so that C is freed once d exists: at most three float64
        # temporaries per row and unit are alive at once
        top = self.op("Add", [self.op("ReduceMax", [C], axes=[0], keepdims=1), self._zero_after([test], _DOUBLE)])
        t = self.op("Tanh", [self.op("Sub", [C, top])])  # tanh(d/2)
        q = self.op("Div", [t, self.op("Sub", [self.const(np.ones(1)), t])])
        two = self.const(np.array([2.0]))
        total = self.op("Div", [self.op("Mul", [self.op("ReduceSum", [q, axis0], keepdims=1), two]), rows])
        dc = self.op("Mul", [self.op("Sub", [lead, top]), two])
        return test, self.op("Sub", [dc, self._log1p(total)])

    def _log1p(self, y: str) -> str:
        """log(1 + y) to a few ulps for every y > −1 (y·log v / (v − 1) with v = 1 + y)."""
        v = self.op("Add", [y, self.const(np.ones(1))])
        r = self.op("Div", [self.op("Mul", [y, self.op("Log", [v])]), self.op("Sub", [v, self.const(np.ones(1))])])
        return self.op("Where", [self.op("Equal", [v, self.const(np.ones(1))]), y, r])


def _adjoints(engine: Engine, b: Builder, stops: Sequence[str], at_stop: Callable[[str, str, int], str]) -> None:
    """Write into ``b`` the adjoint of every op from the scores (graph input ``seeds``) down to
    the lowest of the gate nodes ``stops``, each op's as its rule's ``emit`` gives it; at each
    stop, ``at_stop(node, g, units)`` gets the cotangents arriving at its output (rows, *s)
    and returns those to carry on with. Raises NotImplementedError where an op has no graph form."""
    ir = engine.ir
    env: dict[str, str] = {ir.output_name: "seeds"}
    remaining = set(stops)
    for node in reversed(engine.nodes):
        if not remaining:
            break  # below the lowest stop nothing is asked for
        cots: list[str | None] = [env.pop(o, None) for o in node.outputs]
        if all(c is None for c in cots):
            continue
        if node.name in remaining and cots[0] is not None:
            units = int(np.prod(ir.shapes[node.outputs[0]], dtype=np.int64))
            cots[0] = b.op("Reshape", [at_stop(node.name, cots[0], units), b.shape(ir.shapes[node.outputs[0]])])
            remaining.discard(node.name)
            if not remaining:
                break
        rule = RULES[node.op_type]
        if rule.emit is None:
            raise NotImplementedError(f"no graph form of {node.op_type} (node {node.name!r})")
        try:
            ins = rule.emit(node, cots, engine.ctx[node.name], b)
        except NotImplementedError as exc:
            raise NotImplementedError(f"{exc} (node {node.name!r}) has no graph form") from None
        for t, d, c in zip(node.inputs, node.data, ins):
            if d and c is not None:
                env[t] = b.op("Add", [env[t], c]) if t in env else c
    if remaining:
        raise NotImplementedError(f"path layers {sorted(remaining)} not reached from the scores")


def _feeds(feeds: Sequence[_Feed], record: Record, i: int) -> dict[str, np.ndarray]:
    """The state inputs of a graph for sample ``i`` of ``record``."""
    return {f.name: np.ascontiguousarray(f.get(record.states[f.node])[i : i + 1], f.dtype) for f in feeds}


class SelectionGraph:
    """The selection graph of one engine and one set of path layers (``widths``: gate node →
    units kept), on ``device``. Raises NotImplementedError, with the op, where some op on the
    way has no ``emit``."""

    def __init__(self, engine: Engine, widths: Mapping[str, int], device: str) -> None:
        self.engine, self.widths = engine, dict(widths)
        ir = engine.ir
        b = Builder()
        self.outputs: dict[str, str] = {}
        units_at: dict[str, int] = {}

        def select(name: str, g: str, units: int) -> str:
            mask, cut = b.select(g, name, units, self.widths[name], "target",
                                 zero_row=ir.num_classes == 1, rows_max=max(2, ir.num_classes))
            self.outputs[name] = mask
            units_at[name] = units
            return cut

        _adjoints(engine, b, list(self.widths), select)
        model = b.model([("seeds", _FLOAT), ("target", onnx.TensorProto.INT64)], list(self.outputs.values()),
                        onnx.TensorProto.BOOL)
        self.feeds = b.feeds
        self.slices = b.slices
        #: the graph itself, its large constants held by the session (for tests and profiles)
        self.model = model
        self.session = runtime.session(model, device, what="creating the pathwise selection graph's session",
                                       shared=b.shared)
        self.units = {name: units_at[name] for name in self.widths}  # every path layer was reached
        self._largest = max(int(np.prod(ir.shapes[t], dtype=np.int64)) for t in ir.shapes)
        #: why a run failed ("" while none has): the sweep then selects on the host
        self.failed = ""

    def fits(self, rows: int, live: int) -> bool:
        """Whether one sample's ``rows`` competing rows fit the memory budget in the graph, with
        ``live`` elements per row of cotangents held at once at most."""
        need = rows * (live + LARGEST_EXTRA * self._largest) * BYTES_PER_ROW_UNIT + SCORE_SLICE_BYTES
        return need <= limits.memory_budget()

    def masks(self, record: Record, classes: np.ndarray, count: np.ndarray, target_row: np.ndarray,
              advance: Callable[[], None] = lambda: None) -> dict[str, np.ndarray]:
        """The kept-unit masks {path layer: (n, u)}: one run per sample (``advance`` after each).
        ``classes`` (M, n): the competing rows' classes (−1: a zero seed), of which the first
        ``count[i]`` compete in sample i; ``target_row`` the target's row."""
        ir = self.engine.ir
        n = record.n
        K = ir.num_classes
        out = {name: np.zeros((n, u), bool) for name, u in self.units.items()}
        names = list(self.outputs.values())
        for i in range(n):
            cls = classes[: int(count[i]), i]
            seeds = np.zeros((cls.size, K), np.float32)
            live = np.flatnonzero(cls >= 0)
            seeds[live, cls[live]] = 1.0
            feeds: dict[str, np.ndarray] = {
                "seeds": seeds.reshape((cls.size,) + ir.shapes[ir.output_name]),
                "target": np.array([[int(target_row[i])]], np.int64),
            }
            feeds.update(_feeds(self.feeds, record, i))
            try:
                results = self.session.run(names, feeds)
            except Exception as exc:
                raise runtime.failure(exc, "running the pathwise selection graph") from None
            for name, mask in zip(self.outputs, results):
                out[name][i] = mask.reshape(-1)
            advance()
        return out


class AdjointGraph:
    """onnxruntime's own backward of the sweep, without any selection: the competing rows
    carried from the scores down to the lowest of the gate nodes ``layers`` by the graph forms
    the selection graph uses (the gates' slopes as recorded, every unit kept), that layer's
    cotangents its output. What onnxruntime takes for the adjoints alone, beside which
    ``benchmarks/realsize.py`` times the whole selection, and an oracle for the rules' graph
    forms against the host's sweep (tests). Raises NotImplementedError as
    :class:`SelectionGraph` does."""

    def __init__(self, engine: Engine, layers: Sequence[str], device: str = "cpu") -> None:
        self.engine = engine
        b = Builder()
        lowest: list[str] = []

        def carry(name: str, g: str, units: int) -> str:
            lowest[:] = [name, g]
            return g

        _adjoints(engine, b, layers, carry)
        #: the lowest of ``layers``: the gate node at whose output the cotangents come out
        self.layer = lowest[0]
        self.feeds = b.feeds
        self.session = runtime.session(b.model([("seeds", _FLOAT)], [lowest[1]]), device,
                                       what="creating the adjoint graph's session", shared=b.shared)

    def cotangents(self, record: Record, i: int, seeds: np.ndarray) -> np.ndarray:
        """The cotangents (rows, *s) arriving at :attr:`layer`'s output for sample ``i`` of
        ``record``, from ``seeds`` (rows, *score shape)."""
        feeds = {"seeds": np.ascontiguousarray(seeds, np.float32), **_feeds(self.feeds, record, i)}
        try:
            return self.session.run(None, feeds)[0]  # type: ignore[no-any-return]
        except Exception as exc:
            raise runtime.failure(exc, "running the adjoint graph") from None
