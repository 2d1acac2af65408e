"""SIGINT, SIGTERM and SIGHUP during a long run: no partial output, no temporary file, the
documented exit code (128 + signal) and one line on stderr. Real processes, real signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import SAMPLES, subprocess_env
from typer.testing import CliRunner

from onnx_pathwise import Explainer
from onnx_pathwise.cli import EXIT_CODES, Interrupted, app

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists() or sys.platform != "linux",
                                reason="needs Linux /proc to see when the command has started")


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (SigCgt in /proc)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return False


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _interrupt(tmp_path: Path, signum: int, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Start ``python -m onnx_pathwise *args``, wait until the command runs (its SIGTERM handler
    is installed when the command starts) and a little longer, send ``signum``, collect it."""
    proc = subprocess.Popen([sys.executable, "-m", "onnx_pathwise", *args], cwd=tmp_path, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a test runner started in the background may ignore SIGINT, and one started
                            # under nohup SIGHUP; the tool keeps what its caller ignores, so reset both
                            preexec_fn=_default_signals)
    try:
        deadline = time.monotonic() + 120
        while not _catches(proc.pid, signal.SIGTERM):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the command never started"
            time.sleep(0.05)
        time.sleep(2.0)  # into the computation (model read, input checked)
        assert proc.poll() is None, "finished before the signal: make the run longer"
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


LONG_EXPLAIN = ["explain", str(SAMPLES / "cnn.onnx"), str(SAMPLES / "cnn_inputs.npy"), "--out", "out",
                "--device", "cpu", "--method", "integrated_gradients", "--steps", "100000"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_leaves_no_output_and_no_temp_files(tmp_path: Path, signum: signal.Signals) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_bytes(b"the user's")
    before = _files(tmp_path)
    done = _interrupt(tmp_path, signum, LONG_EXPLAIN)
    assert done.returncode == 128 + signum, (done.returncode, done.stderr)
    assert done.returncode in EXIT_CODES or signum == signal.SIGHUP
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-pathwise: error: "), done.stderr
    assert signum.name in lines[0] and "Traceback" not in done.stderr and done.stdout == ""
    assert _files(tmp_path) == before  # nothing new: no output, no temporary file or folder
    assert (tmp_path / "out" / "mine.txt").read_bytes() == b"the user's"


def test_sigterm_on_evaluate_leaves_no_folder(tmp_path: Path) -> None:
    """The out folder did not exist: it does not exist afterwards either."""
    # 512 samples: long enough to be still running when the signal comes on an idle machine too
    np.save(tmp_path / "in.npy", np.tile(np.load(SAMPLES / "cnn_inputs.npy"), (64, 1, 1, 1)))
    args = ["evaluate", str(SAMPLES / "cnn.onnx"), "in.npy", "--out", "new/out", "--device",
            "cpu", "--methods", "integrated_gradients,pathwise,gradient,guided_backprop", "--step", "1"]
    done = _interrupt(tmp_path, signal.SIGTERM, args)
    assert done.returncode == 143, done.stderr
    assert _files(tmp_path) == ["in.npy"]


def test_interrupt_in_process_runs_cleanup_and_exits_with_the_code(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The exception SIGTERM becomes ends the command like any error: one line, 143."""
    def terminated(self: Explainer, x: np.ndarray) -> None:
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(Explainer, "unwrap", terminated)
    result = CliRunner().invoke(app, ["unwrap", str(SAMPLES / "tiny_mlp.onnx"), str(SAMPLES / "tiny_mlp_inputs.npy"),
                                      "--out", str(tmp_path / "u.npz"), "--device", "cpu"])
    assert result.exit_code == 143
    assert result.stderr == "onnx-pathwise: error: terminated (SIGTERM); no output written\n"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler does not outlive the command


def test_a_library_broken_by_the_signal_still_ends_as_the_interrupt(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The signal can land inside a library's callback (numba compiles through ctypes callbacks),
    which swallows the exception: the signal is delivered again once the callback returns, so the
    command still ends as interrupted — one line, 143 — without running on, without the library's
    own error and without Python's "Exception ignored" report."""
    import ctypes
    import os

    def broken_by_the_signal(self: Explainer, x: np.ndarray) -> None:
        callback = ctypes.CFUNCTYPE(None)(lambda: os.kill(os.getpid(), signal.SIGTERM))
        callback()  # the handler raises inside the callback; ctypes reports it as unraisable
        raise RuntimeError("no compiled object yet")  # what numba did next; never reached now

    monkeypatch.setattr(Explainer, "unwrap", broken_by_the_signal)
    result = CliRunner().invoke(app, ["unwrap", str(SAMPLES / "tiny_mlp.onnx"), str(SAMPLES / "tiny_mlp_inputs.npy"),
                                      "--out", str(tmp_path / "u.npz"), "--device", "cpu"])
    assert result.exit_code == 143, result.output
    assert result.stderr == "onnx-pathwise: error: terminated (SIGTERM); no output written\n"
    assert list(tmp_path.iterdir()) == []


def test_an_error_after_a_swallowed_signal_ends_as_the_interrupt(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the library fails on its own before the signal comes again, the failure after a
    signal is reported as the signal (one line, 143), not as the library's traceback."""
    from onnx_pathwise.cli import shell

    def broken(self: Explainer, x: np.ndarray) -> None:
        shell._received.append(signal.SIGTERM)  # the handler ran inside a callback that swallowed it
        raise RuntimeError("no compiled object yet")

    monkeypatch.setattr(Explainer, "unwrap", broken)
    result = CliRunner().invoke(app, ["unwrap", str(SAMPLES / "tiny_mlp.onnx"), str(SAMPLES / "tiny_mlp_inputs.npy"),
                                      "--out", str(tmp_path / "u.npz"), "--device", "cpu"])
    assert result.exit_code == 143, result.output
    assert result.stderr == "onnx-pathwise: error: terminated (SIGTERM); no output written\n"


def test_an_error_without_a_signal_is_still_a_bug_with_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(self: Explainer, x: np.ndarray) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Explainer, "unwrap", bug)
    result = CliRunner().invoke(app, ["unwrap", str(SAMPLES / "tiny_mlp.onnx"), str(SAMPLES / "tiny_mlp_inputs.npy"),
                                      "--out", "/tmp/never-written.npz", "--device", "cpu"])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)
