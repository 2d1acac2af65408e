"""DepthToSpace and SpaceToDepth: permutations of elements between channels and space
(PyTorch's PixelShuffle exports as DepthToSpace in CRD mode), never across samples."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ModelError
from ..ir import SHAPE, Node
from . import Ctx, register, rows_shape

Array = np.ndarray


def _depth_space_canonical(
    node: Node, a: dict[str, Any], consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """One form for every opset (DepthToSpace-1 has no ``mode``: it is DCR); refuse what the
    rule cannot handle. ``shapes`` are per-sample: (C, H, W)."""
    op = node.op_type
    bs = int(a["blocksize"])
    shape = shapes[node.inputs[0]]
    if op == "DepthToSpace":
        a["mode"] = a.get("mode", "DCR")
        if a["mode"] not in ("DCR", "CRD"):
            raise ModelError(f"DepthToSpace mode {a['mode']!r} is not supported")
    if bs < 1 or len(shape) != 3:
        raise ModelError(f"{op} needs an (N, C, H, W) input and a positive blocksize")
    if op == "DepthToSpace" and shape[0] % (bs * bs):
        raise ModelError(f"DepthToSpace needs C divisible by {bs * bs}")
    if op == "SpaceToDepth" and (shape[1] % bs or shape[2] % bs):
        raise ModelError(f"SpaceToDepth needs H and W divisible by {bs}")
    a["blocksize"] = bs


def _view(node: Node, rows: int, in_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The 6-D view of X (rows, C, H, W) and the permutation the op applies to it."""
    c, h, w = in_shape
    bs = int(node.attrs["blocksize"])
    if node.op_type == "SpaceToDepth":
        return (rows, c, h // bs, bs, w // bs, bs), (0, 3, 5, 1, 2, 4)
    if node.attrs["mode"] == "DCR":
        return (rows, bs, bs, c // (bs * bs), h, w), (0, 3, 4, 1, 5, 2)
    return (rows, c // (bs * bs), bs, bs, h, w), (0, 1, 4, 2, 5, 3)


@register("DepthToSpace", role=SHAPE, canonical=_depth_space_canonical,
          notes="DCR and CRD modes (PyTorch's PixelShuffle), (N, C, H, W) inputs")
@register("SpaceToDepth", role=SHAPE, canonical=_depth_space_canonical, notes="(N, C, H, W) inputs")
class DepthSpace:
    """DepthToSpace: X (N, C, H, W) viewed as 6-D (DCR: (N, b, b, C/b², H, W); CRD:
    (N, C/b², b, b, H, W)), permuted and reshaped to (N, C/b², H·b, W·b). SpaceToDepth: X viewed
    as (N, C, H/b, b, W/b, b), permuted to (N, b, b, C, H/b, W/b) and reshaped to
    (N, C·b², H/b, W/b). Permutations of elements. Adjoint: the inverse permutation (reshape Ȳ
    to the permuted 6-D shape, transpose back, reshape to X's shape).
    https://onnx.ai/onnx/operators/onnx__DepthToSpace.html,
    https://onnx.ai/onnx/operators/onnx__SpaceToDepth.html"""

    @staticmethod
    def forward(node: Node, inputs: list[Array | None], ctx: Ctx) -> list[Array]:
        x = inputs[0]
        assert x is not None
        six, perm = _view(node, x.shape[0], x.shape[1:])
        return [x.reshape(six).transpose(perm).reshape(rows_shape(x, ctx.out_shapes[0]))]

    @staticmethod
    def transpose(node: Node, cots: list[Array | None], ctx: Ctx) -> list[Array | None]:
        (g,) = cots
        assert g is not None
        six, perm = _view(node, g.shape[0], tuple(ctx.in_shapes[0] or ()))
        permuted = tuple(six[p] for p in perm)
        return [g.reshape(permuted).transpose(np.argsort(perm)).reshape(rows_shape(g, ctx.in_shapes[0]))]

    @staticmethod
    def emit(node: Node, cots: list[str | None], ctx: Ctx, b: Any) -> list[str | None]:
        (g,) = cots
        assert g is not None
        six, perm = _view(node, -1, tuple(ctx.in_shapes[0] or ()))
        permuted = b.op("Reshape", [g, b.const(np.array([six[p] for p in perm], np.int64))])
        back = b.op("Transpose", [permuted], perm=[int(p) for p in np.argsort(perm)])
        return [b.op("Reshape", [back, b.shape(ctx.in_shapes[0])])]
