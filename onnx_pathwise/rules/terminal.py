"""Terminal ops: Softmax, LogSoftmax and Sigmoid after the last layer are peeled by the loader,
so that explanations target their input (the logits); anywhere else on the path they are
refused. They are never evaluated or swept: their entries carry the role and the attributes."""

from __future__ import annotations

import numpy as np

from ..ir import TERMINAL, Node
from . import Ctx, register
from .attrs import axis_canonical

Array = np.ndarray


@register("Softmax", "LogSoftmax", role=TERMINAL, canonical=axis_canonical,
          notes="after the last layer only, over each sample's scores: peeled")
@register("Sigmoid", role=TERMINAL, notes="after the last layer only: peeled")
class Peeled:
    """Peeled before analysis (docs/design.md §1); no rule evaluates or transposes it."""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        raise NotImplementedError(f"{node.op_type} is peeled, never evaluated by the engine")

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        raise NotImplementedError(f"{node.op_type} is peeled, never swept")
