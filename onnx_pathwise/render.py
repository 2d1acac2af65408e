"""Text rendering of what the tool sees in a model: :func:`describe` (JSON-ready data, also the
HTML reports' model summary), the ``inspect`` text and its tables, the unsupported-nodes report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import (
    UnsupportedModelError,
)
from .explainer import Explainer
from .graph import GateLayer, Segment
from .ir import GATE, ROUTING
from .text import clean


def _gate_parameters(ex: Explainer) -> int:
    """Learned gate parameters (PRelu slopes); the other gates have none."""
    total = 0
    for node in ex.ir.nodes:
        if node.role == GATE and node.op_type == "PRelu":
            total += sum(ex.ir.constants[t].size for t, d in zip(node.inputs, node.data)
                         if t and not d and t in ex.ir.constants)
    return int(total)


def _gate_dict(g: GateLayer) -> dict[str, Any]:
    return {"index": g.index, "name": g.name, "op_type": g.op_type, "units": g.units,
            "shape": list(g.shape), "input": g.input, "output": g.output}


def _segment_dict(s: Segment, op_types: Mapping[str, str]) -> dict[str, Any]:
    return {"index": s.index, "nodes": list(s.nodes), "op_types": [op_types[n] for n in s.nodes],
            "inputs": list(s.inputs), "outputs": list(s.outputs), "parameters": s.parameters}


def describe(ex: Explainer, model: Path | str) -> dict[str, Any]:
    """What ``inspect`` reports about an analysable model, as plain JSON-ready data."""
    ir = ex.ir
    op_types = {n.name: n.op_type for n in ir.nodes}
    segments = [_segment_dict(s, op_types) for s in ex.segments]
    gate_params = _gate_parameters(ex)
    return {
        "model": str(model),
        "analysable": True,
        "producer": ir.info.get("producer", ""),
        "opset": ir.opset,
        "input": {"name": ir.input_name, "shape": ["N", *ir.input_shape], "dtype": str(ir.input_dtype),
                  "batch_fixed_in_file": ir.batch_fixed,
                  **({"batch_in_file": ir.fixed_batch} if ir.batch_fixed else {})},
        "output": {"name": ir.source_output or ir.output_name, "explained": ir.output_name,
                   "peeled": list(ir.peeled), "classes": ir.num_classes},
        "gate_layers": [_gate_dict(g) for g in ex.gate_layers],
        "routing": [{"name": n.name, "op_type": n.op_type} for n in ir.nodes if n.role == ROUTING],
        "segments": segments,
        "parameters": sum(s["parameters"] for s in segments) + gate_params,
    }


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    cells = [list(map(str, headers))] + [[clean(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def _dims(shape: Sequence[Any]) -> str:
    return "×".join(map(str, shape)) if shape else "scalar"


def _ops_summary(ops: Sequence[str], limit: int = 5) -> str:
    text = " → ".join(ops[:limit])
    return text + f" → … ({len(ops)} nodes)" if len(ops) > limit else text


def _names_summary(names: Sequence[str], limit: int = 2) -> str:
    """The first ``limit`` tensor names and how many there are: a DenseNet's Concat segment
    reads 17 tensors, which made every row of the table a screen and a half wide (``--json``
    lists them all)."""
    text = ", ".join(names[:limit])
    return text + f", … ({len(names)} tensors)" if len(names) > limit else text


def _describe_text(info: Mapping[str, Any]) -> str:
    inp, out = info["input"], info["output"]
    producer = f"made by {info['producer']}, " if info["producer"] else ""
    lines = [f"{clean(info['model'])}  ({clean(producer)}opset {info['opset']})", ""]
    batch = "N is the batch axis"
    if inp["batch_fixed_in_file"]:
        fixed = inp.get("batch_in_file") or 1
        batch = f"fixed at {fixed} in the file; any N works" + (f", run in groups of {fixed}" if fixed > 1 else "")
    lines.append(f"Input     {inp['name']!r}: {inp['dtype']}, shape ({', '.join(map(str, inp['shape']))})"
                 f"  [{batch}]")
    if out["peeled"]:
        peeled = " then ".join(reversed(out["peeled"]))
        lines.append(f"Output    {out['name']!r}; explained scores: {out['explained']!r}, "
                     f"before the final {peeled} (explanations target these logits)")
    else:
        lines.append(f"Output    {out['name']!r}; explained scores: {out['explained']!r}")
    lines.append(f"Classes   {out['classes']} scores per sample" if out["classes"] != 1 else
                 "Classes   1 score per sample (a single logit: classes 0 and 1 are its two sides)")
    lines.append("")
    gates = info["gate_layers"]
    lines.append(f"Gate layers: {len(gates)} (the hidden layers; a unit is one element of a gate's output)")
    if gates:
        lines += _table(["#", "node", "op", "units", "shape"],
                        [[g["index"], g["name"], g["op_type"], g["units"], _dims(g["shape"])] for g in gates])
    else:
        lines.append("  none: the model is affine, every explanation is exact input×gradient")
    lines.append("")
    routing = info["routing"]
    lines.append(f"Routing nodes: {len(routing)} (max-pool choices, frozen at each input, never selected)")
    lines += [f"  {clean(r['name'])} ({clean(r['op_type'])})" for r in routing] or ["  none"]
    lines.append("")
    segs = info["segments"]
    lines.append(f"Segments: {len(segs)} (the affine pieces between gates, after folding constants and BatchNorm)")
    lines += _table(["#", "ops", "inputs", "outputs", "parameters"],
                    [[s["index"], _ops_summary(s["op_types"]), _names_summary(s["inputs"]),
                      _names_summary(s["outputs"]), f"{s['parameters']:,}"] for s in segs])
    lines.append("")
    lines.append(f"Parameters  {info['parameters']:,} on the explained path")
    return "\n".join(lines)


def _unsupported_text(model: Path, exc: UnsupportedModelError) -> str:
    lines = [f"{clean(model)}: not analysable: {len(exc.problems)} node(s) on the input→output path "
             "are not supported:"]
    lines += [f"  - {clean(p)}" for p in exc.problems]
    lines.append("Supported ops: " + ", ".join(sorted(exc.supported)) + ".")
    lines.append("A final Softmax, LogSoftmax or Sigmoid is allowed (peeled).")
    return "\n".join(lines)


