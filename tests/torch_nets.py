"""Small PyTorch models exported to ONNX, for checks against torch autograd."""

from __future__ import annotations

import io

import onnx
import torch
from torch import nn


def export(module: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """torch.onnx.export (TorchScript exporter, opset 17, symbolic batch) into memory."""
    buf = io.BytesIO()
    torch.onnx.export(
        module.eval(), (example,), buf, dynamo=False, dynamic_axes={"x": {0: "N"}},
        input_names=["x"], output_names=["logits"], opset_version=17,
    )
    return onnx.load_from_string(buf.getvalue())


def mlp(seed: int = 0, inputs: int = 6, hidden: int = 12, classes: int = 4) -> nn.Sequential:
    """Linear → ReLU → Linear → LeakyReLU(0.1) → Linear → ReLU6 → Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.LeakyReLU(0.1),
        nn.Linear(hidden, hidden), nn.ReLU6(),
        nn.Linear(hidden, classes),
    ).eval()


def cnn(seed: int = 0, channels: int = 2, size: int = 8, classes: int = 5) -> nn.Sequential:
    """Conv 3×3 → ReLU → MaxPool 2 → Conv 3×3 → ReLU → Flatten → Linear (input C×size×size)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * (size // 2 - 2) ** 2, classes),
    ).eval()
