"""Figures (onnx_pathwise.plots): heatmaps drawn over the original image at its displayed size with a
diverging colour map centred at 0 and a colour bar, the class name and score in the title, a
grid comparing methods, feature bar charts for tabular samples, and the input-tensor fallback.
PNGs are decoded with Pillow and checked pixel by pixel where the claim is about pixels."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
from PIL import Image

from onnx_pathwise import plots


def decode(png: bytes) -> np.ndarray:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def photo(h: int = 120, w: int = 200) -> np.ndarray:
    """A uint8 RGB 'photo': a green background with a white square in the upper left."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 1] = 120
    img[10:40, 10:40] = 255
    return img


def test_overlay_is_drawn_at_the_originals_size_and_aspect() -> None:
    img = photo(120, 200)  # wide
    a = np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32)  # the model's square input
    wide = decode(plots.overlay(img, a, "pathwise: cat (class 3), score 1.5"))
    tall = decode(plots.overlay(np.ascontiguousarray(img.transpose(1, 0, 2)), a, "t"))
    # the figure follows the original's shape, not the model's 32×32 grid
    assert wide.shape[1] > wide.shape[0] and tall.shape[0] > tall.shape[1] * 0.9
    big = decode(plots.overlay(photo(1200, 2000), a, "t"))
    assert max(big.shape[:2]) <= plots.MAX_DISPLAY * 2  # large photos are scaled down


def test_overlay_uses_a_diverging_map_centred_at_zero_with_a_colour_bar() -> None:
    fig, axes = plots._figure(1, 1)
    a = np.zeros((3, 8, 8), np.float32)
    a[:, :4] = np.arange(32, dtype=np.float32).reshape(4, 8)  # only positive values: 0 must still be white
    im = plots._draw_overlay(axes[0, 0], photo(), a, "t", None)
    assert im.get_cmap().name == plots.CMAP == "RdBu_r"
    lim = np.percentile(np.abs(a.sum(0)), 99.5)  # summed over channels; the top 0.5% saturate
    assert im.norm.vcenter == 0 and im.norm.vmin == -im.norm.vmax and im.norm.vmax == pytest.approx(lim)
    assert len(fig.axes) == 2  # the image axes and its colour bar
    assert im.get_extent() == [0.0, 200.0, 120.0, 0.0]  # the heatmap covers the original
    matplotlib.pyplot.close(fig)


@pytest.mark.parametrize("scale", [1e-5, 1.0, 3e4])
def test_colour_bars_have_no_offset_text_over_the_title(scale: float) -> None:
    """A panel's colour bar writes each tick in full: matplotlib's shared exponent ("1e-5")
    went above the bar, onto the title of a decomposition's part."""
    fig, axes = plots._figure(1, 2)
    a = (np.random.default_rng(0).normal(size=(3, 8, 8)) * scale).astype(np.float32)
    plots._heat(axes[0, 0], a, "unit 15432: 0.00067")
    plots._draw_overlay(axes[0, 1], photo(), a, "t", None)
    fig.canvas.draw()
    bars = fig.axes[2:]
    assert len(bars) == 2
    for bar in bars:
        assert bar.yaxis.get_offset_text().get_text() == ""
        labels = [t.get_text() for t in bar.get_yticklabels() if t.get_text()]
        assert len(labels) >= 3 and all(len(text) <= 6 for text in labels), labels
    matplotlib.pyplot.close(fig)


def test_signed_limit_saturates_outliers_but_not_sparse_maps() -> None:
    m = np.ones(1000)
    m[0] = 1e6  # one extreme pixel
    assert plots.signed_limit(m) == pytest.approx(1.0)
    sparse = np.zeros(1000)
    sparse[3] = -5.0
    assert plots.signed_limit(sparse) == 5.0 and plots.signed_limit(np.zeros(4)) == 1.0


def test_overlay_region_places_the_heatmap_where_the_input_was_cut() -> None:
    fig, axes = plots._figure(1, 1)
    im = plots._draw_overlay(axes[0, 0], photo(), np.ones((8, 8)), "t", (40.0, 0.0, 160.0, 120.0))
    assert im.get_extent() == [40.0, 160.0, 120.0, 0.0]
    matplotlib.pyplot.close(fig)


def test_overlay_shows_the_original_not_the_normalised_tensor() -> None:
    img = photo()
    png = decode(plots.overlay(img, np.zeros((3, 16, 16)), "zero attribution"))
    # with a zero attribution the heatmap is transparent: the original's bright square shows
    # through, in grey, and the rest stays the darker background
    grey = png.mean(axis=2)
    assert grey.max() > 240 and (grey < 100).mean() > 0.2


def test_signed_attributions_are_red_for_and_blue_against() -> None:
    a = np.zeros((16, 16))
    a[:, :8], a[:, 8:] = 1.0, -1.0
    png = decode(plots.overlay(np.full((160, 160, 3), 128, np.uint8), a, "t")).astype(int)
    red = (png[..., 0] - png[..., 2] > 60).sum()
    blue = (png[..., 2] - png[..., 0] > 60).sum()
    assert red > 2000 and blue > 2000


def test_title_names_the_class_and_its_score() -> None:
    assert plots.title("pathwise", 2, 3.14159, ["cat", "dog", "tabby cat"]) == "pathwise: tabby cat (class 2), score 3.14"
    assert plots.title("gradient", 7, -0.5) == "gradient: class 7, score -0.5"
    assert plots.title("gradient", 7, 1.0, ["only one"]) == "gradient: class 7, score 1"


def test_methods_grid_has_one_panel_per_method() -> None:
    a = np.random.default_rng(1).normal(size=(3, 16, 16))
    one = decode(plots.methods_grid(photo(), a, {"pathwise": a}, "sample"))
    three = decode(plots.methods_grid(photo(), a, {"pathwise": a, "gradient": -a, "ig": a * 2}, "sample"))
    assert three.shape[1] > 1.6 * one.shape[1]
    fallback = decode(plots.methods_grid(None, a, {"pathwise": a, "gradient": -a}, "sample"))  # no original
    assert fallback.shape[1] > fallback.shape[0]


def test_feature_bars_rank_by_magnitude_with_names() -> None:
    a = np.array([0.1, -3.0, 2.0, 0.0, 0.5])
    assert plots.top_features(a, 3).tolist() == [1, 2, 4]
    png = decode(plots.feature_bars(a, ["age", "income", "debt", "zip", "tenure"], "pathwise: class 1, score 2"))
    assert png.shape[0] > 100
    with pytest.raises(ValueError, match="2 feature names for 5"):
        plots.feature_bars(a, ["a", "b"], "t")


def test_sample_figure_picks_the_right_figure() -> None:
    a = np.random.default_rng(2).normal(size=(3, 16, 16)).astype(np.float32)
    over = decode(plots.sample_figure(a, a, "t", original=photo(60, 200)))  # type: ignore[arg-type]
    tensor = decode(plots.sample_figure(a, a, "t"))  # type: ignore[arg-type]
    bars = decode(plots.sample_figure(np.ones(6), np.arange(6.0), "t", features=list("abcdef")))  # type: ignore[arg-type]
    assert over.shape[1] > 2 * over.shape[0]  # the wide original decides the shape
    assert tensor.shape[1] > 1.5 * tensor.shape[0]  # input beside heatmap
    assert bars.shape[1] > bars.shape[0]
    assert plots.sample_figure(np.ones((2, 3)), np.ones((2, 3)), "t") is None


def test_originals_must_be_uint8_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        plots.overlay(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8)), "t")
    assert decode(plots.picture(photo()[..., :1])).shape[:2] == (120, 200)  # one channel: grey


def test_only_the_agg_backend_is_used() -> None:
    plots.feature_bars(np.arange(3.0), None, "t")
    assert matplotlib.get_backend().lower() == "agg"


def test_input_beside_heatmap_is_drawn_without_matplotlib() -> None:
    """The per-sample figures (input tensor beside its heatmap, overlay, original) are Pillow
    alone; the tensor figure is drawn in
    the same diverging map: red where the attribution is +max, blue at −max, white at 0, the
    input enlarged by an integer factor with square pixels; one to four channels all draw."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from onnx_pathwise import plots\n"
        "x = np.zeros((1, 8, 8), np.float32); x[0, :4] = 1.0\n"
        "a = np.zeros((1, 8, 8)); a[0, 0, 0] = 2.0; a[0, 7, 7] = -2.0\n"
        "sys.stdout.buffer.write(plots.input_and_heatmap(x, a, 'pathwise: class 3, score 2.1'))\n"
        "photo = np.full((30, 50, 3), 90, np.uint8)\n"
        "plots.overlay(photo, a, 't', (10.0, 0.0, 40.0, 30.0)); plots.picture(photo)\n"
        "assert 'matplotlib' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    img = decode(done.stdout)
    f = plots.PANEL // 8
    top, pad = 26, 10
    assert tuple(img[top + 1, pad + 1]) == (255, 255, 255) and tuple(img[top + 5 * f, pad + 1]) == (0, 0, 0)
    x_heat = pad + 8 * f + 2 * pad
    red, blue, white = img[top + 1, x_heat + 1], img[top + 8 * f - 2, x_heat + 8 * f - 2], img[top + 3 * f, x_heat + 3 * f]
    assert red[0] > 2 * red[2] and blue[2] > 2 * blue[0] and min(white) > 240
    for channels in (2, 3, 4):
        x = np.random.default_rng(channels).random((channels, 9, 9))
        assert decode(plots.input_and_heatmap(x, x, "t")).shape[0] == top + 9 * (plots.PANEL // 9) + pad


def test_overlay_colours_only_the_region_the_input_came_from() -> None:
    """With a crop region, the heatmap covers exactly the region's displayed pixels: a uniform
    positive map turns them red and leaves the original grey outside."""
    img = np.full((120, 200, 3), 128, np.uint8)
    png = decode(plots.overlay(img, np.ones((8, 8)), "t", (40.0, 0.0, 160.0, 120.0))).astype(int)
    top, pad, scale = 26, 10, 240 / 200  # small originals are drawn 240 px wide
    row = png[top + 60]
    red = np.flatnonzero(row[:, 0] - row[:, 2] > 60)
    assert abs(red.min() - (pad + 40 * scale)) <= 1 and abs(red.max() - (pad + 160 * scale - 1)) <= 1
    assert abs(int(row[pad + 20, 0]) - int(row[pad + 20, 2])) < 5  # grey left of the region
