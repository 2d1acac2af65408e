"""Unit scores of the pathwise selection (docs/design.md §4).

``unit_excess`` scores the units of one path layer for one sample: the excess
e = log(K·P) = C_c − log(mean_k exp C_k) of each unit, P = softmax_k(C)[c], C_k = h·J_k, in
float64. A unit can be kept only when P > 1/K, i.e. e > 0; only those are returned.

With d = C − mean C, log(mean_k exp C_k) = mean C + log(mean_k exp d_k), and

    log(mean_k exp d_k) = log1p(mean_k expm1(d_k)),

exact for every spread of d (no series to truncate) and accurate to ~1e-16 of the spread,
so a unit whose P sits near 1/K gets its small e to ~1e-19 rather than to the ~4e-16 round-off
of log-sum-exp's log(Σ) − log K. Only where some d_k is past exp's range (d > 709: huge
scores) does it fall back to log-sum-exp with the maximum shifted out. numpy's ``expm1`` is
vectorised, so the whole layer is a handful of passes over the candidates. The passes before
it (the float64 row sum, the necessary test, gathering and centring the candidates' rows)
are the numpy form of a tiered loop (:mod:`onnx_pathwise.tiers`): once the process runs
the compiled kernels, :func:`onnx_pathwise.kernels.excess_candidates` and
:func:`~onnx_pathwise.kernels.excess_rows` do them with the same operations in the same order,
so the same bits, 1.6-1.8x faster over a DenseNet-121's or a ResNet-50's layers
(benchmarks/README.md). ``expm1`` and ``log1p`` stay numpy's in both tiers: numpy's and libm's
differ in the last bit for ~2% of inputs, so a compiled one would change the scores.

The class-chunked variant (running sums merged chunk by chunk, when one sample's K
cotangents do not fit the budget) is :func:`onnx_pathwise.kernels.lse_accumulate`; both take
the same necessary test first.
"""

from __future__ import annotations

import math

import numpy as np

from . import tiers


def unit_excess(h: np.ndarray, J: np.ndarray, c: int, zero_row: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices (ascending) and excesses e > 0 of one sample's units: h (u,), J (K, u) any
    strides (float32 or float64), c the target's row of J.

    Necessary test first: log-mean-exp ≥ mean (Jensen), so e > 0 needs C_c > mean_k C_k, with
    mean_k J summed in float64 in row order; every unit with h = 0, or cut above (J = 0),
    fails it and is never scored.

    With ``zero_row`` (a single score, docs/design.md §4) J is the one swept row and the scored
    rows are [0, J]: the same bits as scoring ``np.concatenate([zeros, J])`` (tested), without
    building it over every unit, only over the candidates.
    """
    if zero_row:
        assert J.shape[0] == 1, "a single score sweeps one row"
        K = 2
        inv = 0.5
        kernels = None
    else:
        K = J.shape[0]
        inv = 1.0 / K
        kernels = tiers.compiled()
    if kernels is not None:  # the same operations, compiled (onnx_pathwise.tiers)
        u = h.shape[0]
        s, idx = np.empty(u), np.empty(u, np.int64)
        idx = idx[: kernels.excess_candidates(h, J, c, inv, s, idx)]
        hs, mean, D = np.empty(idx.size), np.empty(idx.size), np.empty((K, idx.size))
        kernels.excess_rows(h, J, s, inv, idx, hs, mean, D)
    else:
        with tiers.timed():
            idx, hs, mean, D = _centred(h, J, c, inv, zero_row)
    dc = D[c].copy()
    with np.errstate(over="ignore"):
        np.expm1(D, out=D)
    total = np.add.reduce(D, axis=0)
    total *= inv
    e = dc - np.log1p(total)
    far = np.flatnonzero(~np.isfinite(e))
    if far.size:  # some d past exp's range: log-sum-exp with the maximum shifted out
        F = _rows_at(J, idx[far], zero_row).astype(np.float64) * hs[far] - mean[far]
        top = F.max(axis=0)
        F -= top
        np.exp(F, out=F)
        e[far] = (dc[far] - top) - np.log(F.sum(axis=0)) + math.log(K)
    keep = e > 0.0
    return idx[keep], e[keep]


def _centred(h: np.ndarray, J: np.ndarray, c: int, inv: float,
             zero_row: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The numpy form of the necessary test and the candidates' centred scores: flat indices
    idx, hs = h there, mean = hs·(mean_k J) and D = h·J − mean (K, m), all float64."""
    if zero_row:
        s = J[0].astype(np.float64)  # 0.0 + J but for the sign of a zero, which no candidate has
        row_c = J[0] if c == 1 else np.zeros(J.shape[1], J.dtype)
    else:
        s = _row_sum(J)
        row_c = J[c]
    test = row_c - s * inv  # float32 operands widen exactly: every step below is float64
    test *= h
    idx = np.flatnonzero(test > 0.0)
    hs = h[idx].astype(np.float64)
    mean = hs * (s[idx] * inv)
    D = _rows_at(J, idx, zero_row).astype(np.float64, copy=False)
    D *= hs  # h·J is exact in float64
    D -= mean
    return idx, hs, mean, D


def _row_sum(J: np.ndarray) -> np.ndarray:
    """Σ_k J_k in float64, row by row in order: the bits of ``np.add.reduce(J, axis=0,
    dtype=np.float64)`` in half its time (each row widened into one buffer, then added), but for
    a sum of -0 alone, -0 here (numpy's reduction starts from +0): no candidate has one (its
    J_c would be -0 and its test 0)."""
    s = J[0].astype(np.float64)
    row = np.empty_like(s)
    for k in range(1, J.shape[0]):
        row[...] = J[k]
        s += row
    return s


def _rows_at(J: np.ndarray, idx: np.ndarray, zero_row: bool) -> np.ndarray:
    """The scored rows of J at units ``idx``: J's own, or with ``zero_row`` a row of zeros first."""
    rows = np.take(J, idx, axis=1)
    if not zero_row:
        return rows
    return np.concatenate([np.zeros((1, idx.size), J.dtype), rows])
