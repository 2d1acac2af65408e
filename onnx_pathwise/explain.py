"""The pathwise explanation driver (docs/design.md §4) on the shared sweep
(:class:`onnx_pathwise.sweep.Sweep`): samples in chunks that fit the memory budget, one
:class:`onnx_pathwise.pathwise.PathSweep` per chunk (itself in class chunks where one sample's
competing rows do not fit), and the :class:`~onnx_pathwise.pathwise.Explanation` assembled from
it. :meth:`onnx_pathwise.Explainer.explain` calls :func:`explain`; :func:`path_sweep` is shared
with :mod:`onnx_pathwise.decompose`.

>>> import numpy as np
>>> from onnx_pathwise import Explainer
>>> from onnx_pathwise.samples import tiny_mlp
>>> e = explain(Explainer(tiny_mlp(), device="cpu").sweep, np.array([1.0, 2.0], np.float32))
>>> e.attribution.tolist(), e.masked_score.tolist()
([[1.0, 0.0]], [1.5])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .engine import Record
from .pathwise import (
    Explanation,
    PathLayer,
    PathSweep,
    competing_rows,
    competing_set,
    parse_classes,
    parse_width,
    path_layers,
    resolve_targets,
)
from .sweep import Sweep, concat_batches, refuse_overflow, slice_record


def path_setup(sweep: Sweep, width: Any, depth: int | None) -> tuple[list[Any], dict[str, int]]:
    """The path layers (the last ``depth`` gate layers) and the units kept in each."""
    layers = path_layers(sweep.gate_layers, depth)
    return layers, {layer.name: parse_width(width, layer.units) for layer in layers}


def _result_bytes(e: Explanation) -> int:
    """Bytes an explanation holds: its arrays and every path layer's kept units."""
    arrays = (e.attribution, e.weight, e.bias, e.output, e.target, e.masked_score, e.input_kept)
    return sum(a.nbytes for a in arrays if a is not None) + sum(p.kept.nbytes for s in e.path for p in s)


def path_sweep(sweep: Sweep, rec: Record, target: Any, width: Any, depth: int | None, input_width: Any,
               keep_at: str | None = None, classes: int | None = None, progress: bool = False,
               held: int = 0) -> tuple[list[Any], Any, np.ndarray, np.ndarray]:
    """The pathwise sweep (every competing row down to the lowest path layer, in class
    chunks where they do not fit the memory budget): (path layers, the sweep with its
    masks and targets, W_p (n, *in), b_p (n,) of each target). ``held``: bytes of earlier
    results the caller keeps meanwhile, taken from what class chunks may keep in memory."""
    layers, widths = path_setup(sweep, width, depth)
    D = int(np.prod(sweep.input_shape, dtype=np.int64))
    in_width = parse_width(input_width, D) if input_width is not None else None
    tgt = resolve_targets(target, rec.scores)
    competing = competing_set(rec.scores, tgt, classes)
    _, chunk, store = sweep.sweep_plan(competing.rows, rec.n)
    store = max(0.0, store - held)
    graph = sweep.selection_graph(widths, competing.rows) if in_width is None and keep_at is None else None
    path = PathSweep(sweep.engine, layers, rec, tgt, competing, widths, in_width, keep_at=keep_at,
                     chunk=chunk, store_bytes=store, progress=progress, graph=graph)
    W, b = path.run()
    return layers, path, W, b


def explain(
    sweep: Sweep,
    x: Any,
    target: Any = None,
    width: int | str | None = None,
    depth: int | None = None,
    input_width: int | str | None = None,
    record: Record | None = None,
    classes: int | str | None = None,
    progress: bool = False,
    held: int = 0,
) -> Explanation:
    """Pathwise explanation of each sample, one backward sweep per chunk of samples (recorded
    once); the options as in :meth:`onnx_pathwise.Explainer.explain`, ``progress`` shows a
    progress bar on stderr while a sweep goes in class chunks. The explanations of the chunks
    done so far (``held`` bytes from the caller's, plus this call's) are kept while the next
    chunk is swept: the memory plan's checkpoint store gives them room."""
    ncls = parse_classes(classes)
    xb = sweep.check_input(x) if record is None else record.x
    step, _, _ = sweep.sweep_plan(competing_rows(ncls, sweep.num_classes), xb.shape[0])
    if xb.shape[0] > step:  # bounded memory: one sweep per chunk of samples, recorded once
        t = None if target is None else np.asarray(target)
        parts: list[Explanation] = []
        kept = held  # bytes of the explanations held while the next chunk is swept
        for s in range(0, xb.shape[0], step):
            parts.append(explain(sweep, xb[s : s + step], t if t is None or t.ndim == 0 else t[s : s + step],
                                 width, depth, input_width,
                                 record=None if record is None else slice_record(record, s, s + step),
                                 classes=ncls, progress=progress, held=kept))
            kept += _result_bytes(parts[-1])
        return concat_batches(parts)  # type: ignore[no-any-return]
    rec = record if record is not None else sweep.record(xb)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, not warned
        layers, path, weight, bias = path_sweep(sweep, rec, target, width, depth, input_width, classes=ncls,
                                                progress=progress, held=held)
        tgt = path.target
        n = rec.n
        xf = rec.x.astype(np.float64)
        masked = (weight.reshape(n, -1).astype(np.float64) * xf.reshape(n, -1)).sum(axis=1) + bias
        attribution = (weight * rec.x).astype(weight.dtype)
    refuse_overflow("the pathwise explanation", attribution, masked)
    paths = [
        [PathLayer(layer.name, np.flatnonzero(path.masks[layer.name][i]), layer.units) for layer in layers]
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
        input_kept=path.input_mask,
        classes=ncls,
        selection=path.selection,
    )
