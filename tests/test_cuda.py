"""The CUDA path of onnxruntime-gpu gives the same records, unwrapping and paths as the CPU.

Skipped cleanly where onnxruntime cannot create a CUDA session."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import SAMPLES

from onnx_pathwise import DeviceError, Explainer
from onnx_pathwise.runtime import cuda_available

needs_cuda = pytest.mark.skipif(not cuda_available(), reason="no usable CUDA GPU")


def test_cuda_request_without_gpu_is_a_clear_error() -> None:
    if cuda_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="cuda"):
        Explainer(SAMPLES / "tiny_mlp.onnx", device="cuda")


def test_auto_falls_back_to_cpu_with_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    ex = Explainer(SAMPLES / "tiny_mlp.onnx", device="auto")
    assert ex.device in ("cpu", "cuda")
    err = capfd.readouterr().err
    assert len([line for line in err.splitlines() if line.strip()]) <= 1


@needs_cuda
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_cuda_matches_cpu(name: str) -> None:
    x = np.load(SAMPLES / f"{name}_inputs.npy")
    cpu = Explainer(SAMPLES / f"{name}.onnx", device="cpu")
    gpu = Explainer(SAMPLES / f"{name}.onnx", device="cuda")
    assert gpu.device == "cuda"
    ua, ub = cpu.unwrap(x), gpu.unwrap(x)
    np.testing.assert_allclose(ub.output, ua.output, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ub.weight, ua.weight, rtol=1e-3, atol=1e-4 * np.abs(ua.weight).max())
    assert ub.delta.max() < 1e-3 * max(1.0, np.abs(ub.output).max())
    ea, eb = cpu.explain(x, width="10%"), gpu.explain(x, width="10%")
    assert ea.target.tolist() == eb.target.tolist()
    for pa, pb in zip(ea.path, eb.path):
        assert [p.kept.tolist() for p in pa] == [p.kept.tolist() for p in pb]
    np.testing.assert_allclose(eb.attribution, ea.attribution, rtol=1e-3, atol=1e-4 * np.abs(ea.attribution).max())
