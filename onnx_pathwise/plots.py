"""PNG figures for the CLI and the HTML report. The per-sample figures a run writes for every
image (the heatmap over the original, or beside the input tensor, and the original alone) are
drawn with Pillow: ~10 ms each, no matplotlib import. The rest (method grids, bar charts,
decomposition grids, curves) use matplotlib, Agg backend only, imported on first use. Figures:
heatmaps over the original image or beside the input tensor, a grid comparing methods on one sample, bar charts of
the top features of tabular samples, decomposition grids, insertion/deletion curves and width
sweeps. Each function returns PNG bytes, so the caller writes (or embeds) them atomically.

Signed attributions use one diverging colour map (:data:`CMAP`) with limits symmetric about 0,
so white is always "no contribution", red for the target and blue against it.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .text import number

Array = np.ndarray
#: The diverging colour map of every signed attribution.
CMAP = "RdBu_r"
#: Largest side, in pixels, at which an original image is drawn (larger photos are scaled down).
MAX_DISPLAY = 448
_DPI = 90


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
    fig.savefig(buf, format="png", dpi=_DPI)
    plt.close(fig)
    return buf.getvalue()


def _as_picture(x: Array) -> tuple[Array, str | None]:
    """An input image for display: channels last, scaled to [0, 1] (grey for 1 channel)."""
    img = x if x.ndim == 2 else (x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)[..., :3])
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return img, ("gray" if img.ndim == 2 else None)


def _channel_sum(a: Array) -> tuple[Array, float]:
    """A heatmap's 2-D map (an attribution summed over its channel axis, first) and its
    symmetric colour limit max|m| (1 for an all-zero map): the grids' panels and
    :func:`input_and_heatmap`."""
    m = a if a.ndim == 2 else a.sum(axis=0)
    return m, float(np.abs(m).max()) or 1.0


def _heat(ax: Any, a: Array, title: str) -> None:
    m, lim = _channel_sum(a)
    im = ax.imshow(m, cmap=CMAP, vmin=-lim, vmax=lim)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    _colour_bar(ax, im, pad=0.04)


def _colour_bar(ax: Any, im: Any, pad: float) -> None:
    """A colour bar beside ``ax`` whose ticks carry their own exponent ("2e-05"): matplotlib's
    shared offset text ("1e-5") would sit on the panel's title."""
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=pad, format="%.2g")


#: ColorBrewer's 11-class RdBu reversed (blue against, white 0, red for): the nodes matplotlib
#: interpolates linearly for ``RdBu_r`` (:data:`CMAP`), so the Pillow figures match the others.
_RDBU_R = ("053061", "2166ac", "4393c3", "92c5de", "d1e5f0", "f7f7f7", "fddbc7", "f4a582", "d6604d", "b2182b", "67001f")
#: Side in pixels of each panel of :func:`input_and_heatmap` (small inputs are enlarged by an
#: integer factor, pixels kept square and sharp).
PANEL = 192


@functools.lru_cache(maxsize=1)
def _lut() -> Array:
    """256 RGB entries of :data:`CMAP`, linear between its nodes (built once; read-only)."""
    nodes = np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in _RDBU_R], np.float64)
    at = np.linspace(0.0, len(nodes) - 1.0, 256)
    lut = np.stack([np.interp(at, np.arange(len(nodes)), nodes[:, k]) for k in range(3)], axis=1).round().astype(np.uint8)
    lut.setflags(write=False)
    return lut


def _enlarged(rgb: Array) -> Any:
    """An H×W×3 uint8 image as a Pillow image of about :data:`PANEL` pixels: enlarged by the
    largest integer factor that keeps it within (nearest-neighbour), or, past twice that,
    reduced by box averaging."""
    from PIL import Image

    img = Image.fromarray(rgb)
    side = max(rgb.shape[:2])
    if side > 2 * PANEL:
        scale = PANEL / side
        return img.resize((max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale))), Image.Resampling.BOX)
    f = max(1, PANEL // side)
    return img.resize((rgb.shape[1] * f, rgb.shape[0] * f), Image.Resampling.NEAREST)


def _font() -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the bitmap font
        return ImageFont.load_default()


def _signed_colours(m: Array, lim: float) -> Array:
    """RGB uint8 of a 2-D signed map in :data:`CMAP`, linear in m/lim over [−1, 1] (clipped)."""
    return _lut()[np.round((np.clip(m / lim, -1.0, 1.0) + 1.0) * 127.5).astype(np.intp)]


def _canvas(panels: Sequence[tuple[Any, str]], lim: float) -> bytes:
    """Pillow images side by side, each with its label above, and a colour bar of ±``lim`` at
    the right: the layout of every figure drawn without matplotlib, as PNG bytes."""
    from PIL import Image, ImageDraw

    font = _font()
    pad, top, bar = 10, 26, 12
    h = max(p.height for p, _ in panels)
    xs, x = [], pad
    for p, _ in panels:
        xs.append(x)
        x += p.width + 2 * pad
    x_bar = x - pad
    width = max(x_bar + bar + int(font.getlength(f"{-lim:.3g}")) + 6 + pad,
                xs[-1] + int(font.getlength(panels[-1][1])) + pad)
    canvas = Image.new("RGB", (width, top + h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for (p, label), x0 in zip(panels, xs):
        canvas.paste(p, (x0, top))
        draw.text((x0, 6), label, fill="black", font=font)
    ramp = _lut()[::-1][np.linspace(0, 255, h).astype(np.intp)]  # top: +lim
    canvas.paste(Image.fromarray(np.ascontiguousarray(np.repeat(ramp[:, None], bar, axis=1))), (x_bar, top))
    draw.rectangle((x_bar, top, x_bar + bar - 1, top + h - 1), outline=(80, 80, 80))
    for text, y in ((f"{lim:.3g}", top), ("0", top + h // 2 - 6), (f"{-lim:.3g}", top + h - 12)):
        draw.text((x_bar + bar + 4, y), text, fill="black", font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def input_and_heatmap(x: Array, attribution: Array, title: str) -> bytes:
    """The input beside its attribution summed over channels (signed colour map, limits ±max|a|,
    with a colour bar), drawn with Pillow: no matplotlib import for the command line's default
    figure (matplotlib's import and layout cost ~0.5 s plus ~0.15 s a figure)."""
    img, _ = _as_picture(x)
    img = img.mean(axis=2) if img.ndim == 3 and img.shape[2] != 3 else img  # 2 channels: grey
    pic = np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    pic = np.repeat(pic[..., None], 3, axis=2) if pic.ndim == 2 else pic
    m, lim = _channel_sum(np.asarray(attribution, np.float64))
    return _canvas([(_enlarged(pic), "input"), (_enlarged(_signed_colours(m, lim)), title)], lim)


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


# --------------------------------------------------------------------------- overlays, features


def _signed_map(attribution: Array) -> Array:
    """A 2-D map of an image attribution: summed over the channel axis (first, or last when the
    layout is channels-last with a few channels)."""
    a = np.asarray(attribution, dtype=np.float64)
    if a.ndim == 3:
        axis = 0 if a.shape[0] <= 4 or a.shape[-1] > 4 else -1
        a = a.sum(axis=axis)
    return a


#: Percentile of |attribution| at which overlay colours saturate: a few extreme pixels must not
#: wash out the rest (Captum's ``outlier_perc`` does the same).
SATURATE_PERCENTILE = 99.5


def signed_limit(m: Array) -> float:
    """The symmetric colour limit of an overlay: the :data:`SATURATE_PERCENTILE` percentile of
    |m|, or its maximum when that is 0 (sparse maps), or 1 for an all-zero map."""
    a = np.abs(np.asarray(m, dtype=np.float64))
    lim = float(np.percentile(a, SATURATE_PERCENTILE)) if a.size else 0.0
    return lim if lim > 0 else (float(a.max()) if a.size and a.max() > 0 else 1.0)


def _norm(lim: float) -> Any:
    from matplotlib.colors import TwoSlopeNorm

    lim = lim if np.isfinite(lim) and lim > 0 else 1.0
    return TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)


def _grey(original: Array) -> Array:
    """Luminance of an RGB (or grey) uint8 image, in [0, 1]."""
    img = np.asarray(original, dtype=np.float64) / 255.0
    if img.ndim == 3:
        img = img[..., :3] @ np.array([0.299, 0.587, 0.114])
    return img


def _draw_overlay(ax: Any, original: Array, attribution: Array, title: str,
                  region: tuple[float, float, float, float] | None) -> Any:
    """The original (grey, so the colours belong to the heatmap) with the signed heatmap over it,
    more opaque where the attribution is larger; ``region`` = (left, top, right, bottom) in the
    original's pixels is where the model's input came from (default: the whole image)."""
    h, w = original.shape[:2]
    ax.imshow(_grey(original), cmap="gray", vmin=0.0, vmax=1.0, extent=(0, w, h, 0), interpolation="antialiased")
    m = _signed_map(attribution)
    lim = signed_limit(m)
    alpha = _alpha(m, lim)
    left, top, right, bottom = region if region is not None else (0.0, 0.0, float(w), float(h))
    im = ax.imshow(m, cmap=CMAP, norm=_norm(lim), alpha=alpha, extent=(left, right, bottom, top),
                   interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    _colour_bar(ax, im, pad=0.03)
    return im


def _display_px(original: Array) -> tuple[int, int]:
    """The original's displayed width and height in pixels: scaled down to at most
    :data:`MAX_DISPLAY`, small images up to 240."""
    h, w = original.shape[:2]
    scale = MAX_DISPLAY / max(h, w) if max(h, w) > MAX_DISPLAY else max(1.0, 240 / max(h, w))
    return max(1, round(w * scale)), max(1, round(h * scale))


def _display_size(original: Array, cols: int = 1) -> tuple[float, float]:
    """Figure inches that draw the original at its displayed size (:func:`_display_px`), plus
    room for the title and colour bar."""
    w, h = _display_px(original)
    return w / _DPI * 1.3 * cols + 0.2, h / _DPI + 0.5


def _alpha(m: Array, lim: float) -> Array:
    """Opacity of an overlay's heatmap: 0.15 + 0.85·|m|/lim, saturating at 1; all 0 (the original
    alone) when the map is."""
    return np.clip(0.15 + 0.85 * np.abs(m) / lim, 0.0, 1.0) if np.abs(m).max() > 0 else np.zeros_like(m)


def check_original(original: Array) -> Array:
    """An original image as the overlays expect it: H×W×3 (or H×W×4, H×W) uint8."""
    img = np.asarray(original)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"original image: expected H×W×3 uint8, got {img.dtype} {img.shape}")
    return img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img


def picture(original: Array) -> bytes:
    """The original image alone, at its own size (at most :data:`MAX_DISPLAY` px), no axes."""
    from PIL import Image

    img = check_original(original)
    h, w = img.shape[:2]
    scale = min(1.0, MAX_DISPLAY / max(h, w))
    pic = Image.fromarray(img)
    if scale < 1.0:
        pic = pic.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pic.save(buf, format="PNG")
    return buf.getvalue()


def overlay(original: Array, attribution: Array, title: str,
            region: tuple[float, float, float, float] | None = None) -> bytes:
    """The signed heatmap of one sample drawn over its original image (before normalisation) at
    the original's displayed size, with a colour bar; ``title`` names the method, the target
    class and its score (see :func:`title`). The original is grey, so the colours belong to the
    heatmap, which is more opaque where the attribution is larger (:func:`_alpha`); ``region`` =
    (left, top, right, bottom) in the original's pixels is where the model's input came from
    (default: the whole image). Drawn with Pillow (one per sample of a dataset: no matplotlib)."""
    from PIL import Image

    img = check_original(original)
    h, w = img.shape[:2]
    dw, dh = _display_px(img)
    base = np.round(_grey(img) * 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(base).resize((dw, dh), Image.Resampling.LANCZOS).convert("RGB"), np.float64)
    m = _signed_map(attribution)
    lim = signed_limit(m)
    left, top, right, bottom = region if region is not None else (0.0, 0.0, float(w), float(h))
    x0, y0 = round(left * dw / w), round(top * dh / h)
    x1, y1 = round(right * dw / w), round(bottom * dh / h)
    if x1 > x0 and y1 > y0:
        heat = Image.fromarray(_signed_colours(m, lim)).resize((x1 - x0, y1 - y0), Image.Resampling.NEAREST)
        alpha = Image.fromarray(np.round(_alpha(m, lim) * 255).astype(np.uint8)).resize(heat.size, Image.Resampling.NEAREST)
        # clip the region to the picture (a crop box may reach past the original's edge)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, dw), min(y1, dh)
        if cx1 > cx0 and cy1 > cy0:
            box = (cx0 - x0, cy0 - y0, cx1 - x0, cy1 - y0)
            a = np.asarray(alpha.crop(box), np.float64)[..., None] / 255.0
            part = base[cy0:cy1, cx0:cx1]
            base[cy0:cy1, cx0:cx1] = part * (1.0 - a) + np.asarray(heat.crop(box), np.float64) * a
    return _canvas([(Image.fromarray(np.round(base).astype(np.uint8)), title)], lim)


def methods_grid(original: Array | None, x: Array, attributions: Mapping[str, Array], title: str,
                 region: tuple[float, float, float, float] | None = None) -> bytes:
    """One sample, one panel per method: heatmaps over the original (or beside the input tensor
    when there is no original), each with its own symmetric colour bar."""
    cols = len(attributions) + 1
    if original is not None:
        img = check_original(original)
        fig, axes = _figure(1, cols)
        w_in, h_in = _display_size(img)
        fig.set_size_inches(min(w_in, 4.0) * cols, min(h_in, 4.0))
        axes[0, 0].imshow(img, cmap="gray" if img.ndim == 2 else None)
        axes[0, 0].set_title("original", fontsize=9)
        axes[0, 0].axis("off")
        for ax, (label, a) in zip(axes[0, 1:], attributions.items()):
            _draw_overlay(ax, img, a, label, region)
    else:
        fig, axes = _figure(1, cols)
        pic, cmap = _as_picture(x)
        axes[0, 0].imshow(pic, cmap=cmap)
        axes[0, 0].set_title("input", fontsize=9)
        axes[0, 0].axis("off")
        for ax, (label, a) in zip(axes[0, 1:], attributions.items()):
            _heat(ax, a, label)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def top_features(attribution: Array, top: int) -> Array:
    """Indices of the ``top`` largest |attribution| values, largest first (ties: lower index first)."""
    return np.argsort(-np.abs(np.asarray(attribution).ravel()), kind="stable")[:top]


def feature_bars(attribution: Array, features: Sequence[str] | None, title: str, top: int = 15) -> bytes:
    """Horizontal bars of the ``top`` features by |attribution|, largest at the top, named by
    ``features`` (default ``feature <i>``); red for the target, blue against it."""
    a = np.asarray(attribution, dtype=np.float64).ravel()
    names = list(features) if features is not None else [f"feature {i}" for i in range(a.size)]
    if len(names) != a.size:
        raise ValueError(f"{len(names)} feature names for {a.size} attributions")
    order = top_features(a, top)[::-1]
    fig, axes = _figure(1, 1)
    fig.set_size_inches(5.5, 0.8 + 0.28 * len(order))
    ax = axes[0, 0]
    lim = float(np.abs(a).max()) or 1.0
    import matplotlib

    cmap = matplotlib.colormaps[CMAP]
    colours = [cmap(_norm(lim)(v)) for v in a[order]]
    ax.barh(np.arange(len(order)), a[order], color=colours, edgecolor="0.3", linewidth=0.4)
    ax.set_yticks(np.arange(len(order)), [names[i] for i in order], fontsize=8)
    ax.axvline(0.0, color="0.3", linewidth=0.6)
    ax.set_xlabel("attribution", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def title(method: str, target: int, score: float, labels: Sequence[str] | None = None) -> str:
    """``"pathwise: tabby cat (class 281), score 12.3"``; without labels ``"pathwise: class 281, ..."``."""
    name = f"{labels[target]} (class {target})" if labels is not None and 0 <= target < len(labels) else f"class {target}"
    return f"{method}: {name}, score {score:.3g}"


def sample_figure(x: Array, attribution: Array, title: str, original: Array | None = None,
                  features: Sequence[str] | None = None,
                  region: tuple[float, float, float, float] | None = None) -> bytes | None:
    """The figure of one sample and one method: an overlay on the original when there is one,
    else the input tensor beside its heatmap (image inputs) or a feature bar chart (flat
    inputs); None when the input is neither."""
    if original is not None:
        return overlay(original, attribution, title, region)
    if is_image(x.shape):
        return input_and_heatmap(x, attribution, title)
    if np.asarray(x).ndim == 1:
        return feature_bars(attribution, features, title)
    return None
