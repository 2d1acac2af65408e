"""Decomposition of a pathwise attribution through one gate layer (docs/design.md §4), on the
shared sweep (:class:`onnx_pathwise.sweep.Sweep`): the pathwise sweep kept at the layer, then one
replay per part (a unit or a channel) ranked by its score contribution h_u·∂y_c/∂h_u.
:meth:`onnx_pathwise.Explainer.decompose` checks the arguments and calls :func:`decompose`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import graph as graph_mod
from .explain import path_sweep
from .pathwise import competing_rows, parse_classes
from .sweep import Sweep, concat_batches, refuse_overflow


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


@np.errstate(over="ignore", invalid="ignore")  # an overflow is refused below, not warned
def decompose(
    sweep: Sweep,
    x: Any,
    name: str,
    top: int = 8,
    group: str = "unit",
    target: Any = None,
    width: int | str | None = None,
    depth: int | None = None,
    input_width: int | str | None = None,
    classes: int | str | None = None,
    progress: bool = False,
) -> Decomposition:
    """The decomposition of each sample at gate layer ``name`` (checked by the caller, as are
    ``top`` and ``group``): one pathwise sweep per chunk of samples that fits the memory budget,
    kept at the layer, then one replay of the top parts and the rest."""
    ncls = parse_classes(classes)
    names = [g.name for g in sweep.gate_layers]
    xb = sweep.check_input(x)
    step, _, _ = sweep.sweep_plan(competing_rows(ncls, sweep.num_classes), xb.shape[0])
    if xb.shape[0] > step:  # bounded memory: one sweep per chunk of samples
        t = None if target is None else np.asarray(target)
        return concat_batches([  # type: ignore[no-any-return]
            decompose(sweep, xb[s : s + step], name, top, group, t if t is None or t.ndim == 0 else t[s : s + step],
                      width, depth, input_width, ncls, progress)
            for s in range(0, xb.shape[0], step)
        ])
    gl = sweep.gate_layers[names.index(name)]
    rec = sweep.record(xb)
    _, path, W, _ = path_sweep(sweep, rec, target, width, depth, input_width, keep_at=name, classes=ncls,
                               progress=progress)
    tgt = path.target
    n = rec.n
    attribution = (W * rec.x).astype(W.dtype)
    assert path.at_layer is not None
    g = path.at_layer.astype(np.float64)  # (n, u), masks applied
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
    seeds = np.zeros((m + 1, n, gl.units), sweep.engine.dtype)
    chosen = np.zeros((n, gl.units), bool)
    for i in range(n):
        for j in range(m):
            sel = (groups == order[i, j]) & active[i, groups]
            seeds[j, i, sel] = g[i, sel]
            chosen[i] |= sel
    seeds[m] = np.where(chosen, 0.0, g)
    Wp = path.replay({gl.output: seeds.reshape((m + 1, n) + gl.shape)})
    parts = (Wp[:m] * rec.x[None]).swapaxes(0, 1)  # (n, m, *in)
    rest = Wp[m] * rec.x
    bypass = attribution - parts.sum(axis=1) - rest
    refuse_overflow("the decomposition", attribution, parts, rest, bypass)
    g_cut = sweep.layer_graph.copy()
    g_cut.remove_node(name)
    out_node = next(v for v, d in sweep.layer_graph.nodes(data=True) if sweep.ir.output_name in d["outputs"])
    import networkx as nx  # only here: a plain explanation imports none

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
