"""Sliding-window helpers shared by convolution and pooling (N-d, strided, dilated, padded)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import as_strided

Array = np.ndarray


def pad_spatial(x: Array, pads: Sequence[int], out: Sequence[int], kernel: Sequence[int],
                strides: Sequence[int], dilations: Sequence[int], value: float) -> Array:
    """Pad the spatial axes of ``x`` (B, C, *L) by ``pads`` (begins then ends), and further at
    the end where ``out`` windows (ceil_mode) reach past the padded input."""
    n = len(out)
    width = [(0, 0), (0, 0)]
    for i in range(n):
        need = (out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
        have = x.shape[2 + i] + pads[i] + pads[n + i]
        width.append((pads[i], pads[n + i] + max(0, need - have)))
    if all(w == (0, 0) for w in width):
        return x
    return np.pad(x, width, constant_values=value)


def windows(xp: Array, out: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
            dilations: Sequence[int]) -> Array:
    """Read-only view (B, C, *out, *kernel) of the windows of a padded ``xp`` (B, C, *L)."""
    n = len(out)
    st = xp.strides
    shape = xp.shape[:2] + tuple(out) + tuple(kernel)
    view_strides = st[:2] + tuple(st[2 + i] * strides[i] for i in range(n)) + tuple(
        st[2 + i] * dilations[i] for i in range(n)
    )
    return as_strided(xp, shape, view_strides, writeable=False)


def col2im(cols: Array, padded: Sequence[int], strides: Sequence[int], dilations: Sequence[int]) -> Array:
    """Adjoint of :func:`windows`: scatter-add ``cols`` (B, C, *out, *kernel) into an array of
    spatial size ``padded``."""
    n = len(padded)
    out = cols.shape[2 : 2 + n]
    kernel = cols.shape[2 + n :]
    xp = np.zeros(cols.shape[:2] + tuple(padded), cols.dtype)
    for k in itertools.product(*(range(kk) for kk in kernel)):
        index = tuple(
            slice(k[i] * dilations[i], k[i] * dilations[i] + strides[i] * (out[i] - 1) + 1, strides[i])
            for i in range(n)
        )
        xp[(slice(None), slice(None)) + index] += cols[(Ellipsis,) + k]
    return xp


def crop(xp: Array, pads: Sequence[int], spatial: Sequence[int]) -> Array:
    n = len(spatial)
    return xp[(slice(None), slice(None)) + tuple(slice(pads[i], pads[i] + spatial[i]) for i in range(n))]


def padded_size(spatial: Sequence[int], pads: Sequence[int], out: Sequence[int], kernel: Sequence[int],
                strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    n = len(spatial)
    return [
        max(spatial[i] + pads[i] + pads[n + i], (out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1)
        for i in range(n)
    ]


def _split_negative_pads(pads: Sequence[int], spatial: Sequence[int]
                         ) -> tuple[list[int], list[int], tuple[slice, ...]]:
    """Pads with the negative ones turned into a crop: (pads ≥ 0, cropped spatial size, the
    cropped region as an index of (B, C, *spatial))."""
    n = len(spatial)
    cut = [max(-int(p), 0) for p in pads]
    cropped = [int(spatial[i]) - cut[i] - cut[n + i] for i in range(n)]
    inner = (slice(None), slice(None)) + tuple(slice(cut[i], cut[i] + cropped[i]) for i in range(n))
    return [max(int(p), 0) for p in pads], cropped, inner


def conv_nd(x: Array, w: Array, out: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
            pads: Sequence[int], group: int) -> Array:
    """Cross-correlation as ONNX Conv computes it, without bias: x (B, C, *L), w (M, C/g, *k).
    A negative pad crops the input (ConvTranspose's output_shape can ask for one)."""
    if min(pads, default=0) < 0:
        pads, _, inner = _split_negative_pads(pads, x.shape[2:])
        x = x[inner]
    B, C = x.shape[:2]
    M = w.shape[0]
    kernel = w.shape[2:]
    g = group
    xp = pad_spatial(x, pads, out, kernel, strides, dilations, 0.0)
    cols = windows(xp, out, kernel, strides, dilations)  # (B, C, *n_out, *K)
    n_out = int(np.prod(out, dtype=np.int64))
    K = int(np.prod(kernel, dtype=np.int64))
    n = len(out)
    perm = (0, 1) + tuple(range(2 + n, 2 + 2 * n)) + tuple(range(2, 2 + n))
    cols = cols.transpose(perm).reshape(B, g, (C // g) * K, n_out)  # (B, g, Cg·K, n_out)
    wg = w.reshape(g, M // g, (C // g) * K)
    y = np.matmul(wg[None], cols)  # (B, g, Mg, n_out)
    return y.reshape((B, M) + tuple(out))


def conv_nd_adjoint(y: Array, w: Array, spatial: Sequence[int], strides: Sequence[int],
                    dilations: Sequence[int], pads: Sequence[int], group: int) -> Array:
    """Adjoint of :func:`conv_nd` with respect to x: y (B, M, *n_out) → (B, C, *spatial).
    A negative pad leaves zeros where conv_nd cropped the input."""
    if min(pads, default=0) < 0:
        pads, cropped, inner = _split_negative_pads(pads, spatial)
        dx = conv_nd_adjoint(y, w, cropped, strides, dilations, pads, group)
        full = np.zeros(dx.shape[:2] + tuple(spatial), dx.dtype)
        full[inner] = dx
        return full
    B, M = y.shape[:2]
    out = y.shape[2:]
    kernel = w.shape[2:]
    g = group
    Cg = w.shape[1]
    n = len(out)
    n_out = int(np.prod(out, dtype=np.int64))
    K = int(np.prod(kernel, dtype=np.int64))
    wg = w.reshape(g, M // g, Cg * K)
    yg = y.reshape(B, g, M // g, n_out)
    cols = np.matmul(wg.transpose(0, 2, 1)[None], yg)  # (B, g, Cg·K, n_out)
    cols = cols.reshape((B, g * Cg) + tuple(kernel) + tuple(out))
    perm = (0, 1) + tuple(range(2 + n, 2 + 2 * n)) + tuple(range(2, 2 + n))
    cols = cols.transpose(perm)  # (B, C, *n_out, *K)
    padded = padded_size(spatial, pads, out, kernel, strides, dilations)
    xp = col2im(cols, padded, strides, dilations)
    return crop(xp, pads, spatial)
