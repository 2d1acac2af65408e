"""Datasets in bounded memory: shards + index, the same result as one batch, kill + --resume
equal to an uninterrupted run, and peak memory flat as the dataset grows."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_helpers import feature_metadata, mlp_model, photo_folder, write_csv
from helpers import ROOT, runner

from onnx_pathwise import Explainer
from onnx_pathwise.cli import app
from onnx_pathwise.data import open_inputs
from onnx_pathwise.stream import read_shards
from onnx_pathwise.stream import run as run_stream

NAMES = ["a", "b", "c", "d"]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _table(tmp: Path, n: int, seed: int = 0) -> tuple[Path, Path, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    model = mlp_model(tmp / "m.onnx", metadata=feature_metadata(NAMES))
    return model, write_csv(tmp / "rows.csv", NAMES, x), x


def _cli(*args: object, **kw: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "onnx_pathwise", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)  # type: ignore[call-overload]


def test_shards_and_index_equal_one_batch(tmp_path: Path) -> None:
    model, table, x = _table(tmp_path, 27)
    out = tmp_path / "out"
    res = invoke("explain", model, table, "--out", out, "--device", "cpu", "--batch-size", "4", "--shard-size", "10")
    assert res.exit_code == 0, res.output
    assert "27 sample(s) in 3 shard(s)" in res.output
    names = sorted(p.name for p in out.iterdir())
    expected = ["explanation-00000.npz", "explanation-00001.npz", "explanation-00002.npz", "index.json"]
    assert [n for n in names if n != "index.parquet"] == expected
    index = json.loads((out / "index.json").read_text())
    # the shard size rounds up to whole batches: 12, 12, 3
    assert index["shard_size"] == 12 and index["count"] == 27 and index["input"]["kind"] == "table"
    rows = index["rows"]
    assert [(r["shard"], r["offset"]) for r in rows][:3] == [(0, 0), (0, 1), (0, 2)]
    assert rows[12]["shard"] == 1 and rows[12]["offset"] == 0 and rows[26]["source"] == f"{table}[26]"
    assert set(rows[0]) >= {"source", "target", "score", "faithfulness", "delta", "shard", "offset"}
    assert max(r["delta"] for r in rows) < 1e-4
    got = read_shards(out)
    ex = Explainer(model, device="cpu")
    ref = ex.explain(x)
    np.testing.assert_allclose(got["attribution"], ref.attribution, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got["target"], ref.target)
    np.testing.assert_allclose([r["faithfulness"] for r in rows], ref.faithfulness, rtol=1e-6)
    np.testing.assert_allclose(got["delta"], ex.unwrap(x).delta, atol=1e-5)
    np.testing.assert_array_equal(got["path_count"][:, 0], [len(p[0].kept) for p in ref.path])
    if (out / "index.parquet").exists():
        import pyarrow.parquet as pq

        table_rows = pq.read_table(out / "index.parquet").to_pylist()
        assert [r["source"] for r in table_rows] == [r["source"] for r in rows]
        assert [r["offset"] for r in table_rows] == [r["offset"] for r in rows]


def test_a_folder_streams_with_figures_and_baselines(tmp_path: Path) -> None:
    from data_helpers import conv_model

    photo_folder(tmp_path / "p")
    model = conv_model(tmp_path / "m.onnx", size=16)
    res = invoke("explain", model, tmp_path / "p", "--out", tmp_path / "o", "--device", "cpu", "--method",
                 "gradient", "--preprocess", "tf")
    assert res.exit_code == 0, res.output
    index = json.loads((tmp_path / "o" / "index.json").read_text())
    assert index["method"] == "gradient" and index["preprocessing"]["preset"] == "tf"
    assert all(r["faithfulness"] is None for r in index["rows"])
    assert sorted(p.name for p in (tmp_path / "o").glob("sample_*.png")) == [f"sample_{i}.png" for i in range(6)]


def test_outputs_are_not_clobbered_and_resume_checks_settings(tmp_path: Path) -> None:
    model, table, _ = _table(tmp_path, 12)
    out = tmp_path / "out"
    assert invoke("explain", model, table, "--out", out, "--device", "cpu").exit_code == 0
    res = invoke("explain", model, table, "--out", out, "--device", "cpu")
    assert res.exit_code == 2 and "--force" in res.output
    res = invoke("explain", model, table, "--out", out, "--device", "cpu", "--resume")
    assert res.exit_code == 0 and "resumed after 12" in res.output
    res = invoke("explain", model, table, "--out", out, "--device", "cpu", "--resume", "--width", "1")
    assert res.exit_code == 2 and "other settings" in res.output
    res = invoke("explain", model, table, "--out", out, "--device", "cpu", "--resume", "--force")
    assert res.exit_code == 2


def test_kill_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    # 250 shards: enough that the kill lands mid-run on a busy machine (50 were written in
    # a few dozen milliseconds once loading got faster)
    model, table, _ = _table(tmp_path, 2000)
    args = [model, table, "--device", "cpu", "--batch-size", "4", "--shard-size", "8"]
    first = tmp_path / "killed" / "index-00000.json"
    killed = _cli("explain", *args, "--out", tmp_path / "killed")
    deadline = time.monotonic() + 300
    while not first.exists():
        assert killed.poll() is None, killed.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "index.json").exists(), "the run finished before it could be killed"
    resumed = _cli("explain", *args, "--out", tmp_path / "killed", "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert re.search(r"resumed after [1-9]\d*", out), out
    whole = _cli("explain", *args, "--out", tmp_path / "whole")
    whole_out, whole_err = whole.communicate(timeout=600)
    assert whole.returncode == 0, whole_err
    a, b = read_shards(tmp_path / "whole"), read_shards(tmp_path / "killed")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key
    ia, ib = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("whole", "killed"))
    assert ia["rows"] == ib["rows"] and ia["shards"] == ib["shards"] == [f"explanation-{i:05d}.npz" for i in range(250)]
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())


def test_the_local_engine_imports_no_ray(tmp_path: Path) -> None:
    model, table, _ = _table(tmp_path, 5)
    code = ("import sys; from onnx_pathwise.cli import app\n"
            f"try: app([r'explain', r'{model}', r'{table}', '--out', r'{tmp_path / 'o'}', '--device', 'cpu'])\n"
            "except SystemExit as e: assert not e.code, e.code\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_run_api_and_progress_off_when_not_a_terminal(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model, table, x = _table(tmp_path, 9)
    ex = Explainer(model, device="cpu")
    result = run_stream(ex, open_inputs(table, ex, batch_size=2), tmp_path / "o", model=model, shard_size=4)
    assert (result.count, result.shards, result.resumed_at) == (9, 3, 0)
    assert capfd.readouterr().err == ""


# --------------------------------------------------------------------------- memory

RSS_SCRIPT = """
import resource, sys
from onnx_pathwise.cli import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    assert not e.code, e.code
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_kb(tmp: Path, n: int, *extra: str) -> int:
    """Peak RSS of `explain` over ``n`` tiny images (a list file naming 8 PNGs over and over:
    each sample's input, weight and attribution take ~10 kB, so holding them all would show),
    in a fresh process. Both sizes run the compiled loops from the start: with the default
    tiers a long run loads numba part-way (about 100 MiB more) and a short one never does."""
    from data_helpers import conv_model
    from PIL import Image

    folder = tmp / f"n{n}"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "list.txt").write_text("".join(f"{i % 8}.png\n" for i in range(n)))
    model = conv_model(folder / "m.onnx", size=16)
    res = subprocess.run([sys.executable, "-c", RSS_SCRIPT, "explain", str(model), str(folder / "list.txt"), "--out",
                          str(folder / "out"), "--device", "cpu", "--no-png", "--preprocess", "unit", "--batch-size", "64", *extra],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "ONNX_PATHWISE_KERNELS": "compiled"})
    assert res.returncode == 0, res.stderr
    assert json.loads((folder / "out" / "index.json").read_text())["count"] == n
    return int(res.stdout.split("PEAK_KB")[-1])


@pytest.mark.slow
def test_peak_memory_is_flat_from_2000_to_20000_inputs(tmp_path: Path) -> None:
    small, big = peak_rss_kb(tmp_path, 2_000), peak_rss_kb(tmp_path, 20_000)
    print(f"peak RSS: 2,000 inputs {small / 1024:.1f} MiB, 20,000 inputs {big / 1024:.1f} MiB, ratio {big / small:.3f}")
    assert big <= 1.25 * small



@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_progress_bar_with_rate_and_eta_on_a_terminal() -> None:
    code = ("import time\nfrom onnx_pathwise.stream import _progress\n"
            "with _progress(10, 2, None) as advance:\n"
            "    for _ in range(8):\n        time.sleep(0.1)\n        advance(1)\n")
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave, env={**os.environ, "COLUMNS": "120"})
    os.close(slave)
    seen = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(master, 4096):
            seen += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode("utf-8", "replace"))
    assert "explaining" in text and "10/10" in text and "samples/s" in text and "0:00:0" in text


def test_index_rows_escape_text_from_file_names(tmp_path: Path) -> None:
    """A photo whose file name holds a terminal escape and a bidi override: index.json carries
    them as \\u escapes (reading back as the name), like every other JSON the tool writes."""
    folder = tmp_path / "p"
    paths = photo_folder(folder)
    odd = folder / "evil\x1b[31m\u202e.png"
    paths["flower"].rename(odd)
    model = tmp_path / "m.onnx"
    from data_helpers import conv_model

    conv_model(model, size=16)
    out = tmp_path / "out"
    result = invoke("explain", model, folder, "--preprocess", "unit", "--out", out, "--device", "cpu", "--no-png")
    assert result.exit_code == 0, result.output
    text = (out / "index.json").read_text(encoding="utf-8")
    assert "\x1b" not in text and "\u202e" not in text
    rows = json.loads(text)["rows"]
    assert any(Path(r["source"]).name == odd.name for r in rows)
