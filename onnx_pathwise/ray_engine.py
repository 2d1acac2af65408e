"""``--engine ray``: the streaming run of :mod:`onnx_pathwise.stream` with the explaining on Ray.

Optional: ``pip install 'onnx-pathwise[ray]'``. Nothing here is imported by the local engine
(the default), and Ray is imported only when :func:`run` is called.

The driver reads and preprocesses the inputs batch by batch as the local engine does (bounded
memory: one shard of inputs at a time) and hands each shard's batches to a pool of Ray actors
started once per run: one :class:`~onnx_pathwise.Explainer` per actor, built once from the
model bytes put once in Ray's object store (a pool per shard loaded the model again for every
shard). The batches go round the actors and come back in order, and the driver writes them as
the same shards and index as the local engine (:func:`onnx_pathwise.stream.run`), so
``--resume`` works the same way. Ray is joined at ``address`` (``--ray-address``) or started
locally with ``ray.init()``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from . import runtime
from .data import InputSource, Sample
from .errors import PathwiseError
from .stream import StreamResult, explain_batch
from .stream import run as run_stream

#: Row fields carried through Ray as arrays (None ↔ NaN for the baselines' faithfulness/delta).
_ROW_FIELDS = ("score", "faithfulness", "delta")


def import_ray() -> Any:
    """Ray, or a :class:`PathwiseError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise PathwiseError("--engine ray needs Ray: pip install 'onnx-pathwise[ray]' "
                            "(or leave --engine at local)") from None
    return ray


class ExplainActor:
    """A Ray actor: one Explainer, built once from the model bytes; explains numpy batches."""

    def __init__(self, model: Any, device: str, input_name: str | None, output_name: str | None, method: str,
                 target: Any, options: Mapping[str, Any]) -> None:
        import onnx

        from .explainer import Explainer

        if not isinstance(model, bytes):  # an ObjectRef that Ray did not resolve for us
            import ray

            model = ray.get(model)
        self.explainer = Explainer(onnx.load_from_string(model), device=device, input_name=input_name,
                                   output_name=output_name)
        self.method, self.target, self.options = method, target, dict(options)

    def explain(self, x: np.ndarray) -> dict[str, np.ndarray]:
        arrays, rows = explain_batch(self.explainer, np.ascontiguousarray(x), self.method, self.target, self.options)
        out = dict(arrays)
        for name in _ROW_FIELDS:
            out[f"row_{name}"] = np.array([np.nan if r[name] is None else r[name] for r in rows], np.float64)
        return out


def run(explainer: Any, source: InputSource, out: str | os.PathLike[str], *, address: str | None = None,
        device: str = "cpu", input_name: str | None = None, output_name: str | None = None,
        concurrency: int | None = None, **stream_kw: Any) -> StreamResult:
    """:func:`onnx_pathwise.stream.run` with the explaining done by Ray actors."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                     logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise PathwiseError(f"--ray-address {address!r}: cannot join Ray ({exc})") from None
    actors: list[Any] = []
    try:
        model_ref = ray.put(runtime.filled(explainer.proto, explainer.sweep.initializers).SerializeToString())
        # one CPU per actor, and never more actors than the cluster has CPUs: an actor that
        # cannot be placed would leave its batches waiting for good
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        workers = min(concurrency or min(4, int(ray.available_resources().get("CPU", 1)) or 1), cpus)
        method = stream_kw.get("method", "pathwise")
        kwargs = {"model": model_ref, "device": device, "input_name": input_name, "output_name": output_name,
                  "method": method, "target": stream_kw.get("target"), "options": stream_kw.get("options") or {}}

        def explain_shard(samples: list[Sample]) -> tuple[list[Sample], dict[str, np.ndarray], list[dict[str, Any]]]:
            if not actors:  # started with the first shard, kept for the others
                actors.extend(_start_actors(ray, workers, kwargs))
            return _explain_on_ray(ray, actors, samples, source.batch_size, method)

        def compute(batches: Iterator[list[Sample]]) -> Iterator[tuple[list[Sample], dict[str, np.ndarray],
                                                                        list[dict[str, Any]]]]:
            shard = _shard_samples(explainer, source, stream_kw)
            pending: list[Sample] = []
            for batch in batches:
                pending += batch
                if len(pending) >= shard:
                    yield explain_shard(pending)
                    pending = []
            if pending:
                yield explain_shard(pending)

        return run_stream(explainer, source, out, compute=compute, engine="ray", **stream_kw)
    finally:
        for actor in actors:  # on a cluster we joined they would live as long as this process
            ray.kill(actor)
        if started:
            ray.shutdown()


def _shard_samples(explainer: Any, source: InputSource, stream_kw: Mapping[str, Any]) -> int:
    from .stream import shard_size_for

    return shard_size_for(explainer, source.batch_size, stream_kw.get("shard_size"))


def _start_actors(ray: Any, workers: int, kwargs: Mapping[str, Any]) -> list[Any]:
    """The run's ``workers`` actors (one CPU each), each building its Explainer once."""
    actor = ray.remote(num_cpus=1)(ExplainActor)
    return [actor.remote(**kwargs) for _ in range(workers)]


def _explain_on_ray(ray: Any, actors: list[Any], samples: list[Sample], batch_size: int,
                    method: str) -> tuple[list[Sample], dict[str, np.ndarray], list[dict[str, Any]]]:
    """One shard: its batches round the actors, the results in order."""
    x = np.stack([s.array for s in samples])
    blocks = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]  # one block per batch
    parts = ray.get([actors[i % len(actors)].explain.remote(block) for i, block in enumerate(blocks)])
    merged = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    rows: list[dict[str, Any]] = []
    for i in range(len(samples)):
        row: dict[str, Any] = {"target": int(merged["target"][i])}
        for name in _ROW_FIELDS:
            value = float(merged[f"row_{name}"][i])
            row[name] = None if method != "pathwise" and name != "score" else value
        rows.append(row)
    arrays = {k: v for k, v in merged.items() if not k.startswith("row_")}
    return samples, arrays, rows
