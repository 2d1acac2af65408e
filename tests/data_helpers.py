"""Small models and files for the data, preprocessing, streaming and Ray tests (built here; no downloads)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], shape: list[int | str], path: Path,
          metadata: dict[str, str] | None = None) -> Path:
    graph = helper.make_graph(
        nodes, "data_test", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


def conv_model(path: Path, size: int = 32, channels: int = 3, classes: int = 5, nhwc: bool = False,
               metadata: dict[str, str] | None = None, seed: int = 0) -> Path:
    """x (N, C, size, size) [or (N, size, size, C) with nhwc] → Conv 3×3 → Relu → MaxPool 2 → Gemm."""
    rng = np.random.default_rng(seed)
    inits = {"w": rng.normal(size=(4, channels, 3, 3)) * 0.3, "b": rng.normal(size=4) * 0.1,
             "fc": rng.normal(size=(classes, 4 * (size // 2) ** 2)) * 0.05, "fb": rng.normal(size=classes) * 0.1}
    nodes = []
    x = "x"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]))
        x = "xt"
    nodes += [helper.make_node("Conv", [x, "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
              helper.make_node("Relu", ["c"], ["r"], name="relu"),
              helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fc", "fb"], ["logits"], transB=1, name="fc")]
    shape: list[int | str] = ["N", size, size, channels] if nhwc else ["N", channels, size, size]
    return _save(nodes, inits, shape, path, metadata)


def mlp_model(path: Path, features: int = 4, classes: int = 3, metadata: dict[str, str] | None = None,
              seed: int = 0) -> Path:
    """x (N, features) → Gemm → Relu → Gemm → logits (N, classes)."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.normal(size=(16, features)), "b1": rng.normal(size=16) * 0.1,
             "w2": rng.normal(size=(classes, 16)), "b2": rng.normal(size=classes) * 0.1}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], transB=1, name="fc2")]
    return _save(nodes, inits, ["N", features], path, metadata)


def feature_metadata(names: list[str]) -> dict[str, str]:
    return {"feature_names": json.dumps(names)}


def write_csv(path: Path, header: list[str], rows: np.ndarray | list[list[object]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow([repr(float(v)) if isinstance(v, (float, np.floating)) else v for v in row])
    return path


def photo_folder(root: Path) -> dict[str, Path]:
    """The two photos that ship with scikit-learn plus odd files: greyscale, RGBA, palette, an
    EXIF-rotated JPEG, a truncated JPEG and a text file named .jpg. Returns name → path."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root.mkdir(parents=True, exist_ok=True)
    china, flower = load_sample_images().images
    paths: dict[str, Path] = {}
    # small copies keep the tests fast; the geometry (4:3, shorter side resized) stays realistic
    china_im = Image.fromarray(china).resize((160, 120), Image.Resampling.BILINEAR)
    flower_im = Image.fromarray(flower).resize((120, 90), Image.Resampling.BILINEAR)
    paths["china"] = root / "china.jpg"
    china_im.save(paths["china"], quality=95)
    (root / "sub").mkdir(exist_ok=True)
    paths["flower"] = root / "sub" / "flower.png"
    flower_im.save(paths["flower"])
    paths["grey"] = root / "grey.png"
    china_im.convert("L").save(paths["grey"])
    paths["rgba"] = root / "rgba.png"
    rgba = flower_im.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(paths["rgba"])
    paths["palette"] = root / "palette.bmp"
    flower_im.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(paths["palette"])
    paths["rotated"] = root / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    china_im.crop((0, 0, 100, 60)).save(paths["rotated"], exif=exif, quality=95)
    return paths


def add_bad_files(root: Path) -> dict[str, Path]:
    """A truncated JPEG and a text file named .jpg."""
    good = (root / "china.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "text.jpg").write_text("this is not a picture\n")
    return {"truncated": root / "truncated.jpg", "text": root / "text.jpg"}
