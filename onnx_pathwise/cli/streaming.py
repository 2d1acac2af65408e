"""``explain`` over a dataset: the glue between the command's options, the streaming run
(:mod:`onnx_pathwise.stream`, or Ray), its figures and its HTML report."""


from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import baselines, plots
from ..data import InputSource
from ..errors import (
    PathwiseError,
)
from ..explainer import Explainer
from ..render import describe
from .options import (
    Device,
    Engine,
    _method_options,
)
from .plumbing import (
    _check_target,
    _DataOptions,
    _guard_dir,
    _labels,
    _note_skipped,
    _open_explainer,
    _open_source,
    _write_bytes,
)
from .shell import _out


def _explain_stream(model: Path, input: Path, out: Path, method: str, target: int | None, w: Any, depth: int | None,
                    iw: Any, ncls: int | None, steps: int, exact: bool, device: Device, input_name: str | None,
                    output: str | None, png: bool, force: bool, opts: _DataOptions, labels: Path | None,
                    shard_size: int | None, resume: bool, engine: Engine, ray_address: str | None,
                    report_format: Any = None) -> None:
    """explain over a dataset in bounded memory: batches in, shards out (onnx_pathwise.stream).
    Figures are overlays on each sample's original image; ``--report html`` pages the first
    :data:`onnx_pathwise.report.html.MAX_CARDS` samples."""
    from .. import stream

    if resume and force:
        raise PathwiseError("--resume and --force contradict each other: --resume keeps OUT's finished shards")
    if engine is Engine.local and ray_address is not None:
        raise PathwiseError("--ray-address needs --engine ray")
    names = ["explanation.npz", "explanation.json", stream.INDEX, stream.SHARD.format(0), stream.RUN]
    names += ["report.html"] if report_format else []
    _guard_dir(out, [] if resume else names, force)
    ex = _open_explainer(model, device, input_name, output)
    _check_target(target, ex)
    source = _open_source(input, ex, opts)
    class_names = _labels(labels, ex)
    if baselines.METHODS[method].path:
        options: dict[str, Any] = {"width": w, "depth": depth, "input_width": iw}
        if ncls is not None:
            options["classes"] = ncls
    else:
        options = _method_options(method, {"steps": steps, "exact": exact})
    from ..report.html import MAX_CARDS

    pages: list[tuple[Any, dict[str, Any], dict[str, np.ndarray]]] = []  # the report's first samples
    draw = png and plots.is_image(ex.input_shape)
    render = None
    if draw or report_format:
        def render(sample: Any, row: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, bytes]:
            if report_format and len(pages) < MAX_CARDS:
                pages.append((sample, dict(row), dict(arrays)))
            if not draw:
                return {}
            title = plots.title(method, int(row["target"]), float(row["score"]), class_names)
            fig = plots.sample_figure(sample.array, arrays["attribution"], title, sample.original, sample.features)
            return {f"sample_{row['sample']}.png": fig} if fig else {}
    kw: dict[str, Any] = {"model": model, "method": method, "target": target, "options": options,
                          "shard_size": shard_size, "resume": resume, "labels": class_names, "render": render,
                          "overwrite_figures": force or resume, "batch_size_given": opts.batch_size is not None}
    if engine is Engine.ray:
        from ..ray_engine import run as run_ray

        result = run_ray(ex, source, out, address=ray_address, device=ex.device, input_name=input_name,
                         output_name=output, **kw)
    else:
        result = stream.run(ex, source, out, **kw)
    if report_format and pages:
        _stream_report(out, model, ex, method, options, source, class_names, pages, force or resume)
    _note_skipped(result.skipped)
    extra = f", faithfulness {result.mean_faithfulness:.3f} (mean)" if result.mean_faithfulness is not None else ""
    again = f", resumed after {result.resumed_at}" if result.resumed_at else ""
    skipped = f", {len(result.skipped)} skipped" if result.skipped else ""
    _out(f"wrote {result.count} sample(s) in {result.shards} shard(s) and {stream.INDEX} to {out}{again}"
         f"{skipped}: method {method}{extra}")


def _stream_report(out: Path, model: Path, ex: Explainer, method: str, options: Mapping[str, Any],
                   source: InputSource, class_names: Sequence[str] | None,
                   pages: Sequence[tuple[Any, dict[str, Any], dict[str, np.ndarray]]], overwrite: bool) -> None:
    """OUT/report.html of a streaming explain, from the samples its figures hook kept."""
    from .. import stream
    from ..report import explain_page

    layers = stream.path_layers(ex, options) if baselines.METHODS[method].path else []
    samples = []
    for _, row, arrays in pages:
        info: dict[str, Any] = {"target": row["target"], "score": row["score"], "faithfulness": row.get("faithfulness")}
        if "path_count" in arrays:
            info["path"] = [{"node": layer["name"], "count": int(c), "units": layer["units"]}
                            for layer, c in zip(layers, arrays["path_count"])]
        samples.append(info)

    def stacked(key: str) -> np.ndarray | None:
        return np.stack([a[key] for _, _, a in pages]) if all(key in a for _, _, a in pages) else None

    attribution, output = stacked("attribution"), stacked("output")
    assert attribution is not None and output is not None  # every method writes both
    page = explain_page(
        model_info=describe(ex, model), method=method, options=options,
        x=np.stack([s.array for s, _, _ in pages]), attribution=attribution, output=output,
        target=np.array([r["target"] for _, r, _ in pages]), samples=samples, bias=stacked("bias"),
        masked_score=stacked("masked_score"), sources=[s.source for s, _, _ in pages],
        originals=[s.original for s, _, _ in pages], labels=class_names, features=pages[0][0].features,
        preprocessing=source.preprocessing.to_json() if source.preprocessing is not None else None,
        inputs=str(source.path))
    _write_bytes(out / "report.html", page.encode(), overwrite)
