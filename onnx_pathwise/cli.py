"""The ``onnx-pathwise`` command line: a thin Typer shell over :class:`~onnx_pathwise.Explainer`.

Commands only parse options, call the library and print. The plumbing lives in one helper
each, for every command to share: :func:`_open_explainer` (model + device),
:func:`_load_input` (a checked input batch), :func:`_guard_output` (refuse to clobber before any
work is done) and :func:`_write_npz` / :func:`_write_json` (atomic output).

Errors: every :class:`~onnx_pathwise.errors.PathwiseError` becomes one line on stderr,
``onnx-pathwise: error: <message>``, and the error's ``exit_code`` (:data:`EXIT_CODES`, also the
table in README.md); ``--debug`` shows its traceback instead. Any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from typer.core import TyperGroup

from . import __version__
from .errors import (
    DeviceError,
    InputError,
    ModelError,
    OutputError,
    PathwiseError,
    UnsupportedModelError,
)
from .explainer import Explainer
from .graph import GateLayer, Segment
from .io import load_array, save_npz, to_json, write_json
from .ir import GATE, ROUTING

PROG = "onnx-pathwise"
_DEBUG = "onnx_pathwise.debug"

#: Exit code → (short name, meaning). README.md's table mirrors this; a test keeps them in step.
EXIT_CODES: dict[int, tuple[str, str]] = {
    0: ("success", "the command did what it was asked"),
    1: ("not analysable", "`inspect` found unsupported nodes (its report lists every one); "
                          "also any unexpected error, i.e. a bug, which prints a traceback"),
    PathwiseError.exit_code: ("usage", "a bad option or argument, or an output path that may not be "
                                       "written (exists without `--force`, is a directory, ...)"),
    ModelError.exit_code: ("model", "the model file cannot be read or analysed"),
    UnsupportedModelError.exit_code: ("unsupported", "the input→output path holds unsupported "
                                                     "operations (the message lists them all)"),
    InputError.exit_code: ("input", "the input file or array is unusable: missing, corrupt, pickled, "
                                    "not numeric, wrong shape, NaN or infinite values"),
    DeviceError.exit_code: ("device", "the requested device is not available "
                                      "(`--device cuda` without a usable GPU)"),
}
assert OutputError.exit_code == PathwiseError.exit_code


class _Group(TyperGroup):
    """Turns a :class:`PathwiseError` raised by any command into one line and its exit code."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except PathwiseError as exc:
            if ctx.meta.get(_DEBUG):
                raise
            message = " ".join(str(exc).split("\n"))
            typer.echo(f"{PROG}: error: {message}", err=True)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=_Group,
    name=PROG,
    help="Exact local affine models and pathwise explanations of piecewise-linear (ReLU) ONNX models.",
    epilog="Exit codes: " + ", ".join(f"{code} {short}" for code, (short, _) in EXIT_CODES.items())
    + " (details in README.md).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# --------------------------------------------------------------------------- shared options

ModelArg = Annotated[Path, typer.Argument(help="ONNX model file.", metavar="MODEL", show_default=False)]
InputArg = Annotated[Path, typer.Argument(
    help="Input batch: a .npy file, or a .npz holding one array (or one named 'x' or 'inputs'); "
         "with or without the batch axis.", metavar="INPUT", show_default=False)]
InputNameOpt = Annotated[str | None, typer.Option(
    "--input-name", help="Model input to explain; default: the only float input.", show_default=False)]
OutputNameOpt = Annotated[str | None, typer.Option(
    "--output", help="Model output (or any tensor) to explain; default: the only float output. "
                     "A final Softmax/LogSoftmax/Sigmoid is peeled: scores are the logits.",
    show_default=False)]
DeviceOpt = Annotated[Device, typer.Option(
    "--device", case_sensitive=False,
    help="Where onnxruntime runs: auto (CUDA when usable, else CPU), cpu or cuda.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"{PROG} {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show the full traceback of errors too (normally one line).")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Exact local affine models and pathwise explanations of piecewise-linear (ReLU) ONNX models."""
    ctx.meta[_DEBUG] = debug


# --------------------------------------------------------------------------- plumbing


def _open_explainer(model: Path, device: Device | str = Device.auto, input_name: str | None = None,
                    output_name: str | None = None) -> Explainer:
    """Read, validate and analyse the model (ModelError / UnsupportedModelError / DeviceError)."""
    device = device.value if isinstance(device, Device) else device
    return Explainer(model, device=device, input_name=input_name, output_name=output_name)


def _load_input(path: Path, explainer: Explainer) -> np.ndarray:
    """Read an input file safely and check it against the model: a batch (N, *input shape)."""
    return explainer.check_input(load_array(path), name=str(path))


def _guard_output(path: Path, force: bool) -> None:
    """Refuse, before any work, an output path that cannot or may not be written.

    Missing folders on the way are allowed: the writers create them.
    """
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name")
    if (path.exists() or path.is_symlink()) and not force:
        raise OutputError(f"{path}: already exists; pass --force to overwrite it")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{path}: {str(parent)!r} is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"{path}: folder {str(parent)!r} is not writable")
            break


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create folder {str(path.parent)!r} ({exc.strerror or exc})") from None


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write arrays atomically, creating missing folders; the file is named exactly ``path``."""
    _make_parent(path)
    return save_npz(path, arrays)


def _write_json(path: Path, obj: Any) -> Path:
    """Write strict JSON atomically, creating missing folders."""
    _make_parent(path)
    return write_json(path, obj)


# --------------------------------------------------------------------------- inspect


def _gate_parameters(ex: Explainer) -> int:
    """Learned gate parameters (PRelu slopes); the other gates have none."""
    total = 0
    for node in ex.ir.nodes:
        if node.role == GATE and node.op_type == "PRelu":
            total += sum(ex.ir.constants[t].size for t, d in zip(node.inputs, node.data)
                         if t and not d and t in ex.ir.constants)
    return int(total)


def _gate_dict(g: GateLayer) -> dict[str, Any]:
    return {"index": g.index, "name": g.name, "op_type": g.op_type, "units": g.units,
            "shape": list(g.shape), "input": g.input, "output": g.output}


def _segment_dict(s: Segment, op_types: Mapping[str, str]) -> dict[str, Any]:
    return {"index": s.index, "nodes": list(s.nodes), "op_types": [op_types[n] for n in s.nodes],
            "inputs": list(s.inputs), "outputs": list(s.outputs), "parameters": s.parameters}


def describe(ex: Explainer, model: Path | str) -> dict[str, Any]:
    """What ``inspect`` reports about an analysable model, as plain JSON-ready data."""
    ir = ex.ir
    op_types = {n.name: n.op_type for n in ir.nodes}
    segments = [_segment_dict(s, op_types) for s in ex.segments]
    gate_params = _gate_parameters(ex)
    return {
        "model": str(model),
        "analysable": True,
        "producer": ir.info.get("producer", ""),
        "opset": ir.opset,
        "input": {"name": ir.input_name, "shape": ["N", *ir.input_shape], "dtype": str(ir.input_dtype),
                  "batch_fixed_in_file": ir.batch_fixed},
        "output": {"name": ir.source_output or ir.output_name, "explained": ir.output_name,
                   "peeled": list(ir.peeled), "classes": ir.num_classes},
        "gate_layers": [_gate_dict(g) for g in ex.gate_layers],
        "routing": [{"name": n.name, "op_type": n.op_type} for n in ir.nodes if n.role == ROUTING],
        "segments": segments,
        "parameters": sum(s["parameters"] for s in segments) + gate_params,
    }


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def _dims(shape: Sequence[Any]) -> str:
    return "×".join(map(str, shape)) if shape else "scalar"


def _ops_summary(ops: Sequence[str], limit: int = 5) -> str:
    text = " → ".join(ops[:limit])
    return text + f" → … ({len(ops)} nodes)" if len(ops) > limit else text


def _describe_text(info: Mapping[str, Any]) -> str:
    inp, out = info["input"], info["output"]
    producer = f"made by {info['producer']}, " if info["producer"] else ""
    lines = [f"{info['model']}  ({producer}opset {info['opset']})", ""]
    batch = "fixed at 1 in the file; any N works" if inp["batch_fixed_in_file"] else "N is the batch axis"
    lines.append(f"Input     {inp['name']!r}: {inp['dtype']}, shape ({', '.join(map(str, inp['shape']))})"
                 f"  [{batch}]")
    if out["peeled"]:
        peeled = " then ".join(reversed(out["peeled"]))
        lines.append(f"Output    {out['name']!r}; explained scores: {out['explained']!r}, "
                     f"before the final {peeled} (explanations target these logits)")
    else:
        lines.append(f"Output    {out['name']!r}; explained scores: {out['explained']!r}")
    lines.append(f"Classes   {out['classes']} scores per sample")
    lines.append("")
    gates = info["gate_layers"]
    lines.append(f"Gate layers: {len(gates)} (the hidden layers; a unit is one element of a gate's output)")
    if gates:
        lines += _table(["#", "node", "op", "units", "shape"],
                        [[g["index"], g["name"], g["op_type"], g["units"], _dims(g["shape"])] for g in gates])
    else:
        lines.append("  none: the model is affine, every explanation is exact input×gradient")
    lines.append("")
    routing = info["routing"]
    lines.append(f"Routing nodes: {len(routing)} (max-pool choices, frozen at each input, never selected)")
    lines += [f"  {r['name']} ({r['op_type']})" for r in routing] or ["  none"]
    lines.append("")
    segs = info["segments"]
    lines.append(f"Segments: {len(segs)} (the affine pieces between gates, after folding constants and BatchNorm)")
    lines += _table(["#", "ops", "inputs", "outputs", "parameters"],
                    [[s["index"], _ops_summary(s["op_types"]), ", ".join(s["inputs"]),
                      ", ".join(s["outputs"]), f"{s['parameters']:,}"] for s in segs])
    lines.append("")
    lines.append(f"Parameters  {info['parameters']:,} on the explained path")
    return "\n".join(lines)


def _unsupported_text(model: Path, exc: UnsupportedModelError) -> str:
    lines = [f"{model}: not analysable: {len(exc.problems)} node(s) on the input→output path "
             "are not supported:"]
    lines += [f"  - {p}" for p in exc.problems]
    lines.append("Supported ops: " + ", ".join(sorted(exc.supported)) + ".")
    lines.append("A final Softmax, LogSoftmax or Sigmoid is allowed (peeled).")
    return "\n".join(lines)


@app.command()
def inspect(
    model: ModelArg,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON object instead of text.")] = False,
    input_name: InputNameOpt = None,
    output: OutputNameOpt = None,
) -> None:
    """Show what the tool sees in MODEL: input, explained output, gate layers, segments.

    When the model cannot be analysed, lists every unsupported node and exits with 1.
    """
    try:
        ex = _open_explainer(model, Device.cpu, input_name, output)
    except UnsupportedModelError as exc:
        if json_out:
            typer.echo(to_json({"model": str(model), "analysable": False, "problems": exc.problems,
                                "supported": sorted(exc.supported)}))
        else:
            typer.echo(_unsupported_text(model, exc))
        raise typer.Exit(1) from None
    info = describe(ex, model)
    typer.echo(to_json(info) if json_out else _describe_text(info))


# --------------------------------------------------------------------------- unwrap


@app.command()
def unwrap(
    model: ModelArg,
    input: InputArg,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Where to write the .npz (missing folders are created).", show_default=False)],
    device: DeviceOpt = Device.auto,
    input_name: InputNameOpt = None,
    output: OutputNameOpt = None,
    force: ForceOpt = False,
) -> None:
    """Write each sample's local affine model f(x') = W x' + b, exact on its activation region.

    The .npz holds weight (N, K, *input shape), bias (N, K), output (N, K),
    the model's scores, and delta (N), max |W x + b - output|: float32 round-off.
    """
    _guard_output(out, force)
    ex = _open_explainer(model, device, input_name, output)
    x = _load_input(input, ex)
    res = ex.unwrap(x)
    _write_npz(out, {"weight": res.weight, "bias": res.bias, "output": res.output, "delta": res.delta})
    n, k = res.output.shape
    typer.echo(f"wrote {out}: {n} sample(s) × {k} scores of {ex.ir.output_name!r}, weight "
               f"{tuple(res.weight.shape)}, max completeness delta {float(res.delta.max()):.2g}")


def main() -> None:
    """Entry point for ``python -m onnx_pathwise``."""
    app(prog_name=PROG)
