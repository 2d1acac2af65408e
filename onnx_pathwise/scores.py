"""Unit scores of the pathwise selection, in numpy (docs/design.md §4).

``unit_excess`` scores the units of one path layer for one sample: the excess
e = log(K·P) = C_c − log(mean_k exp C_k) of each unit, P = softmax_k(C)[c], C_k = h·J_k, in
float64. A unit can be kept only when P > 1/K, i.e. e > 0; only those are returned.

With d = C − mean C, log(mean_k exp C_k) = mean C + log(mean_k exp d_k), and

    log(mean_k exp d_k) = log1p(mean_k expm1(d_k)),

exact for every spread of d (no series to truncate) and accurate to ~1e-16 of the spread,
so a unit whose P sits near 1/K gets its small e to ~1e-19 rather than to the ~4e-16 round-off
of log-sum-exp's log(Σ) − log K. Only where some d_k is past exp's range (d > 709: huge
scores) does it fall back to log-sum-exp with the maximum shifted out. numpy's ``expm1`` is
vectorised, so the whole layer is a handful of passes over the candidates, and no compiler is
loaded for it: a command-line run of a model without class chunks never imports numba. The
price: on a ResNet-18's layers the passes take 52 ms where the compiled per-unit loop they
replaced took 33 ms (benchmarks/README.md). A compiled twin cannot give the same bits (numpy's
expm1 and libm's differ in the last bit for ~2% of inputs), so there is none.

The class-chunked variant (running sums merged chunk by chunk, when one sample's K
cotangents do not fit the budget) is :func:`onnx_pathwise.kernels.lse_accumulate`; both take
the same necessary test first.
"""

from __future__ import annotations

import math

import numpy as np


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
        s = J[0].astype(np.float64)  # 0.0 + J but for the sign of a zero, which no candidate has
        row_c = J[0] if c == 1 else np.zeros(J.shape[1], J.dtype)
    else:
        K = J.shape[0]
        inv = 1.0 / K
        s = np.add.reduce(J, axis=0, dtype=np.float64)  # row by row, in float64
        row_c = J[c]
    test = row_c - s * inv  # float32 operands widen exactly: every step below is float64
    test *= h
    idx = np.flatnonzero(test > 0.0)
    hs = h[idx].astype(np.float64)
    mean = hs * (s[idx] * inv)
    D = np.multiply(_rows_at(J, idx, zero_row), hs)  # h·J is exact in float64
    D -= mean
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


def _rows_at(J: np.ndarray, idx: np.ndarray, zero_row: bool) -> np.ndarray:
    """The scored rows of J at units ``idx``: J's own, or with ``zero_row`` a row of zeros first."""
    rows = np.take(J, idx, axis=1)
    if not zero_row:
        return rows
    return np.concatenate([np.zeros((1, idx.size), J.dtype), rows])
