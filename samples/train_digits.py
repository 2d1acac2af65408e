"""Train a small CNN on scikit-learn's bundled digits and export it for the README's evaluation.

    python samples/train_digits.py [--out DIR]     # needs torch and scikit-learn

Data: :func:`sklearn.datasets.load_digits` (1797 images of 8×8, values 0–16, bundled with
scikit-learn, nothing is downloaded), scaled to [0, 1], upsampled to 16×16 with bilinear
interpolation (``align_corners=False``), then standardised with the training split's pixel
mean and standard deviation (one scalar each). A stratified split keeps 25% of the images
out of training (``random_state=0``).

Model, in the spirit of the pathwise paper's toy CNN: [Conv3×3(16)–ReLU–MaxPool2] →
[Conv3×3(32)–ReLU–MaxPool2] → fc 64 → ReLU → fc 10, logits out (no Softmax). Adam,
learning rate 5e-3, batch 64, 8 epochs; a few seconds on a 2-core CPU. Seeded
(``torch.manual_seed``, numpy), so reruns give the same model up to thread-order round-off.

Writes to ``--out`` (default: this script's folder):

* ``digits_cnn.onnx`` — exported with torch's legacy (TorchScript) exporter at opset 17,
  input ``x`` of shape (N, 1, 16, 16) with a symbolic batch axis, output ``logits`` (N, 10);
* ``digits_inputs.npy`` — the first 32 held-out images, float32, shape (32, 1, 16, 16),
  already standardised (feed them to the model as they are);
* ``digits_labels.npy`` — their labels, int64, shape (32,).

Prints the held-out accuracy (on all 450 held-out images) and the training time.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

SEED = 0
EPOCHS = 8
BATCH = 64
LR = 5e-3
N_SAVED = 32
MAX_BYTES = 300_000


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): float32 images (N, 1, 16, 16), standardised with the
    training split's mean and std; int64 labels."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [0, 1]
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False).numpy()
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=0.25, random_state=SEED, stratify=labels
    )
    mean, std = float(x_tr.mean()), float(x_tr.std())
    x_tr = ((x_tr - mean) / std).astype(np.float32)
    x_te = ((x_te - mean) / std).astype(np.float32)
    return x_tr, y_tr, x_te, y_te


def build_model():  # -> torch.nn.Module
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16×8×8
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32×4×4
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def train(x: np.ndarray, y: np.ndarray, epochs: int = EPOCHS):  # -> torch.nn.Module
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        for start in range(0, len(x), BATCH):
            idx = order[start:start + BATCH]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export(model, x: np.ndarray, path: Path) -> None:
    import onnx
    import torch

    with warnings.catch_warnings():  # the legacy exporter announces its deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model.eval(), (torch.from_numpy(x[:1]),), str(path), dynamo=False,
                          dynamic_axes={"x": {0: "N"}}, input_names=["x"], output_names=["logits"],
                          opset_version=17)
    onnx.checker.check_model(onnx.load(str(path)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs (default: %(default)s)")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    np.random.seed(SEED)
    x_tr, y_tr, x_te, y_te = load_data()
    t0 = time.perf_counter()
    model = train(x_tr, y_tr, args.epochs)
    seconds = time.perf_counter() - t0
    acc = accuracy(model, x_te, y_te)
    print(f"trained on {len(x_tr)} images in {seconds:.1f} s; "
          f"held-out accuracy {acc:.4f} ({len(x_te)} images)")

    export(model, x_te, out / "digits_cnn.onnx")
    np.save(out / "digits_inputs.npy", np.ascontiguousarray(x_te[:N_SAVED], np.float32))
    np.save(out / "digits_labels.npy", y_te[:N_SAVED].astype(np.int64))
    print(f"saved inputs: accuracy {accuracy(model, x_te[:N_SAVED], y_te[:N_SAVED]):.4f} "
          f"({N_SAVED} images)")
    for name in ("digits_cnn.onnx", "digits_inputs.npy", "digits_labels.npy"):
        size = (out / name).stat().st_size
        assert size < MAX_BYTES, f"{name} is {size} bytes; samples must stay small"
        print(f"{name}: {size} bytes")


if __name__ == "__main__":
    main()
