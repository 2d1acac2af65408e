"""Model edits for :mod:`onnx_pathwise.audit`'s randomisation sanity check: find the weights of
the last affine layer and redraw them (protobuf in, protobuf out)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from . import runtime
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


def redrawn(w: np.ndarray, seed: int = 0) -> np.ndarray:
    """A draw from a normal distribution with the mean and standard deviation of ``w``."""
    rng = np.random.default_rng(seed)
    w64 = np.asarray(w, np.float64)  # float32 statistics of a 1e38 weight overflow
    std = float(w64.std()) or 1.0
    new = rng.normal(float(w64.mean()), std, size=w.shape)
    if w.dtype.kind == "f":  # a draw beyond float32's range would cast to inf
        new = np.clip(new, np.finfo(w.dtype).min, np.finfo(w.dtype).max)
    return new.astype(w.dtype)


def _redraw(model: onnx.ModelProto, name: str, seed: int) -> onnx.ModelProto:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(redrawn(numpy_helper.to_array(t), seed), name))
            return model
    raise KeyError(name)


def randomize_initializer(model: onnx.ModelProto, name: str, seed: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` whose initializer ``name`` is redrawn (:func:`redrawn`)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return _redraw(out, name, seed)


def randomized(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], name: str, seed: int = 0,
               ) -> onnx.ModelProto:
    """The whole model from an Explainer's lean one and its arrays (:func:`runtime.filled`) with
    initializer ``name`` redrawn: the audit builds it without a second copy of the original."""
    return _redraw(runtime.filled(model, arrays), name, seed)
