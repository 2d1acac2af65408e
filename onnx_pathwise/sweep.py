"""The shared sweep layer (docs/design.md §8): what every attribution method builds on.

A :class:`Sweep` holds one analysed model's IR, its :class:`~onnx_pathwise.engine.Engine`,
the onnxruntime recorders and op kernels, and the device; it checks inputs, runs the forward
record (``runtime.Recorder`` → ``engine.Record``) and plans how a backward sweep is chunked
within :func:`onnx_pathwise.limits.memory_budget` (samples, then classes). ``slice_record``,
``concat_batches`` and ``record_rows`` are the plumbing the methods share. The API
(:class:`onnx_pathwise.explainer.Explainer`) and the methods (``unwrap``, ``pathwise``,
``explain``, ``decompose``, ``radius``, ``baselines``, ``metrics``) import this module; it
imports nothing above the engine.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from . import graph as graph_mod
from . import graphsweep, limits, runtime
from .engine import Engine, Record
from .errors import InputError, ModelError
from .ir import ModelIR

if TYPE_CHECKING:
    import networkx as nx
    import onnx

#: Rows (cotangents × samples × largest tensor) handled at once in a sweep: 4M float32
#: elements, 16 MB per tensor. Larger sweeps were slower, not faster: tensors over glibc's
#: 32 MB mmap limit come as fresh pages on every allocation (page faults on first touch) and
#: fall out of the caches (measured: a batch of 16 VGG-style explanations 0.99 s with 64M,
#: 0.70 s with 4M; exact Integrated Gradients of two digits 6.3–7.0 s → 3.7–3.8 s).
MAX_SWEEP_ELEMENTS = 1 << 22
#: Rows per class chunk of a pathwise sweep, forced (tests); None: the memory budget decides,
#: and the rows go in chunks only when one sample's competing rows do not fit it.
CLASS_CHUNK_ROWS: int | None = None
#: The share of the budget a class-chunked sweep leaves out of its checkpoints, for what no plan
#: counts: the allocator's slack, the record, the per-unit sums. Checkpoints filling the whole
#: remainder took DenseNet-121 with 1,000 classes under an 8 GiB budget to an 8.1 GiB peak.
CHECKPOINT_HEADROOM = 1 / 16


def slice_record(rec: Record, start: int, stop: int) -> Record:
    """The record of samples start … stop − 1 of a batch's record (no new forward pass)."""
    n = rec.n

    def rows(v: Any) -> Any:
        if isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == n:
            return v[start:stop]
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return dataclasses.replace(v, **{f.name: rows(getattr(v, f.name)) for f in dataclasses.fields(v)})
        return v

    return Record(x=rec.x[start:stop], scores=rec.scores[start:stop],
                  states={k: rows(v) for k, v in rec.states.items()},
                  preactivations={k: v[start:stop] for k, v in rec.preactivations.items()})


def concat_batches(results: Sequence[Any]) -> Any:
    """Concatenate same-typed frozen results of consecutive sample chunks along the batch axis
    (fields whose first axis is the batch; per-sample lists; anything else from the first)."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    n0 = len(first.output)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(first):
        vals = [getattr(r, f.name) for r in results]
        v0 = vals[0]
        if isinstance(v0, np.ndarray) and v0.ndim >= 1 and v0.shape[0] == n0:
            values[f.name] = np.concatenate(vals)
        elif isinstance(v0, list) and len(v0) == n0:
            values[f.name] = [item for v in vals for item in v]
        else:
            values[f.name] = v0
    return dataclasses.replace(first, **values)


def refuse_overflow(what: str, *arrays: np.ndarray) -> None:
    """Every array (n, ...) finite, else :class:`ModelError` naming the first sample that is not:
    finite weights and inputs can still overflow float32 in a product of many layers, and an
    infinite or NaN attribution must never be written as an answer."""
    n = arrays[0].shape[0]
    bad = np.zeros(n, bool)
    for a in arrays:
        bad |= ~np.isfinite(np.asarray(a).reshape(n, -1)).all(axis=1)
    if bad.any():
        raise ModelError(f"{what} of sample {int(np.argmax(bad))} overflows {arrays[0].dtype} (a weight or "
                         "product of weights is too large)")


def _refuse_nonfinite(values: Mapping[str, Any]) -> None:
    """Finite weights and inputs can still overflow: a NaN or infinite recorded value is refused."""
    for name, value in values.items():
        v = np.asarray(value)
        if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
            row = int(np.argwhere(~np.isfinite(v))[0][0]) if v.ndim else 0
            raise ModelError(f"tensor {name!r} is NaN or infinite on sample {row}: the model does not "
                             "compute finite values on this input (a float overflow, or a NaN attribute)")


def record_rows(sweep: Sweep, x: np.ndarray, preactivations: bool = False) -> tuple[Record, dict[str, np.ndarray]]:
    """One onnxruntime forward pass over rows x (already checked): the record and the raw
    recorded values (gate outputs, or inputs with ``preactivations``; max-pool inputs; scores)."""
    values = sweep.recorder_for(preactivations).run(x)
    _refuse_nonfinite(values)
    states, pre = sweep.engine.states_from(values)
    scores = np.asarray(values[sweep.ir.output_name]).reshape(x.shape[0], -1)
    return Record(x=x, scores=scores, states=states, preactivations=pre), values


class Sweep:
    """The forward record and the sweep plumbing of one analysed model (IR after the passes)
    on one device: ``ir``, ``engine``, ``kernels``, ``device``, the recorders."""

    def __init__(self, proto: onnx.ModelProto, ir: ModelIR, device: str,
                 initializers: Mapping[str, np.ndarray] | None = None) -> None:
        self.proto = proto
        #: the loader's arrays of the model's constants, which record sessions share
        self.initializers = initializers
        self.ir = ir
        self.device = device
        self.kernels = runtime.OpKernels(self.device)
        self.engine = Engine(self.ir, kernels=self.kernels)
        self._recorders: dict[bool, runtime.Recorder] = {}
        self._selection: dict[tuple[tuple[str, int], ...], graphsweep.SelectionGraph | None] = {}
        #: why the last selection graph asked for could not be built ("" when it could)
        self.selection_problem = ""

    @cached_property
    def gate_layers(self) -> list[graph_mod.GateLayer]:
        return graph_mod.gate_layers(self.ir)

    @cached_property
    def layer_graph(self) -> nx.DiGraph:
        """networkx.DiGraph of the analysed cone (after folding)."""
        return graph_mod.layer_graph(self.ir)

    @property
    def input_name(self) -> str:
        return self.ir.input_name

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample input shape (without the batch axis)."""
        return self.ir.input_shape

    @property
    def num_classes(self) -> int:
        return self.ir.num_classes

    def check_input(self, x: Any, name: str = "input") -> np.ndarray:
        """Validate and batch an input: shape (with or without the batch axis), float dtype,
        finite values. Returns a C-contiguous array of the model's input dtype."""
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except Exception as exc:
                raise InputError(f"{name}: cannot be read as an array ({exc})") from None
        if x.dtype.kind not in "fiu" or x.dtype == np.bool_:
            raise InputError(f"{name}: dtype {x.dtype} is not numeric; the model takes {self.ir.input_dtype}")
        shape = self.input_shape
        if tuple(x.shape) == shape:
            x = x[None]
        elif tuple(x.shape[1:]) != shape or x.ndim != len(shape) + 1:
            raise InputError(
                f"{name}: shape {tuple(x.shape)} does not fit input {self.input_name!r}: "
                f"expected {shape} or (N, {', '.join(map(str, shape))})"
            )
        if x.shape[0] == 0:
            raise InputError(f"{name}: empty batch")
        if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
            bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            raise InputError(f"{name}: {bad} value(s) are NaN or infinite")
        return np.ascontiguousarray(x, dtype=self.ir.input_dtype)

    def recorder_for(self, preactivations: bool = False) -> runtime.Recorder:
        """The cached session recording the gates' outputs (their inputs too with
        ``preactivations``) and the scores."""
        rec = self._recorders.get(preactivations)
        if rec is None:
            rec = runtime.Recorder(self.proto, self.ir.input_name, self.engine.recorded_tensors(preactivations),
                                   self.device, self.ir.fixed_batch or int(self.ir.batch_fixed), self.initializers)
            self._recorders[preactivations] = rec
        return rec

    def scores(self, x: Any, shrink: bool = True) -> np.ndarray:
        """The explained output of each sample, (N, K): the forward record's pass, of which
        only the scores are copied out and checked, and no gate state is built (for the
        metrics' curves, thousands of inputs: the states were a third of their time). The same
        session as :meth:`record`, so the same bits and no second copy of the model's sessions
        (:meth:`runtime.Recorder.run` for ``shrink``)."""
        x = self.check_input(x)
        values = self.recorder_for().run(x, [self.ir.output_name], shrink=shrink)
        _refuse_nonfinite(values)
        return np.asarray(values[self.ir.output_name]).reshape(x.shape[0], -1)

    def record(self, x: Any, preactivations: bool = False) -> Record:
        """One onnxruntime forward pass: every gate's and max-pool's frozen state, the scores.

        With ``preactivations`` the gates' inputs z are recorded too (``Record.preactivations``,
        needed by the certified radius); otherwise the gates' outputs suffice and onnxruntime
        may fuse each layer with its activation.
        """
        return record_rows(self, self.check_input(x), preactivations)[0]

    @cached_property
    def largest_tensor(self) -> int:
        """Elements per sample of the largest tensor of the cone."""
        return max((int(np.prod(s, dtype=np.int64)) for s in self.ir.shapes.values()), default=1)

    @cached_property
    def _live_max(self) -> int:
        """Elements per sample-row of the most cotangents a sweep holds at once: the largest
        set of tensors that have a processed consumer and an unprocessed producer."""
        nodes = self.engine.nodes
        where = {t: i for i, node in enumerate(nodes) for t in node.outputs}
        last: dict[str, int] = {self.ir.output_name: len(nodes)}
        for i, node in enumerate(nodes):
            for t in node.data_inputs:
                last[t] = max(last.get(t, -1), i)
        size = {t: int(np.prod(self.ir.shapes[t], dtype=np.int64)) for t in last if t in self.ir.shapes}
        best = 0
        for p in range(len(nodes)):
            best = max(best, sum(v for t, v in size.items() if where.get(t, -1) <= p < last[t]))
        return max(best, 1)

    def sweep_bytes(self, rows: int, n: int) -> tuple[float, float]:
        """(bytes per sample-row of a sweep, bytes per sample besides the sweep: the selection's
        float64 sums, the seeds, the record and the results) for ``rows`` competing rows."""
        item = self.engine.dtype.itemsize
        per_row = item * (self._live_max + 3 * self.largest_tensor)
        units = max((g.units for g in self.gate_layers), default=0)
        D = int(np.prod(self.input_shape, dtype=np.int64))
        recorded = sum(g.units for g in self.gate_layers) + sum(
            int(np.prod(self.ir.shapes[node.data_inputs[0]], dtype=np.int64)) for node in self.engine.routing_nodes)
        fixed = 48 * max(units, D) + item * (rows * self.num_classes + 4 * D + 2 * recorded)
        return float(per_row), float(fixed)

    def sweep_plan(self, rows: int, n: int) -> tuple[int, int | None, float]:
        """How a pathwise sweep of ``rows`` competing rows per sample runs within the memory
        budget (docs/design.md §4): (samples per sweep, rows per class chunk or None for all at once,
        bytes left for checkpoints, less ``CHECKPOINT_HEADROOM`` of the budget). All rows at
        once whenever one sample's fit the budget (the speed heuristic then sets the samples);
        otherwise one sample at a time in the largest class chunks that fit (at most
        MAX_SWEEP_ELEMENTS per chunk). Refused, with the estimate, only when one row per chunk
        cannot fit."""
        budget = limits.memory_budget()
        per_row, fixed = self.sweep_bytes(rows, n)
        step = self.sample_chunk(rows)
        fit = int(budget // (rows * per_row + fixed))
        if CLASS_CHUNK_ROWS is None and fit >= 1:
            return max(1, min(step, fit)), None, 0.0
        samples = 1 if CLASS_CHUNK_ROWS is None else min(step, max(1, fit))
        chunk = CLASS_CHUNK_ROWS or int(min(rows, self.class_chunk(1),
                                            (budget - fixed) // per_row))
        if chunk < 1:
            limits.check_fits(fixed + per_row, f"a pathwise sweep ({rows} competing classes, one per chunk)")
        return samples, chunk, budget * (1 - CHECKPOINT_HEADROOM) - samples * (fixed + chunk * per_row)

    def release_sessions(self) -> None:
        """Drop every cached onnxruntime session (the recorders, the op kernels, the selection
        graphs) and what they hold, MLAS's prepacked weights among them; they are built again
        on next use. For a caller about to build a second large model (``audit``)."""
        self._recorders.clear()
        self.kernels.release()
        self.release_selection_graphs()

    @property
    def selection_graphs(self) -> list[graphsweep.SelectionGraph]:
        """The selection graphs built so far (:meth:`selection_graph`), one per set of widths."""
        return [g for g in self._selection.values() if g is not None]

    def release_selection_graphs(self) -> None:
        """Drop the selection graphs and the refusals remembered so far (built or refused again
        on next use): after a change of their settings."""
        self._selection.clear()

    def selection_graph(self, widths: Mapping[str, int], rows: int) -> graphsweep.SelectionGraph | None:
        """The device-resident selection of these path layers (:mod:`onnx_pathwise.graphsweep`),
        built once per set of widths, or None where the host sweep selects: on the CPU (unless
        ``ONNX_PATHWISE_SELECTION=graph``), with ``ONNX_PATHWISE_SELECTION=host``, where some op
        on the way has no graph form or a run of the graph failed (``selection_problem`` says
        which), or where one sample's ``rows`` competing rows would not fit the memory budget
        in the graph."""
        mode = graphsweep.mode()
        if not widths or mode == "host" or (mode == "auto" and self.device != "cuda"):
            return None
        key = tuple(sorted(widths.items()))
        if key not in self._selection:
            try:
                self._selection[key] = graphsweep.SelectionGraph(self.engine, widths, self.device)
                self.selection_problem = ""
            except NotImplementedError as exc:  # attributes without a graph form: the host, quietly
                self._selection[key] = None
                self.selection_problem = str(exc)
            except ModelError as exc:  # onnxruntime refused the graph: the host, saying so once
                print(f"onnx-pathwise: {exc}; selecting on the host instead", file=sys.stderr)
                self._selection[key] = None
                self.selection_problem = str(exc)
        built = self._selection[key]
        if built is not None and built.failed:
            self.selection_problem = built.failed
            return None
        return built if built is not None and built.fits(rows, self._live_max) else None

    def sample_chunk(self, rows_per_sample: int) -> int:
        """Samples per sweep so that rows × largest tensor stays within MAX_SWEEP_ELEMENTS."""
        return max(1, MAX_SWEEP_ELEMENTS // max(1, rows_per_sample * self.largest_tensor))

    def class_chunk(self, n: int) -> int:
        """Rows per sweep of ``n`` samples: the same bound as :meth:`sample_chunk`, with the
        roles of rows and samples swapped."""
        return self.sample_chunk(n)

    def score_seeds(self, classes: np.ndarray, n: int) -> dict[str, np.ndarray]:
        """Seeds e_k at the scores: (len(classes), n, *score shape)."""
        K = self.num_classes
        seed = np.zeros((len(classes), n, K), self.engine.dtype)
        seed[np.arange(len(classes)), :, classes] = 1.0
        return {self.ir.output_name: seed.reshape((len(classes), n) + self.ir.shapes[self.ir.output_name])}
