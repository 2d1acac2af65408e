"""The commands: each parses its options, calls the library and prints (docs/design.md §8).

The shared parts live in options.py, plumbing.py, streaming.py and ../render.py."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from .. import baselines, plots
from ..data import is_array_file
from ..errors import (
    PathwiseError,
    UnsupportedModelError,
)
from ..io import to_json
from ..metrics import finite_mean
from ..pathwise import target_scores
from ..render import _describe_text, _table, _unsupported_text, describe
from ..text import number
from .options import (
    MAX_STEPS,
    METHODS,
    BatchSizeOpt,
    ClassesOpt,
    DepthOpt,
    Device,
    DeviceOpt,
    Engine,
    EngineOpt,
    ForceOpt,
    InputArg,
    InputNameOpt,
    InputWidthOpt,
    LabelsOpt,
    ModelArg,
    OutDirOpt,
    OutputNameOpt,
    PageFormat,
    PageOpt,
    RayAddressOpt,
    ResumeOpt,
    ShardSizeOpt,
    TargetOpt,
    WidthOpt,
    _method_options,
    choice_option,
    count_option,
    number_option,
    width_option,
)
from .plumbing import (
    NO_DATA_OPTIONS,
    _check_target,
    _chunked,
    _DataOptions,
    _guard_dir,
    _guard_output,
    _labels,
    _load_input,
    _model_info,
    _open_explainer,
    _open_source,
    _path_json,
    _png_names,
    _read_inputs,
    _resolve_device,
    _write_bytes,
    _write_dir,
    _write_json,
    _write_npz,
    data_options,
)
from .shell import _out, app
from .streaming import _explain_stream


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
            _out(to_json({"model": str(model), "analysable": False, "problems": exc.problems,
                          "supported": sorted(exc.supported)}))
        else:
            _out(_unsupported_text(model, exc))
        raise typer.Exit(1) from None
    info = describe(ex, model)
    _out(to_json(info) if json_out else _describe_text(info))


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
    _write_npz(out, {"weight": res.weight, "bias": res.bias, "output": res.output, "delta": res.delta}, force)
    n, k = res.output.shape
    _out(f"wrote {out}: {n} sample(s) × {k} scores of {ex.ir.output_name!r}, weight "
               f"{tuple(res.weight.shape)}, max completeness delta {float(res.delta.max()):.2g}")


# --------------------------------------------------------------------------- explain


@app.command()
@data_options
def explain(
    model: ModelArg,
    input: InputArg,
    out: OutDirOpt,
    method: Annotated[str, choice_option("--method", METHODS, help="Attribution method.")] = "pathwise",
    target: TargetOpt = None,
    width: WidthOpt = None,
    depth: DepthOpt = None,
    input_width: InputWidthOpt = None,
    steps: Annotated[int, count_option("--steps", help="Integrated Gradients: interpolation steps", high=MAX_STEPS,
                                       show_default=True)] = 32,
    classes: ClassesOpt = None,
    exact: Annotated[bool, typer.Option("--exact", help="Integrated Gradients: integrate exactly over linear pieces.")] = False,
    device: DeviceOpt = Device.auto,
    input_name: InputNameOpt = None,
    output: OutputNameOpt = None,
    png: Annotated[bool, typer.Option("--png/--no-png", help="For image inputs, one PNG per sample.")] = True,
    report_format: PageOpt = None,
    force: ForceOpt = False,
    data: _DataOptions = NO_DATA_OPTIONS,  # the data options, packed by @data_options
    labels: LabelsOpt = None,
    batch_size: BatchSizeOpt = None,
    shard_size: ShardSizeOpt = None,
    resume: ResumeOpt = False,
    engine: EngineOpt = Engine.local,
    ray_address: RayAddressOpt = None,
) -> None:
    """Explain each sample: pathwise (the default) or a baseline method.

    A .npy/.npz INPUT: writes OUT/explanation.npz (attribution, output, target; pathwise also
    weight, bias, masked_score), OUT/explanation.json (per sample: target, score and, for
    pathwise, faithfulness and the path) and, for image inputs, OUT/sample_<i>.png.
    Images, folders, path lists and tables (or --batch-size, --shard-size, --resume, --engine
    ray) stream in batches to shards OUT/explanation-NNNNN.npz and OUT/index.json.
    """
    w, iw, ncls = width, input_width, classes
    if not baselines.METHODS[method].path and (w is not None or depth is not None or iw is not None or ncls is not None):
        raise PathwiseError("--width, --depth, --input-width and --classes apply to --method pathwise only")
    data = dataclasses.replace(data, batch_size=batch_size)
    streaming = (not is_array_file(input) or resume or batch_size is not None or shard_size is not None
                 or engine is not Engine.local)
    if not streaming and ray_address is not None:
        raise PathwiseError("--ray-address needs --engine ray")
    if streaming:
        _explain_stream(model, input, out, method, target, w, depth, iw, ncls, steps, exact, device, input_name,
                        output, png, force, data, labels, shard_size, resume, engine, ray_address, report_format)
        return
    names = ["explanation.npz", "explanation.json"] + (["report.html"] if report_format else [])
    _guard_dir(out, names, force)
    ex = _open_explainer(model, device, input_name, output)
    _check_target(target, ex)
    x = _load_input(input, ex, data)
    _guard_dir(out, names + _png_names(png, ex, x.shape[0]), force)
    class_names = _labels(labels, ex)
    if baselines.METHODS[method].path:
        res = _chunked(lambda b: ex.explain(b, target=target, width=w, depth=depth, input_width=iw, classes=ncls),
                       x, "explaining")
        arrays = {"attribution": res.attribution, "weight": res.weight, "bias": res.bias, "output": res.output,
                  "target": res.target, "masked_score": res.masked_score}
        samples = [{"target": int(res.target[i]), "score": float(res.score[i]),
                    "masked_score": float(res.masked_score[i]), "faithfulness": float(res.faithfulness[i]),
                    "sparsity": float(res.sparsity[i]), "path": _path_json(res.path[i])} for i in range(len(res.target))]
        options = {"width": w, "depth": depth, "input_width": iw, "classes": ncls if ncls is not None else "all",
                   "selection": res.selection}
    else:
        opts: dict[str, Any] = _method_options(method, {"steps": steps, "exact": exact})
        res = _chunked(lambda b: ex.attribute(b, method=method, target=target, **opts), x, "explaining")
        arrays = {"attribution": res.attribution, "output": res.output, "target": res.target}
        idx = np.arange(len(res.target))
        scores = target_scores(res.output, res.target)
        samples = [{"target": int(res.target[i]), "score": float(scores[i])} for i in idx]
        options = opts
    if class_names is not None:
        for i, s in enumerate(samples):
            s["label"] = class_names[int(res.target[i])]
    report = {"model": str(model), "method": method, "options": options, "explained_output": ex.ir.output_name,
              "samples": samples}
    if class_names is not None:
        report["labels"] = class_names
    pngs = {}
    if png and plots.is_image(ex.input_shape):
        for i in range(x.shape[0]):
            title = plots.title(method, int(res.target[i]), float(target_scores(res.output[i:i + 1], res.target[i:i + 1])[0]),
                                class_names)
            pngs[f"sample_{i}.png"] = plots.sample_figure(x[i], res.attribution[i], title) or b""
    if report_format is not None:
        from ..report import explain_page

        pngs["report.html"] = explain_page(
            model_info=describe(ex, model), method=method, options=options, x=x, attribution=res.attribution,
            output=res.output, target=res.target, samples=samples, bias=getattr(res, "bias", None),
            masked_score=getattr(res, "masked_score", None), inputs=str(input), labels=class_names).encode()
    written = _write_dir(out, {"explanation.npz": arrays}, {"explanation.json": report}, pngs, force)
    extra = f", faithfulness {number(finite_mean(res.faithfulness), '.3f')} (mean)" if baselines.METHODS[method].path else ""
    _out(f"wrote {len(written)} file(s) to {out}: {x.shape[0]} sample(s), method {method}{extra}")


# --------------------------------------------------------------------------- decompose


@app.command()
def decompose(
    model: ModelArg,
    input: InputArg,
    out: OutDirOpt,
    layer: Annotated[str | None, typer.Option("--layer", help="Gate layer (node name); default the last.",
                                              show_default=False)] = None,
    top: Annotated[int, count_option("--top", help="How many parts to keep (more than the layer has: all)",
                                     show_default=True)] = 8,
    group: Annotated[str, choice_option("--group", ("unit", "channel"), help="What a part runs through.")] = "unit",
    target: TargetOpt = None,
    width: WidthOpt = None,
    depth: DepthOpt = None,
    classes: ClassesOpt = None,
    device: DeviceOpt = Device.auto,
    input_name: InputNameOpt = None,
    output: OutputNameOpt = None,
    png: Annotated[bool, typer.Option("--png/--no-png", help="For image inputs, one PNG grid per sample.")] = True,
    force: ForceOpt = False,
) -> None:
    """Split each pathwise attribution into its parts through single units (or channels) of a
    gate layer, ranked by their contribution to the score; parts + rest + bypass = attribution.

    Writes OUT/decomposition.npz, OUT/decomposition.json and, for image inputs, a PNG grid per sample.
    """
    w, ncls = width, classes
    names = ["decomposition.npz", "decomposition.json"]
    _guard_dir(out, names, force)
    ex = _open_explainer(model, device, input_name, output)
    _check_target(target, ex)
    x = _load_input(input, ex)
    _guard_dir(out, names + _png_names(png, ex, x.shape[0]), force)
    d = _chunked(lambda b: ex.decompose(b, layer=layer, top=top, group=group, target=target, width=w, depth=depth,
                                        classes=ncls), x, "decomposing")
    arrays = {"attribution": d.attribution, "parts": d.parts, "part_index": d.part_index,
              "part_score": d.part_score, "rest": d.rest, "bypass": d.bypass, "target": d.target,
              "output": d.output}
    samples = [{"target": int(d.target[i]),
                "parts": [{group: int(d.part_index[i, j]), "score": float(d.part_score[i, j]),
                           "active": bool(d.part_active[i, j])} for j in range(d.parts.shape[1])],
                "delta": float(d.delta[i])} for i in range(len(d.target))]
    report = {"model": str(model), "layer": d.layer, "group": group, "crosses_all_paths": d.crosses_all,
              "classes": ncls if ncls is not None else "all", "samples": samples}
    pngs = {}
    if png and plots.is_image(ex.input_shape):
        shape = next(g.shape for g in ex.gate_layers if g.name == d.layer)
        for i in range(x.shape[0]):
            labels = [f"{_part_name(group, int(d.part_index[i, j]), shape)}: {d.part_score[i, j]:.3g}"
                      for j in range(d.parts.shape[1])]
            pngs[f"sample_{i}.png"] = plots.parts_grid(x[i], d.attribution[i], d.parts[i], labels)
    written = _write_dir(out, {"decomposition.npz": arrays}, {"decomposition.json": report}, pngs, force)
    _out(f"wrote {len(written)} file(s) to {out}: {x.shape[0]} sample(s), layer {d.layer!r}, "
               f"max |parts + rest + bypass - attribution| {float(d.delta.max()):.2g}")


def _part_name(group: str, index: int, shape: tuple[int, ...]) -> str:
    """A part's panel title: a unit of a layer with channels and positions also by where it
    sits, since its flat index alone says little on a figure ("unit 15432 (c 314, 6, 4)" in a
    512 × 7 × 7 layer)."""
    if group != "unit" or len(shape) < 2:
        return f"{group} {index}"
    where = np.unravel_index(index, shape)
    return f"unit {index} (c {int(where[0])}, {', '.join(str(int(v)) for v in where[1:])})"


# --------------------------------------------------------------------------- evaluate


@app.command()
@data_options
def evaluate(
    model: ModelArg,
    inputs: InputArg,
    out: OutDirOpt,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods, from: " + ", ".join(METHODS)
                                         + ". Default: all but " + ", ".join(m.name for m in baselines.METHODS.values() if not m.evaluate)
                                         + ".", show_default=False)] = ",".join(
        m.name for m in baselines.METHODS.values() if m.evaluate),
    width: Annotated[list[str] | None, width_option(
        "--width", help="Pathwise width(s); repeat for a sweep (e.g. --width 5% --width 20%).")] = None,
    depth: Annotated[list[int] | None, count_option("--depth", help="Pathwise depth(s); repeat for several",
                                                     low=0)] = None,
    step: Annotated[int | None, count_option("--step", help="Pixels per insertion/deletion step "
                                             "(default: one image row)")] = None,
    target: TargetOpt = None,
    classes: ClassesOpt = None,
    device: DeviceOpt = Device.auto,
    input_name: InputNameOpt = None,
    output: OutputNameOpt = None,
    report_format: PageOpt = None,
    force: ForceOpt = False,
    data: _DataOptions = NO_DATA_OPTIONS,  # the data options, packed by @data_options
    labels: LabelsOpt = None,
) -> None:
    """Rank explanation methods on MODEL with insertion/deletion AUC and more.

    Prints a table (mean ± std over samples) and writes OUT/evaluation.json (per method, per
    sample and mean values of every metric), OUT/curves.png and, with several widths,
    OUT/width_sweep.png.
    """
    from ..metrics import evaluate as run_evaluation

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in METHODS]
    if bad or not chosen:
        raise PathwiseError(f"--methods: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(METHODS)}")
    widths: list[int | str | None] | None = list(width) if width else None
    names = ["evaluation.json", "curves.png"] + (["width_sweep.png"] if widths and len(widths) > 1 else []) + (
        ["report.html"] if report_format else [])
    ncls = classes
    _guard_dir(out, names, force)
    ex = _open_explainer(model, device, input_name, output)
    _check_target(target, ex)
    source = _open_source(inputs, ex, data)
    x = _load_input(inputs, ex, source=source)
    class_names = _labels(labels, ex)
    attributions: dict[str, np.ndarray] | None = {} if report_format else None
    result = run_evaluation(ex, x, chosen, widths=widths, depths=list(depth) if depth else None, step=step,
                            target=target, attributions=attributions, classes=ncls, progress=ex.progress)
    result["model"] = str(model)
    result["input"] = source.describe()
    if class_names is not None:
        result["labels"] = class_names
    metric_names = ["insertion_auc", "deletion_auc", "faithfulness", "sparsity", "completeness_delta"]
    rows = []
    for label, info in result["methods"].items():
        cells = [label]
        for m in metric_names:
            v = info["metrics"].get(m)
            cells.append(f"{number(v['mean'], '.4f')} ± {number(v['std'], '.4f')}" if v else "")
        rows.append(cells)
    _out("\n".join(_table(["method"] + metric_names, rows, indent="")))
    for k, v in result["samples"].items():
        _out(f"{k}: {number(v['mean'])} ± {number(v['std'])}" if v["mean"] is not None else f"{k}: n/a")
    pngs = {"curves.png": plots.curves(result["methods"])}
    if widths and len(widths) > 1:
        pngs["width_sweep.png"] = plots.width_sweep(result["methods"])
    if attributions is not None:
        from ..report import evaluate_page

        pngs["report.html"] = evaluate_page(
            model_info=describe(ex, model), evaluation=result, x=x, attributions=attributions,
            output=ex.record(x).scores, figures=dict(pngs), inputs=str(inputs)).encode()
    written = _write_dir(out, {}, {"evaluation.json": result}, pngs, force)
    _out(f"wrote {len(written)} file(s) to {out}")


# --------------------------------------------------------------------------- audit, diff


class ReportFormat(str, Enum):
    json = "json"
    junit = "junit"
    html = "html"


@app.command()
@data_options
def audit(
    model: ModelArg,
    inputs: Annotated[Path | None, typer.Option(
        "--inputs", help="Inputs to check on (as INPUT of explain: .npy/.npz, images, a folder, a list, a table); "
                         "default: 4 generated standard-normal inputs.",
        show_default=False)] = None,
    max_delta: Annotated[float, number_option(
        "--max-delta", help="Largest completeness delta allowed, relative to the score scale: the largest |score|, or 1 if that is smaller",
        low=0.0, show_default=True)] = 1e-4,
    width: WidthOpt = None,
    report: Annotated[ReportFormat | None, typer.Option(
        "--report", help="Also write a report: json, junit (XML that CI systems display) or html (a page).",
        show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the report (default: stdout).",
                                             show_default=False)] = None,
    classes: ClassesOpt = None,
    device: DeviceOpt = Device.auto,
    force: ForceOpt = False,
    data: _DataOptions = NO_DATA_OPTIONS,  # the data options, packed by @data_options
) -> None:
    """Check that MODEL is analysable and its explanations are exact and stable: for CI gates.

    Checks: analysable (op inventory, every blocker), onnxruntime loads it, completeness delta,
    batch equals per-sample, two runs identical, CPU vs CUDA (when a GPU is present), and that
    randomising the last layer's weights changes the explanations. Exit 0 when every check
    passes (or is skipped), 1 otherwise.
    """
    from ..audit import audit as run_audit

    if out is not None:
        _guard_output(out, force)
        if report is None:
            raise PathwiseError("--out needs --report json, junit or html")
    x = None
    if inputs is not None:
        x = _read_inputs(inputs, model, data)
    result = run_audit(model, inputs=x, max_delta=max_delta, device=_resolve_device(device), width=width,
                       inputs_name=str(inputs), classes=classes)
    text = result.to_text()
    machine = None
    if report is ReportFormat.json:
        machine = to_json(result.to_json())
    elif report is ReportFormat.junit:
        machine = result.to_junit()
    elif report is ReportFormat.html:
        from ..report import audit_page

        machine = audit_page(report=result, model_info=_model_info(model), inputs=str(inputs) if inputs else None)
    if machine is not None and out is not None:
        _write_bytes(out, machine.encode(), force)
        _out(text)
    elif machine is not None:
        _out(machine)
        _out(text, err=True)
    else:
        _out(text)
    raise typer.Exit(0 if result.passed else 1)


@app.command()
@data_options
def diff(
    old: Annotated[Path, typer.Argument(help="The released model.", metavar="OLD", show_default=False)],
    new: Annotated[Path, typer.Argument(help="The candidate model.", metavar="NEW", show_default=False)],
    inputs: Annotated[Path, typer.Option("--inputs", help="Inputs to compare on (as INPUT of explain: .npy/.npz, "
                                         "images, a folder, a list, a table).", show_default=False)],
    fail_below: Annotated[float | None, number_option(
        "--fail-below", help="Fail when the mean attribution correlation is below this", low=-1.0, high=1.0)] = None,
    min_overlap: Annotated[float | None, number_option(
        "--min-overlap", help="Fail when the mean path overlap (Jaccard) is below this", low=0.0, high=1.0)] = None,
    max_changes: Annotated[int | None, count_option(
        "--max-changes", help="Fail when more predictions than this change", low=0)] = None,
    width: WidthOpt = None,
    depth: DepthOpt = None,
    classes: ClassesOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the full report as JSON here.",
                                                  show_default=False)] = None,
    report_format: Annotated[PageFormat | None, typer.Option(
        "--report", case_sensitive=False, help="Also write an HTML page of the changes to --out.",
        show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where --report writes its page.",
                                             show_default=False)] = None,
    device: DeviceOpt = Device.auto,
    force: ForceOpt = False,
    data: _DataOptions = NO_DATA_OPTIONS,  # the data options, packed by @data_options
) -> None:
    """Compare the explanations of two versions of a model on the same inputs.

    Per sample: prediction change, per-layer path overlap (Jaccard of kept units where gate layers
    match by name and shape) and attribution correlation; exit 1 when a threshold is crossed.
    """
    from ..audit import diff as run_diff

    if json_out is not None:
        _guard_output(json_out, force)
    if (report_format is None) != (out is None):
        raise PathwiseError("--report html and --out FILE go together")
    if out is not None:
        _guard_output(out, force)
    x = _read_inputs(inputs, old, data)
    result = run_diff(old, new, x, width=width, depth=depth, device=_resolve_device(device),
                      min_correlation=fail_below, min_jaccard=min_overlap, max_prediction_changes=max_changes,
                      inputs_name=str(inputs), classes=classes)
    if json_out is not None:
        _write_json(json_out, result.to_json(), force)
    if out is not None:
        from ..report import diff_page

        _write_bytes(out, diff_page(report=result, inputs=str(inputs)).encode(), force)
    _out(result.to_text())
    raise typer.Exit(0 if result.passed else 1)


