"""Compiled inner loops (numba): the class-chunked unit sums of a pathwise selection whose K
cotangents do not fit the budget at once (``lse_accumulate``, ``lse_excess``: docs/design.md §4,
"Bounded memory at any K"), the piece bounds of exact Integrated Gradients (``gate_piece``,
``window_piece``), and the twins of the numpy forms of a plain explanation's inner loops, which
give the same bits (:mod:`onnx_pathwise.tiers`): keeping the selected units (``keep_units``),
the unit scores' necessary test and centred rows (``excess_candidates``, ``excess_rows``), and
max-pool routing and its adjoint (``window_argmax``, ``scatter_add``).

Imported on first use only: numba's import and its first dispatch in a process cost about a
second, and the first compilation after install a few more (compiled code is cached on disk,
next to this file or in the user's cache directory). A plain explanation runs the numpy forms
until the process has spent a second in them (:data:`onnx_pathwise.tiers.COMPILE_AFTER`), so a
command-line run on a few inputs without class chunks or exact Integrated Gradients never
loads numba.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, types
from numba.extending import intrinsic


def _compiled(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """numba's njit with an on-disk cache where there is a writable place for one (beside this
    file, or the user's cache directory); without one numba refuses ``cache=True`` at import,
    so the kernels then compile once per process instead."""

    def wrap(fn: Callable[..., Any]) -> Any:
        try:
            return njit(cache=True, nogil=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return njit(nogil=True, **options)(fn)

    return wrap


@intrinsic
def _float_from_bits(typingctx, bits):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """The float64 whose IEEE bits are the int64 ``bits`` (a bit cast, as C's memcpy)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], llvm_ir.DoubleType())

    return types.float64(types.int64), codegen


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # fdlibm's split of log 2: k·_LN2_HI is exact for |k| < 2¹¹
_LN2_LO = 1.90821492927058770002e-10
_ROUND = 6755399441055744.0  # 1.5·2⁵²: (y + _ROUND) − _ROUND rounds y to the nearest integer


@_compiled(inline="always", fastmath={"contract"})
def exp_nonpositive(x):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """exp(x) for x ≤ 0 in float64 to within 1 ulp; x below −708 counts as −708 (exp = 3.3e-308,
    nothing beside the 1 that a log-sum-exp's maximum contributes). Branch-free so that loops calling it vectorise (libm's exp is a call LLVM cannot):
    x = k·log 2 + r with |r| ≤ log(2)/2, exp r by its Taylor polynomial to r¹³ (the next term
    is below 4e-18 relative), times 2ᵏ built from its exponent bits."""
    x = max(x, -708.0)
    k = (x * _LOG2E + _ROUND) - _ROUND
    r = (x - k * _LN2_HI) - k * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return p * _float_from_bits((np.int64(k) + 1023) << 52)


@_compiled(fastmath={"contract"}, error_model="numpy")
def lse_accumulate(h, g, i, rows, c, s, top, acc, jc, mx, lo=0, hi=-1):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """One chunk of sample ``i``'s competing rows, for a layer whose K cotangents are swept in
    chunks (docs/design.md §4, "Bounded memory at any K"): h (u,), g (m, n, u) C-contiguous, of
    which the first ``rows`` rows compete (the rest is padding); ``c`` the target's row in the
    chunk, or -1. Units ``lo`` … ``hi`` − 1 only (``hi`` = -1: to the last), so that threads
    can share a layer: each unit's sums are its own.

    Updates per unit, in place and in float64: ``s`` += Σ_k J_k in row order (the sum
    :func:`onnx_pathwise.scores.unit_excess` takes, so its necessary test is the same), the log-sum-exp of
    C_k = h·J_k as ``top + log(acc)``: ``top`` the maximum so far (start at 0) and ``acc`` =
    Σ exp(C_k − top) (start at 0; rescaled when the maximum grows: lse(a ∪ b) =
    logaddexp(lse a, lse b)), and ``jc`` = J_c. ``mx`` (u,) is scratch. Each pass is a plain
    loop over the units, which LLVM vectorises (with :func:`exp_nonpositive`).
    """
    # unsigned indices: with signed ones numba must allow for negative (wrap-around) indices
    # and LLVM no longer vectorises the loops (4.5× slower, measured)
    a = np.uint64(lo)
    b = np.uint64(hi if hi >= 0 else g.shape[2])
    ii = np.uint64(i)
    for j in range(a, b):
        mx[j] = top[j]
    for k in range(np.uint64(rows)):
        for j in range(a, b):
            v = np.float64(g[k, ii, j])
            s[j] += v
            mx[j] = max(mx[j], np.float64(h[j]) * v)  # h·J is exact in float64
    for j in range(a, b):
        acc[j] = acc[j] * exp_nonpositive(top[j] - mx[j])
        top[j] = mx[j]
    for k in range(np.uint64(rows)):
        for j in range(a, b):
            acc[j] += exp_nonpositive(np.float64(h[j]) * np.float64(g[k, ii, j]) - top[j])
    if c >= 0:
        for j in range(a, b):
            jc[j] = g[c, ii, j]


@_compiled()
def lse_excess(h, s, top, acc, jc, K, idx, out):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """Units with e = C_c − lse_k C_k + log K > 0 from the sums of :func:`lse_accumulate`
    over all K competing rows: flat indices (ascending) to ``idx``, e to ``out``; returns how
    many. The necessary test C_c > mean_k C_k comes first, as in :func:`onnx_pathwise.scores.unit_excess`: units
    with h = 0 or cut above never pass it, whatever the round-off of the log-sum-exp."""
    u = h.shape[0]
    inv = 1.0 / K
    log_k = math.log(K)
    n = 0
    for j in range(u):
        hj = np.float64(h[j])
        if hj * (jc[j] - s[j] * inv) > 0.0:
            e = hj * jc[j] - top[j] - math.log(acc[j]) + log_k
            if e > 0.0:
                idx[n] = j
                out[n] = e
                n += 1
    return n


@_compiled()
def excess_candidates(h, J, c, inv, s, idx):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """The necessary test of :func:`onnx_pathwise.scores.unit_excess`, compiled: h (u,), J (K, u)
    any strides; ``s`` (u,) gets Σ_k J_k in float64 in row order, ``idx`` the units (ascending)
    with (J_c − s·inv)·h > 0; returns how many. The numpy form's operations in its order, so
    the same bits (no fast-math: no fused multiply-add)."""
    K, u = J.shape
    uu = np.uint64(u)  # unsigned: the row sums vectorise (see lse_accumulate)
    for j in range(uu):
        s[j] = np.float64(J[0, j])
    for k in range(1, K):
        for j in range(uu):
            s[j] += np.float64(J[k, j])
    m = 0
    for j in range(u):
        if (np.float64(J[c, j]) - s[j] * inv) * np.float64(h[j]) > 0.0:
            idx[m] = j
            m += 1
    return m


@_compiled()
def excess_rows(h, J, s, inv, idx, hs, mean, D):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """The candidates' centred scores for :func:`onnx_pathwise.scores.unit_excess`, compiled:
    hs[n] = h at unit idx[n], mean[n] = hs·(s·inv) and D (K, m)[k, n] = J_k·hs − mean, in
    float64, as the numpy form computes them."""
    K = J.shape[0]
    m = idx.shape[0]
    for n in range(m):
        hj = np.float64(h[idx[n]])
        hs[n] = hj
        mean[n] = hj * (s[idx[n]] * inv)
    for k in range(K):
        for n in range(m):
            D[k, n] = np.float64(J[k, idx[n]]) * hs[n] - mean[n]


@_compiled()
def scatter_add(g, argmax, size):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """The max-pool adjoint: dx (m, n, size) with dx[r, i, argmax[i, p]] += g[r, i, p]."""
    m, n, P = g.shape
    dx = np.zeros((m, n, size), g.dtype)
    for r in range(m):
        for i in range(n):
            for p in range(P):
                dx[r, i, argmax[i, p]] += g[r, i, p]
    return dx


@_compiled()
def window_argmax(x, table, arg):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """Max-pool routing: x (N, C, S) flattened spatial, table (P, W) the flat index of each
    window's elements (-1 in padding) → arg (N, C, P), written in place: the flat index of each
    window's first maximum (padding never wins), per channel. Padding entries are first replaced
    by the window's first element: a copy of an element already seen never wins a strict
    comparison, so the inner loop needs no branch on padding and keeps the running maximum in
    a register (3-4x faster than testing each entry, benchmarks/README.md)."""
    N, C, S = x.shape
    P, W = table.shape
    filled = np.empty((P, W), np.int64)
    for p in range(P):
        first = -1
        for w in range(W):
            if table[p, w] >= 0:
                first = table[p, w]
                break
        for w in range(W):
            filled[p, w] = table[p, w] if table[p, w] >= 0 else first
    for i in range(N):
        for ch in range(C):
            xc = x[i, ch]
            for p in range(P):
                best = filled[p, 0]
                top = xc[best]
                for w in range(1, W):
                    t = filled[p, w]
                    v = xc[t]
                    if v > top:
                        top = v
                        best = t
                arg[i, ch, p] = best


@_compiled()
def keep_units(g, mask, slope):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """g (K, n, u) times ``slope`` (n, u) on the units of ``mask`` (n, u), zero elsewhere, as a
    new array: one branch-free pass that LLVM vectorises (a select, not a multiply by the mask:
    an unkept unit is +0 whatever its cotangent, -0 or inf included, as in the numpy form). It
    replaced a gather of the kept units into zeros, 1.6-4x slower on ResNet-18's layers with 5
    to 30% of the units kept (benchmarks/README.md)."""
    K, n, u = g.shape
    out = np.empty((K, n, u), g.dtype)
    for k in range(K):
        for i in range(n):
            for j in range(u):
                v = g[k, i, j] * slope[i, j]
                out[k, i, j] = v if mask[i, j] else 0.0
    return out


@_compiled(inline="always")
def _reach(m, rate, fwd, bwd):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """How far α may move forward (fwd) and back (bwd) before margin m + Δα·rate turns negative."""
    if rate < 0.0:
        fwd = min(fwd, m / -rate)
    elif rate > 0.0:
        bwd = min(bwd, m / rate)
    return fwd, bwd


@_compiled()
def gate_piece(z, dz, kink, up, alpha, lo, hi):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """Tighten each row's piece [lo, hi] of the segment (exact Integrated Gradients) so that no
    gate unit crosses ``kink``: z (P, U) pre-activations at α (P,), dz (P, U) their rates along
    the segment; z == kink counts as the upper side when ``up``. In float64, in place."""
    P, U = z.shape
    for r in range(P):
        fwd = np.inf
        bwd = np.inf
        for j in range(U):
            zz = np.float64(z[r, j])
            above = zz >= kink if up else zz > kink
            side = 1.0 if above else -1.0
            fwd, bwd = _reach(max(side * (zz - kink), 0.0), side * np.float64(dz[r, j]), fwd, bwd)
        lo[r] = max(lo[r], alpha[r] - bwd)
        hi[r] = min(hi[r], alpha[r] + fwd)


@_compiled()
def window_piece(v, dv, table, size, argmax, alpha, lo, hi):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """Likewise for max-pool windows: no other element of a window overtakes its recorded
    maximum. v, dv (P, C·size) the pooled input and its rates, table (Pout, W) each window's
    per-channel flat indices (-1 in padding), argmax (P, C·Pout) the recorded maxima."""
    P = v.shape[0]
    Pout, W = table.shape
    C = argmax.shape[1] // Pout
    for r in range(P):
        fwd = np.inf
        bwd = np.inf
        for c in range(C):
            for p in range(Pout):
                w = argmax[r, c * Pout + p]
                vw = np.float64(v[r, w])
                dw = np.float64(dv[r, w])
                for k in range(W):
                    t = table[p, k]
                    if t < 0:
                        continue
                    e = c * size + t
                    if e == w:
                        continue
                    fwd, bwd = _reach(max(vw - np.float64(v[r, e]), 0.0), dw - np.float64(dv[r, e]), fwd, bwd)
        lo[r] = max(lo[r], alpha[r] - bwd)
        hi[r] = min(hi[r], alpha[r] + fwd)
