"""The committed digits sample (samples/train_digits.py's output): it loads, unwraps exactly and
still classifies its saved held-out inputs. Never trains."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from helpers import SAMPLES

from onnx_pathwise import Explainer

FILES = ("digits_cnn.onnx", "digits_inputs.npy", "digits_labels.npy")


@pytest.fixture(scope="module")
def sample() -> tuple[Explainer, np.ndarray, np.ndarray]:
    ex = Explainer(SAMPLES / "digits_cnn.onnx", device="cpu")
    return ex, np.load(SAMPLES / "digits_inputs.npy"), np.load(SAMPLES / "digits_labels.npy")


def test_files_are_small_and_shaped(sample: tuple[Explainer, np.ndarray, np.ndarray]) -> None:
    ex, x, y = sample
    for name in FILES:
        assert (SAMPLES / name).stat().st_size < 300_000, name
    assert x.dtype == np.float32 and x.shape == (32, 1, 16, 16)
    assert y.shape == (32,) and y.dtype.kind == "i" and set(y.tolist()) <= set(range(10))
    assert ex.input_shape == (1, 16, 16) and ex.num_classes == 10
    # [Conv–ReLU–MaxPool] × 2 (16, 32 channels) + fc 64 + ReLU: three gate layers.
    assert [layer.units for layer in ex.gate_layers] == [16 * 16 * 16, 32 * 8 * 8, 64]


def test_unwrap_is_exact(sample: tuple[Explainer, np.ndarray, np.ndarray]) -> None:
    ex, x, _ = sample
    res = ex.unwrap(x)
    scale = max(1.0, float(np.abs(res.output).max()))
    assert float(res.delta.max()) < 1e-4 * scale


def test_accuracy_on_saved_inputs(sample: tuple[Explainer, np.ndarray, np.ndarray]) -> None:
    ex, x, y = sample
    accuracy = float((ex.record(x).scores.argmax(axis=1) == y).mean())
    assert accuracy >= 0.9


def test_training_script_imports_without_side_effects(tmp_path: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in SAMPLES.iterdir()}
    spec = importlib.util.spec_from_file_location("train_digits", SAMPLES / "train_digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main) and callable(module.build_model)
    assert {p.name: p.stat().st_mtime_ns for p in SAMPLES.iterdir()} == before
