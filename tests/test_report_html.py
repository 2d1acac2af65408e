"""The HTML report (onnx_pathwise.report.html, ``--report html``): one self-contained page per
run of explain, evaluate, audit and diff.

Without a browser: what each page holds, that every name from a file is escaped and that the
page can request nothing (data: images, inline CSS, no script, a Content-Security-Policy).
With Playwright driving Debian's chromium (``apt-get install chromium``; skipped with the reason
when either is missing): every page opens from file:// with no console error and no request but
itself, every <img> decodes, and a screenshot is a real picture. A 224² ResNet-like CNN exported
from torch is explained with ``--report html`` and, through the API, with the original photos.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import ROOT, SAMPLES, export_torch, run
from PIL import Image

from onnx_pathwise import Explainer
from onnx_pathwise.audit import AuditReport, Check, DiffReport
from onnx_pathwise.render import describe
from onnx_pathwise.report import audit_page, diff_page, explain_page, write_page

CNN, CNN_X = SAMPLES / "cnn.onnx", SAMPLES / "cnn_inputs.npy"  # 8 images 1×16×16
MLP, MLP_X = SAMPLES / "mlp.onnx", SAMPLES / "mlp_inputs.npy"  # 16 rows of 8 features
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = ROOT / "docs" / "report-screenshot.png"
DATA_PNG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')

def assert_self_contained(page: str) -> list[bytes]:
    """No script, no external reference; every image an embedded PNG that decodes. Returns them."""
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    assert "default-src &#x27;none&#x27;" in page or "default-src 'none'" in page  # the CSP
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "http://" not in page and "https://" not in page and "url(" not in page
    pngs = [__import__("base64").b64decode(m) for m in DATA_PNG.findall(page)]
    assert page.count("<img") == len(pngs)
    for png in pngs:
        Image.open(io.BytesIO(png)).verify()
    return pngs


# --------------------------------------------------------------------------- pages from the CLI


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One page per command, on the first 4 inputs of the bundled samples."""
    tmp = tmp_path_factory.mktemp("pages")
    cnn_x, mlp_x = tmp / "cnn4.npy", tmp / "mlp4.npy"
    np.save(cnn_x, np.load(CNN_X)[:4])
    np.save(mlp_x, np.load(MLP_X)[:4])
    run("explain", CNN, cnn_x, "--out", tmp / "explain", "--report", "html", "--device", "cpu")
    run("explain", MLP, mlp_x, "--out", tmp / "tabular", "--report", "html", "--device", "cpu")
    run("evaluate", CNN, cnn_x, "--out", tmp / "evaluate", "--methods", "pathwise,gradient", "--report", "html",
        "--device", "cpu")
    run("audit", MLP, "--inputs", mlp_x, "--report", "html", "--out", tmp / "audit.html", "--device", "cpu")
    run("diff", MLP, MLP, "--inputs", mlp_x, "--report", "html", "--out", tmp / "diff.html", "--device", "cpu")
    return {"explain": tmp / "explain" / "report.html", "tabular": tmp / "tabular" / "report.html",
            "evaluate": tmp / "evaluate" / "report.html", "audit": tmp / "audit.html", "diff": tmp / "diff.html"}


def test_explain_page_holds_model_preprocessing_and_a_card_per_sample(pages: dict[str, Path]) -> None:
    page = pages["explain"].read_text()
    pngs = assert_self_contained(page)
    assert len(pngs) == 4  # one figure per sample (no originals: the input tensor beside its heatmap)
    assert page.count('class="card"') == 4
    for text in ("Model", "x: float32, shape (N, 1, 16, 16)", "/features/features.6/Relu", "2,276",
                 "Preprocessing: none", "cnn4.npy", "faithfulness", "completeness delta", "kept units"):
        assert text in page, text
    report = json.loads((pages["explain"].parent / "explanation.json").read_text())
    s0 = report["samples"][0]
    for layer in s0["path"]:  # the card's path table holds each layer's kept-unit count
        assert f"<td>{layer['node']}</td><td class=\"num\">{layer['count']:,}</td>" in page
    assert f"class {s0['target']}, score {s0['score']:.4g}" in page


def test_tabular_page_has_feature_bar_charts(pages: dict[str, Path]) -> None:
    page = pages["tabular"].read_text()
    pngs = assert_self_contained(page)
    assert len(pngs) == 4
    width, height = Image.open(io.BytesIO(pngs[0])).size
    assert width > height  # horizontal bars of the top features
    assert "x: float32, shape (N, 8)" in page


def test_evaluate_page_has_metrics_curves_and_method_grids(pages: dict[str, Path]) -> None:
    page = pages["evaluate"].read_text()
    pngs = assert_self_contained(page)
    assert len(pngs) == 1 + 4  # curves.png and one grid per sample
    evaluation = json.loads((pages["evaluate"].parent / "evaluation.json").read_text())
    for label, info in evaluation["methods"].items():
        m = info["metrics"]["insertion_auc"]
        assert f"<td>{label}</td><td class=\"num\">{m['mean']:.4f} ± {m['std']:.4f}</td>" in page
    assert "insertion AUC ↑" in page and "curves.png" in page and "methods compared" in page


def test_audit_and_diff_pages(pages: dict[str, Path]) -> None:
    audit = pages["audit"].read_text()
    assert_self_contained(audit)
    for name in ("analysable", "completeness", "batch equals per-sample", "deterministic", "cpu vs cuda"):
        assert f"<td>{name}</td>" in audit
    assert "7 of 7 checks passed or skipped" in audit and "/net/net.1/Relu" in audit  # checks + model summary
    diff = pages["diff"].read_text()
    assert_self_contained(diff)
    assert "predictions changed</dt><dd>0 of 4" in diff and diff.count("<tr>") == 1 + 2 + 1 + 4


def test_audit_page_of_a_model_that_cannot_be_analysed(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Tanh", ["x"], ["y"], name="<tanh>")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = tmp_path / "tanh.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    run("audit", model, "--report", "html", "--out", tmp_path / "a.html", "--device", "cpu", code=1)
    page = (tmp_path / "a.html").read_text()
    assert_self_contained(page)
    assert "No summary: the model could not be analysed" in page and "&lt;tanh&gt;" in page
    assert '<span class="badge fail">FAIL</span>' in page


def test_diff_page_highlights_changed_predictions() -> None:
    report = DiffReport("old.onnx", "new.onnx", [
        {"old_prediction": 0, "new_prediction": 0, "correlation": 0.99, "jaccard": {"relu": 0.9}},
        {"old_prediction": 1, "new_prediction": 2, "correlation": 0.2, "jaccard": {"relu": 0.1}},
    ], {"relu": 0.5}, 1, 0.595, 0.5, ["1 prediction(s) changed > 0"])
    page = diff_page(report=report, labels=["cat", "dog", "fox"], sources=["a.png", "b.png"])
    assert_self_contained(page)
    assert page.count('<tr class="changed">') == 1
    assert "<td>dog (class 1)</td><td>fox (class 2)</td><td>yes</td>" in page
    assert "1 prediction(s) changed &gt; 0" in page and "FAILED" in page


def test_report_options_are_checked(tmp_path: Path) -> None:
    result = run("diff", MLP, MLP, "--inputs", MLP_X, "--report", "html", code=2)
    assert "--report html and --out FILE go together" in result.output
    run("explain", MLP, MLP_X, "--out", tmp_path, "--report", "pdf", code=2)
    run("audit", MLP, "--report", "junit", "--out", tmp_path / "a.xml", "--device", "cpu")  # still works
    assert (tmp_path / "a.xml").read_text().startswith("<?xml")


# --------------------------------------------------------------------------- untrusted names


HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_every_name_from_a_file_is_escaped(tmp_path: Path) -> None:
    ex = Explainer(MLP, device="cpu")
    info = describe(ex, HOSTILE + ".onnx")
    info["producer"] = HOSTILE
    info["gate_layers"][0]["name"] = HOSTILE
    x = np.load(MLP_X)[:2]
    e = ex.explain(x)
    samples = [{"faithfulness": 1.0, "path": [{"node": HOSTILE, "count": 1, "units": 16}]}] * 2
    page = explain_page(model_info=info, method="pathwise", options={HOSTILE: HOSTILE}, x=x,
                        attribution=e.attribution, output=e.output, target=e.target, samples=samples,
                        sources=[HOSTILE, "b"], labels=[HOSTILE] * 3, features=[HOSTILE] * 8,
                        preprocessing={"preset": HOSTILE}, inputs=HOSTILE)
    assert_self_contained(page)
    assert "<img src=x" not in page and 'alert("x")' not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    audit = audit_page(report=AuditReport(HOSTILE, [Check(HOSTILE, "fail", HOSTILE)]), model_info=None)
    assert_self_contained(audit)
    assert "<img src=x" not in audit
    path = write_page(tmp_path / "p.html", page)
    assert path.read_text() == page and [p.name for p in tmp_path.iterdir()] == ["p.html"]  # no temporary left


def test_preprocessing_is_stated() -> None:
    x = np.load(MLP_X)[:1]
    e = Explainer(MLP, device="cpu").explain(x)
    page = explain_page(model_info=None, method="pathwise", options={}, x=x, attribution=e.attribution,
                        output=e.output, target=e.target, samples=[{}],
                        preprocessing={"preset": "imagenet", "resize": 256, "crop": 224,
                                       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    assert "Preprocessing used:" in page and "<dd>imagenet</dd>" in page and "<dd>0.485, 0.456, 0.406</dd>" in page


# --------------------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_offline(browser: Any, path: Path, viewport: dict[str, int] | None = None) -> tuple[Any, dict[str, Any]]:
    """Open ``path`` from file://; what went wrong: console errors, page errors, requests other
    than the page itself (data: URIs excepted), failed requests, images that did not decode."""
    page = browser.new_page(viewport=viewport or {"width": 1280, "height": 900})
    seen: dict[str, Any] = {"console": [], "errors": [], "requests": [], "failed": []}
    page.on("console", lambda m: seen["console"].append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("requestfailed", lambda r: seen["failed"].append(r.url))
    url = path.resolve().as_uri()
    page.goto(url, wait_until="load")
    page.wait_for_load_state("networkidle")
    seen["requests"] = [u for u in seen["requests"] if u != url and not u.startswith("data:")]
    seen["images"] = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    seen["text"] = page.inner_text("body")
    return page, seen


def assert_clean(seen: dict[str, Any]) -> None:
    assert seen["console"] == [] and seen["errors"] == [], (seen["console"], seen["errors"])
    assert seen["requests"] == [] and seen["failed"] == [], (seen["requests"], seen["failed"])
    assert all(complete and w > 0 and h > 0 for complete, w, h in seen["images"]), seen["images"]


@pytest.mark.parametrize("name", ["explain", "tabular", "evaluate", "audit", "diff"])
def test_pages_open_offline_in_chromium(browser: Any, pages: dict[str, Path], name: str) -> None:
    page, seen = open_offline(browser, pages[name])
    assert_clean(seen)
    assert "Preprocessing" in seen["text"] and "self-contained" in seen["text"]
    if name != "diff":
        assert "Model" in seen["text"] and "parameters on the explained path" in seen["text"]
    assert len(seen["images"]) == {"explain": 4, "tabular": 4, "evaluate": 5, "audit": 0, "diff": 0}[name]
    page.close()


def test_the_browser_check_catches_requests_and_broken_images(browser: Any, tmp_path: Path) -> None:
    """The checks above would see a page that fetches something or shows a broken image."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png">'
                   '<img src="data:image/png;base64,AAAA"></body></html>')
    page, seen = open_offline(browser, bad)
    assert seen["requests"] == ["http://127.0.0.1:9/x.png"]
    assert not all(w > 0 for _, w, _ in seen["images"])
    page.close()


# --------------------------------------------------------------------------- a real-size CNN


def resnet_like(classes: int = 10) -> Any:
    """A small ResNet (stem, three residual blocks, global average pool) on 3×224×224, seeded."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                      nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.skip = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
            self.relu = nn.ReLU()

        def forward(self, x: Any) -> Any:
            return self.relu(self.body(x) + self.skip(x))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                        Block(8, 8, 1), Block(8, 16, 2), Block(16, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, classes))
    for m in net.modules():  # random but not degenerate BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


IMAGENET = {"preset": "imagenet", "resize": "shorter side to 256 (bilinear)", "crop": "centre 224×224",
            "scale": "[0, 1]", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "layout": "nchw"}


def imagenet(photo: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """torchvision's convention, for this test only (the tool's presets live in preprocess.py):
    the tensor and the crop's box in the photo's pixels."""
    h, w = photo.shape[:2]
    s = 256 / min(h, w)
    rw, rh = round(w * s), round(h * s)
    img = Image.fromarray(photo).resize((rw, rh), Image.BILINEAR)
    left, top = (rw - 224) // 2, (rh - 224) // 2
    a = np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    a = (a - np.array(IMAGENET["mean"], np.float32)) / np.array(IMAGENET["std"], np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1)), (left / s, top / s, (left + 224) / s, (top + 224) / s)


def export_resnet_like(folder: Path) -> Path:
    """The seeded :func:`resnet_like` exported to ``folder/resnet_like.onnx`` (skips the test without torch)."""
    torch = pytest.importorskip("torch")
    return export_torch(resnet_like(), (torch.zeros(1, 3, 224, 224),), folder / "resnet_like.onnx")


@pytest.fixture(scope="module")
def photos_explained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("cnn224")
    model = export_resnet_like(tmp)
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p) for p in load_sample_images().images]  # china.jpg, flower.jpg: 427×640 RGB
    tensors, regions = zip(*(imagenet(p) for p in photos))
    x = np.stack(tensors)
    np.save(tmp / "photos.npy", x)
    out = tmp / "explain"
    run("explain", model, tmp / "photos.npy", "--out", out, "--report", "html", "--device", "cpu")
    return {"model": model, "x": x, "photos": photos, "regions": list(regions), "out": out, "tmp": tmp}


def test_real_size_cnn_report_is_one_file_that_loads_offline(browser: Any, photos_explained: dict[str, Any]) -> None:
    out = photos_explained["out"]
    assert sorted(p.name for p in out.iterdir()) == ["explanation.json", "explanation.npz", "report.html",
                                                      "sample_0.png", "sample_1.png"]
    html = (out / "report.html").read_text()
    assert len(assert_self_contained(html)) == 2
    page, seen = open_offline(browser, out / "report.html")
    assert_clean(seen)
    assert len(seen["images"]) == 2 and "(N, 3, 224, 224)" in seen["text"]
    page.close()


def test_real_size_cnn_report_with_original_photos(browser: Any, photos_explained: dict[str, Any]) -> None:
    """What ``--preprocess imagenet --report html`` on a photo folder hands to the page: the
    original photos (overlays), where the crop came from, labels and the preprocessing record."""
    pe = photos_explained
    ex = Explainer(pe["model"], device="cpu")
    with np.load(pe["out"] / "explanation.npz") as data:
        arrays = {k: data[k] for k in data.files}
    report = json.loads((pe["out"] / "explanation.json").read_text())
    labels = ["pagoda", "flower", "tabby cat", "goldfish", "bus", "lighthouse", "teapot", "violin", "zebra", "<kite>"]
    html = explain_page(model_info=describe(ex, pe["model"].name), method="pathwise", options=report["options"],
                        x=pe["x"], attribution=arrays["attribution"], output=arrays["output"], target=arrays["target"],
                        samples=report["samples"], bias=arrays["bias"], masked_score=arrays["masked_score"],
                        sources=["photos/china.jpg", "photos/flower.jpg"], originals=pe["photos"],
                        regions=pe["regions"], labels=labels, preprocessing=IMAGENET, inputs="photos/")
    pngs = assert_self_contained(html)
    assert len(pngs) == 4  # per sample: the original and its overlay
    original = Image.open(io.BytesIO(pngs[0]))
    assert original.size[0] == 448 and abs(original.size[1] - 299) <= 1  # the 640×427 photo, long side ≤ 448
    path = write_page(pe["tmp"] / "photos.html", html)
    page, seen = open_offline(browser, path, viewport={"width": 1200, "height": 1250})
    assert_clean(seen)
    text = seen["text"]
    assert "Preprocessing used:" in text and "imagenet" in text and "centre 224×224" in text
    assert "photos/china.jpg" in text and "resnet_like.onnx" in text and "(class " in text
    shot = page.screenshot(full_page=False)
    page.close()
    img = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
    assert img.shape == (1250, 1200, 3)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 1000  # a real picture, not one colour or a blank page
    assert img.std() > 20
    if os.environ.get("ONNX_PATHWISE_UPDATE_SCREENSHOT") or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(exist_ok=True)  # README's copy, in 256 colours (a third of the size)
        Image.open(io.BytesIO(shot)).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
            SCREENSHOT, optimize=True)
    shutil.copy(path, pe["tmp"] / "copy.html")  # the page is one file: a copy anywhere opens alike
    page, seen = open_offline(browser, pe["tmp"] / "copy.html")
    assert_clean(seen)
    page.close()
