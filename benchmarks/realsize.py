"""Real-size models (224², random weights) side by side with the PyTorch references (issue 13).

For each model, head size K and batch b, in one process, ours and the reference timed in turn,
round after round (median of ``--repeat``), so drift of a shared machine cancels out of the ratios.
The timings in this process run the compiled forms of the tiered loops (``--kernels compiled``,
the default: where a process doing real-size work is after its first second of it,
:mod:`onnx_pathwise.tiers`; ``--kernels auto`` measures a short run's mix instead, whose first
calls run the numpy forms). Its subprocesses (peak RSS, the command line) run in the
environment the script was started with, as a user's process would:

* ``grad``     — ours ``attribute(x, "gradient")`` ÷ torch autograd of the target logit;
* ``ig32``     — ours ``attribute(x, "integrated_gradients", steps=32)`` ÷ Captum
  ``IntegratedGradients(method="riemann_middle", n_steps=32)`` (the same 32 midpoints; a
  hand-written torch loop over the same points when Captum is not installed) with Captum's
  default (every point of the batch in one pass); ``ig32_lean`` the same against
  ``internal_batch_size`` = the batch (one point per pass: Captum's least memory);
* ``unwrap``   — ours ``attribute(x, "unwrap")`` (the top class's row of W_x) ÷ torch autograd;
* ``pathwise`` — ours full-depth ``explain`` ÷ the limit: onnxruntime's forward pass of the batch
  (a plain session of the file with onnxruntime's default options) times (1 + K) (docs/design.md §6: 1 + K forward-equivalents; measured once per round on b rows and
  scaled, since running 1,001 forwards of a ResNet-50 per round would dominate the run);
  ``pathwise_ort_bwd`` the same explanation ÷ a second limit, onnxruntime's forward pass of the
  batch plus K rows per sample of onnxruntime's own backward (``graphsweep.AdjointGraph``: the
  adjoint graph of every op from the scores down to the lowest gate layer, no selection; timed
  on min(K, 10) rows of one sample per round and scaled);
* ``curves``   — ``evaluate``'s insertion and deletion curves of one attribution (default step:
  one image row, so 2 × (224 + 1) points a sample) ÷ onnxruntime running as many rows through a
  plain session of the file, in the same chunks: what the curves cost beyond their forward passes;
* ``rss``      — peak RSS (VmHWM) of ours and Captum (default and lean) for IG-32, each in its own
  subprocess;
* ``cli``      — a warm ``python -m onnx_pathwise explain`` ÷ the same explanation through the API,
  and its breakdown (imports, load and analysis, explain, writing);
* ``devices``  — full-depth pathwise on the CPU and on CUDA: same kept units and attributions,
  and the speed-up, with CUDA's selection graph and with its host sweep side by side (skipped
  without a usable GPU; ``benchmarks/gpu_session.sh`` runs it);
* ``pathwise_rss`` — full-depth pathwise alone in its own process (no torch) under ``--budget``
  (default 8G): its time and peak RSS, the "K = 1,000, batch 8, within 8 GB" check;
* ``overlap``  — competing classes (``classes=N``, N = 10 and 100) against ``all``: the mean Jaccard
  overlap of the kept units per path layer, the share of layers whose kept set differs, and the
  time ratio.

    python benchmarks/realsize.py --models resnet18 [--classes 10] [--batch 1] [--repeat 3]
    python benchmarks/realsize.py            # the full set (hours on a 2-core machine)

Prints one table; paste it into benchmarks/README.md with the machine and thread counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import archs  # noqa: E402

from onnx_pathwise import Explainer  # noqa: E402


def _captum_ig(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, lean: bool = False) -> torch.Tensor:
    """Captum's IG-32 at the same midpoints: by default (Captum's own default) all points of the
    batch in one pass; ``lean``: ``internal_batch_size`` = the batch, one point per pass (less
    memory, more time)."""
    try:
        from captum.attr import IntegratedGradients
    except ImportError:  # the same 32 midpoints by hand
        total = torch.zeros_like(x)
        for s in range(32):
            xi = (x * (s + 0.5) / 32).requires_grad_(True)
            model(xi).gather(1, target[:, None]).sum().backward()
            total += xi.grad
        return total * x / 32
    return IntegratedGradients(model).attribute(x, target=target, n_steps=32, method="riemann_middle",
                                                internal_batch_size=max(1, x.shape[0]) if lean else None)


def _ig_reference() -> str:
    """What the IG-32 rows compare against: Captum with its version, or the hand loop."""
    try:
        import captum
    except ImportError:
        return "a torch loop over the 32 midpoints (Captum not installed: pip install '.[bench]')"
    return f"Captum {captum.__version__}"


def _torch_grad(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    xi = x.clone().requires_grad_(True)
    model(xi).gather(1, target[:, None]).sum().backward()
    return xi.grad


TIER_VARIABLE = "ONNX_PATHWISE_KERNELS"


@contextlib.contextmanager
def _tier(mode: str | None) -> Iterator[None]:
    """ONNX_PATHWISE_KERNELS = ``mode`` (unset: None) for the timings inside."""
    saved = os.environ.pop(TIER_VARIABLE, None)
    if mode is not None:
        os.environ[TIER_VARIABLE] = mode
    try:
        yield
    finally:
        os.environ.pop(TIER_VARIABLE, None)
        if saved is not None:
            os.environ[TIER_VARIABLE] = saved


#: The environment as the user started the script: its subprocesses (peak RSS, the command line)
#: run with it, as a user's process would, whatever tier ``--kernels`` sets for the timings here.
USER_ENV = dict(os.environ)


def _child_env() -> dict[str, str]:
    """:data:`USER_ENV` with this checkout first on PYTHONPATH, for the measuring subprocesses."""
    return dict(USER_ENV, PYTHONPATH=os.pathsep.join([str(HERE.parent), USER_ENV.get("PYTHONPATH", "")]))


def _medians(runs: list[Callable[[], Any]], repeat: int) -> list[float]:
    """The median time of each of ``runs``, timed in turn round after round, after one warm-up
    round (kernel compilation, caches, allocator)."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeat):
        for run, ts in zip(runs, times):
            t = time.perf_counter()
            run()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def _median_pair(ours: Callable[[], Any], ref: Callable[[], Any], repeat: int) -> tuple[float, float]:
    o, r = _medians([ours, ref], repeat)
    return o, r


#: Rows of onnxruntime's own backward (``graphsweep.AdjointGraph``) timed per round for the
#: second limit; scaled to K rows of every sample, as the forward pass is scaled to 1 + K.
ADJOINT_ROWS = 10


def _ort_backward(ex: Explainer, x: np.ndarray, K: int) -> Callable[[], Any]:
    """One run of onnxruntime's own K-row backward without selection, on min(K, ADJOINT_ROWS)
    rows of the first sample: the adjoint graph of every op from the scores down to the lowest
    gate layer, the same graph forms as the selection graph's (docs/design.md §6)."""
    from onnx_pathwise import graphsweep

    graph = graphsweep.AdjointGraph(ex.sweep.engine, [layer.name for layer in ex.sweep.gate_layers])
    rec = ex.sweep.record(x[:1])
    rows = min(K, ADJOINT_ROWS)
    seeds = np.eye(K, dtype=np.float32)[:rows].reshape((rows,) + ex.sweep.ir.shapes[ex.sweep.ir.output_name])
    return lambda: graph.cotangents(rec, 0, seeds)


#: Our side of the RSS measurement: a process that imports onnx_pathwise only (no torch).
OURS_CHILD = """
import sys, numpy as np
from onnx_pathwise import Explainer
x = np.random.default_rng(1).normal(size=(int(sys.argv[2]), 3, 224, 224)).astype(np.float32)
Explainer(sys.argv[1], device="cpu").attribute(x, "integrated_gradients", steps=32)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024)
"""


#: Full-depth pathwise alone in a process (no torch): its time and peak RSS under a budget.
PATHWISE_CHILD = """
import sys, time, numpy as np
from onnx_pathwise import Explainer, limits
limits.set_memory_budget(sys.argv[3])
x = np.random.default_rng(1).normal(size=(int(sys.argv[2]), 3, 224, 224)).astype(np.float32)
ex = Explainer(sys.argv[1], device="cpu")
ex.progress = sys.stderr.isatty()
t = time.perf_counter()
ex.explain(x)
print(time.perf_counter() - t)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024)
"""


def pathwise_alone(path: str, batch: int, budget: str) -> dict[str, Any]:
    """``pathwise_rss``: full-depth pathwise in its own process under ``budget`` (the issue's
    "K = 1,000, batch 8, within 8 GB"): seconds and peak RSS (VmHWM) of that process."""
    env = _child_env()
    out = subprocess.run([sys.executable, "-c", PATHWISE_CHILD, path, str(batch), budget],
                         stdout=subprocess.PIPE, text=True, check=True, env=env)
    seconds, peak = out.stdout.split()[-2:]
    return {"budget": budget, "seconds": float(seconds), "peak_mib": float(peak)}


def _child_rss(args: list[str]) -> float:
    """Peak RSS in MiB (VmHWM: a child's ru_maxrss starts from its parent's size at fork) of one
    job in its own process: ours imports onnx_pathwise alone, the reference torch and Captum."""
    if args[0] == "ours":
        cmd = [sys.executable, "-c", OURS_CHILD, args[1], args[3]]
    else:
        cmd = [sys.executable, __file__, "--child", *args]
    env = _child_env()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def child(kind: str, model_path: str, torch_spec: str, batch: int) -> None:
    """Captum's IG-32 in this process (``kind`` "ref" or "ref-lean"); prints its peak RSS in MiB."""
    x = np.random.default_rng(1).normal(size=(batch, 3, 224, 224)).astype(np.float32)
    name, classes = torch_spec.split(":")
    model = archs.build(name, int(classes))
    xt = torch.from_numpy(x)
    target = model(xt).argmax(1)
    _captum_ig(model, xt, target, lean=kind == "ref-lean")
    with open("/proc/self/status", encoding="ascii") as f:
        hwm = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    print(hwm / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def cli_overhead(model_path: str, x_path: str, out: Path, repeat: int) -> dict[str, float]:
    """Warm CLI explain against the API, and where the CLI's time goes; both in the tier of the
    user's environment (a short run: auto unless set), whatever ``--kernels`` says (run ``--what
    cli`` alone: the API side is in-process, and numba loaded by earlier measurements stays)."""
    env = dict(USER_ENV, PYTHONPATH=str(HERE.parent))
    cmd = [sys.executable, "-m", "onnx_pathwise", "explain", model_path, x_path, "--out", str(out),
           "--force", "--device", "cpu", "--no-png"]
    subprocess.run(cmd, env=env, capture_output=True, check=True)  # warm: kernel caches on disk
    cli = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True, check=True)
        cli.append(time.perf_counter() - t)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import onnx_pathwise.cli"], env=env, check=True)
    imports = time.perf_counter() - t
    with _tier(USER_ENV.get(TIER_VARIABLE)):  # the API side in the user's tier too
        t = time.perf_counter()
        ex = Explainer(model_path, device="cpu")
        load = time.perf_counter() - t
        x = np.load(x_path)
        t = time.perf_counter()
        e = ex.explain(x)
        api = time.perf_counter() - t
    from onnx_pathwise.io import save_npz
    t = time.perf_counter()
    save_npz(out / "api.npz", {"attribution": e.attribution})
    write = time.perf_counter() - t
    c = statistics.median(cli)
    return {"cli": c, "api": load + api, "imports": imports, "load": load, "explain": api, "write_npz": write,
            "cli_minus_api": c - (load + api)}


def classes_overlap(ex: Explainer, x: np.ndarray, K: int) -> dict[str, Any]:
    """How often ``classes=N`` keeps other units than ``classes="all"``, and how much faster it is."""
    t = time.perf_counter()
    full = ex.explain(x)
    t_all = time.perf_counter() - t
    out: dict[str, Any] = {}
    for n in (10, 100):
        if n >= K:
            continue
        t = time.perf_counter()
        part = ex.explain(x, classes=n)
        dt = time.perf_counter() - t
        jac, differ, layers = [], 0, 0
        for a, b in zip(full.path, part.path):
            for la, lb in zip(a, b):
                sa, sb = set(la.kept.tolist()), set(lb.kept.tolist())
                jac.append(len(sa & sb) / max(1, len(sa | sb)))
                differ += sa != sb
                layers += 1
        out[f"top{n}"] = {"jaccard": float(np.mean(jac)) if jac else 1.0, "layers_differ": f"{differ}/{layers}",
                          "speedup": t_all / dt}
    return out


def devices(path: str, x: np.ndarray, repeat: int) -> dict[str, Any]:
    """Full-depth pathwise on the CPU and on CUDA (issue 13, item 7): CUDA with its selection
    graph (the default there) and with the host sweep; the same kept units and attributions to
    float32 round-off, and the time of each. The first call of each is compared and timed
    (``first_*``: sessions, cuDNN's choices); then ``repeat`` rounds in turn (``*_s``, medians;
    none with ``--repeat 0``, for a GPU session short of time)."""
    from bench_devices import compare

    from onnx_pathwise import graphsweep, runtime

    if not runtime.cuda_available():
        return {"skipped": "no usable CUDA GPU"}
    cpu, cuda = Explainer(path, device="cpu"), Explainer(path, device="cuda")

    def host_selection() -> Any:  # CUDA with the host sweep (the path before the selection graph)
        os.environ[graphsweep.ENV_VAR] = "host"
        try:
            return cuda.explain(x)
        finally:
            os.environ.pop(graphsweep.ENV_VAR)

    runs = {"cpu": lambda: cpu.explain(x), "cuda": lambda: cuda.explain(x), "cuda_host_selection": host_selection}
    first: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for name, run in runs.items():
        t = time.perf_counter()
        first[name] = run()
        out[f"first_{name}_s"] = time.perf_counter() - t
    used = first["cuda"].selection == "graph"
    out["selection_graph"] = "used" if used else (cuda.sweep.selection_problem or "not used (rows past the budget?)")
    for name in ("cuda", "cuda_host_selection"):
        same_targets, differ, total, rel = compare(first["cpu"], first[name])
        out[f"{name}_vs_cpu"] = {"same_targets": same_targets, "kept_lists_differ": f"{differ}/{total}",
                                 "attribution_max_rel": rel}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    key = "first_{}_s" if not repeat else "{}_s"
    for name in runs:
        if repeat:
            out[f"{name}_s"] = statistics.median(times[name])
    out["speedup"] = out[key.format("cpu")] / out[key.format("cuda")]
    out["graph_over_host_selection"] = out[key.format("cuda_host_selection")] / out[key.format("cuda")]
    return out


def curves_ratio(ex: Explainer, x: np.ndarray, path: str, repeat: int) -> float:
    """`evaluate`'s insertion and deletion curves (of the gradient, default step: one image row)
    ÷ onnxruntime running as many rows through a plain session, in the curves' chunks."""
    from onnx_pathwise import metrics

    attribution = ex.attribute(x, "gradient").attribution
    # as many rows as the two curves score (their points, from a first run of them)
    rows = sum(curve(ex, x, attribution).scores.size for curve in (metrics.insertion, metrics.deletion))
    chunk = max(1, metrics.MAX_CURVE_ELEMENTS // int(np.prod(x.shape[1:])))
    plain = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name_in = plain.get_inputs()[0].name
    batch = np.repeat(x[:1], chunk, axis=0)

    def reference() -> None:
        for start in range(0, rows, chunk):
            plain.run(None, {name_in: batch[: min(chunk, rows - start)]})

    def curves() -> None:
        metrics.insertion(ex, x, attribution)
        metrics.deletion(ex, x, attribution)

    o, r = _median_pair(curves, reference, repeat)
    return o / r


def measure(ex: Explainer, model: torch.nn.Module, x: np.ndarray, path: str, name: str, K: int, repeat: int,
            what: set[str], tmp: Path, budget: str = "8G") -> dict[str, Any]:
    """One row of the table: the chosen comparisons for one model, head and batch."""
    b = x.shape[0]
    xt = torch.from_numpy(x)
    with torch.no_grad():
        target = model(xt).argmax(1)
    row: dict[str, Any] = {"model": name, "K": K, "batch": b}
    if "grad" in what:
        o, r = _median_pair(lambda: ex.attribute(x, "gradient"),
                            lambda: _torch_grad(model, xt, target), repeat)
        row["grad"] = o / r
    if "unwrap" in what:
        o, r = _median_pair(lambda: ex.attribute(x, "unwrap"),
                            lambda: _torch_grad(model, xt, target), repeat)
        row["unwrap"] = o / r
    if "ig32" in what:
        o, r = _median_pair(lambda: ex.attribute(x, "integrated_gradients", steps=32),
                            lambda: _captum_ig(model, xt, target), repeat)
        row["ig32"] = o / r
        o, r = _median_pair(lambda: ex.attribute(x, "integrated_gradients", steps=32),
                            lambda: _captum_ig(model, xt, target, lean=True), repeat)
        row["ig32_lean"] = o / r
    if "pathwise" in what:
        plain = ort.InferenceSession(path, providers=["CPUExecutionProvider"])  # onnxruntime's defaults
        name_in = plain.get_inputs()[0].name
        o, r, a = _medians([lambda: ex.explain(x), lambda: plain.run(None, {name_in: x}), _ort_backward(ex, x, K)],
                           repeat)
        row["pathwise"] = o / (r * (1 + K))
        row["pathwise_s"] = o
        # the second limit: the forward pass and K rows per sample of onnxruntime's own backward
        row["pathwise_ort_bwd"] = o / (r + a * K * b / min(K, ADJOINT_ROWS))
    if "curves" in what:
        row["curves"] = curves_ratio(ex, x, path, repeat)
    if "rss" in what:
        ours = _child_rss(["ours", path, f"{name}:{K}", str(b)])
        ref = _child_rss(["ref", path, f"{name}:{K}", str(b)])
        lean = _child_rss(["ref-lean", path, f"{name}:{K}", str(b)])
        row["rss_ig32"] = f"{ours:.0f} / {ref:.0f} MiB ({ours / ref:.2f})"
        row["rss_ig32_lean"] = f"{ours:.0f} / {lean:.0f} MiB ({ours / lean:.2f})"
    if "pathwise_rss" in what:
        row["pathwise_alone"] = pathwise_alone(path, b, budget)
    if "overlap" in what:
        row["overlap"] = classes_overlap(ex, x, K)
    if "devices" in what:
        row["devices"] = devices(path, x, repeat)
    if "cli" in what:
        xp = tmp / "x.npy"
        np.save(xp, x)
        row["cli"] = cli_overhead(path, str(xp), tmp / "out", repeat)
    return row


def run(names: list[str], classes: list[int], batches: list[int], repeat: int, what: set[str],
        budget: str = "8G") -> list[dict[str, Any]]:
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for K in classes:
                model = archs.build(name, K)
                path = str(Path(tmp) / f"{name}_{K}.onnx")
                onnx.save(archs.export(model), path)
                ex = Explainer(path, device="cpu")
                for b in batches:
                    x = np.random.default_rng(1).normal(size=(b, 3, 224, 224)).astype(np.float32)
                    row = measure(ex, model, x, path, name, K, repeat, what, Path(tmp), budget)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(archs.ARCHS))
    p.add_argument("--classes", default="1,10,1000")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--what", default="grad,unwrap,ig32,pathwise,rss,cli,overlap")
    p.add_argument("--budget", default="8G", help="memory budget of the pathwise_rss process")
    p.add_argument("--kernels", default="compiled", choices=("compiled", "auto", "numpy"),
                   help="tier of the tiered loops for the timings in this process (ONNX_PATHWISE_KERNELS): "
                        "compiled, where any process doing real-size work is after its first second of it "
                        "(default); auto, a short run's mix")
    a = p.parse_args()
    os.environ[TIER_VARIABLE] = a.kernels
    rows = run(a.models.split(","), [int(k) for k in a.classes.split(",")], [int(b) for b in a.batch.split(",")],
               a.repeat, set(a.what.split(",")), a.budget)
    print(f"\nmachine: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, tiered loops: {a.kernels}")
    if {"ig32", "rss"} & set(a.what.split(",")):
        print(f"IG-32 reference: {_ig_reference()}")
    cols = [c for c in ("grad", "unwrap", "ig32", "ig32_lean", "pathwise", "pathwise_ort_bwd", "pathwise_s", "curves",
                        "rss_ig32", "rss_ig32_lean")
            if any(c in r for r in rows)]
    print("| model | K | batch | " + " | ".join(cols) + " |")
    print("|---" * (3 + len(cols)) + "|")
    for r in rows:
        vals = [f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        print(f"| {r['model']} | {r['K']} | {r['batch']} | " + " | ".join(vals) + " |")
    for r in rows:
        if r.get("overlap"):
            print(f"classes {r['model']} K={r['K']} b={r['batch']}: " + json.dumps(r["overlap"]))
        if "pathwise_alone" in r:
            print(f"pathwise alone {r['model']} K={r['K']} b={r['batch']}: " + json.dumps(r["pathwise_alone"]))
        if "devices" in r:
            print(f"devices {r['model']} K={r['K']} b={r['batch']}: " + json.dumps(r["devices"]))
        if "cli" in r:
            print(f"cli {r['model']} K={r['K']} b={r['batch']}: " + ", ".join(f"{k} {v:.2f}s" for k, v in r["cli"].items()))


if __name__ == "__main__":
    main()
