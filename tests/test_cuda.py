"""The CUDA path of onnxruntime-gpu gives the same records, unwrapping and paths as the CPU.

Skipped cleanly where onnxruntime cannot create a CUDA session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, SAMPLES, subprocess_env

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


@needs_cuda
@pytest.mark.parametrize("name", ["cnn", "residual", "activations"])
def test_the_selection_graph_runs_on_cuda_and_matches_the_cpu(name: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With device="cuda" the selection runs as one graph on the device (docs/design.md §4): the
    same kept units as the CPU's host sweep and as CUDA's own host sweep."""
    import zoo

    from onnx_pathwise import graphsweep

    path, _ = zoo.BUILDERS[name](tmp_path / f"{name}.onnx")
    cpu, gpu = Explainer(path, device="cpu"), Explainer(path, device="cuda")
    x = np.random.default_rng(1).normal(size=(3,) + cpu.input_shape).astype(np.float32)
    for kw in ({}, {"width": "10%"}):
        a, b = cpu.explain(x, **kw), gpu.explain(x, **kw)
        assert b.selection == "graph" and a.selection == "host", gpu.sweep.selection_problem
        monkeypatch.setenv(graphsweep.ENV_VAR, "host")
        c = gpu.explain(x, **kw)
        monkeypatch.delenv(graphsweep.ENV_VAR)
        assert c.selection == "host"
        for other in (b, c):
            assert a.target.tolist() == other.target.tolist()
            for pa, pb in zip(a.path, other.path):
                assert [p.kept.tolist() for p in pa] == [p.kept.tolist() for p in pb]
            np.testing.assert_allclose(other.attribution, a.attribution, rtol=1e-3,
                                       atol=1e-4 * np.abs(a.attribution).max())


@needs_cuda
def test_class_chunked_pathwise_on_cuda_matches_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many classes in class chunks (a budget that forces them) on CUDA and on the CPU: the same
    kept units, attributions to float32 round-off (issue 13)."""
    from test_class_chunks import mlp_many

    from onnx_pathwise import limits

    path = mlp_many(tmp_path / "many.onnx", 300, width=64)
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    monkeypatch.setattr(limits, "memory_budget", lambda: 1)
    a, b = Explainer(path, device="cpu").explain(x), Explainer(path, device="cuda").explain(x)
    assert a.target.tolist() == b.target.tolist()
    for pa, pb in zip(a.path, b.path):
        assert [p.kept.tolist() for p in pa] == [p.kept.tolist() for p in pb]
    np.testing.assert_allclose(b.attribution, a.attribution, rtol=1e-4, atol=1e-5 * np.abs(a.attribution).max())


def test_the_gpu_session_script_says_why_it_skips_without_a_gpu(tmp_path: Path) -> None:
    """benchmarks/gpu_session.sh on a machine without CUDA: a summary saying so, exit 1, at once."""
    if cuda_available():
        pytest.skip("a GPU is present: the script would run its benchmarks")
    env = subprocess_env()
    env.update(OUT=str(tmp_path), PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "onnx_pathwise sees CUDA: False" in summary
    assert "skipped: onnxruntime cannot use a CUDA GPU here" in summary
