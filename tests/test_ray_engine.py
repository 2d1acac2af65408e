"""--engine ray on a local Ray instance: the same shards and index as the local engine, sample by sample.

Skips when Ray is not installed (pip install 'onnx-pathwise[ray]'); the local engine needs none of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from data_helpers import conv_model, photo_folder
from helpers import runner

from onnx_pathwise import ray_engine
from onnx_pathwise.cli import app
from onnx_pathwise.errors import PathwiseError
from onnx_pathwise.stream import read_shards


def _ray_missing() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "Ray is not installed (pip install 'onnx-pathwise[ray]')"
    return None


def test_engine_ray_without_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from onnx_pathwise import ray_engine

    real_import = builtins.__import__

    def no_ray(name: str, *args: object, **kw: object) -> object:
        if name == "ray" or name.startswith("ray."):
            raise ImportError(name)
        return real_import(name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(PathwiseError, match=r"pip install 'onnx-pathwise\[ray\]'"):
        ray_engine.import_ray()


@pytest.mark.skipif(_ray_missing() is not None, reason=_ray_missing() or "")
def test_ray_equals_local_sample_by_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same shards, rows and values as the local engine; the actors start once for both shards."""
    started: list[int] = []
    start = ray_engine._start_actors

    def counted(ray: Any, workers: int, kwargs: Any) -> list[Any]:
        started.append(workers)
        return start(ray, workers, kwargs)

    monkeypatch.setattr(ray_engine, "_start_actors", counted)
    photo_folder(tmp_path / "p")
    model = conv_model(tmp_path / "m.onnx", size=16)
    common = [str(model), str(tmp_path / "p"), "--device", "cpu", "--preprocess", "unit", "--batch-size", "2",
              "--shard-size", "4", "--no-png"]
    local = runner.invoke(app, ["explain", *common, "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    ray_run = runner.invoke(app, ["explain", *common, "--out", str(tmp_path / "ray"), "--engine", "ray"])
    assert ray_run.exit_code == 0, ray_run.output
    a, b = read_shards(tmp_path / "local"), read_shards(tmp_path / "ray")
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7, err_msg=key)
    ia, ib = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("local", "ray"))
    assert ib["engine"] == "ray" and ia["engine"] == "local"
    assert ia["shards"] == ib["shards"] == ["explanation-00000.npz", "explanation-00001.npz"]
    assert len(started) == 1 and 1 <= started[0] <= 4  # one pool for the two shards
    for ra, rb in zip(ia["rows"], ib["rows"], strict=True):
        assert (ra["source"], ra["target"], ra["shard"], ra["offset"]) == (rb["source"], rb["target"], rb["shard"],
                                                                          rb["offset"])
        assert ra["score"] == pytest.approx(rb["score"], rel=1e-6)


def test_ray_address_needs_engine_ray(tmp_path: Path) -> None:
    photo_folder(tmp_path / "p")
    model = conv_model(tmp_path / "m.onnx", size=16)
    res = runner.invoke(app, ["explain", str(model), str(tmp_path / "p"), "--out", str(tmp_path / "o"),
                              "--ray-address", "auto", "--device", "cpu"])
    assert res.exit_code == 2 and "--ray-address needs --engine ray" in res.output
