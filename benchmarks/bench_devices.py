"""CPU against CUDA for the same explanations, side by side in one process (issue 3).

For each model and batch size: explain (width 10%, every gate layer a path layer) and unwrap
on ``--first`` and ``--second`` devices (cpu and cuda by default). Checks that both give the same
targets, the same kept units and attributions to float32 round-off, then prints the median
times and the speed-up. A second CUDA timing uses cuDNN's exhaustive algorithm search instead
of the heuristic one the package uses (onnx_pathwise.runtime.CUDA_OPTIONS).

    python benchmarks/bench_devices.py [--repeat 10]            # needs a usable CUDA GPU
    python benchmarks/bench_devices.py --second cpu --repeat 2   # dry run of the script itself
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pathwise import interleaved, toy_cnn, vgg_style  # noqa: E402

from onnx_pathwise import Explainer, runtime  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
WIDTH = "10%"


def compare(a, b) -> tuple[bool, int, int, float]:  # type: ignore[no-untyped-def]
    """Same targets?, kept-unit lists that differ / total, max relative attribution difference."""
    same_target = a.target.tolist() == b.target.tolist()
    differ = total = 0
    for pa, pb in zip(a.path, b.path):
        for la, lb in zip(pa, pb):
            total += 1
            differ += la.kept.tolist() != lb.kept.tolist()
    rel = float(np.abs(a.attribution - b.attribution).max() / (np.abs(a.attribution).max() + 1e-30))
    return same_target, differ, total, rel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--first", default="cpu")
    ap.add_argument("--second", default="cuda")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--tf32", action="store_true", help="let CUDA use TF32 (onnxruntime's default) to see what it changes")
    args = ap.parse_args()
    if args.tf32:
        runtime.CUDA_OPTIONS["use_tf32"] = "1"
    batches = [int(b) for b in args.batches.split(",")]
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__} {ort.get_available_providers()}, {os.cpu_count()} CPUs, "
          f"CUDA usable: {runtime.cuda_available()}, options {runtime.CUDA_OPTIONS}")
    print(f"{'model':10s} {'batch':>5s} {'targets':>8s} {'kept differ':>12s} {'attr rel':>9s} "
          f"{'explain ' + args.first:>13s} {'explain ' + args.second:>13s} {'speed-up':>8s} "
          f"{'exhaustive':>10s} {'unwrap ' + args.first:>12s} {'unwrap ' + args.second:>12s} {'speed-up':>8s}")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        models = []
        for name, build, size in (("toy_cnn", toy_cnn, 32), ("vgg_style", vgg_style, 64)):
            path = Path(tmp) / f"{name}.onnx"
            torch.onnx.export(build(), (torch.randn(1, 3, size, size),), str(path), dynamo=False,
                              input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}},
                              opset_version=17)
            models.append((name, path, lambda n, s=size: rng.standard_normal((n, 3, s, s)).astype(np.float32)))
        digits = np.load(SAMPLES / "digits_inputs.npy")
        models.append(("digits", SAMPLES / "digits_cnn.onnx", lambda n: digits[:n]))
        for name, path, inputs in models:
            one, two = Explainer(path, device=args.first), Explainer(path, device=args.second)
            saved = dict(runtime.CUDA_OPTIONS)
            runtime.CUDA_OPTIONS["cudnn_conv_algo_search"] = "EXHAUSTIVE"
            try:
                exhaustive = Explainer(path, device=args.second)
            finally:
                runtime.CUDA_OPTIONS.clear()
                runtime.CUDA_OPTIONS.update(saved)
            for n in batches:
                x = inputs(n)
                same, differ, total, rel = compare(one.explain(x, width=WIDTH), two.explain(x, width=WIDTH))
                t = interleaved({
                    "t1": lambda e=one, x=x: e.explain(x, width=WIDTH),
                    "t2": lambda e=two, x=x: e.explain(x, width=WIDTH),
                    "t3": lambda e=exhaustive, x=x: e.explain(x, width=WIDTH),
                    "u1": lambda e=one, x=x: e.unwrap(x),
                    "u2": lambda e=two, x=x: e.unwrap(x),
                }, args.repeat)
                t1, t2, t3, u1, u2 = t["t1"], t["t2"], t["t3"], t["u1"], t["u2"]
                print(f"{name:10s} {n:5d} {'same' if same else 'DIFFER':>8s} {f'{differ}/{total}':>12s} {rel:9.1e} "
                      f"{t1:13.4f} {t2:13.4f} {t1 / t2:8.2f} {t3:10.4f} {u1:12.4f} {u2:12.4f} {u1 / u2:8.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
