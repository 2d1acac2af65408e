"""Preprocessing presets against a Pillow/numpy reference written here, on the photos that ship
with scikit-learn plus odd files; logits against onnxruntime on the reference tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from data_helpers import add_bad_files, conv_model, photo_folder
from helpers import runner
from PIL import Image, ImageOps

from onnx_pathwise import Explainer
from onnx_pathwise.cli import app
from onnx_pathwise.data import open_inputs
from onnx_pathwise.errors import InputError, PathwiseError
from onnx_pathwise.preprocess import preset
from onnx_pathwise.stream import read_shards

PRESETS = ["imagenet", "caffe", "tf", "unit", "none"]


def reference(path: Path, name: str, size: int, channels: int = 3, layout: str = "nchw") -> np.ndarray:
    """The reference pipeline: torchvision's Resize(int) + CenterCrop on a PIL image (bilinear),
    then each preset's arithmetic in float32 numpy."""
    image = ImageOps.exif_transpose(Image.open(path))
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    short_target = round(size * 256 / 224) if name == "imagenet" else size
    if w <= h:
        nw, nh = short_target, int(short_target * h / w)
    else:
        nw, nh = int(short_target * w / h), short_target
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    if channels == 1:
        mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    if name == "imagenet":
        a = (a / np.float32(255) - mean) / std
    elif name == "caffe":
        a = a[:, :, ::-1] - np.array([103.939, 116.779, 123.68], np.float32)
    elif name == "tf":
        a = a / np.float32(127.5) - np.float32(1)
    elif name == "unit":
        a = a / np.float32(255)
    return np.ascontiguousarray(a.transpose(2, 0, 1) if layout == "nchw" else a, dtype=np.float32)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return photo_folder(tmp_path_factory.mktemp("photos"))


def _samples(folder: Path, model: object, **kw: object) -> dict[str, np.ndarray]:
    src = open_inputs(folder, model, **kw)  # type: ignore[arg-type]
    return {Path(s.source).name: s.array for batch in src.batches() for s in batch}


@pytest.mark.parametrize("name", PRESETS)
def test_presets_equal_the_reference(photos: dict[str, Path], name: str) -> None:
    size = 224 if name == "imagenet" else 48
    got = _samples(photos["china"].parent, (3, size, size), preprocess=name)
    assert sorted(got) == sorted(p.name for p in photos.values())
    for key, path in photos.items():
        np.testing.assert_allclose(got[path.name], reference(path, name, size), rtol=1e-6, atol=1e-6,
                                   err_msg=f"{name} {key}")


def test_greyscale_and_nhwc_models(photos: dict[str, Path]) -> None:
    grey = _samples(photos["china"].parent, (1, 40, 40), preprocess="imagenet")
    nhwc = _samples(photos["china"].parent, (40, 40, 3), preprocess="unit")
    for path in photos.values():
        np.testing.assert_allclose(grey[path.name], reference(path, "imagenet", 40, channels=1), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(nhwc[path.name], reference(path, "unit", 40, layout="nhwc"), rtol=1e-6, atol=1e-6)


def test_exif_orientation_is_honoured(photos: dict[str, Path]) -> None:
    src = open_inputs(photos["rotated"], (3, 60, 60), preprocess="none")
    sample = next(iter(src.batches()))[0]
    raw = np.asarray(Image.open(photos["rotated"]).convert("RGB"))
    assert raw.shape[:2] == (60, 100)  # stored landscape, displayed portrait
    upright = np.asarray(ImageOps.exif_transpose(Image.open(photos["rotated"])).convert("RGB"))
    assert upright.shape[:2] == (100, 60)
    # the model sees the upright image: its centre crop, not the stored one's
    np.testing.assert_array_equal(sample.original, upright[20:80])
    assert sample.array.shape == (3, 60, 60)
    np.testing.assert_array_equal(sample.array, upright[20:80].transpose(2, 0, 1).astype(np.float32))


def test_overrides_and_their_errors(photos: dict[str, Path]) -> None:
    p = preset("unit", resize="64", mean="0.5", std="0.25,0.5,1", layout="nchw")
    got = _samples(photos["flower"].parent, (3, 48, 48), preprocess=p)["flower.png"]
    image = Image.open(photos["flower"]).convert("RGB").resize((85, 64), Image.Resampling.BILINEAR)
    ref = np.asarray(image.crop((18, 8, 66, 56)), np.float32) / np.float32(255)
    ref = (ref - np.float32(0.5)) / np.array([0.25, 0.5, 1], np.float32)
    np.testing.assert_allclose(got, ref.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)
    with pytest.raises(PathwiseError, match="--crop 32x32 does not match the model's input size 48x48"):
        preset("unit", crop="32").resolve((3, 48, 48))
    with pytest.raises(PathwiseError, match="--resize 20 is smaller than the crop"):
        preset("unit", resize=20).resolve((3, 48, 48))
    with pytest.raises(PathwiseError, match="--preprocess 'vgg'"):
        preset("vgg")
    with pytest.raises(PathwiseError, match="--mean"):
        preset("unit", mean="a,b")
    with pytest.raises(InputError, match="not an image"):
        preset("unit").resolve((8,))


def test_preprocessing_is_recorded() -> None:
    info = preset("caffe").resolve((3, 32, 32)).to_json()
    assert info["preset"] == "caffe" and info["channel_order"] == "bgr" and info["crop"] == [32, 32]
    assert info["mean"] == [103.939, 116.779, 123.68] and info["std"] is None and info["layout"] == "nchw"


def test_bad_images_fail_or_are_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    photo_folder(folder)
    bad = add_bad_files(folder)
    for which in ("truncated", "text"):
        with pytest.raises(InputError, match=rf"{bad[which].name}: .*(truncated|not an image)"):
            list(open_inputs(bad[which], (3, 32, 32), preprocess="unit").batches())
    src = open_inputs(folder, (3, 32, 32), preprocess="unit", on_error="skip", batch_size=3)
    batches = list(src.batches())
    assert [len(b) for b in batches] == [3, 3]  # batches hold good samples only
    assert sorted(Path(s).name for s, _ in src.skipped) == ["text.jpg", "truncated.jpg"]
    # the command line: one line naming the file, exit 5 (input); with --on-error skip it goes on
    model = conv_model(tmp_path / "m.onnx", size=32)
    res = runner.invoke(app, ["explain", str(model), str(folder), "--out", str(tmp_path / "o"), "--device", "cpu",
                              "--preprocess", "unit"])
    assert res.exit_code == 5, res.output
    assert "error:" in res.output and "text.jpg" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()
    res = runner.invoke(app, ["explain", str(model), str(folder), "--out", str(tmp_path / "o"), "--device", "cpu",
                              "--preprocess", "unit", "--on-error", "skip", "--no-png"])
    assert res.exit_code == 0, res.output
    assert "2 skipped" in res.output and "skipped" in res.output and "truncated.jpg" in res.output


@pytest.mark.parametrize("name", ["imagenet", "caffe"])
def test_logits_equal_onnxruntime_on_the_reference(photos: dict[str, Path], tmp_path: Path, name: str) -> None:
    size = 224 if name == "imagenet" else 48
    model = conv_model(tmp_path / "m.onnx", size=size)
    out = tmp_path / "out"
    res = runner.invoke(app, ["explain", str(model), str(photos["china"].parent), "--preprocess", name,
                              "--out", str(out), "--device", "cpu", "--no-png"])
    assert res.exit_code == 0, res.output
    arrays = read_shards(out)
    import json

    index = json.loads((out / "index.json").read_text())
    assert index["preprocessing"]["preset"] == name
    files = [Path(r["source"]) for r in index["rows"]]
    ref = np.stack([reference(f, name, size) for f in files])
    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": ref})[0]
    np.testing.assert_allclose(arrays["output"], logits, rtol=1e-5, atol=1e-5)
    # the attribution is the explanation of exactly that tensor
    ex = Explainer(model, device="cpu")
    np.testing.assert_allclose(arrays["attribution"], ex.explain(ref).attribution, rtol=1e-5, atol=1e-6)
