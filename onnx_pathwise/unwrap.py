"""The local affine model (docs/design.md §3): W_x, b_x of every sample on its activation region,
from one backward sweep of the score seeds on the shared sweep (:class:`onnx_pathwise.sweep.Sweep`),
checked against onnxruntime's scores. :meth:`onnx_pathwise.Explainer.unwrap` calls :func:`unwrap`.

>>> import numpy as np
>>> from onnx_pathwise import Explainer
>>> from onnx_pathwise.samples import tiny_mlp
>>> res = unwrap(Explainer(tiny_mlp(), device="cpu").sweep, np.array([[1.0, 2.0]], np.float32))
>>> res.weight.shape, res.bias.shape
((1, 2, 2), (1, 2))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine import Record
from .sweep import Sweep, concat_batches, refuse_overflow, slice_record


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


def unwrap(sweep: Sweep, x: Any, record: Record | None = None) -> UnwrapResult:
    """The local affine model W_x, b_x of every sample, checked against onnxruntime (samples,
    then classes, in chunks of at most ``MAX_SWEEP_ELEMENTS`` rows; ``record`` reuses a
    recorded forward pass)."""
    step = sweep.sample_chunk(1)
    if record is None:
        xb = sweep.check_input(x)
        if xb.shape[0] > step:  # bounded memory: one sample chunk at a time
            return concat_batches(  # type: ignore[no-any-return]
                [unwrap(sweep, xb[s : s + step]) for s in range(0, xb.shape[0], step)])
    elif record.n > step:  # the same, reusing the recorded forward pass
        return concat_batches(  # type: ignore[no-any-return]
            [unwrap(sweep, None, record=slice_record(record, s, s + step)) for s in range(0, record.n, step)])
    rec = record if record is not None else sweep.record(x)
    n, K = rec.scores.shape
    ws, bs = [], []
    step = sweep.class_chunk(n)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, not warned
        for start in range(0, K, step):
            classes = np.arange(start, min(K, start + step))
            w, b = sweep.engine.backward(sweep.score_seeds(classes, n), rec)
            ws.append(w)
            bs.append(b)
        W = np.concatenate(ws).swapaxes(0, 1)  # (n, K, *in)
        b = np.concatenate(bs).T.astype(np.float64)
    return UnwrapResult(W, b.astype(W.dtype), rec.scores, _residual(W, b, rec.x, rec.scores))


def _residual(w: np.ndarray, b: np.ndarray, x: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The completeness delta of rows of the local affine model: max |W x + b − scores| of each
    sample over its rows (w (n, k, *in), b and scores (n, k)), in float64. An overflow of W or
    of W x + b is refused."""
    n, k = b.shape
    with np.errstate(over="ignore", invalid="ignore"):  # refused below, not warned
        fx = np.einsum("nkd,nd->nk", w.reshape(n, k, -1).astype(np.float64),
                       x.reshape(n, -1).astype(np.float64)) + b.astype(np.float64)
    refuse_overflow("the local affine model", w, fx)
    return np.abs(fx - scores).max(axis=1)  # type: ignore[no-any-return]


def delta(sweep: Sweep, x: Any, classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's completeness delta max |W x + b − f(x)| over its rows of the local affine
    model, sweeping the rows in chunks without holding W (``audit``: a 1,000-class ResNet-18's
    W of 4 samples is 2.4 GB): every class, or with ``classes`` = N each sample's top N
    predicted classes. Returns (delta (N,), the recorded scores (N, K))."""
    rec = sweep.record(x)
    n, K = rec.scores.shape
    out = np.zeros(n)
    step = sweep.class_chunk(1)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, not warned
        for i in range(n):
            one = slice_record(rec, i, i + 1)
            rows = (np.arange(K) if classes is None or classes >= K
                    else np.argsort(-rec.scores[i], kind="stable")[:classes])
            for s in range(0, len(rows), step):
                chosen = rows[s : s + step]
                w, b = sweep.engine.backward(sweep.score_seeds(chosen, 1), one)  # (c, 1, *in), (c, 1)
                worst = _residual(w.swapaxes(0, 1), b.T, one.x, rec.scores[i : i + 1, chosen])
                out[i] = max(out[i], float(worst[0]))
    return out, rec.scores
