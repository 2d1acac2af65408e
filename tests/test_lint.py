"""The code stays ruff- and mypy-clean (STYLE.md: 'ruff and a type checker clean'), and the
onnxruntime boundary stays in runtime.py (ruff's banned-api rule in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from helpers import ROOT


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_ruff_clean() -> None:
    res = _run("ruff", "check", ".")
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_clean() -> None:
    pytest.importorskip("mypy")
    res = _run(sys.executable, "-m", "mypy", "onnx_pathwise", "--ignore-missing-imports")
    assert res.returncode == 0, res.stdout + res.stderr
