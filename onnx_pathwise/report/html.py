"""One self-contained HTML page per run of ``explain``, ``evaluate``, ``audit`` or ``diff``.

The page needs nothing but itself: figures are PNGs embedded as ``data:`` URIs, the CSS is
inline, there is no script, and a Content-Security-Policy (``default-src 'none'``) forbids the
browser any request beyond the page itself, so it can be mailed or attached to a CI run and
opened offline. Every piece of text comes from :func:`html.escape` (node names, labels and file
names come from files that may be hostile).

What a page holds: the model summary (what ``onnx-pathwise inspect`` reports, from
:func:`onnx_pathwise.cli.describe`), the preprocessing used, and per command: per-sample cards
(original image, an overlay per method, the prediction, the path per layer with its kept-unit
counts, faithfulness, completeness delta); evaluate's metrics table and AUC curves; audit's
check list; diff's per-sample changes.

The page builders take plain arguments (arrays, lists, dicts) so that callers decide where
originals, labels and preprocessing come from; :func:`write_page` writes atomically.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, plots
from ..io import write_bytes

#: Samples that get a card; the rest are counted, not drawn (a page stays a few MB).
MAX_CARDS = 64
Region = tuple[float, float, float, float]

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d232b;
font-size:14px;line-height:1.45}
header{background:#1d2b3a;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9d3de}
main{padding:18px 28px;max-width:1400px}
section{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:14px 18px;margin:0 0 18px}
h2{font-size:17px;margin:0 0 10px}h3{font-size:15px;margin:0 0 8px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border-bottom:1px solid #e4e7eb;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
dl.kv{display:grid;grid-template-columns:max-content auto;gap:3px 14px;margin:4px 0}
dl.kv dt{color:#5b6673}dl.kv dd{margin:0}
.cards{display:flex;flex-wrap:wrap;gap:16px}
.card{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:12px 14px;flex:1 1 520px;max-width:100%}
.figs{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
figure{margin:0}figcaption{font-size:12px;color:#5b6673}
img{max-width:100%;height:auto}
.badge{display:inline-block;border-radius:10px;padding:1px 9px;font-size:12px;font-weight:600}
.pass{background:#dcf5e3;color:#14632e}.fail{background:#fbe0e0;color:#8c1d1d}.skip{background:#eceef1;color:#4b5563}
tr.changed td{background:#fff4e0}
.verdict{font-size:16px;font-weight:600}
code{background:#f0f2f5;padding:0 3px;border-radius:3px}
.muted{color:#5b6673}
.overview{display:flex;flex-wrap:wrap;gap:0 18px}.overview>section,.overview>div{flex:1 1 340px}
details>summary{cursor:pointer;font-weight:600;margin:6px 0}
"""


# --------------------------------------------------------------------------- small pieces


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    v = float(value)
    return "—" if math.isnan(v) else f"{v:.{digits}g}"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _figure(png: bytes | None, caption: str) -> str:
    if png is None:
        return ""
    return f"<figure>{_img(png, caption)}<figcaption>{_e(caption)}</figcaption></figure>"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = (),
           row_classes: Sequence[str] | None = None) -> str:
    """A table of escaped cells; ``numeric`` columns are right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for r, row in enumerate(rows):
        cls = f' class="{_e(row_classes[r])}"' if row_classes and row_classes[r] else ""
        cells = "".join(f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv(pairs: Sequence[tuple[str, Any]]) -> str:
    return '<dl class="kv">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in pairs) + "</dl>"


def _dims(shape: Sequence[Any]) -> str:
    return "×".join(map(str, shape)) if shape else "scalar"


def _class_name(index: int, labels: Sequence[str] | None) -> str:
    if labels is not None and 0 <= index < len(labels):
        return f"{labels[index]} (class {index})"
    return f"class {index}"


def _overview(left: str, *right: str) -> str:
    """Short sections side by side: ``left`` (the model), the others stacked on the right."""
    return f'<div class="overview">{left}<div>{"".join(right)}</div></div>'


def _page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p>{_e(subtitle)}</p></header><main>"
        + "".join(sections)
        + f'<p class="muted">Made by onnx-pathwise {_e(__version__)}. This page is self-contained: '
          "no scripts, no network requests.</p></main></body></html>\n"
    )


def write_page(path: str | os.PathLike[str], page: str) -> Path:
    """Write a page atomically (a temporary file renamed into place)."""
    return write_bytes(path, page.encode("utf-8"))


# --------------------------------------------------------------------------- shared sections


def model_section(info: Mapping[str, Any] | None) -> str:
    """The model summary, from :func:`onnx_pathwise.cli.describe` (None: not available)."""
    if info is None:
        return '<section id="model"><h2>Model</h2><p class="muted">No summary: the model could not be analysed ' \
               "(see the checks below).</p></section>"
    inp, out = info["input"], info["output"]
    peeled = ", ".join(out.get("peeled") or []) or "nothing"
    pairs = [
        ("file", info["model"]),
        ("producer", info.get("producer") or "unknown"),
        ("opset", info.get("opset")),
        ("input", f"{inp['name']}: {inp['dtype']}, shape ({', '.join(map(str, inp['shape']))})"),
        ("explained output", f"{out['explained']} (of {out['name']}; peeled: {peeled})"),
        ("classes", out.get("classes")),
        ("gate layers", len(info["gate_layers"])),
        ("routing (max-pool) nodes", len(info.get("routing", []))),
        ("segments", len(info.get("segments", []))),
        ("parameters on the explained path", f"{info['parameters']:,}"),
    ]
    gates = _table(["#", "gate layer", "op", "units", "shape"],
                   [[g["index"], g["name"], g["op_type"], f"{g['units']:,}", _dims(g["shape"])]
                    for g in info["gate_layers"]], numeric=(0, 3))
    return (f'<section id="model"><h2>Model</h2>{_kv(pairs)}'
            f"<details><summary>Gate layers ({len(info['gate_layers'])})</summary>{gates}</details></section>")


def preprocessing_section(preprocessing: Mapping[str, Any] | None, inputs: str | None = None) -> str:
    """The preprocessing used (None: the input arrays were used as given)."""
    if not preprocessing:
        what = f" ({inputs})" if inputs else ""
        body = f"<p>Preprocessing: none. The input array{_e(what)} was used as given (already preprocessed).</p>"
    else:
        body = "<p>Preprocessing used:</p>" + _kv([(k, _format_value(v)) for k, v in preprocessing.items()])
    return f'<section id="preprocessing"><h2>Preprocessing</h2>{body}</section>'


def _format_value(v: Any) -> str:
    if v is None:
        return "default"
    if isinstance(v, (list, tuple)):
        return ", ".join(_format_value(i) for i in v)
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _path_table(path: Sequence[Mapping[str, Any]]) -> str:
    if not path:
        return '<p class="muted">No path layers (the model is affine or depth 0).</p>'
    rows = [[p["node"], f"{p['count']:,}", f"{p['units']:,}", f"{100 * p['count'] / p['units']:.2f}%" if p["units"] else "—"]
            for p in path]
    return _table(["path layer", "kept units", "of", "kept"], rows, numeric=(1, 2, 3))


def _source(sources: Sequence[str] | None, i: int) -> str:
    return sources[i] if sources is not None and i < len(sources) else f"sample {i}"


def _original_figure(original: np.ndarray | None) -> bytes | None:
    return plots.picture(original) if original is not None else None


# --------------------------------------------------------------------------- explain


def explain_page(
    *,
    model_info: Mapping[str, Any] | None,
    method: str,
    options: Mapping[str, Any],
    x: np.ndarray,
    attribution: np.ndarray,
    output: np.ndarray,
    target: np.ndarray,
    samples: Sequence[Mapping[str, Any]],
    bias: np.ndarray | None = None,
    masked_score: np.ndarray | None = None,
    sources: Sequence[str] | None = None,
    originals: Sequence[np.ndarray | None] | None = None,
    regions: Sequence[Region | None] | None = None,
    labels: Sequence[str] | None = None,
    features: Sequence[str] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    inputs: str | None = None,
    max_cards: int = MAX_CARDS,
) -> str:
    """The page of one ``explain`` run: model, preprocessing, one card per sample.

    ``samples`` is explanation.json's per-sample list (``path``, ``faithfulness`` for pathwise);
    ``bias`` and ``masked_score`` (pathwise) give each card its completeness delta
    |Σ attribution + b_p − masked score|. ``originals[i]`` (H×W×3 uint8, before normalisation)
    and ``regions[i]`` (where the model input was cut from it) turn heatmaps into overlays.
    """
    n = x.shape[0]
    cards = []
    for i in range(min(n, max_cards)):
        t = int(target[i])
        score = _side_score(output[i], t)
        original = originals[i] if originals is not None else None
        region = regions[i] if regions is not None else None
        fig = plots.sample_figure(x[i], attribution[i], plots.title(method, t, score, labels), original, features, region)
        figs = [_figure(_original_figure(original), "original"), _figure(fig, method)]
        s = samples[i] if i < len(samples) else {}
        delta = None
        if bias is not None and masked_score is not None:
            delta = abs(float(attribution[i].astype(np.float64).sum()) + float(bias[i]) - float(masked_score[i]))
        facts = _prediction_facts(output[i], t, labels) + [
            ("faithfulness", _num(s.get("faithfulness"))),
            ("completeness delta", _num(delta, 3) if delta is not None else "— (pathwise only)"),
        ]
        path = _path_table(s["path"]) if "path" in s else ""
        cards.append(_card(_source(sources, i), i, figs, facts, path))
    return _page(
        f"onnx-pathwise explain: {method}",
        f"{os.path.basename(str(model_info['model'])) if model_info else ''} · {n} sample(s)",
        [_overview(model_section(model_info), preprocessing_section(preprocessing, inputs),
                   _run_section("Explanation", [("method", method)]
                                + [(k, _format_value(v)) for k, v in options.items()])),
         _cards_section(cards, n)],
    )


def _side_score(output: np.ndarray, target: int) -> float:
    """The explained score of class ``target``: y_c, or for a single score y the side's
    log-odds (y for class 1, −y for class 0; docs/design.md §4)."""
    if len(output) == 1:
        return float(output[0] if target == 1 else -output[0])
    return float(output[target])


def _prediction_facts(output: np.ndarray, target: int, labels: Sequence[str] | None) -> list[tuple[str, str]]:
    predicted = int(output[0] >= 0) if len(output) == 1 else int(np.argmax(output))
    facts = [("prediction", f"{_class_name(predicted, labels)}, score {_num(_side_score(output, predicted))}")]
    if predicted != target:
        facts.append(("explained target", f"{_class_name(target, labels)}, score {_num(_side_score(output, target))}"))
    return facts


def _card(source: str, index: int, figs: Sequence[str], facts: Sequence[tuple[str, str]], extra: str) -> str:
    return (f'<div class="card" id="sample-{index}"><h3>{_e(source)}</h3><div class="figs">{"".join(figs)}</div>'
            f"{_kv(facts)}{extra}</div>")


def _cards_section(cards: Sequence[str], n: int) -> str:
    note = f'<p class="muted">The first {len(cards)} of {n} samples.</p>' if len(cards) < n else ""
    return f'<section id="samples"><h2>Samples</h2>{note}<div class="cards">{"".join(cards)}</div></section>'


def _run_section(title: str, pairs: Sequence[tuple[str, Any]]) -> str:
    return f'<section id="run"><h2>{_e(title)}</h2>{_kv(pairs)}</section>'


# --------------------------------------------------------------------------- evaluate


METRICS = ("insertion_auc", "deletion_auc", "faithfulness", "sparsity", "completeness_delta")


def evaluate_page(
    *,
    model_info: Mapping[str, Any] | None,
    evaluation: Mapping[str, Any],
    x: np.ndarray,
    attributions: Mapping[str, np.ndarray],
    output: np.ndarray | None = None,
    figures: Mapping[str, bytes] | None = None,
    sources: Sequence[str] | None = None,
    originals: Sequence[np.ndarray | None] | None = None,
    regions: Sequence[Region | None] | None = None,
    labels: Sequence[str] | None = None,
    features: Sequence[str] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    inputs: str | None = None,
    max_cards: int = MAX_CARDS,
) -> str:
    """The page of one ``evaluate`` run: the metrics table (mean ± std), the curves (``figures``:
    name → PNG, e.g. curves.png), and per sample a grid comparing every method."""
    methods = evaluation["methods"]
    rows = []
    for label, info in methods.items():
        cells = [label]
        for m in METRICS:
            v = info["metrics"].get(m)
            cells.append(f"{v['mean']:.4f} ± {v['std']:.4f}" if v and v.get("mean") is not None else "—")
        rows.append(cells)
    table = _table(["method", "insertion AUC ↑", "deletion AUC ↓", "faithfulness", "sparsity", "completeness delta"],
                   rows, numeric=(1, 2, 3, 4, 5))
    sample_rows = [[k, f"{v['mean']:.4g} ± {v['std']:.4g}" if v.get("mean") is not None else "—"]
                   for k, v in evaluation.get("samples", {}).items()]
    figs = "".join(_figure(png, name) for name, png in (figures or {}).items())
    skipped = "".join(f"<li>{_e(s)}</li>" for s in evaluation.get("skipped", []))
    metrics_section = (
        f'<section id="metrics"><h2>Metrics</h2><p>Mean ± std over {_e(evaluation["n"])} sample(s); '
        f"insertion/deletion step {_e(evaluation.get('step'))} input elements.</p>{table}"
        f"<h3>Per sample</h3>{_table(['value', 'mean ± std'], sample_rows, numeric=(1,))}"
        f'<div class="figs">{figs}</div>' + (f"<p>Skipped:</p><ul>{skipped}</ul>" if skipped else "") + "</section>")
    n = x.shape[0]
    targets = evaluation["target"]
    cards = []
    for i in range(min(n, max_cards)):
        t = int(targets[i])
        original = originals[i] if originals is not None else None
        region = regions[i] if regions is not None else None
        per_method = {label: a[i] for label, a in attributions.items()}
        score = _side_score(output[i], t) if output is not None else float(evaluation["samples"]["score"]["values"][i])
        if original is not None or plots.is_image(x.shape[1:]):
            heading = f"{_class_name(t, labels)}, score {score:.3g}"
            figs_i = [_figure(plots.methods_grid(original, x[i], per_method, heading, region), "methods compared")]
        else:
            figs_i = [_figure(plots.sample_figure(x[i], a, plots.title(label, t, score, labels), None, features), label)
                      for label, a in per_method.items()]
        facts = (_prediction_facts(output[i], t, labels) if output is not None
                 else [("target", f"{_class_name(t, labels)}, score {_num(score)}")])
        metric_rows = []
        for label, info in methods.items():
            vals = {m: info["metrics"][m]["values"][i] for m in METRICS if m in info["metrics"]}
            metric_rows.append([label] + [_num(vals.get(m)) for m in METRICS])
        extra = _table(["method", "insertion AUC", "deletion AUC", "faithfulness", "sparsity", "completeness delta"],
                       metric_rows, numeric=(1, 2, 3, 4, 5))
        cards.append(_card(_source(sources, i), i, figs_i, facts, extra))
    return _page(
        "onnx-pathwise evaluate",
        f"{os.path.basename(str(model_info['model'])) if model_info else ''} · {n} sample(s) · "
        f"{len(methods)} method(s)",
        [_overview(model_section(model_info), preprocessing_section(preprocessing, inputs)), metrics_section,
         _cards_section(cards, n)],
    )


# --------------------------------------------------------------------------- audit, diff


def _badge(status: str) -> str:
    cls = status if status in ("pass", "fail", "skip") else "skip"
    return f'<span class="badge {cls}">{_e(status.upper())}</span>'


def audit_page(
    *,
    report: Any,
    model_info: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    inputs: str | None = None,
) -> str:
    """The page of one ``audit`` run (an :class:`onnx_pathwise.audit.AuditReport`): the verdict and
    the check list (status, detail, seconds)."""
    rows = "".join(
        f"<tr><td>{_badge(c.status)}</td><td>{_e(c.name)}</td><td>{_e(c.detail)}</td>"
        f'<td class="num">{c.seconds:.3f}</td></tr>' for c in report.checks)
    failed = sum(c.status == "fail" for c in report.checks)
    classes = getattr(report, "options", {}).get("classes", "all")
    verdict = (f'<p class="verdict">{_badge("pass" if report.passed else "fail")} '
               f"{len(report.checks) - failed} of {len(report.checks)} checks passed or skipped"
               + (f"; pathwise with {_e(classes)} competing classes" if classes != "all" else "") + "</p>")
    checks = (f'<section id="checks"><h2>Checks</h2>{verdict}<table><thead><tr><th>status</th><th>check</th>'
              f"<th>detail</th><th>seconds</th></tr></thead><tbody>{rows}</tbody></table></section>")
    return _page("onnx-pathwise audit", f"{report.model} · {'PASSED' if report.passed else 'FAILED'}",
                 [checks, _overview(model_section(model_info), preprocessing_section(preprocessing, inputs))])


def diff_page(
    *,
    report: Any,
    labels: Sequence[str] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    sources: Sequence[str] | None = None,
    inputs: str | None = None,
) -> str:
    """The page of one ``diff`` run (an :class:`onnx_pathwise.audit.DiffReport`): the verdict, the
    path overlap per layer and one row per sample (changed predictions highlighted)."""
    n = len(report.samples)
    verdict = (f'<p class="verdict">{_badge("pass" if report.passed else "fail")} '
               + (_e("; ".join(report.failures)) if report.failures else "no threshold crossed") + "</p>")
    pairs = [("old model", report.old), ("new model", report.new),
             ("predictions changed", f"{report.prediction_changes} of {n}"),
             ("attribution correlation (mean)", _num(report.mean_correlation)),
             ("path overlap (mean Jaccard)", _num(report.mean_jaccard)),
             ("competing classes", str(getattr(report, "classes", "all")))]
    layers = (_table(["gate layer", "mean Jaccard"], [[k, _num(v)] for k, v in report.layers.items()], numeric=(1,))
              if report.layers else '<p class="muted">No gate layer matches by name and shape.</p>')
    rows, classes = [], []
    for i, s in enumerate(report.samples):
        js = list(s["jaccard"].values())
        changed = s["old_prediction"] != s["new_prediction"]
        rows.append([_source(sources, i), _class_name(s["old_prediction"], labels), _class_name(s["new_prediction"], labels),
                     "yes" if changed else "no", _num(s["correlation"]), _num(float(np.mean(js)) if js else None)])
        classes.append("changed" if changed else "")
    summary = f'<section id="diff"><h2>Changes</h2>{verdict}{_kv(pairs)}<h3>Path overlap per layer</h3>{layers}</section>'
    per_sample = ('<section id="samples"><h2>Per sample</h2>'
                  + _table(["sample", "old prediction", "new prediction", "changed", "attribution correlation",
                            "path overlap"], rows, numeric=(4, 5), row_classes=classes) + "</section>")
    return _page("onnx-pathwise diff", f"{report.old} → {report.new} · {'PASSED' if report.passed else 'FAILED'}",
                 [summary, per_sample, preprocessing_section(preprocessing, inputs)])
