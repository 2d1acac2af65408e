"""Graph rewrites on the IR. Each pass returns ``(new_ir, changed)`` and leaves the cone's
outputs unchanged (tested by evaluating before and after)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .ir import AFFINE, ModelIR, Node
from .rules import Ctx
from .rules.normalization import batchnorm_affine

PASS_THROUGH = ("Identity", "Dropout", "Cast")


def drop_pass_through(ir: ModelIR) -> tuple[ModelIR, bool]:
    """Remove Identity, inference Dropout and float Cast nodes, rewiring their readers."""
    rename: dict[str, str] = {}
    kept: list[Node] = []
    output = ir.output_name
    for node in ir.nodes:
        if node.op_type in PASS_THROUGH and node.data[0]:
            src = rename.get(node.inputs[0], node.inputs[0])
            rename[node.outputs[0]] = src
            if node.outputs[0] == output:
                output = src
            continue
        if any(t in rename for t in node.inputs):
            node = replace(node, inputs=tuple(rename.get(t, t) for t in node.inputs))
        kept.append(node)
    if len(kept) == len(ir.nodes):
        return ir, False
    return replace(ir, nodes=kept, output_name=output), True


def fold_batchnorm(ir: ModelIR) -> tuple[ModelIR, bool]:
    """Fold an inference BatchNormalization into the Conv or ConvTranspose (group 1) that is its
    only producer and whose output only it reads: W' = W·a (per output channel), b' = a·b + shift."""
    consumers = ir.consumers()
    producer = {t: n for n in ir.nodes for t in n.outputs}
    constants = dict(ir.constants)
    nodes = list(ir.nodes)
    changed = False
    for bn in list(nodes):
        if bn.op_type != "BatchNormalization" or len(bn.outputs) > 1 and any(bn.outputs[1:]):
            continue
        prev = producer.get(bn.inputs[0])
        if prev is None or prev.op_type not in ("Conv", "ConvTranspose") or bn.inputs[0] == ir.output_name:
            continue
        if len(consumers.get(bn.inputs[0], [])) != 1 or prev not in nodes:
            continue
        if prev.op_type == "ConvTranspose" and int(prev.attrs.get("group", 1)) != 1:
            continue
        ctx = Ctx(1, (), (), tuple(None if not t else ir.constants.get(t) for t in bn.inputs))
        a, shift = batchnorm_affine(bn, ctx)
        w = np.asarray(ir.constants[prev.inputs[1]], np.float64)
        if prev.op_type == "Conv":
            w2 = w * a.reshape((-1,) + (1,) * (w.ndim - 1))
        else:
            w2 = w * a.reshape((1, -1) + (1,) * (w.ndim - 2))
        b = (
            np.asarray(ir.constants[prev.inputs[2]], np.float64)
            if len(prev.inputs) > 2 and prev.inputs[2]
            else np.zeros(a.shape)
        )
        b2 = a * b + shift
        dtype = ir.constants[prev.inputs[1]].dtype
        wname, bname = f"{prev.name}::folded_weight", f"{prev.name}::folded_bias"
        constants[wname] = w2.astype(dtype)
        constants[bname] = b2.astype(dtype)
        folded = replace(
            prev,
            inputs=(prev.inputs[0], wname, bname),
            outputs=(bn.outputs[0],),
            data=(True, False, False),
            attrs={**prev.attrs, "folded_batchnorm": bn.name},
            role=AFFINE,
        )
        nodes[nodes.index(prev)] = folded
        nodes.remove(bn)
        changed = True
    if not changed:
        return ir, False
    used = {t for n in nodes for t, d in zip(n.inputs, n.data) if t and not d}
    shapes = {t: s for t, s in ir.shapes.items() if t == ir.input_name or any(t in n.outputs for n in nodes)}
    return replace(ir, nodes=nodes, constants={k: v for k, v in constants.items() if k in used}, shapes=shapes), True


DEFAULT_PASSES = (drop_pass_through, fold_batchnorm)


def run_passes(ir: ModelIR) -> ModelIR:
    for p in DEFAULT_PASSES:
        ir, _ = p(ir)
    return ir
