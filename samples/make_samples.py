"""Write the small sample models and inputs used by the README, the CLI tests and demos.

    python samples/make_samples.py          # from the repository root; needs torch

Writes, next to this script:

* ``mlp.onnx`` + ``mlp_inputs.npy`` — tabular MLP, 8 features → 16 → 16 → 3 classes, Softmax.
  Trained for a few seconds on a synthetic rule (which of three feature groups is largest).
* ``cnn.onnx`` + ``cnn_inputs.npy`` — CNN on 1×16×16 images, (Conv+BatchNorm+ReLU+MaxPool)×2 +
  Linear → 4 classes, Softmax. Trained briefly on synthetic images: a bright bar that is
  horizontal, vertical, diagonal or anti-diagonal, at a random place, in noise.
* ``tiny_mlp.onnx`` + ``tiny_mlp_inputs.npy`` — :func:`onnx_pathwise.samples.tiny_mlp`,
  small enough to check by hand, with the input x = (1, 2) of its docstring.

Everything is seeded; exported with torch's legacy (TorchScript) exporter at opset 17 with a
symbolic batch axis. The exporter folds each BatchNorm into its Conv (eval mode).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from onnx_pathwise.samples import tiny_mlp  # noqa: E402


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


class CNN(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(16 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(self.features(x).flatten(1)), dim=1)


def tabular_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Label = which of the feature groups (0–2, 3–5, 6–7) has the largest sum."""
    x = torch.randn(n, 8, generator=gen)
    groups = torch.stack([x[:, 0:3].sum(1), x[:, 3:6].sum(1), x[:, 6:8].sum(1) * 1.5], 1)
    return x, groups.argmax(1)


def bar_images(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """16×16 images: one bar (horizontal, vertical, diagonal, anti-diagonal) of length 7 in noise."""
    x = 0.3 * torch.randn(n, 1, 16, 16, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    offsets = torch.randint(3, 13, (n, 2), generator=gen)
    steps = {0: (0, 1), 1: (1, 0), 2: (1, 1), 3: (1, -1)}
    for i in range(n):
        dr, dc = steps[int(y[i])]
        r0, c0 = int(offsets[i, 0]), int(offsets[i, 1])
        for t in range(-3, 4):
            x[i, 0, r0 + t * dr, c0 + t * dc] += 2.0
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.NLLLoss()
    model.train()
    for _ in range(epochs):
        for start in range(0, len(x), 64):
            xb, yb = x[start:start + 64], y[start:start + 64]
            opt.zero_grad()
            loss = loss_fn(torch.log(model(xb) + 1e-9), yb)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    model.eval()
    with warnings.catch_warnings():  # the legacy exporter announces its deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=False, dynamic_axes={"x": {0: "N"}},
                          input_names=["x"], output_names=["probs"], opset_version=17)
    onnx.checker.check_model(onnx.load(str(path)))


def main() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    mlp = MLP()
    x, y = tabular_data(2048, gen)
    acc = train(mlp, x, y, epochs=20, lr=1e-2)
    export(mlp, x[:1], HERE / "mlp.onnx")
    np.save(HERE / "mlp_inputs.npy", tabular_data(16, gen)[0].numpy().astype(np.float32))
    print(f"mlp.onnx: train accuracy {acc:.2f}")

    cnn = CNN()
    x, y = bar_images(2048, gen)
    acc = train(cnn, x, y, epochs=4, lr=3e-3)
    export(cnn, x[:1], HERE / "cnn.onnx")
    np.save(HERE / "cnn_inputs.npy", bar_images(8, gen)[0].numpy().astype(np.float32))
    print(f"cnn.onnx: train accuracy {acc:.2f}")

    onnx.save(tiny_mlp(), str(HERE / "tiny_mlp.onnx"))
    np.save(HERE / "tiny_mlp_inputs.npy", np.array([[1.0, 2.0]], np.float32))

    for path in sorted(HERE.glob("*.onnx")) + sorted(HERE.glob("*.npy")):
        size = path.stat().st_size
        assert size < 200_000, f"{path.name} is {size} bytes; samples must stay small"
        print(f"{path.name}: {size} bytes")


if __name__ == "__main__":
    main()
