"""Audits for CI: is a model analysable, are its explanations exact, what changed between two
versions. Each check is a small function returning a :class:`Check`; the report renders as
text, JSON or JUnit XML. Details quote names and messages from the model: the text and XML
renderings pass them through :func:`onnx_pathwise.text.clean` (JSON escapes them itself), and an
undefined value (a correlation of constant maps) is ``n/a`` in text and ``null`` in JSON."""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from . import limits, runtime
from .audit_edits import last_weight, randomized
from .errors import PathwiseError, UnsupportedModelError
from .explainer import Explainer
from .load import read_model
from .pathwise import parse_classes
from .text import clean, number
from .unwrap import delta as unwrap_delta

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    seconds: float = 0.0
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class AuditReport:
    model: str
    checks: list[Check]
    #: the explanations' options: ``width`` (None: the default) and ``classes`` ("all" or N)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "passed": self.passed, "options": self.options,
                "checks": [asdict(c) for c in self.checks]}

    def to_junit(self) -> str:
        suite = ET.Element(
            "testsuite",
            name=clean(f"onnx-pathwise audit {os.path.basename(self.model)}"),
            tests=str(len(self.checks)),
            failures=str(sum(c.status == FAIL for c in self.checks)),
            skipped=str(sum(c.status == SKIP for c in self.checks)),
            time=f"{sum(c.seconds for c in self.checks):.3f}",
        )
        props = ET.SubElement(suite, "properties")
        for key, value in self.options.items():
            ET.SubElement(props, "property", name=key, value=clean(str("default" if value is None else value)))
        for c in self.checks:
            detail = clean(c.detail)  # XML 1.0 cannot even hold most control characters
            case = ET.SubElement(suite, "testcase", classname="onnx_pathwise.audit", name=clean(c.name),
                                 time=f"{c.seconds:.3f}")
            if c.status == FAIL:
                ET.SubElement(case, "failure", message=detail).text = detail
            elif c.status == SKIP:
                ET.SubElement(case, "skipped", message=detail)
            else:
                ET.SubElement(case, "system-out").text = detail
        suites = ET.Element("testsuites")
        suites.append(suite)
        return ET.tostring(suites, encoding="unicode", xml_declaration=True)

    def to_text(self) -> str:
        width = max(len(c.name) for c in self.checks) if self.checks else 10
        lines = [f"audit of {clean(self.model)}" + _variant(self.options.get("classes"))]
        for c in self.checks:
            lines.append(f"  {c.status.upper():4s}  {c.name:{width}s}  {clean(c.detail)}")
        verdict = "PASSED" if self.passed else "FAILED"
        n_fail = sum(c.status == FAIL for c in self.checks)
        lines.append(f"{verdict}: {len(self.checks) - n_fail} of {len(self.checks)} checks passed or skipped")
        return "\n".join(lines)


def _variant(classes: Any) -> str:
    """How a report names a competing-classes variant (nothing for the exact default)."""
    return "" if classes in (None, "all") else f" (pathwise with {classes} competing classes: each sample's top {classes} and its target)"


def generated_inputs(ex: Explainer, n: int = 4, seed: int = 0) -> np.ndarray:
    """A few standard-normal inputs of the model's shape (the default audit inputs)."""
    return np.random.default_rng(seed).normal(size=(n,) + ex.input_shape).astype(ex.ir.input_dtype)


def _timed(name: str, fn: Callable[[], tuple[str, str, dict[str, Any]]]) -> Check:
    t = time.perf_counter()
    try:
        status, detail, values = fn()
    except PathwiseError as exc:
        status, detail, values = FAIL, str(exc), {}
    return Check(name, status, detail, time.perf_counter() - t, values)


def _same_paths(a: Any, b: Any) -> bool:
    """Two explanations kept the same units in every layer of every sample."""
    return len(a.path) == len(b.path) and all(
        len(pa) == len(pb) and all(p.node == q.node and np.array_equal(p.kept, q.kept) for p, q in zip(pa, pb))
        for pa, pb in zip(a.path, b.path))


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def audit(
    model: str | os.PathLike[str],
    inputs: np.ndarray | None = None,
    max_delta: float = 1e-4,
    device: str = "auto",
    width: int | str | None = None,
    inputs_name: str = "inputs",
    classes: int | str | None = None,
) -> AuditReport:
    """Run every check on ``model``; ``max_delta`` bounds the completeness delta relative to
    the largest score magnitude (at least 1). ``inputs_name`` names the inputs in errors.
    ``width`` and ``classes`` (:meth:`Explainer.explain`) shape every pathwise explanation the
    checks make: ``classes=N`` bounds their cost on a model of many classes (a 1,000-class
    ResNet-18 took 9.4 minutes with every class competing)."""
    label = str(model)
    checks: list[Check] = []
    classes = parse_classes(classes)
    options = {"width": width, "classes": "all" if classes is None else classes}
    try:
        proto = read_model(model)
    except PathwiseError as exc:
        return AuditReport(label, [Check("model readable", FAIL, str(exc))], options)
    ops = Counter(n.op_type for n in proto.graph.node)
    inventory = ", ".join(f"{k}×{v}" for k, v in sorted(ops.items()))
    resolved = runtime.resolve_device(device)
    held = [proto]  # the whole model, let go once the explainer holds it (its weights once)
    del proto
    built: list[Explainer] = []  # the model is analysed once: the checks below share it

    def analysable() -> tuple[str, str, dict[str, Any]]:
        try:
            built.append(Explainer(held[0], device=resolved))
        except UnsupportedModelError as exc:
            return FAIL, "; ".join(exc.problems), {"blockers": exc.problems, "ops": dict(ops)}
        return PASS, f"ops: {inventory}", {"ops": dict(ops)}

    checks.append(_timed("analysable", analysable))

    def loads() -> tuple[str, str, dict[str, Any]]:
        if built:  # the same model, its weights read from the explainer's arrays (not copied again)
            runtime.session_sharing(built[0].proto, built[0].sweep.initializers or {})
        else:
            runtime.session(held[0], "cpu")
        return PASS, "onnxruntime creates a session", {}

    checks.append(_timed("onnxruntime loads", loads))
    held.clear()
    if any(c.status == FAIL for c in checks):
        return AuditReport(label, checks, options)

    ex = built[0]
    x = ex.check_input(inputs, inputs_name) if inputs is not None else generated_inputs(ex)
    first: list[Any] = []

    def batch_run() -> Any:
        """The batch's explanation, made once: three checks compare against it."""
        if not first:
            first.append(ex.explain(x, width=width, classes=classes))
        return first[0]

    def completeness() -> tuple[str, str, dict[str, Any]]:
        # the rows the explanations use: every class, or each sample's top ``classes``
        worst, output = unwrap_delta(ex.sweep, x, classes)
        scale = max(1.0, float(np.abs(output).max()))
        rel = float(worst.max()) / scale
        status = PASS if rel <= max_delta else FAIL
        rows = "" if classes is None else f" over each sample's top {classes} classes"
        return status, f"max |W x + b − f(x)| = {number(float(worst.max()), '.3g')}{rows} ({number(rel, '.3g')} of the score scale; limit {max_delta:g})", {
            "delta": worst.tolist(), "relative": rel}

    checks.append(_timed("completeness", completeness))

    def batch_equals_samples() -> tuple[str, str, dict[str, Any]]:
        full = batch_run()
        worst = 0.0
        same_paths = True
        for i in range(x.shape[0]):
            one = ex.explain(x[i : i + 1], width=width, classes=classes)
            worst = max(worst, _relative(one.attribution[0], full.attribution[i]))
            same_paths &= _same_paths(one, replace(full, path=full.path[i : i + 1]))
        ok = worst < 1e-4 and same_paths
        return (PASS if ok else FAIL), f"max relative difference {worst:.3g}, paths {'identical' if same_paths else 'differ'}", {
            "difference": worst}

    checks.append(_timed("batch equals per-sample", batch_equals_samples))

    def deterministic() -> tuple[str, str, dict[str, Any]]:
        a, b = batch_run(), ex.explain(x, width=width, classes=classes)  # the second run comes after every other
        same = np.array_equal(a.attribution, b.attribution) and _same_paths(a, b)
        return (PASS if same else FAIL), "two runs give identical paths and attributions" if same else "two runs differ", {}

    checks.append(_timed("deterministic", deterministic))

    def cuda_agreement() -> tuple[str, str, dict[str, Any]]:
        if not runtime.cuda_available():
            return SKIP, "no usable CUDA GPU", {}
        whole = runtime.filled(ex.proto, ex.sweep.initializers or {})
        cpu = Explainer(whole, device="cpu").explain(x, width=width, classes=classes)
        gpu = Explainer(whole, device="cuda").explain(x, width=width, classes=classes)
        diff = _relative(gpu.attribution, cpu.attribution)
        same = _same_paths(cpu, gpu)
        ok = diff < 1e-3 and same
        return (PASS if ok else FAIL), f"attributions differ by {diff:.3g} (relative); paths {'identical' if same else 'differ'}", {
            "difference": diff}

    checks.append(_timed("cpu vs cuda", cuda_agreement))

    def randomisation() -> tuple[str, str, dict[str, Any]]:
        name = last_weight(ex.source_ir, ex.proto)
        if name is None:
            return SKIP, "no initializer-backed weight in the last layer", {}
        a = batch_run().attribution.reshape(x.shape[0], -1)
        first.clear()
        # the last check: the first model's sessions and the heap its sweeps freed make room for
        # the second model (VGG-16: a 4.79 GB peak without, 4.62–4.69 GB with, single runs)
        ex.sweep.release_sessions()
        limits.release_freed()
        shuffled = Explainer(randomized(ex.proto, ex.sweep.initializers or {}, name, seed=1), device=ex.device)
        b = shuffled.explain(x, width=width, classes=classes).attribution.reshape(x.shape[0], -1)
        corr = [_correlation(a[i], b[i]) for i in range(x.shape[0])]
        defined = [c for c in corr if np.isfinite(c)]
        if not defined:
            return SKIP, f"randomising {name!r}: correlation n/a (the attributions are constant)", {
                "correlation": corr}
        mean = float(np.mean(defined))
        ok = mean < 0.99
        return (PASS if ok else FAIL), f"randomising {name!r} changes the explanations (mean correlation {mean:.3f})" if ok else (
            f"randomising {name!r} leaves the explanations unchanged (mean correlation {mean:.3f})"), {"correlation": corr}

    checks.append(_timed("randomised weights change explanations", randomisation))
    return AuditReport(label, checks, options)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)  # the means too: a float32 sum can overflow
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


# --------------------------------------------------------------------------- diff


@dataclass
class DiffReport:
    old: str
    new: str
    samples: list[dict[str, Any]]
    layers: dict[str, float]  # mean Jaccard per matched layer
    prediction_changes: int
    mean_correlation: float | None  # None: undefined (every attribution map constant)
    mean_jaccard: float | None  # None: no gate layer matches
    failures: list[str]
    classes: int | str = "all"  # the competing classes of both models' explanations

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}

    def to_text(self) -> str:
        n = len(self.samples)
        lines = [f"diff {self.old} → {self.new} on {n} sample(s)" + _variant(self.classes),
                 f"  predictions changed   {self.prediction_changes} of {n}",
                 f"  attribution corr.     {number(self.mean_correlation, '.4f')} (mean)",
                 f"  path overlap          {number(self.mean_jaccard, '.4f')} (mean Jaccard over matched layers)"]
        for name, j in self.layers.items():
            lines.append(f"    {clean(name):30s} {number(j, '.4f')}")
        if not self.layers:
            lines.append("    (no gate layer matches by name and shape)")
        lines.append("FAILED: " + "; ".join(self.failures) if self.failures else "PASSED")
        return "\n".join(clean(line) for line in lines)


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    union = len(sa | sb)
    return len(sa & sb) / union if union else 1.0


def diff(
    old: str | os.PathLike[str],
    new: str | os.PathLike[str],
    inputs: np.ndarray,
    width: int | str | None = None,
    depth: int | None = None,
    device: str = "auto",
    min_correlation: float | None = None,
    min_jaccard: float | None = None,
    max_prediction_changes: int | None = None,
    inputs_name: str = "inputs",
    classes: int | str | None = None,
) -> DiffReport:
    """Compare the explanations of two versions of a model on the same inputs (``inputs_name``
    names them in errors), each made with ``width``, ``depth`` and ``classes``
    (:meth:`Explainer.explain`)."""
    classes = parse_classes(classes)
    ea, eb = Explainer(old, device=device), Explainer(new, device=device)
    if ea.input_shape != eb.input_shape:
        raise PathwiseError(f"input shapes differ: {ea.input_shape} vs {eb.input_shape}")
    x = ea.check_input(inputs, inputs_name)
    ra = ea.explain(x, width=width, depth=depth, classes=classes)
    rb = eb.explain(x, width=width, depth=depth, classes=classes)
    shapes_b = {g.name: g.shape for g in eb.gate_layers}
    matched = [g.name for g in ea.gate_layers if shapes_b.get(g.name) == g.shape]
    samples: list[dict[str, Any]] = []
    per_layer: dict[str, list[float]] = {m: [] for m in matched}
    for i in range(x.shape[0]):
        pa = {p.node: p.kept for p in ra.path[i]}
        pb = {p.node: p.kept for p in rb.path[i]}
        js = {}
        for m in matched:
            if m in pa and m in pb:
                js[m] = _jaccard(pa[m], pb[m])
                per_layer[m].append(js[m])
        samples.append({
            "old_prediction": int(ra.output[i].argmax()),
            "new_prediction": int(rb.output[i].argmax()),
            "correlation": _correlation(ra.attribution[i].ravel(), rb.attribution[i].ravel()),
            "jaccard": js,
        })
    layers = {m: float(np.mean(v)) for m, v in per_layer.items() if v}
    changes = sum(s["old_prediction"] != s["new_prediction"] for s in samples)
    corrs = [float(s["correlation"]) for s in samples if np.isfinite(float(s["correlation"]))]
    mean_corr = float(np.mean(corrs)) if corrs else None
    mean_j = float(np.mean(list(layers.values()))) if layers else None
    failures = []
    if min_correlation is not None and (mean_corr is None or mean_corr < min_correlation):
        failures.append(f"mean attribution correlation {number(mean_corr, '.4f')} < {min_correlation}"
                        + (" (undefined: every attribution map is constant)" if mean_corr is None else ""))
    if min_jaccard is not None and (mean_j is None or mean_j < min_jaccard):
        failures.append(f"mean path overlap {number(mean_j, '.4f')} < {min_jaccard}"
                        + (" (undefined: no gate layer matches by name and shape)" if mean_j is None else ""))
    if max_prediction_changes is not None and changes > max_prediction_changes:
        failures.append(f"{changes} prediction(s) changed > {max_prediction_changes}")
    return DiffReport(str(old), str(new), samples, layers, changes, mean_corr, mean_j, failures,
                      "all" if classes is None else classes)


__all__: Sequence[str] = ["AuditReport", "Check", "DiffReport", "audit", "diff", "generated_inputs"]
