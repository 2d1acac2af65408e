"""Shared fixtures. Plain helpers (sample paths, CLI runners, model building, torch export) are in
``helpers.py``; see CONTRIBUTING.md's test layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
from helpers import write_model_files


@pytest.fixture
def model_files(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """``model_files(model, x)``: the model and its input array written into this test's ``tmp_path``
    as ``m.onnx`` and ``x.npy`` (names overridable: ``name=``, ``inputs=``); returns both paths."""
    def write(model: onnx.ModelProto, x: Any, **names: str) -> tuple[Path, Path]:
        return write_model_files(tmp_path, model, x, **names)
    return write
