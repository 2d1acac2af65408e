"""The whole way from a folder of photos to a page (issue 12): a 224² CNN exported from torch,
``explain photos/ --preprocess imagenet --labels ... --report html``: shards, an index, overlays on
the original photos, and one self-contained page that opens offline in Chromium."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_report_html import (
    assert_clean,
    assert_self_contained,
    browser,
    export_resnet_like,
    open_offline,
    run,
)

__all__ = ["browser"]  # the fixture, shared with test_report_html

LABELS = ["pagoda", "flower", "tabby cat", "goldfish", "bus", "lighthouse", "teapot", "violin", "zebra", "<kite>"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("folder")
    model = export_resnet_like(tmp)
    from sklearn.datasets import load_sample_images

    photos = tmp / "photos"
    photos.mkdir()
    for name, image in zip(("china.jpg", "flower.jpg"), load_sample_images().images):
        Image.fromarray(np.asarray(image)).save(photos / name, quality=95)
    (tmp / "labels.txt").write_text("\n".join(LABELS) + "\n")
    out = tmp / "out"
    run("explain", model, photos, "--preprocess", "imagenet", "--labels", tmp / "labels.txt", "--report", "html",
        "--out", out, "--device", "cpu")
    return {"out": out, "model": model, "photos": photos}


def test_folder_explained_to_shards_index_figures_and_a_page(folder_run: dict[str, Any]) -> None:
    out = folder_run["out"]
    names = sorted(p.name for p in out.iterdir())
    assert {"explanation-00000.npz", "index.json", "report.html", "sample_0.png", "sample_1.png"} <= set(names)
    index = json.loads((out / "index.json").read_text())
    rows = index["rows"] if isinstance(index, dict) and "rows" in index else index
    assert [Path(r["source"]).name for r in rows] == ["china.jpg", "flower.jpg"]
    assert all(r["label"] == LABELS[r["target"]] for r in rows)
    html = (out / "report.html").read_text()
    pngs = assert_self_contained(html)
    assert len(pngs) == 4  # per photo: the original and the overlay drawn over it
    assert "imagenet" in html and "china.jpg" in html and "&lt;kite&gt;" not in html.split("<body", 1)[0]
    overlay = Image.open(out / "sample_0.png")
    assert overlay.size[0] > 224  # drawn over the original photo with its colour bar, not the 224² tensor alone


def test_folder_page_opens_offline_in_chromium(browser: Any, folder_run: dict[str, Any]) -> None:
    page, seen = open_offline(browser, folder_run["out"] / "report.html")
    assert_clean(seen)
    assert len(seen["images"]) == 4 and "imagenet" in seen["text"]
    assert "china.jpg" in seen["text"] and any(label in seen["text"] for label in LABELS)
    page.close()
