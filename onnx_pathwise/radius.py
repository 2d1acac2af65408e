"""Certified radii (docs/design.md §3): the largest L2 and L∞ balls around each sample inside
its activation region, on the shared sweep (:class:`onnx_pathwise.sweep.Sweep`).
:meth:`onnx_pathwise.Explainer.certified_radius` and :func:`onnx_pathwise.metrics.certified_radius`
call :func:`certified_radius`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import limits
from .engine import Record
from .errors import InputError
from .sweep import Sweep


@dataclass(frozen=True)
class RadiusResult:
    """Certified radii: the largest L2 / L∞ balls around x inside its activation region."""

    l2: np.ndarray  # (N,)
    linf: np.ndarray  # (N,)
    l2_unit: list[str]  # the binding unit per sample ("node[index]")
    linf_unit: list[str]



def certified_radius(sweep: Sweep, x: Any, record: Record | None = None, max_input_size: int = 4096) -> RadiusResult:
    """The largest L2 and L∞ balls around each x inside its activation region (docs/design.md §3).

    min over gate units of |z_i − kink| / ‖∇z_i‖₂ (‖∇z_i‖₁ for L∞), and for max pools the
    margin between each window's recorded maximum and every other element of the window over
    the norm of their gradient difference. Costs one forward tangent per input element,
    pushed in chunks that keep memory bounded; inputs larger than ``max_input_size``
    elements must opt in by raising it. The chunks fit the memory budget
    (:func:`onnx_pathwise.limits.memory_budget`); the result does not depend on them.
    """
    from .rules.pooling import _geometry, _window_index

    D = int(np.prod(sweep.input_shape, dtype=np.int64))
    if D > max_input_size:
        raise InputError(
            f"certified radius needs {D} forward tangents (one per input element); "
            f"pass max_input_size>={D} to opt in"
        )
    rec = record if record is not None and len(record.preactivations) == len(sweep.gate_layers) else None
    if rec is None:
        rec = sweep.record(record.x if record is not None else x, preactivations=True)
    n = rec.n
    eng = sweep.engine
    # squared-L2 and L1 norms of the gradients, accumulated over chunks of input elements
    gates = {g.name: g.data_inputs[0] for g in eng.gate_nodes}
    sq = {name: np.zeros((n, int(np.prod(sweep.ir.shapes[t], dtype=np.int64)))) for name, t in gates.items()}
    ab = {name: np.zeros_like(v) for name, v in sq.items()}
    pools = []
    for node in eng.routing_nodes:
        src = node.data_inputs[0]
        C = sweep.ir.shapes[src][0]
        S = int(np.prod(sweep.ir.shapes[src][1:], dtype=np.int64))
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
    cols = _radius_columns(sweep, n, D, sq, pools)
    for start in range(0, D, cols):
        # the tangents e_j of this chunk's input elements, built per chunk (never a D×D identity)
        stop = min(D, start + cols)
        t = np.zeros((stop - start, n, D), eng.dtype)
        t[np.arange(stop - start), :, np.arange(start, stop)] = 1.0
        env_t = eng.tangent_env(t.reshape((stop - start, n) + sweep.input_shape), rec)
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
            node = sweep.ir.node(name)
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

def _radius_columns(sweep: Sweep, n: int, D: int, sq: dict[str, np.ndarray], pools: list[Any]) -> int:
    """Input elements whose tangents are pushed at once by :meth:`certified_radius`: as many
    as fit the memory budget next to the accumulators, and no more than a sweep's
    :data:`MAX_SWEEP_ELEMENTS` rows of the largest tensor (``Sweep.class_chunk``; larger
    chunks were not faster).

    Per tangent column and sample: every tensor of the cone (the tangent pass keeps them
    all), the im2col copy of the widest convolution, the float64 copies of the largest
    gate's gradients and of one max pool's window differences. Refuses with the estimate
    (:class:`~onnx_pathwise.limits.BudgetError`) when not even one column fits."""
    itemsize = sweep.engine.dtype.itemsize
    elements = sum(int(np.prod(s, dtype=np.int64)) for s in sweep.ir.shapes.values())
    im2col = max((int(np.prod(sweep.ir.shapes[node.data_inputs[0]], dtype=np.int64))
                  * int(np.prod(node.attrs.get("kernel_shape") or [1], dtype=np.int64))
                  for node in sweep.engine.nodes if node.op_type in ("Conv", "ConvTranspose")), default=0)
    gate = max([v.shape[1] for v in sq.values()]
               + [int(np.prod(sweep.ir.shapes[p[1]], dtype=np.int64)) for p in pools], default=0)
    window = max((int(np.prod(p[3].shape, dtype=np.int64)) for p in pools), default=0)
    per_column = n * ((elements + im2col + D) * itemsize + 3 * gate * 8) + 3 * window * 8
    held = 2 * sum(v.nbytes for v in sq.values()) + sum(
        p[2].nbytes + p[3].nbytes + p[5].nbytes + p[6].nbytes for p in pools)
    limits.check_fits(held + per_column, "the certified radius (accumulators and one input tangent)")
    fit = (limits.memory_budget() - held) // per_column
    return int(max(1, min(D, fit, sweep.class_chunk(n))))
