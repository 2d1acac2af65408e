"""Model edits for :mod:`onnx_pathwise.audit`'s randomisation sanity check: find the weights of
the last affine layer and redraw them (protobuf in, protobuf out)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .ir import ModelIR


def last_weight(ir: ModelIR, model: onnx.ModelProto) -> str | None:
    """The initializer holding the weights of the affine layer closest to the output."""
    inits = {t.name for t in model.graph.initializer}
    for node in reversed(ir.nodes):
        if node.op_type in ("Gemm", "MatMul", "Conv", "ConvTranspose"):
            for t, d in zip(node.inputs, node.data):
                if t and not d and t in inits and ir.constants[t].ndim >= 2:
                    return t
    return None


def randomize_initializer(model: onnx.ModelProto, name: str, seed: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` whose initializer ``name`` is redrawn from a normal distribution with
    the same mean and standard deviation (the randomisation sanity check)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        if t.name == name:
            w = numpy_helper.to_array(t)
            rng = np.random.default_rng(seed)
            w64 = w.astype(np.float64)  # float32 statistics of a 1e38 weight overflow
            std = float(w64.std()) or 1.0
            new = rng.normal(float(w64.mean()), std, size=w.shape)
            if w.dtype.kind == "f":  # a draw beyond float32's range would cast to inf
                new = np.clip(new, np.finfo(w.dtype).min, np.finfo(w.dtype).max)
            new = new.astype(w.dtype)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(new, name))
            return out
    raise KeyError(name)
