"""The Python API: ``Explainer(model).unwrap(x)`` and friends.

>>> import numpy as np
>>> from onnx_pathwise import Explainer
>>> from onnx_pathwise.samples import tiny_mlp
>>> ex = Explainer(tiny_mlp(), device="cpu")
>>> [layer.units for layer in ex.gate_layers]
[3]
>>> res = ex.unwrap(np.array([[1.0, 2.0]], np.float32))
>>> res.weight.shape, res.bias.shape
((1, 2, 2), (1, 2))
>>> bool(res.delta.max() < 1e-5)
True
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import networkx as nx
import numpy as np
import onnx

from . import graph as graph_mod
from . import limits, runtime, serde
from .engine import Engine, Record
from .errors import InputError, ModelError, PathwiseError
from .ir import ModelIR
from .passes import run_passes
from .pathwise import Explanation

#: Rows (cotangents × samples × largest tensor) handled at once in a sweep: 4M float32
#: elements, 16 MB per tensor. Larger sweeps were slower, not faster: tensors over glibc's
#: 32 MB mmap limit come as fresh pages on every allocation (page faults on first touch) and
#: fall out of the caches (measured: a batch of 16 VGG-style explanations 0.99 s with 64M,
#: 0.70 s with 4M; exact Integrated Gradients of two digits 6.3–7.0 s → 3.7–3.8 s).
MAX_SWEEP_ELEMENTS = 1 << 22
#: Rows per class chunk of a pathwise sweep, forced (tests); None: the memory budget decides,
#: and the rows go in chunks only when one sample's competing rows do not fit it.
CLASS_CHUNK_ROWS: int | None = None


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


@dataclass(frozen=True)
class UnwrapResult:
    """The local affine model f(x') = W x' + b on the activation region of each sample."""

    weight: np.ndarray  # (N, K, *input shape)
    bias: np.ndarray  # (N, K)
    output: np.ndarray  # (N, K) onnxruntime's explained scores
    delta: np.ndarray  # (N,) max |W x + b − output|

    def __repr__(self) -> str:
        return (f"UnwrapResult(weight={self.weight.shape}, bias={self.bias.shape}, "
                f"max delta={float(self.delta.max(initial=0)):.3g})")


@dataclass(frozen=True)
class RadiusResult:
    """Certified radii: the largest L2 / L∞ balls around x inside its activation region."""

    l2: np.ndarray  # (N,)
    linf: np.ndarray  # (N,)
    l2_unit: list[str]  # the binding unit per sample ("node[index]")
    linf_unit: list[str]


class Explainer:
    """Exact local explanations of a piecewise-linear ONNX model.

    Model in the constructor, data in the call. ``device`` is ``"auto"`` (CUDA when
    onnxruntime can use it, else the CPU), ``"cpu"`` or ``"cuda"``.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | onnx.ModelProto,
        device: str = "auto",
        *,
        input_name: str | None = None,
        output_name: str | None = None,
    ) -> None:
        self.device = runtime.resolve_device(device)
        self.proto, raw_ir = serde.load(model, input_name=input_name, output_name=output_name)
        self.source_ir: ModelIR = raw_ir
        self.ir: ModelIR = run_passes(raw_ir)
        self.kernels = runtime.OpKernels(self.device)
        self.engine = Engine(self.ir, kernels=self.kernels)
        self._recorders: dict[bool, runtime.Recorder] = {}
        #: show a progress bar on stderr while a pathwise sweep goes in class chunks (opt-in)
        self.progress = False

    # ------------------------------------------------------------------ structure

    @cached_property
    def layer_graph(self) -> nx.DiGraph:
        """networkx.DiGraph of the analysed cone (after folding)."""
        return graph_mod.layer_graph(self.ir)

    @cached_property
    def gate_layers(self) -> list[graph_mod.GateLayer]:
        return graph_mod.gate_layers(self.ir)

    @cached_property
    def segments(self) -> list[graph_mod.Segment]:
        return graph_mod.segments(self.ir)

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

    # ------------------------------------------------------------------ data

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

    def _recorder_for(self, preactivations: bool = False) -> runtime.Recorder:
        rec = self._recorders.get(preactivations)
        if rec is None:
            rec = runtime.Recorder(
                self.proto, self.ir.input_name, self.engine.recorded_tensors(preactivations), self.device,
                self.ir.fixed_batch or int(self.ir.batch_fixed),
            )
            self._recorders[preactivations] = rec
        return rec

    def record(self, x: Any, preactivations: bool = False) -> Record:
        """One onnxruntime forward pass: every gate's and max-pool's frozen state, the scores.

        With ``preactivations`` the gates' inputs z are recorded too (``Record.preactivations``,
        needed by the certified radius); otherwise the gates' outputs suffice and onnxruntime
        may fuse each layer with its activation.
        """
        x = self.check_input(x)
        values = self._recorder_for(preactivations).run(x)
        for name, value in values.items():  # finite weights and inputs can still overflow
            v = np.asarray(value)
            if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
                row = int(np.argwhere(~np.isfinite(v))[0][0]) if v.ndim else 0
                raise ModelError(f"tensor {name!r} is NaN or infinite on sample {row}: the model does not "
                                 "compute finite values on this input (a float overflow, or a NaN attribute)")
        states, pre = self.engine.states_from(values)
        scores = np.asarray(values[self.ir.output_name]).reshape(x.shape[0], -1)
        return Record(x=x, scores=scores, states=states, preactivations=pre)

    @cached_property
    def _biggest(self) -> int:
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

    def _sweep_bytes(self, rows: int, n: int) -> tuple[float, float]:
        """(bytes per sample-row of a sweep, bytes per sample besides the sweep: the selection's
        float64 sums, the seeds, the record and the results) for ``rows`` competing rows."""
        item = self.engine.dtype.itemsize
        per_row = item * (self._live_max + 3 * self._biggest)
        units = max((g.units for g in self.gate_layers), default=0)
        D = int(np.prod(self.input_shape, dtype=np.int64))
        recorded = sum(g.units for g in self.gate_layers) + sum(
            int(np.prod(self.ir.shapes[node.data_inputs[0]], dtype=np.int64)) for node in self.engine.routing_nodes)
        fixed = 48 * max(units, D) + item * (rows * self.num_classes + 4 * D + 2 * recorded)
        return float(per_row), float(fixed)

    def _sweep_plan(self, rows: int, n: int) -> tuple[int, int | None, float]:
        """How a pathwise sweep of ``rows`` competing rows per sample runs within the memory
        budget (DESIGN §4): (samples per sweep, rows per class chunk or None for all at once,
        bytes left for checkpoints). All rows at once whenever one sample's fit the budget
        (the speed heuristic then sets the samples); otherwise one sample at a time in the
        largest class chunks that fit (at most MAX_SWEEP_ELEMENTS per chunk). Refused, with
        the estimate, only when one row per chunk cannot fit."""
        from . import limits

        budget = limits.memory_budget()
        per_row, fixed = self._sweep_bytes(rows, n)
        step = self._sample_chunk(rows)
        fit = int(budget // (rows * per_row + fixed))
        if CLASS_CHUNK_ROWS is None and fit >= 1:
            return max(1, min(step, fit)), None, 0.0
        samples = 1 if CLASS_CHUNK_ROWS is None else min(step, max(1, fit))
        chunk = CLASS_CHUNK_ROWS or int(min(rows, max(1, MAX_SWEEP_ELEMENTS // self._biggest),
                                            (budget - fixed) // per_row))
        if chunk < 1:
            limits.check_fits(fixed + per_row, f"a pathwise sweep ({rows} competing classes, one per chunk)")
        return samples, chunk, budget - samples * (fixed + chunk * per_row)

    def _sample_chunk(self, rows_per_sample: int) -> int:
        """Samples per sweep so that rows × largest tensor stays within MAX_SWEEP_ELEMENTS."""
        return max(1, MAX_SWEEP_ELEMENTS // max(1, rows_per_sample * self._biggest))

    def _class_chunk(self, n: int) -> int:
        return max(1, MAX_SWEEP_ELEMENTS // max(1, n * self._biggest))

    def _score_seeds(self, classes: np.ndarray, n: int) -> dict[str, np.ndarray]:
        """Seeds e_k at the scores: (len(classes), n, *score shape)."""
        K = self.num_classes
        seed = np.zeros((len(classes), n, K), self.engine.dtype)
        seed[np.arange(len(classes)), :, classes] = 1.0
        return {self.ir.output_name: seed.reshape((len(classes), n) + self.ir.shapes[self.ir.output_name])}

    def unwrap(self, x: Any, record: Record | None = None) -> UnwrapResult:
        """The local affine model W_x, b_x of every sample, checked against onnxruntime."""
        step = self._sample_chunk(1)
        if record is None:
            xb = self.check_input(x)
            if xb.shape[0] > step:  # bounded memory: one sample chunk at a time
                return concat_batches(  # type: ignore[no-any-return]
                    [self.unwrap(xb[s : s + step]) for s in range(0, xb.shape[0], step)])
        elif record.n > step:  # the same, reusing the recorded forward pass
            return concat_batches(  # type: ignore[no-any-return]
                [self.unwrap(None, record=slice_record(record, s, s + step)) for s in range(0, record.n, step)])
        rec = record if record is not None else self.record(x)
        n, K = rec.scores.shape
        ws, bs = [], []
        step = self._class_chunk(n)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, not warned
            for start in range(0, K, step):
                classes = np.arange(start, min(K, start + step))
                w, b = self.engine.backward(self._score_seeds(classes, n), rec)
                ws.append(w)
                bs.append(b)
            W = np.concatenate(ws).swapaxes(0, 1)  # (n, K, *in)
            b = np.concatenate(bs).T.astype(np.float64)
            fx = np.einsum("nkd,nd->nk", W.reshape(n, K, -1).astype(np.float64),
                           rec.x.reshape(n, -1).astype(np.float64)) + b
        if not (np.all(np.isfinite(W)) and np.all(np.isfinite(fx))):
            bad = int(np.argwhere(~np.isfinite(W.reshape(n, -1)).all(axis=1) | ~np.isfinite(fx).all(axis=1))[0][0])
            raise ModelError(f"the local affine model of sample {bad} overflows {W.dtype} (a weight or "
                             "product of weights is too large)")
        delta = np.abs(fx - rec.scores).max(axis=1)
        return UnwrapResult(W, b.astype(W.dtype), rec.scores, delta)

    def certified_radius(self, x: Any, record: Record | None = None, max_input_size: int = 4096) -> RadiusResult:
        """The largest L2 and L∞ balls around each x inside its activation region (DESIGN §3).

        min over gate units of |z_i − kink| / ‖∇z_i‖₂ (‖∇z_i‖₁ for L∞), and for max pools the
        margin between each window's recorded maximum and every other element of the window over
        the norm of their gradient difference. Costs one forward tangent per input element,
        pushed in chunks that keep memory bounded; inputs larger than ``max_input_size``
        elements must opt in by raising it. The chunks fit the memory budget
        (:func:`onnx_pathwise.limits.memory_budget`); the result does not depend on them.
        """
        from .rules.pooling import _geometry, _window_index

        D = int(np.prod(self.input_shape, dtype=np.int64))
        if D > max_input_size:
            raise InputError(
                f"certified radius needs {D} forward tangents (one per input element); "
                f"pass max_input_size>={D} to opt in"
            )
        rec = record if record is not None and len(record.preactivations) == len(self.gate_layers) else None
        if rec is None:
            rec = self.record(record.x if record is not None else x, preactivations=True)
        n = rec.n
        eng = self.engine
        # squared-L2 and L1 norms of the gradients, accumulated over chunks of input elements
        gates = {g.name: g.data_inputs[0] for g in eng.gate_nodes}
        sq = {name: np.zeros((n, int(np.prod(self.ir.shapes[t], dtype=np.int64)))) for name, t in gates.items()}
        ab = {name: np.zeros_like(v) for name, v in sq.items()}
        pools = []
        for node in eng.routing_nodes:
            src = node.data_inputs[0]
            C = self.ir.shapes[src][0]
            S = int(np.prod(self.ir.shapes[src][1:], dtype=np.int64))
            if node.op_type == "MaxPool":
                table = _window_index(*_geometry(node, eng._ctx(node, n, rec.states[node.name])))
            else:
                table = np.arange(S)[None, :]
            winners = rec.states[node.name].argmax.reshape(n, C, -1)  # (n, C, P) flat input index
            others = table[None, None] + (np.arange(C) * S)[None, :, None, None]  # (1, C, P, K)
            valid = np.broadcast_to(table >= 0, others.shape[1:])
            others = np.where(table >= 0, others, 0)
            shape = (n, C) + table.shape
            pools.append((node, src, winners, others, valid, np.zeros(shape), np.zeros(shape)))
        cols = self._radius_columns(n, D, sq, pools)
        for start in range(0, D, cols):
            # the tangents e_j of this chunk's input elements, built per chunk (never a D×D identity)
            stop = min(D, start + cols)
            t = np.zeros((stop - start, n, D), eng.dtype)
            t[np.arange(stop - start), :, np.arange(start, stop)] = 1.0
            env_t = eng.tangent_env(t.reshape((stop - start, n) + self.input_shape), rec)
            for name, tname in gates.items():
                g = env_t[tname].reshape(stop - start, n, -1).astype(np.float64)
                sq[name] += (g * g).sum(axis=0)
                ab[name] += np.abs(g).sum(axis=0)
            for _node, src, winners, others, _valid, psq, pab in pools:
                tv = env_t[src].reshape(stop - start, n, -1).astype(np.float64)
                for i in range(n):
                    w = tv[:, i][:, winners[i]]  # (d, C, P)
                    dg = w[..., None] - tv[:, i][:, others[0]]  # (d, C, P, K)
                    psq[i] += (dg * dg).sum(axis=0)
                    pab[i] += np.abs(dg).sum(axis=0)
        best2, bestinf = np.full(n, np.inf), np.full(n, np.inf)
        unit2, unitinf = [""] * n, [""] * n

        def consider(r2: np.ndarray, r1: np.ndarray, label: Any) -> None:
            for i in range(n):
                j2, j1 = int(np.argmin(r2[i])), int(np.argmin(r1[i]))
                if r2[i].flat[j2] < best2[i]:
                    best2[i], unit2[i] = r2[i].flat[j2], label(j2)
                if r1[i].flat[j1] < bestinf[i]:
                    bestinf[i], unitinf[i] = r1[i].flat[j1], label(j1)

        with np.errstate(divide="ignore", invalid="ignore"):
            for name in gates:
                z = rec.preactivations[name].reshape(n, -1).astype(np.float64)
                node = self.ir.node(name)
                kinks = [0.0]
                if node.op_type == "Clip":
                    kinks = [k for k in (node.attrs["min"], node.attrs["max"]) if np.isfinite(k)]
                n2, n1 = np.sqrt(sq[name]), ab[name]
                for kink in kinks:
                    margin = np.abs(z - kink)
                    consider(np.where(n2 > 0, margin / n2, np.inf), np.where(n1 > 0, margin / n1, np.inf),
                             lambda j, name=name: f"{name}[{j}]")
            if pools:
                values = eng.forward(rec.x, rec, keep=True)
            for node, src, winners, others, valid, psq, pab in pools:
                v = values[src].reshape(n, -1).astype(np.float64)
                margin = np.stack([v[i][winners[i]][..., None] - v[i][others[0]] for i in range(n)])
                live = valid[None] & (others != winners[..., None]) & (psq > 0)
                n2 = np.sqrt(psq)
                r2 = np.where(live, margin / np.where(live, n2, 1), np.inf)
                r1 = np.where(live, margin / np.where(live, pab, 1), np.inf)
                P = winners.shape[2]
                K = others.shape[3]

                def label(j: int, node: Any = node, P: int = P, K: int = K) -> str:
                    c, rest = divmod(j, P * K)
                    return f"{node.name}[channel {c}, window {rest // K}]"

                consider(r2.reshape(n, -1), r1.reshape(n, -1), label)
        return RadiusResult(best2, bestinf, unit2, unitinf)

    def _radius_columns(self, n: int, D: int, sq: dict[str, np.ndarray], pools: list[Any]) -> int:
        """Input elements whose tangents are pushed at once by :meth:`certified_radius`: as many
        as fit the memory budget next to the accumulators, and no more than a sweep's
        :data:`MAX_SWEEP_ELEMENTS` rows of the largest tensor (larger chunks were not faster).

        Per tangent column and sample: every tensor of the cone (the tangent pass keeps them
        all), the im2col copy of the widest convolution, the float64 copies of the largest
        gate's gradients and of one max pool's window differences. Refuses with the estimate
        (:class:`~onnx_pathwise.limits.BudgetError`) when not even one column fits."""
        itemsize = self.engine.dtype.itemsize
        elements = sum(int(np.prod(s, dtype=np.int64)) for s in self.ir.shapes.values())
        im2col = max((int(np.prod(self.ir.shapes[node.data_inputs[0]], dtype=np.int64))
                      * int(np.prod(node.attrs.get("kernel_shape") or [1], dtype=np.int64))
                      for node in self.engine.nodes if node.op_type in ("Conv", "ConvTranspose")), default=0)
        gate = max([v.shape[1] for v in sq.values()]
                   + [int(np.prod(self.ir.shapes[p[1]], dtype=np.int64)) for p in pools], default=0)
        window = max((int(np.prod(p[3].shape, dtype=np.int64)) for p in pools), default=0)
        per_column = n * ((elements + im2col + D) * itemsize + 3 * gate * 8) + 3 * window * 8
        held = 2 * sum(v.nbytes for v in sq.values()) + sum(
            p[2].nbytes + p[3].nbytes + p[5].nbytes + p[6].nbytes for p in pools)
        limits.check_fits(held + per_column, "the certified radius (accumulators and one input tangent)")
        fit = (limits.memory_budget() - held) // per_column
        return int(max(1, min(D, fit, MAX_SWEEP_ELEMENTS // max(1, n * self._biggest))))

    # ------------------------------------------------------------------ pathwise (DESIGN §4)

    def _path_setup(self, width: Any, depth: int | None) -> tuple[list[Any], dict[str, int]]:
        from .pathwise import parse_width, path_layers

        layers = path_layers(self.gate_layers, depth)
        return layers, {layer.name: parse_width(width, layer.units) for layer in layers}

    def _path_sweep(self, rec: Record, target: Any, width: Any, depth: int | None, input_width: Any,
                    keep_at: str | None = None, classes: int | None = None,
                    ) -> tuple[list[Any], Any, np.ndarray, np.ndarray]:
        """The pathwise sweep (every competing row down to the lowest path layer, in class
        chunks where they do not fit the memory budget): (path layers, the sweep with its
        masks and targets, W_p (n, *in), b_p (n,) of each target)."""
        from .pathwise import PathSweep, competing_set, parse_width, resolve_targets

        layers, widths = self._path_setup(width, depth)
        D = int(np.prod(self.input_shape, dtype=np.int64))
        in_width = parse_width(input_width, D) if input_width is not None else None
        tgt = resolve_targets(target, rec.scores)
        competing = competing_set(rec.scores, tgt, classes)
        _, chunk, store = self._sweep_plan(competing.rows, rec.n)
        sweep = PathSweep(self.engine, layers, rec, tgt, competing, widths, in_width, keep_at=keep_at,
                          chunk=chunk, store_bytes=store, progress=self.progress)
        W, b = sweep.run()
        return layers, sweep, W, b

    def explain(
        self,
        x: Any,
        target: Any = None,
        width: int | str | None = None,
        depth: int | None = None,
        input_width: int | str | None = None,
        record: Record | None = None,
        classes: int | str | None = None,
    ) -> Explanation:
        """Pathwise explanation of each sample (DESIGN §4), one backward sweep per batch chunk.

        ``width``: units kept per path layer (int or ``"5%"``; default all that favour the
        target); ``depth``: how many of the last gate layers are path-constrained (default all;
        0 gives Input×Gradient); ``input_width``: apply the same selection to the input
        elements; ``target``: int, one int per sample, or None for the argmax (for a single
        score y: 0 or 1, the side explained, default 1 where y ≥ 0); ``classes``: the classes
        that compete in each unit's softmax, None or ``"all"`` (every class, exact) or N (the
        top N predicted classes plus the target). Memory stays within the budget at any number
        of classes (DESIGN §4): samples, then classes, go in chunks.

        >>> import numpy as np
        >>> from onnx_pathwise.samples import tiny_mlp
        >>> e = Explainer(tiny_mlp(), device="cpu").explain(np.array([1.0, 2.0], np.float32))
        >>> e.target.tolist(), [p.kept.tolist() for p in e.path[0]]
        ([0], [[0]])
        >>> e.attribution.tolist(), e.masked_score.tolist()
        ([[1.0, 0.0]], [1.5])
        """
        from .pathwise import Explanation, PathLayer, competing_rows, parse_classes

        ncls = parse_classes(classes)
        xb = self.check_input(x) if record is None else record.x
        step, _, _ = self._sweep_plan(competing_rows(ncls, self.num_classes), xb.shape[0])
        if xb.shape[0] > step:  # bounded memory: one sweep per chunk of samples, recorded once
            t = None if target is None else np.asarray(target)
            return concat_batches([  # type: ignore[no-any-return]
                self.explain(xb[s : s + step], t if t is None or t.ndim == 0 else t[s : s + step],
                             width, depth, input_width,
                             record=None if record is None else slice_record(record, s, s + step), classes=ncls)
                for s in range(0, xb.shape[0], step)
            ])
        rec = record if record is not None else self.record(xb)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, not warned
            layers, sweep, weight, bias = self._path_sweep(rec, target, width, depth, input_width, classes=ncls)
            tgt = sweep.target
            n = rec.n
            xf = rec.x.astype(np.float64)
            masked = (weight.reshape(n, -1).astype(np.float64) * xf.reshape(n, -1)).sum(axis=1) + bias
            attribution = (weight * rec.x).astype(weight.dtype)
        if not (np.all(np.isfinite(attribution)) and np.all(np.isfinite(masked))):
            bad = int(np.argwhere(~np.isfinite(attribution.reshape(n, -1)).all(axis=1) | ~np.isfinite(masked))[0][0])
            raise ModelError(f"the pathwise explanation of sample {bad} overflows {weight.dtype} (a weight or "
                             "product of weights is too large)")
        paths = [
            [PathLayer(layer.name, np.flatnonzero(sweep.masks[layer.name][i]), layer.units) for layer in layers]
            for i in range(n)
        ]
        return Explanation(
            attribution=attribution,
            weight=weight,
            bias=bias,
            output=rec.scores,
            target=tgt,
            masked_score=masked,
            path=paths,
            input_kept=sweep.input_mask,
            classes=ncls,
        )

    def decompose(
        self,
        x: Any,
        layer: str | None = None,
        top: int = 8,
        group: str = "unit",
        target: Any = None,
        width: int | str | None = None,
        depth: int | None = None,
        input_width: int | str | None = None,
        classes: int | str | None = None,
    ) -> Decomposition:
        """Split each sample's pathwise attribution into the parts through single units (or
        channels) of one gate layer (default: the last), ranked by their score contribution
        h_u·∂y_c/∂h_u. ``parts`` (top ones) + ``rest`` (the other kept units) + ``bypass``
        (paths that skip the layer, e.g. residual joins) = ``attribution``. ``classes`` as in
        :meth:`explain`."""
        from .pathwise import parse_classes

        ncls = parse_classes(classes)
        if group not in ("unit", "channel"):
            raise PathwiseError(f"group {group!r}: choose 'unit' or 'channel'")
        if int(top) < 1:
            raise PathwiseError(f"top {top}: must be at least 1")
        names = [g.name for g in self.gate_layers]
        if not names:
            raise PathwiseError("the model has no gate layer to decompose at")
        name = layer if layer is not None else names[-1]
        if name not in names:
            raise PathwiseError(f"layer {name!r} is not a gate layer; gate layers: {', '.join(names)}")
        from .pathwise import competing_rows

        xb = self.check_input(x)
        step, _, _ = self._sweep_plan(competing_rows(ncls, self.num_classes), xb.shape[0])
        if xb.shape[0] > step:  # bounded memory: one sweep per chunk of samples
            t = None if target is None else np.asarray(target)
            return concat_batches([  # type: ignore[no-any-return]
                self.decompose(xb[s : s + step], name, top, group, t if t is None or t.ndim == 0 else t[s : s + step],
                               width, depth, input_width, ncls)
                for s in range(0, xb.shape[0], step)
            ])
        gl = self.gate_layers[names.index(name)]
        rec = self.record(xb)
        _, sweep, W, _ = self._path_sweep(rec, target, width, depth, input_width, keep_at=name, classes=ncls)
        tgt = sweep.target
        n = rec.n
        attribution = (W * rec.x).astype(W.dtype)
        assert sweep.at_layer is not None
        g = sweep.at_layer.astype(np.float64)  # (n, u), masks applied
        h = rec.states[name].value.reshape(n, -1).astype(np.float64)
        contrib = h * g  # per unit
        if group == "channel" and len(gl.shape) > 1:
            groups = np.repeat(np.arange(gl.shape[0]), gl.units // gl.shape[0])
        else:
            groups = np.arange(gl.units)
        G = int(groups.max()) + 1
        gcontrib = np.zeros((n, G))
        np.add.at(gcontrib.T, groups, contrib.T)
        active = np.zeros((n, G), bool)
        np.logical_or.at(active.T, groups, (g != 0).T)
        m = min(int(top), G)
        order = np.argsort(-np.where(active, gcontrib, -np.inf), axis=1, kind="stable")[:, :m]
        seeds = np.zeros((m + 1, n, gl.units), self.engine.dtype)
        chosen = np.zeros((n, gl.units), bool)
        for i in range(n):
            for j in range(m):
                sel = (groups == order[i, j]) & active[i, groups]
                seeds[j, i, sel] = g[i, sel]
                chosen[i] |= sel
        seeds[m] = np.where(chosen, 0.0, g)
        Wp = sweep.replay({gl.output: seeds.reshape((m + 1, n) + gl.shape)})
        parts = (Wp[:m] * rec.x[None]).swapaxes(0, 1)  # (n, m, *in)
        rest = Wp[m] * rec.x
        bypass = attribution - parts.sum(axis=1) - rest
        g_cut = self.layer_graph.copy()
        g_cut.remove_node(name)
        out_node = next(v for v, d in self.layer_graph.nodes(data=True) if self.ir.output_name in d["outputs"])
        crosses_all = out_node != name and not nx.has_path(g_cut, graph_mod.INPUT_NODE, out_node)
        return Decomposition(
            crosses_all=crosses_all,
            layer=name,
            group=group,
            attribution=attribution,
            parts=parts,
            part_index=order,
            part_score=np.take_along_axis(gcontrib, order, axis=1),
            part_active=np.take_along_axis(active, order, axis=1),
            rest=rest,
            bypass=bypass,
            target=tgt,
            output=rec.scores,
            classes=ncls,
        )

    # ------------------------------------------------------------------ baselines (DESIGN §5)

    def attribute(self, x: Any, method: str = "pathwise", target: Any = None, **options: Any) -> Attribution:
        """Attributions of each sample by one method, on the same engine (no autodiff framework).

        ``method``: 'gradient', 'input_x_gradient', 'integrated_gradients' (options
        ``baseline``, ``steps``, ``exact``), 'guided_backprop', 'unwrap' or 'pathwise' (options
        ``width``, ``depth``, ``input_width``); see :mod:`onnx_pathwise.baselines`.

        >>> import numpy as np
        >>> from onnx_pathwise.samples import tiny_mlp
        >>> a = Explainer(tiny_mlp(), device="cpu").attribute(np.array([1.0, 2.0], np.float32), "gradient")
        >>> a.attribution.tolist(), a.target.tolist()
        ([[1.0, 0.0]], [0])
        """
        from . import baselines
        from .pathwise import resolve_targets

        fn = baselines.get_method(method)
        baselines.check_options(method, options)
        rec = self.record(x)
        tgt = resolve_targets(target, rec.scores)
        attribution = fn(self, rec.x, tgt, record=rec, **options)
        return Attribution(attribution, rec.scores, tgt, method, dict(options))


@dataclass(frozen=True)
class Attribution:
    """Attributions of a batch by one method (:meth:`Explainer.attribute`)."""

    attribution: np.ndarray  # (N, *input shape)
    output: np.ndarray  # (N, K) onnxruntime's scores at x
    target: np.ndarray  # (N,)
    method: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Decomposition:
    """Parts of the pathwise attribution through units (or channels) of one gate layer."""

    layer: str
    group: str
    attribution: np.ndarray  # (N, *in)
    parts: np.ndarray  # (N, m, *in), ranked by part_score
    part_index: np.ndarray  # (N, m) unit (or channel) index of each part
    part_score: np.ndarray  # (N, m) h_u·∂y_c/∂h_u summed over the part
    part_active: np.ndarray  # (N, m) False where the part holds no kept, active unit
    rest: np.ndarray  # (N, *in) the other kept units' share
    bypass: np.ndarray  # (N, *in) paths that do not cross the layer
    target: np.ndarray
    output: np.ndarray
    crosses_all: bool  # every input→output path crosses the layer, so bypass must vanish
    classes: int | None = None  # the competing classes (None: all), as in Explanation

    @property
    def delta(self) -> np.ndarray:
        """Where every path crosses the layer: max |Σ parts + rest − attribution| per sample,
        computed from independent sweeps (float round-off only). Elsewhere the bypass closes
        the sum by construction and delta is 0."""
        n = self.attribution.shape[0]
        total = self.parts.sum(axis=1) + self.rest + (0 if self.crosses_all else self.bypass)
        return np.abs(total - self.attribution).reshape(n, -1).max(axis=1)
