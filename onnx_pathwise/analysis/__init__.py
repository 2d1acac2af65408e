"""The analysis: a checked ModelProto in, a :class:`~onnx_pathwise.ir.ModelIR` out, reading no
file (docs/design.md §8). :func:`analyse` (:mod:`.build`) chains the steps: the explained input
and output (:mod:`.ports`), tensor kinds (:mod:`.kinds`), the validated cone (:mod:`.cone`),
the probe run and its fixed-batch checks (:mod:`.fixed_batch`), canonical attributes
(:mod:`.attributes`)."""

from __future__ import annotations

from .attributes import canonical_attrs
from .build import analyse
from .cone import SUPPORTED_OPS
from .kinds import CONST, DATA, SHAPE_KIND
from .ports import ML_DOMAIN, TERMINAL_OPS

__all__ = ["CONST", "DATA", "ML_DOMAIN", "SHAPE_KIND", "SUPPORTED_OPS", "TERMINAL_OPS", "analyse", "canonical_attrs"]
