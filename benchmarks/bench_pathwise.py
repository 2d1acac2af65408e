"""Pathwise explanation cost, measured side by side in one process (docs/design.md §6, issue 3).

For each model, per explanation (batch 1, K = 10, all path layers, width 10%):

* ``ours``       — onnx_pathwise.Explainer.explain (record + one backward sweep);
* ``published``  — the published algorithm's cost structure in PyTorch: for every path
  layer, recompute the lower forward, the full Jacobian of the upper part with one backward
  per class, mask; then the input Jacobian;
* ``sweep``      — a hand-written single-sweep PyTorch implementation (one backward pass
  carrying all K cotangents, selection at each ReLU as the sweep passes it);
* ``ort_fwd``    — onnxruntime running 1 + K forward passes of the same model, timed in turn
  with the others ("ort 1+K") and, at its best, back to back in a default session whose pool
  threads spin between runs ("ort best", the lower of the two; ``ours/best`` is the
  conservative ratio).

Prints the median times and the ratios the targets are stated in; the four are timed in turn,
round after round, so that a slow spell of a shared machine cancels out of the ratios. Run it
on an idle machine:
    python benchmarks/bench_pathwise.py [--repeat 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnx_pathwise import Explainer  # noqa: E402
from onnx_pathwise.runtime import session  # noqa: E402

K = 10
WIDTH = "10%"


def toy_cnn() -> nn.Sequential:
    """The paper's CIFAR-10 toy CNN: 3×[conv3×3–ReLU–maxpool] (32/64/128), fc 512–256–10."""
    layers: list[nn.Module] = []
    c = 3
    for out in (32, 64, 128):
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = out
    layers += [nn.Flatten(), nn.Linear(128 * 4 * 4, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, K)]
    return nn.Sequential(*layers).eval()


def vgg_style() -> nn.Sequential:
    """8 conv layers, 4 maxpools, fc 256–64–10, 64×64 input."""
    layers: list[nn.Module] = []
    c = 3
    for out in (32, 32, 64, 64, 128, 128, 128, 128):
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
        c = out
        if len([m for m in layers if isinstance(m, nn.Conv2d)]) % 2 == 0:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, K)]
    return nn.Sequential(*layers).eval()


def select(h: torch.Tensor, J: torch.Tensor, c: int, width: int) -> torch.Tensor:
    """docs/design.md §4 selection for one sample: h (u,), J (K, u) → mask (u,)."""
    C = (h[None] * J).double()
    logp = C[c] - torch.logsumexp(C, dim=0)
    order = torch.argsort(-logp, stable=True)[:width]
    keep = order[logp[order] > -math.log(J.shape[0])]
    if keep.numel() == 0:
        keep = order[:1]
    mask = torch.zeros_like(h)
    mask[keep] = 1
    return mask


def n_keep(units: int) -> int:
    return max(1, round(units * float(WIDTH[:-1]) / 100))


def published(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Per path layer: lower forward again, K backward passes for the full Jacobian, mask."""
    layers = list(model)
    relus = [i for i, m in enumerate(layers) if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        logits = model(x)
    c = int(logits.argmax())
    masks: dict[int, torch.Tensor] = {}

    def upper(h: torch.Tensor, start: int) -> torch.Tensor:
        for j in range(start + 1, len(layers)):
            h = layers[j](h)
            if j in masks:
                h = h * masks[j]
        return h

    for r in reversed(relus):
        with torch.no_grad():
            h = x
            for j in range(r + 1):
                h = layers[j](h)
        h = h.detach().requires_grad_(True)
        out = upper(h, r)[0]
        J = torch.stack([torch.autograd.grad(out[k], h, retain_graph=True)[0].flatten() for k in range(K)])
        masks[r] = select(h.detach().flatten(), J, c, n_keep(h.numel())).view_as(h)
    xg = x.clone().requires_grad_(True)
    h = xg
    for j, layer in enumerate(layers):
        h = layer(h)
        if j in masks:
            h = h * masks[j]
    (w,) = torch.autograd.grad(h[0, c], xg)
    return w * x


def single_sweep(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """One forward recording, one backward sweep carrying K cotangents, selection in passing."""
    layers = list(model)
    acts = [x]
    pools: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        h = x
        for j, layer in enumerate(layers):
            if isinstance(layer, nn.MaxPool2d):
                h, pools[j] = F.max_pool2d(h, 2, return_indices=True)
            else:
                h = layer(h)
            acts.append(h)
        c = int(h.argmax())
        g = torch.eye(K)
        for j in reversed(range(len(layers))):
            layer = layers[j]
            inp, out = acts[j], acts[j + 1]
            if isinstance(layer, nn.ReLU):
                flat = g.reshape(K, -1)
                mask = select(out.flatten(), flat, c, n_keep(out.numel()))
                g = (flat * mask * (inp.flatten() > 0)).reshape(g.shape)
            elif isinstance(layer, nn.Linear):
                g = g @ layer.weight
            elif isinstance(layer, nn.Conv2d):
                g = F.conv_transpose2d(g, layer.weight, padding=1)
            elif isinstance(layer, nn.MaxPool2d):
                idx = pools[j].expand(K, *pools[j].shape[1:])
                g = F.max_unpool2d(g, idx, 2, output_size=inp.shape[2:])
            elif isinstance(layer, nn.Flatten):
                g = g.reshape((K,) + inp.shape[1:])
        return g[c : c + 1] * x


def interleaved(fns: dict[str, Any], repeat: int) -> dict[str, float]:
    """Median time of each function, timed in turn (a, b, c, a, b, c, ...) so that a slow spell
    of a shared machine touches all of them alike and cancels out of their ratios."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, device {args.device}, K={K}, width {WIDTH}")
    print(f"{'model':10s} {'ours':>9s} {'published':>10s} {'sweep':>9s} {'ort 1+K':>9s} {'ort best':>9s} "
          f"{'pub/ours':>9s} {'ours/sweep':>11s} {'ours/ort':>9s} {'ours/best':>9s}")
    path_bytes: dict[str, bytes] = {}
    for name, build, size in (("toy_cnn", toy_cnn, 32), ("vgg_style", vgg_style, 64)):
        model = build()
        x = torch.randn(1, 3, size, size)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.onnx"
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "N"}}, opset_version=17)
            ex = Explainer(path, device=args.device)
            sess = session(path.read_bytes(), ex.device)
            path_bytes[name] = path.read_bytes()
        xn = x.numpy()
        ours = ex.explain(xn, width=WIDTH)
        ref = single_sweep(model, x).numpy()
        pub = published(model, x).numpy()
        agree = float(np.abs(ours.attribution - ref).max() / (np.abs(ref).max() + 1e-12))
        agree_pub = float(np.abs(pub - ref).max() / (np.abs(ref).max() + 1e-12))

        def ort_fwd(sess=sess, xn=xn) -> None:  # type: ignore[no-untyped-def]
            for _ in range(1 + K):
                sess.run(None, {"x": xn})

        t = interleaved({
            "ours": lambda ex=ex, xn=xn: ex.explain(xn, width=WIDTH),
            "published": lambda model=model, x=x: published(model, x),
            "sweep": lambda model=model, x=x: single_sweep(model, x),
            "ort": ort_fwd,
        }, args.repeat)
        t_ours, t_pub, t_sweep, t_ort = t["ours"], t["published"], t["sweep"], t["ort"]
        # onnxruntime at its best: a default session (pool threads spinning between runs), its
        # 1 + K passes timed back to back with nothing in between
        default = ort.InferenceSession(path_bytes[name], providers=sess.get_providers())
        t_best = min(t_ort, interleaved({"ort": lambda s=default, xn=xn: [s.run(None, {"x": xn}) for _ in range(1 + K)]},
                                        args.repeat)["ort"])
        print(f"{name:10s} {t_ours:9.4f} {t_pub:10.4f} {t_sweep:9.4f} {t_ort:9.4f} {t_best:9.4f} "
              f"{t_pub / t_ours:9.1f} {t_ours / t_sweep:11.2f} {t_ours / t_ort:9.2f} {t_ours / t_best:9.2f}"
              f"   (max rel. diff vs sweep: ours {agree:.1e}, published {agree_pub:.1e})", flush=True)


if __name__ == "__main__":
    main()
