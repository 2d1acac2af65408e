"""PNG figures for the CLI (matplotlib, Agg backend): heatmaps beside inputs, decomposition
grids, insertion/deletion curves and width sweeps. Each function returns PNG bytes, so the
caller writes them atomically."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .text import number

Array = np.ndarray


def is_image(shape: Sequence[int]) -> bool:
    """(C, H, W) with a few channels and a real spatial extent, or (H, W)."""
    if len(shape) == 3:
        return shape[0] <= 4 and shape[1] >= 4 and shape[2] >= 4
    return len(shape) == 2 and shape[0] >= 4 and shape[1] >= 4


def _figure(rows: int, cols: int, size: float = 2.6) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    return fig, axes


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _as_picture(x: Array) -> tuple[Array, str | None]:
    """An input image for display: channels last, scaled to [0, 1] (grey for 1 channel)."""
    img = x if x.ndim == 2 else (x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)[..., :3])
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return img, ("gray" if img.ndim == 2 else None)


def _heat(ax: Any, a: Array, title: str) -> None:
    m = a if a.ndim == 2 else a.sum(axis=0)
    lim = float(np.abs(m).max()) or 1.0
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def input_and_heatmap(x: Array, attribution: Array, title: str) -> bytes:
    """The input beside its attribution summed over channels (signed colour map)."""
    fig, axes = _figure(1, 2)
    img, cmap = _as_picture(x)
    axes[0, 0].imshow(img, cmap=cmap)
    axes[0, 0].set_title("input", fontsize=8)
    axes[0, 0].axis("off")
    _heat(axes[0, 1], attribution, title)
    return _png(fig)


def parts_grid(x: Array, attribution: Array, parts: Array, labels: Sequence[str]) -> bytes:
    """Input, whole attribution, then one heatmap per part."""
    cols = min(5, len(parts) + 2)
    rows = -(-(len(parts) + 2) // cols)
    fig, axes = _figure(rows, cols)
    for ax in axes.ravel():
        ax.axis("off")
    img, cmap = _as_picture(x)
    axes[0, 0].imshow(img, cmap=cmap)
    axes[0, 0].set_title("input", fontsize=8)
    _heat(axes.ravel()[1], attribution, "attribution")
    for ax, part, label in zip(axes.ravel()[2:], parts, labels):
        _heat(ax, part, label)
    return _png(fig)


def curves(methods: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Mean insertion and deletion curves of every method."""
    fig, axes = _figure(1, 2, size=4.0)
    for label, info in methods.items():
        c = info["curves"]
        changed = np.asarray(c["changed"], float)
        frac = changed / changed[-1] if changed[-1] else changed
        ins_auc = info["metrics"]["insertion_auc"]["mean"]
        del_auc = info["metrics"]["deletion_auc"]["mean"]
        axes[0, 0].plot(frac, c["insertion"], label=f"{label} ({number(ins_auc, '.3f')})")
        axes[0, 1].plot(frac, c["deletion"], label=f"{label} ({number(del_auc, '.3f')})")
    for ax, name in zip(axes[0], ("insertion (higher is better)", "deletion (lower is better)")):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("fraction of pixels changed", fontsize=8)
        ax.set_ylabel("target probability", fontsize=8)
        ax.legend(fontsize=6)
    return _png(fig)


def _value(v: float | None) -> float:
    """A metric for plotting: an undefined one (None) is a gap."""
    return float("nan") if v is None else float(v)


def width_sweep(methods: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Insertion/deletion AUC of pathwise against its width (one line per depth)."""
    fig, axes = _figure(1, 1, size=4.0)
    ax = axes[0, 0]
    by_depth: dict[str, list[tuple[str, float, float]]] = {}
    for info in methods.values():
        if info["method"] != "pathwise":
            continue
        opts = info["options"]
        by_depth.setdefault(str(opts.get("depth")), []).append(
            (str(opts.get("width") or "all"), _value(info["metrics"]["insertion_auc"]["mean"]),
             _value(info["metrics"]["deletion_auc"]["mean"])))
    for depth, rows in by_depth.items():
        labels = [r[0] for r in rows]
        ax.plot(labels, [r[1] for r in rows], marker="o", label=f"insertion, depth {depth}")
        ax.plot(labels, [r[2] for r in rows], marker="s", linestyle="--", label=f"deletion, depth {depth}")
    ax.set_xlabel("width", fontsize=8)
    ax.set_ylabel("AUC", fontsize=8)
    ax.set_title("pathwise: AUC against width", fontsize=9)
    ax.legend(fontsize=6)
    return _png(fig)
