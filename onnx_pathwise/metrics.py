"""Attribution metrics (docs/design.md §5): RISE-style insertion/deletion AUC, completeness delta,
path faithfulness, sparsity, certified radius, and :func:`evaluate` over several methods.

Insertion and deletion (Petsiuk, Das, Saenko 2018, "RISE"): pixels are ranked by the
attribution summed over channels (descending, ties to the lower flat index) and changed
``step`` at a time. Deletion starts from x and replaces pixels with zeros; insertion starts
from x blurred per channel (Gaussian, kernel 11, σ 5, zero padding, same size) and puts the
original pixels back. Every curve point is scored by the target's softmax probability of the
explained scores (float64), so a curve has ceil(P/step) + 1 points (0 … P pixels changed) and
AUC = (Σ s − s₀/2 − s_last/2) / (n − 1) (trapezoid rule on [0, 1]).

Inputs with no spatial axes (tabular: per-sample rank 1) rank features instead of pixels; both
substrates are then zeros (a blur has no meaning across unrelated features).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import PathwiseError
from .pathwise import progress_bar, resolve_targets, target_scores

if TYPE_CHECKING:
    from .explainer import Explainer, RadiusResult

Array = np.ndarray

#: Input elements (curve points × sample size) scored at once, at most.
MAX_CURVE_ELEMENTS = 8_000_000


# ---------------------------------------------------------------------- substrates


def gaussian_kernel(size: int = 11, sigma: float = 5.0) -> Array:
    """The normalised 1-D Gaussian exp(−i²/2σ²), i = −size//2 … size//2 (float64, sums to 1).
    The 2-D kernel is its outer product with itself."""
    if size < 1 or sigma <= 0:
        raise PathwiseError(f"blur kernel {size}, sigma {sigma}: need size ≥ 1 and sigma > 0")
    i = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(i**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(x: Array, size: int = 11, sigma: float = 5.0, channel_axis: int | None = 0) -> Array:
    """Blur each channel of a batch x (N, *per-sample shape) over its spatial axes with the
    separable Gaussian of :func:`gaussian_kernel`, zero padding, same size (a 2-D convolution
    with the outer-product kernel, applied one axis at a time). ``channel_axis`` is the
    per-sample axis not blurred (None: blur every per-sample axis)."""
    k = gaussian_kernel(size, sigma)
    out = np.asarray(x, np.float64)
    axes = [a + 1 for a in range(out.ndim - 1) if channel_axis is None or a != channel_axis % (out.ndim - 1)]
    left = (size - 1) // 2
    for ax in axes:
        L = out.shape[ax]
        pad = [(0, 0)] * out.ndim
        pad[ax] = (left, size - 1 - left)
        padded = np.pad(out, pad)
        acc = np.zeros_like(out)
        for j in range(size):
            acc += k[j] * np.take(padded, np.arange(j, j + L), axis=ax)
        out = acc
    return out


# ---------------------------------------------------------------------- curves


@dataclass(frozen=True)
class Curve:
    """An insertion or deletion curve per sample."""

    kind: str  # "insertion" | "deletion"
    scores: Array  # (N, n) target softmax probability after changed[j] pixels
    changed: Array  # (n,) pixels changed at each point: 0, step, 2·step, …, P
    order: Array  # (N, P) pixel ranking, most important first

    @property
    def auc(self) -> Array:
        """(Σ s − s₀/2 − s_last/2) / (n − 1) per sample."""
        s = self.scores
        return (s.sum(axis=1) - s[:, 0] / 2 - s[:, -1] / 2) / (s.shape[1] - 1)


def target_probability(scores: Array, target: Array) -> Array:
    """softmax(scores)[target] in float64 (sigmoid of the single score when K = 1)."""
    s = np.asarray(scores, np.float64)
    if s.shape[1] == 1:  # the side's probability: σ(y) for class 1, σ(−y) for class 0
        return 1.0 / (1.0 + np.exp(-np.where(np.asarray(target) == 0, -s[:, 0], s[:, 0])))
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return e[np.arange(len(target)), target] / e.sum(axis=1)


def _pixels(shape: tuple[int, ...], channel_axis: int | None) -> tuple[int | None, int]:
    """(channel axis or None, number of pixels) of a per-sample shape."""
    if len(shape) <= 1 or channel_axis is None:
        return None, int(np.prod(shape, dtype=np.int64))
    c = channel_axis % len(shape)
    return c, int(np.prod(shape, dtype=np.int64)) // shape[c]


def pixel_saliency(attribution: Array, channel_axis: int | None = 0) -> Array:
    """(N, P): the attribution summed over the channel axis, pixels flattened row-major."""
    a = np.asarray(attribution, np.float64)
    c, P = _pixels(a.shape[1:], channel_axis)
    if c is not None:
        a = a.sum(axis=c + 1)
    return a.reshape(a.shape[0], P)


def pixel_order(attribution: Array, channel_axis: int | None = 0) -> Array:
    """(N, P) pixels by saliency descending, ties to the lower flat index."""
    return np.argsort(-pixel_saliency(attribution, channel_axis), axis=1, kind="stable")


def default_step(shape: tuple[int, ...], channel_axis: int | None = 0) -> int:
    """One image row (the last axis's length) per step for spatial inputs, one feature for
    tabular inputs."""
    c, _ = _pixels(shape, channel_axis)
    return 1 if c is None else int(shape[-1] if c != len(shape) - 1 else shape[-2])


def _curve(
    kind: str,
    explainer: Explainer,
    x: Any,
    attribution: Array,
    target: Any,
    step: int | None,
    channel_axis: int | None,
    blur: tuple[int, float],
) -> Curve:
    x = explainer.check_input(x)
    N = x.shape[0]
    shape = x.shape[1:]
    attribution = np.asarray(attribution)
    if attribution.shape != x.shape:
        raise PathwiseError(f"attribution shape {attribution.shape} does not match the input batch {x.shape}")
    c, P = _pixels(shape, channel_axis)
    step = default_step(shape, channel_axis) if step is None else step
    if isinstance(step, bool) or int(step) != step or step < 1:
        raise PathwiseError(f"step {step!r}: must be a positive integer")
    step = int(step)
    if target is None:
        target = resolve_targets(None, explainer.scores(x))
    tgt = resolve_targets(target, np.zeros((N, explainer.num_classes)))
    order = pixel_order(attribution, channel_axis)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(P)[None].repeat(N, 0), axis=1)
    n = math.ceil(P / step) + 1
    changed = np.minimum(np.arange(n) * step, P)
    if kind == "insertion" and c is not None:
        start = gaussian_blur(x, blur[0], blur[1], channel_axis).astype(x.dtype)
        final = x
    elif kind == "insertion":
        start, final = np.zeros_like(x), x
    else:
        start, final = x, np.zeros_like(x)
    # Move channels last so a pixel mask (P,) broadcasts over them.
    def to_pixels(a: Array) -> Array:
        return (np.moveaxis(a, c + 1, -1) if c is not None else a[..., None]).reshape(a.shape[0], P, -1)

    def from_pixels(a: Array) -> Array:
        if c is None:
            return a.reshape((a.shape[0],) + shape)
        moved = tuple(s for i, s in enumerate(shape) if i != c) + (shape[c],)
        return np.moveaxis(a.reshape((a.shape[0],) + moved), -1, c + 1)

    sp, fp = to_pixels(start), to_pixels(final)
    size = int(np.prod(shape, dtype=np.int64))
    chunk = max(1, MAX_CURVE_ELEMENTS // max(1, size))
    rows_i = np.repeat(np.arange(N), n)
    rows_j = np.tile(np.arange(n), N)
    scores = np.empty(N * n)
    for s in range(0, N * n, chunk):
        ii, jj = rows_i[s : s + chunk], rows_j[s : s + chunk]
        mask = rank[ii] < changed[jj][:, None]  # (r, P)
        batch = np.where(mask[..., None], fp[ii], sp[ii])
        # the record session's arena is kept between chunks and given back after the last
        last = s + chunk >= N * n
        out = explainer.sweep.scores(from_pixels(batch), shrink=last)
        scores[s : s + chunk] = target_probability(out, tgt[ii])
    return Curve(kind, scores.reshape(N, n), changed, order)


def insertion(
    explainer: Explainer,
    x: Any,
    attribution: Array,
    target: Any = None,
    step: int | None = None,
    channel_axis: int | None = 0,
    blur: tuple[int, float] = (11, 5.0),
) -> Curve:
    """Insertion curve: from the blurred input (zeros for tabular inputs), put back the most
    important ``step`` pixels at a time. ``.auc`` is the metric (higher is better)."""
    return _curve("insertion", explainer, x, attribution, target, step, channel_axis, blur)


def deletion(
    explainer: Explainer,
    x: Any,
    attribution: Array,
    target: Any = None,
    step: int | None = None,
    channel_axis: int | None = 0,
) -> Curve:
    """Deletion curve: replace the most important ``step`` pixels at a time with zeros.
    ``.auc`` is the metric (lower is better)."""
    return _curve("deletion", explainer, x, attribution, target, step, channel_axis, (11, 5.0))


# ---------------------------------------------------------------------- other metrics


def completeness_delta(explainer: Explainer, x: Any) -> Array:
    """max_k |W_x x + b_x − f(x)| per sample (docs/design.md §3): float32 round-off on any supported model."""
    return explainer.unwrap(x).delta


def path_faithfulness(
    explainer: Explainer, x: Any, target: Any = None, width: Any = None, depth: int | None = None,
    input_width: Any = None,
) -> Array:
    """masked score / full score per sample: how much of y_c(x) the path's model keeps."""
    return explainer.explain(x, target, width=width, depth=depth, input_width=input_width).faithfulness


def sparsity(
    explainer: Explainer, x: Any, target: Any = None, width: Any = None, depth: int | None = None,
    input_width: Any = None,
) -> Array:
    """Fraction of the path layers' units the path keeps, per sample."""
    return explainer.explain(x, target, width=width, depth=depth, input_width=input_width).sparsity


def certified_radius(explainer: Explainer, x: Any, max_input_size: int = 4096) -> RadiusResult:
    """L2 and L∞ certified radii of the activation region around each sample (docs/design.md §3)."""
    return explainer.certified_radius(x, max_input_size=max_input_size)


# ---------------------------------------------------------------------- evaluate


def finite_mean(values: Any) -> float | None:
    """The mean of the finite values, or None when there are none (undefined: printed as
    ``n/a``, written as JSON ``null``, never NaN)."""
    v = np.asarray(values, np.float64).ravel()
    finite = v[np.isfinite(v)]
    return float(finite.mean()) if finite.size else None


def finite_std(values: Any) -> float | None:
    """The population standard deviation of the finite values (0 for one value), or None when
    there are none."""
    v = np.asarray(values, np.float64).ravel()
    finite = v[np.isfinite(v)]
    return float(finite.std()) if finite.size else None


def _summary(values: Any) -> dict[str, Any]:
    v = np.asarray(values, np.float64).ravel()
    return {"values": [float(a) for a in v], "mean": finite_mean(v), "std": finite_std(v)}


def _label(name: str, options: Mapping[str, Any]) -> str:
    if not options:
        return name
    def short(v: Any) -> str:
        if v is None:  # width/depth None mean every unit / every layer
            return "all"
        return f"array{tuple(np.shape(v))}" if np.ndim(v) > 0 else str(v)

    return f"{name}(" + ", ".join(f"{k}={short(v)}" for k, v in options.items()) + ")"


def evaluate(
    explainer: Explainer,
    x: Any,
    methods: Sequence[str | tuple[str, Mapping[str, Any]]] = ("gradient", "input_x_gradient", "pathwise"),
    widths: Sequence[int | str | None] | None = None,
    depths: Sequence[int | None] | None = None,
    step: int | None = None,
    target: Any = None,
    channel_axis: int | None = 0,
    max_input_size: int = 4096,
    attributions: dict[str, np.ndarray] | None = None,
    classes: int | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every applicable metric per method per sample, with mean and (population) std.

    ``methods``: names or ``(name, options)`` pairs (:meth:`Explainer.attribute`). 'pathwise'
    is run once per (width, depth) in ``widths`` × ``depths`` (default: all units, all layers),
    with ``classes`` competing classes (default all).
    Per method: insertion and deletion AUC; Integrated Gradients adds its completeness delta
    |Σ IG − (y_c(x) − y_c(x₀))|; 'unwrap' adds the local model's completeness delta; pathwise
    adds masked score, faithfulness and sparsity. Per sample: target, score, probability and,
    when the input has at most ``max_input_size`` elements, the certified radii.

    Returns a JSON-ready dict: {"n", "target", "step", "samples": {metric: summary},
    "methods": {label: {"method", "options", "metrics": {metric: summary}}}, "skipped": [...]}
    where a summary is {"values": [...], "mean", "std"}: mean and population std over the finite
    values, None when there are none (undefined; ``null`` in JSON).
    ``attributions``, when given, receives each method label's attribution array (N, *input shape).
    ``progress`` shows a bar on stderr, one step per method run.
    """
    from . import baselines

    xb = explainer.check_input(x)
    rec = explainer.record(xb)
    tgt = resolve_targets(target, rec.scores)
    shape = xb.shape[1:]
    used_step = default_step(shape, channel_axis) if step is None else step
    runs: list[tuple[str, dict[str, Any]]] = []
    for m in methods:
        name, opts = (m, {}) if isinstance(m, str) else (m[0], dict(m[1]))
        spec = baselines.get_method(name)
        if spec.path and not opts and (widths is not None or depths is not None):
            for w in widths if widths is not None else [None]:
                for d in depths if depths is not None else [None]:
                    runs.append((name, {"width": w, "depth": d}))
        else:
            runs.append((name, opts))
    if classes is not None:  # the competing classes of every pathwise run (docs/design.md §4)
        runs = [(name, {**opts, "classes": classes} if baselines.METHODS[name].path else opts) for name, opts in runs]
    result: dict[str, Any] = {
        "n": int(xb.shape[0]),
        "target": tgt.tolist(),
        "step": int(used_step),
        "samples": {
            "score": _summary(target_scores(rec.scores, tgt)),
            "probability": _summary(target_probability(rec.scores, tgt)),
        },
        "methods": {},
        "skipped": [],
    }
    D = int(np.prod(shape, dtype=np.int64))
    if D <= max_input_size:
        radius = explainer.certified_radius(xb, record=rec, max_input_size=max_input_size)
        result["samples"]["certified_radius_l2"] = _summary(radius.l2)
        result["samples"]["certified_radius_linf"] = _summary(radius.linf)
    else:
        result["skipped"].append(f"certified radius: input has {D} elements > max_input_size {max_input_size}")
    inner = explainer.progress  # a sweep's own bar would be drawn over this one: off meanwhile
    explainer.progress = inner and not progress
    try:
        with progress_bar(progress, len(runs), f"evaluating {len(runs)} method run(s) on {xb.shape[0]} sample(s)") \
                as advance:
            for name, opts in runs:
                _run_method(explainer, xb, rec, tgt, name, opts, used_step, channel_axis, attributions, result)
                advance()
    finally:
        explainer.progress = inner
    return result


def _run_method(explainer: Explainer, xb: Array, rec: Any, tgt: Array, name: str, opts: dict[str, Any], step: int,
                channel_axis: int | None, attributions: dict[str, np.ndarray] | None, result: dict[str, Any]) -> None:
    """One method run of :func:`evaluate`: its attribution, its metrics into ``result``."""
    from . import baselines

    n = xb.shape[0]
    baselines.check_options(name, opts)
    metrics: dict[str, Any] = {}
    if baselines.METHODS[name].path:
        e = explainer.explain(xb, tgt, record=rec, **opts)
        attribution = e.attribution
        metrics["masked_score"] = _summary(e.masked_score)
        metrics["faithfulness"] = _summary(e.faithfulness)
        metrics["sparsity"] = _summary(e.sparsity)
    else:
        attribution = baselines.METHODS[name].fn(explainer, xb, tgt, record=rec, **opts)
    if name == "unwrap":
        metrics["completeness_delta"] = _summary(explainer.unwrap(xb, record=rec).delta)
    if name == "integrated_gradients":
        x0 = baselines._baseline(explainer, xb, opts.get("baseline", "zeros"))
        y0 = target_scores(explainer.scores(x0), tgt).astype(np.float64)
        total = attribution.reshape(n, -1).astype(np.float64).sum(axis=1)
        metrics["completeness_delta"] = _summary(np.abs(total - (target_scores(rec.scores, tgt) - y0)))
    ins = insertion(explainer, xb, attribution, tgt, step, channel_axis)
    dele = deletion(explainer, xb, attribution, tgt, step, channel_axis)
    metrics["insertion_auc"] = _summary(ins.auc)
    metrics["deletion_auc"] = _summary(dele.auc)
    label = _label(name, opts)
    if attributions is not None:
        attributions[label] = attribution
    result["methods"][label] = {
        "method": name,
        "options": {k: _plain(v) for k, v in opts.items()},
        "metrics": metrics,
        "curves": {"changed": ins.changed.tolist(), "insertion": ins.scores.mean(axis=0).tolist(),
                   "deletion": dele.scores.mean(axis=0).tolist()},
    }


def _plain(v: Any) -> Any:
    """A method option as plain Python (arrays as lists, numpy scalars as numbers), for the
    evaluation's result; io.jsonable is the writer's step, not this."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v
