"""The front end: a model file (or a ModelProto) → a checked ModelProto (:mod:`onnx_pathwise.load`)
→ its :class:`~onnx_pathwise.ir.ModelIR` (:mod:`onnx_pathwise.analysis`). ``Explainer`` and
``audit`` open models through :func:`load`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .analysis import analyse
from .errors import ModelError
from .ir import ModelIR
from .load import read_source, upgrade_old_opset

if TYPE_CHECKING:
    import onnx


def load(
    source: str | os.PathLike[str] | onnx.ModelProto,
    *,
    input_name: str | None = None,
    output_name: str | None = None,
    probe: Any = None,
) -> tuple[onnx.ModelProto, ModelIR]:
    """Read and analyse a model; return the (external-data-loaded) ModelProto and its IR.

    ``probe(model, outputs, feed)`` runs the model in onnxruntime and returns the named
    outputs; by default :func:`onnx_pathwise.runtime.probe`.
    """
    model, label = read_source(source)
    if probe is None:
        from .runtime import probe as probe_fn

        probe = probe_fn
    try:
        model = upgrade_old_opset(model)
        return model, analyse(model, label, input_name, output_name, probe)
    except ModelError as exc:
        if str(exc).startswith(label):
            raise
        exc.args = (f"{label}: {exc.args[0]}",) + exc.args[1:]
        raise
