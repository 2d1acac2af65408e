"""Graph checks for a file that fixes the batch at B > 1 (older PyTorch exports fix it at the
tracing batch): no op may mix the rows of a batch, checked on the graph and numerically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from .kinds import DATA


def node_where(node: onnx.NodeProto, opset: int) -> str:
    """How messages name a node: its name, op type and opset."""
    return f"{node.name or '<unnamed>'} ({node.op_type}, opset {opset})"


#: Ops whose constant operands broadcast against the computed tensor, axes aligned from the
#: right: a constant of the output's full rank has an axis on the batch axis.
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "Max", "PRelu", "Concat"})


def fixed_batch_problems(
    nodes: Sequence[onnx.NodeProto],
    kind: Mapping[str, int],
    consts: dict[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    batch: int,
    opset: int,
) -> list[str]:
    """Graph checks for a file that fixes the batch at ``batch`` > 1, beyond those that
    refuse an op on axis 0 at any batch size (:func:`~onnx_pathwise.analysis.attributes.canonical_attrs`): a MatMul whose constant
    left operand contracts the batch axis, and constants that hold one value per batch row
    (a sample's result would depend on its place in the group). A constant whose rows are all
    equal is kept as one row, which broadcasts over any batch."""
    problems: list[str] = []
    per_row: dict[str, list[onnx.NodeProto]] = {}
    other_uses: set[str] = set()
    for node in nodes:
        op = node.op_type
        data = [t for t in node.input if t and kind.get(t) == DATA]
        if not data:
            continue
        rank = len(shapes[data[0]]) + 1
        out_rank = len(shapes[node.output[0]]) + 1 if node.output[0] in shapes else rank
        if op == "MatMul" and len(node.input) > 1 and kind.get(node.input[1]) == DATA and rank <= 2:
            problems.append(f"{node_where(node, opset)}: MatMul(W, x) with a constant W on the left and x of "
                            f"rank 2 contracts the batch axis (fixed at {batch} in the file): it mixes samples")
        for i, t in enumerate(node.input):
            if not t or kind.get(t) == DATA or t not in consts:
                continue
            c = np.asarray(consts[t])
            if op in _BROADCASTING:
                aligned = c.ndim == out_rank
            elif op == "Gemm":
                aligned = i == 2 and c.ndim == 2
            elif op == "MatMul":
                aligned = c.ndim >= 3 and c.ndim == rank
            else:
                aligned = False
            if aligned and c.shape[0] == batch:
                per_row.setdefault(t, []).append(node)
            else:
                other_uses.add(t)
    for t, users in per_row.items():
        c = np.asarray(consts[t])
        if t not in other_uses and np.array_equal(c, np.broadcast_to(c[:1], c.shape), equal_nan=c.dtype.kind in "fc"):
            consts[t] = c[:1]
            continue
        problems.append(f"{node_where(users[0], opset)}: constant {t!r} of shape {c.shape} holds one value per "
                        f"batch row (the batch is fixed at {batch} in the file): a sample's result would "
                        "depend on its place in the group")
    return problems


def rows_mixed(
    nodes: Sequence[onnx.NodeProto], needed: set[str], runs: Sequence[Mapping[str, Any]], batch: int, opset: int
) -> list[str]:
    """The numeric check behind the graph checks for a fixed batch B > 1: the second run's
    input holds the first run's rows moved down by one and a fresh row 0, so where every row
    is computed on its own, row i+1 of every recorded tensor in the second run equals row i of
    the first (to the round-off of a kernel that sees the row at another place). The first
    tensor where it does not, in topological order, names the node that mixes samples."""
    first, second = runs
    for node in nodes:
        for t in node.output:
            if t not in needed or t not in first:
                continue
            a = np.asarray(first[t], np.float64)[:-1]
            b = np.asarray(second[t], np.float64)[1:]
            scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)), 1e-30)
            tol = (1e-4 if np.asarray(first[t]).dtype.itemsize >= 4 else 2e-2) * scale
            diff = np.abs(a - b)
            if not np.all((diff <= tol) | (a == b) | (np.isnan(a) & np.isnan(b))):
                worst = float(np.nanmax(diff)) if np.any(np.isfinite(diff)) else float("nan")
                return [f"{node_where(node, opset)}: its output {t!r} mixes the samples of a batch (fixed at "
                        f"{batch} in the file): moving the samples by one place changed their values by "
                        f"up to {worst:.3g}, not just their place"]
    return []
