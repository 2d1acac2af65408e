"""Datasets in bounded memory: read → preprocess → explain → write, one batch at a time.

:func:`run` pulls batches of :class:`~onnx_pathwise.data.Sample` from an
:class:`~onnx_pathwise.data.InputSource`, explains each batch (:func:`explain_batch`) and
writes the results as shards, so memory holds one shard at most, however long the dataset:

- ``explanation-00000.npz``, ``explanation-00001.npz``, ...: at most ``shard_size`` samples
  each, the arrays of ``explain`` (pathwise: ``attribution``, ``weight``, ``bias``, ``output``,
  ``target``, ``masked_score``, ``delta``, ``path_count``; a baseline: ``attribution``,
  ``output``, ``target``), written atomically;
- ``index.json`` (and ``index.parquet`` when pyarrow is installed): the run (model, method,
  options, input, preprocessing, labels) and one row per sample: ``source``, ``target``,
  ``label``, ``score``, ``faithfulness``, ``delta``, ``shard``, ``offset`` (row in the shard).

``delta`` is the completeness delta of the target's local affine model,
\\|w_c·x + b_c − y_c(x)\\| (one extra single-class sweep per batch; float32 round-off when all
is well). While the run goes on, each finished shard's rows sit in ``index-00000.json`` beside
it (written after its ``.npz``: a shard is complete when both exist) and the settings in
``.run.json``; :func:`run` with ``resume=True`` restarts after the last complete shard, with the
same batches (a shard is a whole number of batches), so the result equals an uninterrupted
run's byte for byte. The progress bar (rate, ETA) goes to stderr when it is a terminal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .data import InputSource, Sample
from .errors import InputError, PathwiseError
from .io import jsonable, save_npz, to_json, to_json_line, write_atomic, write_bytes, write_json
from .pathwise import target_scores

SHARD = "explanation-{:05d}.npz"
PART = "index-{:05d}.json"
RUN = ".run.json"
INDEX = "index.json"
INDEX_PARQUET = "index.parquet"
#: Default samples per shard, and the most bytes of arrays one shard may hold.
SHARD_SAMPLES = 1000
SHARD_BYTES = 256 * 2**20
_SHARD_RE = re.compile(r"^(explanation|index)-(\d{5})\.(npz|json)$")

#: Renders a sample's figures: (sample, its index row, its arrays) → {file name: PNG bytes}.
Render = Callable[[Sample, Mapping[str, Any], Mapping[str, np.ndarray]], Mapping[str, bytes]]


@dataclass(frozen=True)
class StreamResult:
    out: Path
    count: int
    shards: int
    skipped: list[tuple[str, str]]
    resumed_at: int  # samples already done when the run started (0 for a fresh run)
    mean_faithfulness: float | None


# --------------------------------------------------------------------------- one batch


def explain_batch(explainer: Any, x: np.ndarray, method: str = "pathwise", target: Any = None,
                  options: Mapping[str, Any] | None = None) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Explain one batch: (arrays with the batch axis first, one row per sample with
    ``target``, ``score``, ``faithfulness``, ``delta``). Shared by the local and Ray engines."""
    from .baselines import get_method

    options = dict(options or {})
    if not get_method(method).path:
        res = explainer.attribute(x, method=method, target=target, **options)
        idx = np.arange(len(res.target))
        arrays = {"attribution": res.attribution, "output": res.output, "target": res.target}
        scores = target_scores(res.output, res.target)
        rows = [{"target": int(res.target[i]), "score": float(scores[i]),
                 "faithfulness": None, "delta": None} for i in idx]
        return arrays, rows
    rec = explainer.record(x)
    e = explainer.explain(x, target=target, record=rec, **options)
    delta = target_delta(explainer, rec, e.target)
    counts = np.array([[p.count for p in layers] for layers in e.path], dtype=np.int64).reshape(len(e.target), -1)
    arrays = {"attribution": e.attribution, "weight": e.weight, "bias": e.bias, "output": e.output,
              "target": e.target, "masked_score": e.masked_score, "delta": delta, "path_count": counts}
    score, faith = e.score, e.faithfulness
    rows = [{"target": int(e.target[i]), "score": float(score[i]), "faithfulness": float(faith[i]),
             "delta": float(delta[i])} for i in range(len(e.target))]
    return arrays, rows


def target_delta(explainer: Any, record: Any, target: np.ndarray) -> np.ndarray:
    """|w_c·x + b_c − y_c(x)| per sample for its target c: one single-class backward sweep."""
    n, K = record.scores.shape
    name = explainer.ir.output_name
    seed = np.zeros((1, n, K), explainer.engine.dtype)
    column = target if K > 1 else np.zeros_like(target)  # a single score: both sides share its row
    seed[0, np.arange(n), column] = 1.0
    w, b = explainer.engine.backward({name: seed.reshape((1, n) + tuple(explainer.ir.shapes[name]))}, record)
    b = np.asarray(b)[0]  # (classes, n)
    fx = (np.asarray(w)[0].reshape(n, -1).astype(np.float64) * record.x.reshape(n, -1).astype(np.float64)).sum(1)
    return np.abs(fx + b.astype(np.float64) - record.scores[np.arange(n), column].astype(np.float64))


def path_layers(explainer: Any, options: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Names and unit counts of the path layers (the columns of ``path_count``)."""
    from .pathwise import path_layers as layers_of

    return [{"name": g.name, "units": g.units} for g in layers_of(explainer.gate_layers, options.get("depth"))]


# --------------------------------------------------------------------------- the run


def shard_size_for(explainer: Any, batch_size: int, requested: int | None = None) -> int:
    """Samples per shard: ``requested`` or :data:`SHARD_SAMPLES` (fewer for big inputs, so a
    shard's arrays stay under :data:`SHARD_BYTES`), rounded up to whole batches."""
    size = math.prod(explainer.input_shape)
    wanted = requested if requested is not None else max(1, min(SHARD_SAMPLES, SHARD_BYTES // (8 * size + 64)))
    return max(1, math.ceil(wanted / batch_size)) * batch_size


def fingerprint(model: str | os.PathLike[str], source: InputSource, settings: Mapping[str, Any]) -> dict[str, Any]:
    """What must match for ``--resume`` to continue a run: the model's bytes, the input, the
    method and options, the preprocessing, the batch and shard sizes."""
    digest = hashlib.sha256()
    with contextlib.suppress(OSError), open(model, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return jsonable({"model": str(model), "model_sha256": digest.hexdigest(), "input": str(source.path),
                      "input_kind": source.kind, "items": len(source), "on_error": source.on_error,
                      "preprocessing": source.preprocessing.to_json() if source.preprocessing else None,
                      **settings})


def existing_outputs(out: Path) -> list[Path]:
    """Shards, parts and indexes of an earlier run in ``out``."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if _SHARD_RE.match(p.name)]
    found += [out / n for n in (RUN, INDEX, INDEX_PARQUET) if (out / n).exists()]
    return sorted(found)


def completed_shards(out: Path) -> tuple[int, int, list[tuple[str, str]]]:
    """(complete shards, listing position to go on from, skipped so far) of an interrupted run."""
    k, position, skipped = 0, 0, []
    while (out / SHARD.format(k)).exists() and (out / PART.format(k)).exists():
        part = json.loads((out / PART.format(k)).read_text(encoding="utf-8"))
        position = int(part["next"])
        skipped += [(s[0], s[1]) for s in part["skipped"]]
        k += 1
    return k, position, skipped  # type: ignore[return-value]


def run(
    explainer: Any,
    source: InputSource,
    out: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] = "",
    method: str = "pathwise",
    target: Any = None,
    options: Mapping[str, Any] | None = None,
    shard_size: int | None = None,
    resume: bool = False,
    labels: Sequence[str] | None = None,
    render: Render | None = None,
    overwrite_figures: bool = True,
    progress: bool | None = None,
    batch_size_given: bool = True,
    compute: Callable[[Iterator[list[Sample]]], Iterator[tuple[list[Sample], dict[str, np.ndarray], list[dict[str, Any]]]]]
    | None = None,
    engine: str = "local",
) -> StreamResult:
    """Explain every sample of ``source`` into sharded outputs in ``out`` (see the module
    docstring). ``compute`` turns batches into (samples, arrays, rows) — the default explains
    in this process; the Ray engine passes its own. Earlier outputs in ``out`` are replaced,
    unless ``resume``: then the run goes on after the last complete shard, provided it was
    started with the same settings (else a :class:`PathwiseError` says what differs)."""
    out = Path(out)
    options = dict(options or {})
    settings: dict[str, Any] = {"method": method, "target": target, "options": options,
                                "batch_size": source.batch_size, "labels": list(labels) if labels else None}
    recorded = _read_run(out) if resume else None
    if recorded is not None and not batch_size_given:
        source.batch_size = int(recorded.get("batch_size", source.batch_size))
        settings["batch_size"] = source.batch_size
    if recorded is not None and shard_size is None:
        shard_size = int(recorded.get("shard_size", 0)) or None
    settings["shard_size"] = shard_size_for(explainer, source.batch_size, shard_size)
    shard = settings["shard_size"]
    fp = fingerprint(model, source, settings)
    skipped: list[tuple[str, str]] = []
    start_shard, position = 0, 0
    if resume and recorded is None and (out / INDEX).exists():
        done = json.loads((out / INDEX).read_text(encoding="utf-8"))
        if done.get("run") == fp:
            return StreamResult(out, int(done["count"]), len(done["shards"]),
                                [(s["source"], s["error"]) for s in done["skipped"]], int(done["count"]),
                                done.get("mean_faithfulness"))
        raise PathwiseError(f"--resume: {out} holds a finished run with other settings; use --force to start over")
    if recorded is not None:
        diffs = [k for k in sorted(set(fp) | set(recorded)) if fp.get(k) != recorded.get(k)]
        if diffs:
            raise PathwiseError(f"--resume: {out} was started with other settings ({', '.join(diffs)} differ); "
                                "run again with the same ones, or use --force to start over")
        start_shard, position, skipped = completed_shards(out)
        for stale in existing_outputs(out):
            m = _SHARD_RE.match(stale.name)
            if (m and int(m.group(2)) >= start_shard) or stale.name in (INDEX, INDEX_PARQUET):
                stale.unlink()
    else:
        for stale in existing_outputs(out):
            stale.unlink()
    source.skipped = list(skipped)
    done_before = start_shard * shard
    layer_info = path_layers(explainer, options) if method == "pathwise" else []

    def local(batches: Iterator[list[Sample]]) -> Iterator[tuple[list[Sample], dict[str, np.ndarray], list[dict[str, Any]]]]:
        for batch in batches:
            x = np.stack([s.array for s in batch])
            arrays, rows = explain_batch(explainer, x, method, target, options)
            yield batch, arrays, rows

    k, count = start_shard, done_before

    def flush(buffer: list[Any]) -> int:
        if not (out / RUN).exists():  # the settings go down with the first shard: a run that fails
            out.mkdir(parents=True, exist_ok=True)  # before it leaves nothing behind
            write_json(out / RUN, fp)
        return _flush(out, k, buffer, count, labels, render, source, overwrite_figures)
    buffer: list[tuple[list[Sample], dict[str, np.ndarray], list[dict[str, Any]]]] = []
    with _progress(len(source), done_before, progress) as advance:
        for item in (compute or local)(source.batches(position)):
            buffer.append(item)
            advance(len(item[0]))
            if sum(len(b[0]) for b in buffer) >= shard:
                count, k, buffer = flush(buffer), k + 1, []
        if buffer:
            count, k = flush(buffer), k + 1
    if k == 0:
        raise InputError(f"{source.path}: no usable inputs (every one was skipped)")
    skipped_all = _skipped(out, k) + list(source.skipped)
    meta = {"model": str(model), "method": method, "options": options, "target": target, "engine": engine,
            "input": source.describe(), "preprocessing": fp["preprocessing"], "labels": list(labels) if labels else None,
            "path_layers": layer_info, "count": count, "shard_size": shard,
            "shards": [SHARD.format(i) for i in range(k)], "skipped": skipped_all, "run": fp}
    mean = _write_index(out, meta, k)
    for i in range(k):
        with contextlib.suppress(OSError):
            (out / PART.format(i)).unlink()
    with contextlib.suppress(OSError):
        (out / RUN).unlink()
    return StreamResult(out, count, k, skipped_all, done_before, mean)  # type: ignore[arg-type]


def _read_run(out: Path) -> dict[str, Any] | None:
    path = out / RUN
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise PathwiseError(f"--resume: {path} is unreadable; use --force to start over") from None
    return value if isinstance(value, dict) else None


def _flush(out: Path, k: int, buffer: list[Any], count: int, labels: Sequence[str] | None, render: Render | None,
           source: InputSource, overwrite_figures: bool = True) -> int:
    """Write shard ``k`` (its .npz, its figures, then its part of the index)."""
    samples = [s for b in buffer for s in b[0]]
    arrays = {key: np.concatenate([b[1][key] for b in buffer]) for key in buffer[0][1]}
    rows = [r for b in buffer for r in b[2]]
    save_npz(out / SHARD.format(k), arrays)
    for offset, (sample, row) in enumerate(zip(samples, rows)):
        row.update({"source": sample.source, "shard": k, "offset": offset, "sample": count + offset})
        if labels is not None:
            t = row["target"]
            row["label"] = labels[t] if 0 <= t < len(labels) else None
        if render is not None:
            for name, data in render(sample, row, {key: v[offset] for key, v in arrays.items()}).items():
                write_bytes(out / name, data, overwrite=overwrite_figures)
    part = {"shard": k, "next": samples[-1].index + 1, "rows": rows,
            "skipped": [list(s) for s in source.skipped]}
    source.skipped.clear()
    write_json(out / PART.format(k), part)
    return count + len(samples)


ROW_KEYS = ("sample", "source", "target", "label", "score", "faithfulness", "delta", "shard", "offset")


def _rows(out: Path, shards: int) -> Iterator[dict[str, Any]]:
    for i in range(shards):
        part = json.loads((out / PART.format(i)).read_text(encoding="utf-8"))
        for row in part["rows"]:
            yield {key: row.get(key) for key in ROW_KEYS}


def _skipped(out: Path, shards: int) -> list[tuple[str, str]]:
    return [(s[0], s[1]) for i in range(shards)
            for s in json.loads((out / PART.format(i)).read_text(encoding="utf-8"))["skipped"]]


def _write_index(out: Path, meta: dict[str, Any], shards: int) -> float | None:
    """index.json, streamed row by row (never all rows in memory), and index.parquet; returns
    the mean faithfulness (recorded in index.json too)."""
    total, n = 0.0, 0
    for row in _rows(out, shards):
        f = row.get("faithfulness")
        if f is not None and math.isfinite(f):
            total, n = total + f, n + 1
    meta = dict(meta)
    meta["mean_faithfulness"] = total / n if n else None
    meta["skipped"] = [{"source": name, "error": why} for name, why in meta["skipped"]]
    head = to_json(meta)
    assert head.endswith("}")

    def write(f: IO[bytes]) -> None:
        f.write(head[:-1].rstrip().encode("utf-8") + b',\n  "rows": [')
        for i, row in enumerate(_rows(out, shards)):
            text = to_json_line(row)
            f.write((",\n    " if i else "\n    ").encode("utf-8") + text.encode("utf-8"))
        f.write(b"\n  ]\n}\n")

    write_atomic(out / INDEX, write)
    _write_parquet(out, shards)
    return meta["mean_faithfulness"]  # type: ignore[no-any-return]


def _write_parquet(out: Path, shards: int) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return
    schema = pa.schema([("sample", pa.int64()), ("source", pa.string()), ("target", pa.int64()),
                        ("label", pa.string()), ("score", pa.float64()), ("faithfulness", pa.float64()),
                        ("delta", pa.float64()), ("shard", pa.int32()), ("offset", pa.int32())])

    def write(f: IO[bytes]) -> None:
        with pq.ParquetWriter(f, schema) as writer:
            for i in range(shards):
                rows = [{key: row.get(key) for key in ROW_KEYS}
                        for row in json.loads((out / PART.format(i)).read_text(encoding="utf-8"))["rows"]]
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))

    write_atomic(out / INDEX_PARQUET, write)


@contextlib.contextmanager
def _progress(total: int, done: int, show: bool | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar (samples, rate, ETA) on stderr when it is a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    enabled = console.is_terminal if show is None else show
    bar = Progress(TextColumn("explaining"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console,
                   transient=True, disable=not enabled)
    with bar:
        task = bar.add_task("explaining", total=total, completed=done, rate="")

        def advance(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[0].speed
            if speed:
                bar.update(task, rate=f"{speed:.1f} samples/s")

        yield advance


# --------------------------------------------------------------------------- reading back


def read_shards(out: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every shard of a finished run in ``out``, concatenated (for tests and small runs)."""
    out = Path(out)
    index = json.loads((out / INDEX).read_text(encoding="utf-8"))
    parts = [np.load(out / name) for name in index["shards"]]
    try:
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0].files} if parts else {}
    finally:
        for p in parts:
            p.close()

