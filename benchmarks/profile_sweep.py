"""Where a full-depth pathwise explanation spends its time on one device (issue 13, items 1 and 7).

Runs ``explain`` on a real-size model (224², random weights, ``benchmarks/archs.py``) with
onnxruntime's profiler on in every session the explanation creates (the recorder, the op
kernels, the selection graph), after ``--warm`` unprofiled calls of a twin explainer so that
the profiled sessions' last runs are warm ones. Prints:

* the wall time of the profiled call and, from cProfile, the Python functions of the package
  that took most of it (onnxruntime's runs included in their callers);
* per session kind, the time of its runs during that call, and per op type the time
  onnxruntime spent in its nodes and on which execution provider (on CUDA a node's time is the
  host's, launching its kernels; the whole runs' times are the device's, since each run ends
  with the results copied back): a node of the selection graph that onnxruntime placed on
  the CPU while the rest runs on CUDA is named, with its time (each such node also costs a
  copy between host and device).

    python benchmarks/profile_sweep.py --model resnet18 --classes 10            # the CPU
    python benchmarks/profile_sweep.py --model resnet50 --classes 1000 --device cuda
    ONNX_PATHWISE_SELECTION=graph python benchmarks/profile_sweep.py --model resnet18 --classes 10

Nothing is timed side by side here: this says where the time goes, ``realsize.py`` how it
compares.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import archs  # noqa: E402

from onnx_pathwise import Explainer, runtime  # noqa: E402


def _profiled(folder: Path) -> Any:
    """runtime._options with onnxruntime's profiler on, its files in ``folder``."""
    plain = runtime._options

    def options(threads: int = 0, device: str = "cpu", arena: bool = False) -> Any:
        so = plain(threads, device, arena)
        so.enable_profiling = True
        so.profile_file_prefix = str(folder / "session")
        return so

    return options


class _Sessions:
    """Every onnxruntime session created while installed, to end their profiling."""

    def __init__(self) -> None:
        self.made: list[tuple[str, Any]] = []
        self.plain = ort.InferenceSession

    def __call__(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        s = self.plain(model, *args, **kwargs)
        self.made.append((_kind(model), s))
        return s


def _kind(model: Any) -> str:
    """Which of the sweep's sessions runs this model (bytes or path), from its graph."""
    if not isinstance(model, bytes):
        return "model file"
    graph = onnx.load_model_from_string(model).graph
    if graph.name == "pathwise_selection":
        return "selection graph"
    if len(graph.node) == 1:
        return f"op kernel {graph.node[0].op_type}"
    return "recorder and others"


def within(events: list[dict[str, Any]], start_ns: int, span: tuple[int, int]) -> list[dict[str, Any]]:
    """The run and node events of a session (its profiler started at ``start_ns``, ns since the epoch)
    that began within ``span`` (the profiled call, same clock)."""
    return [e for e in events if span[0] <= start_ns + 1000 * e["ts"] <= span[1] and (
        e.get("name") == "model_run" or (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")))]


def table(files: list[tuple[str, int, Path]], span: tuple[int, int], device: str) -> tuple[list[str], list[str]]:
    """Lines of the per-kind, per-op table and, on CUDA, the selection graph's nodes that
    onnxruntime placed on the CPU, slowest first."""
    by_op: dict[tuple[str, str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    off: list[tuple[float, str]] = []
    for kind, start_ns, f in files:
        for e in within(json.loads(f.read_text()), start_ns, span):
            a = e.get("args", {})
            key = (kind, "(whole runs)", "") if e["name"] == "model_run" else (
                kind, a.get("op_name", "?"), a.get("provider", "?"))
            by_op[key][0] += e["dur"] / 1e3
            by_op[key][1] += 1
            if device == "cuda" and kind == "selection graph" and key[2] == "CPUExecutionProvider":
                off.append((e["dur"] / 1e3, f"{a.get('op_name')} {e['name'].removesuffix('_kernel_time')}"))
    lines = ["| session | op | provider | ms | nodes (runs) |", "| --- | --- | --- | --- | --- |"]
    for (kind, op, prov), (ms, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {kind} | {op} | {prov.removesuffix('ExecutionProvider')} | {ms:.1f} | {n} |")
    return lines, [f"{name} {ms:.2f} ms" for ms, name in sorted(off, reverse=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=list(archs.ARCHS))
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--warm", type=int, default=2, help="unprofiled calls first")
    p.add_argument("--top", type=int, default=20, help="cProfile lines")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "model.onnx"
        onnx.save(archs.export(archs.build(a.model, a.classes)), str(path))
        x = np.random.default_rng(0).standard_normal((a.batch, 3, 224, 224)).astype(np.float32)
        plain = runtime._options
        runtime._options = _profiled(folder)
        made = ort.InferenceSession = _Sessions()  # type: ignore[misc,assignment]
        try:
            ex = Explainer(str(path), device=a.device)
            for _ in range(a.warm):
                ex.explain(x)
            prof = cProfile.Profile()
            t = time.time_ns()  # the clock of onnxruntime's profiling start times
            prof.enable()
            e = ex.explain(x)
            prof.disable()
            span = (t, time.time_ns())
            wall = (span[1] - span[0]) / 1e9
        finally:
            runtime._options = plain
            ort.InferenceSession = made.plain  # type: ignore[misc]
        files = [(kind, s.get_profiling_start_time_ns(), Path(s.end_profiling())) for kind, s in made.made]
        print(f"{a.model}, K = {a.classes}, batch {a.batch}, {a.device}: explain {wall * 1e3:.0f} ms "
              f"(selection: {e.selection}), after {a.warm} warm calls; {len(files)} sessions profiled")
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("cumulative").print_stats("onnx_pathwise", a.top)
        print(out.getvalue().split("\n\n", 2)[-1].rstrip())
        lines, off = table(files, span, a.device)
        print("\nonnxruntime's runs and nodes during the profiled call:")
        print("\n".join(lines))
        if off:
            print(f"\nselection-graph nodes on the CPU ({len(off)}), each with copies to and from the device:")
            print("\n".join(off[:30]) + ("\n…" if len(off) > 30 else ""))


if __name__ == "__main__":
    main()
