"""The only onnxruntime boundary: sessions, devices, the forward record and single-op kernels.

Device policy: ``"auto"`` uses CUDA when onnxruntime-gpu can actually create a CUDA session
(CUDA/cuDNN libraries loaded with :func:`onnxruntime.preload_dlls` as onnxruntime documents),
else the CPU with one line on stderr; ``"cpu"`` forces the CPU; ``"cuda"`` without a usable
GPU raises :class:`~onnx_pathwise.errors.DeviceError`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from .errors import DeviceError, ModelError
from .load import external_references
from .load.protos import with_initializers

DEVICES = ("auto", "cpu", "cuda")
_CPU: list[Any] = ["CPUExecutionProvider"]
#: Options of onnxruntime's CUDA provider. TF32 is off: it rounds the inputs of every Conv and
#: Gemm to 10 mantissa bits (~1e-3 relative), far outside the exactness the explanations
#: promise and enough to flip kept units. A heuristic cuDNN algorithm choice instead of the
#: exhaustive search: the sweep runs each adjoint at several batch shapes, and an exhaustive
#: search per new shape costs more than it saves. The device arena grows by what is asked, not to
#: the next power of two: the selection graph's temporaries reach tens of GB at 1,000 classes,
#: and doubling would reserve up to twice that (onnxruntime's option, not measured here).
CUDA_OPTIONS: dict[str, str] = {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC",
                                "arena_extend_strategy": "kSameAsRequested"}

ort.set_default_logger_severity(3)


#: Run options that hand an arena session's memory back at the end of the run
SHRINK_ARENA = ort.RunOptions()
SHRINK_ARENA.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


def _options(threads: int = 0, device: str = "cpu", arena: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    if device == "cpu":
        # No arena and no pre-planned buffers: a session's arena keeps its largest batch's
        # tensors for good, and the sweep holds ~20 sessions. IG-32 on a 224² ResNet-18 peaked
        # at 905 MiB with them, 747 without, in the same time (the sweep reuses freed heap
        # memory instead: limits.reused_heap). ``arena``: the forward record's session keeps
        # one, shrunk at the end of every run (SHRINK_ARENA), so that it holds nothing between
        # runs: its many tensors of one pass come from the arena 1.3-1.7x faster than from
        # malloc (ResNet-18, 5 rows: 97-120 ms against 143-163 ms, a plain session 92-118 ms;
        # 8 rows: 157 against 265 ms).
        so.enable_cpu_mem_arena = arena
        so.enable_mem_pattern = False
    # fatal only: a failure reaches the caller as an exception (and the CLI's one error line);
    # onnxruntime's own log of it would be a second, colourised line on stderr
    so.log_severity_level = 4
    # Spinning pool threads keep the cores busy after each run and starve numpy's BLAS
    # threads that do the rest of the sweep (measured: a 10×512×2048 matmul went 0.7 → 18 ms).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    return so


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True when onnxruntime can run a session on CUDA on this machine."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        # preload_dlls prints its misses on stdout, which belongs to the CLI's output
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                preload()
        except Exception:
            pass
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    # a failed CUDA provider load logs at ERROR level; the fallback line says it better
    ort.set_default_logger_severity(4)
    try:
        sess = ort.InferenceSession(model.SerializeToString(), _options(), providers=providers_for("cuda"))
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(3)
    return "CUDAExecutionProvider" in sess.get_providers()


_warned_fallback = False


def resolve_device(device: str) -> str:
    """Map ``auto``/``cpu``/``cuda`` to the device that will actually run."""
    global _warned_fallback
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if device == "cuda":
        raise DeviceError(
            "device 'cuda' requested but onnxruntime cannot use a CUDA GPU here "
            f"(providers: {', '.join(ort.get_available_providers())})"
        )
    if not _warned_fallback and "CUDAExecutionProvider" in ort.get_available_providers():
        print("onnx-pathwise: no usable CUDA GPU, running on the CPU", file=sys.stderr)
    _warned_fallback = True
    return "cpu"


def providers_for(device: str) -> list[Any]:
    if device == "cuda":
        return [("CUDAExecutionProvider", dict(CUDA_OPTIONS)), "CPUExecutionProvider"]
    return _CPU


#: Longest cause quoted from an onnxruntime message.
MAX_CAUSE_CHARS = 500


def failure(exc: BaseException, doing: str, node: str | None = None, op: str | None = None) -> ModelError:
    """The one-line :class:`ModelError` for an onnxruntime exception: what onnxruntime was
    ``doing``, the node and op when known, and the first line of its message — or, when the
    message is empty or only whitespace, the exception's type, so the line always has a cause.
    Every place that calls onnxruntime goes through here."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines:
        cause = lines[0] if len(lines[0]) <= MAX_CAUSE_CHARS else lines[0][:MAX_CAUSE_CHARS] + "…"
    else:
        cause = f"{type(exc).__name__} without a message"
    where = ""
    if node and op:
        where = f" at node {node!r} ({op})"
    elif node or op:
        where = f" at node {node!r}" if node else f" in its {op} op"
    return ModelError(f"onnxruntime failed {doing}{where}: {cause}")


def session(
    model: onnx.ModelProto | bytes,
    device: str = "cpu",
    threads: int = 0,
    what: str = "creating a session for the model",
    op: str | None = None,
    shared: Mapping[str, np.ndarray] | None = None,
    arena: bool = False,
) -> ort.InferenceSession:
    """An onnxruntime session for ``model``. ``shared``: initializers that the model declares as
    external (:func:`shared_initializer`) and onnxruntime reads from these arrays, not from a
    copy in the protobuf; the session keeps them alive. ``arena``: a CPU session with
    onnxruntime's memory arena, to be run with :data:`SHRINK_ARENA`."""
    if isinstance(model, bytes):
        try:
            model = onnx.load_model_from_string(model)
        except Exception as exc:
            raise ModelError(f"not a valid ONNX protobuf ({type(exc).__name__})") from None
    shared = dict(shared or {})
    # onnxruntime would resolve an external-data location against the current directory:
    # external data is read only by the loader (onnx_pathwise.load), from inside the model's folder
    external = external_references(model, provided=shared)
    if external:
        raise ModelError(f"{external[0]}; refusing to let onnxruntime resolve it")
    data = model.SerializeToString()
    options = _options(threads, device, arena)
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in shared.values()]
    if shared:
        options.add_external_initializers(list(shared), values)
        if device == "cpu":
            # the session then runs on these arrays themselves; with add_external_initializers
            # alone it also holds a copy of each (a 4096 × 25088 Gemm weight: a session
            # peaked 791 MB above its start, 400 MB with this: the prepacked copy MLAS makes
            # of Gemm and Conv weights, kept because without it float32 results differ between
            # batch sizes). On CUDA the weights are copied to the device anyway.
            for name, value in zip(shared, values):
                options.add_initializer(name, value)
    try:
        sess = ort.InferenceSession(data, options, providers=providers_for(device))
    except Exception as exc:
        raise failure(exc, what, op=op) from None
    sess._pathwise_shared = values  # type: ignore[attr-defined]  # onnxruntime reads them at run time
    return sess


def session_sharing(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], device: str = "cpu",
                    what: str = "creating a session for the model") -> ort.InferenceSession:
    """A :func:`session` for ``model`` (whole or :func:`lean`) that reads the initializers
    ``arrays`` holds from the arrays themselves, copying none of them."""
    shareable, shared = _shared(model, arrays)
    return session(shareable, device, what=what, shared=shared)


def shared_initializer(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer whose data :func:`session` hands to onnxruntime from ``array`` itself."""
    t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value=name)
    return t


def _shareable(t: onnx.TensorProto, array: np.ndarray) -> bool:
    """Whether ``array`` can stand for initializer ``t`` (same type and shape, a plain numeric
    dtype, and big enough for the saving to matter). ``t`` may already be a
    :func:`shared_initializer` (a :func:`lean` model's): the loader leaves no other external
    reference in a model."""
    if array.dtype.kind not in "fiub" or array.nbytes < (1 << 16):
        return False
    try:
        same_type = helper.np_dtype_to_tensor_dtype(array.dtype) == t.data_type
    except (KeyError, TypeError, ValueError):
        return False
    return same_type and list(t.dims) == list(array.shape)


def _shared(model: onnx.ModelProto,
            arrays: Mapping[str, np.ndarray] | None) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of ``model`` whose main-graph initializers that ``arrays`` holds (their exact
    values, from the loader) are :func:`shared_initializer` placeholders, and those arrays:
    the copy holds no second copy of the weights."""
    arrays = arrays or {}
    shared: dict[str, np.ndarray] = {}

    def share(t: onnx.TensorProto) -> onnx.TensorProto:
        array = arrays.get(t.name)
        if array is None or not _shareable(t, array):
            return t
        shared[t.name] = array
        return shared_initializer(t.name, array)

    return with_initializers(model, share), shared


def lean(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` without the data of the initializers that ``arrays`` holds: what an
    :class:`~onnx_pathwise.Explainer` keeps, so that its weights live once, in the loader's
    arrays (a 537 MB VGG-16 held them twice). Sessions built from it get the arrays
    (:func:`session`'s ``shared``); :func:`filled` puts the data back."""
    return _shared(model, arrays)[0]


def filled(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A self-contained copy of a :func:`lean` model: each placeholder gets its array's data."""
    def fill(t: onnx.TensorProto) -> onnx.TensorProto:
        if t.data_location == onnx.TensorProto.EXTERNAL and t.name in arrays:
            return numpy_helper.from_array(np.asarray(arrays[t.name]), t.name)
        return t

    return with_initializers(model, fill)


def _with_outputs(model: onnx.ModelProto, names: Sequence[str], arrays: Mapping[str, np.ndarray] | None = None,
                  fed: bool = False) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of ``model`` whose graph outputs are ``names``, and the initializers it shares
    (:func:`_shared`), so that neither the copy nor its serialised bytes nor onnxruntime's
    session duplicate their data (a 537 MB VGG-16 peaked 1.5 GB higher when the record session
    copied them). With ``fed`` they become graph inputs instead, to be fed at each run: then
    onnxruntime copies nothing even while it builds the session (as initializers it copies them
    once, for the time of the session's creation), at the price of the optimisations that need
    constant weights, which a one-off run does not miss."""
    out, shared = _shared(model, arrays)
    if fed and shared:
        kept = [t for t in out.graph.initializer if t.name not in shared]
        del out.graph.initializer[:]
        out.graph.initializer.extend(kept)
        declared = {i.name for i in out.graph.input}  # IR < 4 lists initializers as inputs too
        for name, array in shared.items():
            if name not in declared:
                out.graph.input.append(helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)))
    existing = {o.name for o in out.graph.output}
    del out.graph.output[:]
    for name in names:
        if name in existing:
            vi = next(o for o in model.graph.output if o.name == name)
            out.graph.output.append(vi)
        else:
            out.graph.output.append(onnx.ValueInfoProto(name=name))
    return out, shared


def probe(
    model: onnx.ModelProto, names: Sequence[str], feed: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    arrays: Mapping[str, np.ndarray] | None = None,
) -> Any:
    """Run ``model`` on the CPU and return the named tensors (intermediates included).

    ``feed`` is one feed (the result is one dict) or a list of feeds run on the same session
    (the result is a list of dicts, in order). ``arrays``: the exact values of initializers
    already read, which the session reads as inputs instead of copying (:func:`_with_outputs`)."""
    feeds = [feed] if isinstance(feed, Mapping) else list(feed)
    names = list(dict.fromkeys(names))
    if not names:
        return {} if isinstance(feed, Mapping) else [{} for _ in feeds]
    probed, weights = _with_outputs(model, names, arrays, fed=True)
    sess = session(probed, "cpu", what="creating the session for the analysis run")
    out = []
    for one in feeds:
        try:
            values = sess.run(names, {**weights, **one})
        except Exception as exc:
            raise failure(exc, "running the analysis run") from None
        out.append(dict(zip(names, values)))
    return out[0] if isinstance(feed, Mapping) else out


class Recorder:
    """One cached session that returns the requested intermediates for a batch.

    ``batch`` is the batch dimension the file fixes (0 when it is symbolic; ``True`` counts as
    1). A model with a fixed batch B runs in groups of B samples, each row one sample (the
    loader checked that no op moves or mixes the batch axis): the last group is padded with
    copies of its last sample and the padding's rows are dropped from every recorded tensor.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        input_name: str,
        names: Sequence[str],
        device: str,
        batch: int | bool = 0,
        initializers: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.names = list(dict.fromkeys(names))
        self.input_name = input_name
        self.device = device
        self.batch = int(batch)
        self.batch_fixed = self.batch > 0
        # ``initializers``: the loader's arrays of the model's initializers, shared with the session
        recorded, shared = _with_outputs(model, self.names, initializers)
        self._session = session(recorded, device, what="creating the session for the forward record", shared=shared,
                                arena=True)
        self._run_options = SHRINK_ARENA if device == "cpu" else None

    def run(self, x: np.ndarray, names: Sequence[str] | None = None, shrink: bool = True) -> dict[str, np.ndarray]:
        """The recorded tensors of rows x, or only ``names`` of them (onnxruntime computes the
        same, but copies out only those). ``shrink=False`` leaves the arena as the run grew it,
        for a caller about to run as many rows again (every exposed tensor is allocated per run:
        freeing and faulting them in again cost a sequence of 53-row runs a third of its time)."""
        names = self.names if names is None else list(names)
        options = self._run_options if shrink else None
        B = self.batch
        if B and x.shape[0] != B:
            parts = []
            for start in range(0, x.shape[0], B):
                group = x[start : start + B]
                real = group.shape[0]
                if real < B:
                    group = np.concatenate([group, np.repeat(group[-1:], B - real, axis=0)])
                values = self._run(group, names, options)
                parts.append({k: v[:real] for k, v in values.items()})
            if len(parts) == 1:
                return parts[0]
            return {k: np.concatenate([p[k] for p in parts]) for k in names}
        return self._run(x, names, options)

    def _run(self, x: np.ndarray, names: list[str], options: ort.RunOptions | None) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(names, {self.input_name: x}, options)
        except Exception as exc:
            raise failure(exc, f"running the forward record (input shape {tuple(x.shape)})") from None
        return {k: np.asarray(v) for k, v in zip(names, values)}


def adjoint_geometry(
    w_shape: Sequence[int],
    y_spatial: Sequence[int],
    in_spatial: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int],
    group: int,
) -> tuple[str, dict[str, Any]]:
    """How onnxruntime runs the adjoint of a Conv (weights of shape ``w_shape``, output spatial
    size ``y_spatial``) with respect to its input: ``("Conv", attrs)`` on the weights
    :func:`flipped` at stride 1, which onnxruntime runs faster than ConvTranspose, else
    ``("ConvTranspose", attrs)`` on the weights themselves. Raises ValueError when the geometry
    is not expressible as either. The one home of this geometry: the host sweep's kernels and
    the device-resident selection graph (:mod:`onnx_pathwise.graphsweep`) both read it."""
    n = len(in_spatial)
    kernel = list(w_shape[2:])
    flip_pads = [d * (k - 1) - p for d, k, p in zip(list(dilations) * 2, kernel * 2, pads)]
    if all(s == 1 for s in strides) and min(flip_pads) >= 0 and w_shape[1] * group >= 8:
        # stride 1: the adjoint is a plain Conv with the kernel flipped and the channel
        # roles swapped
        return "Conv", dict(strides=list(strides), dilations=list(dilations), pads=flip_pads, group=group)
    natural = [
        s * (o - 1) + (k - 1) * d + 1 - pb - pe
        for s, o, k, d, pb, pe in zip(strides, y_spatial, kernel, dilations, pads[:n], pads[n:])
    ]
    extra = [L - m for L, m in zip(in_spatial, natural)]
    pads_l = list(pads)
    output_padding = []
    for i, e in enumerate(extra):
        # output_padding must stay below the stride (and dilation): move the rest into a
        # negative end pad, which ConvTranspose expresses as less cropping.
        lim = max(strides[i], dilations[i]) - 1
        op = min(max(e, 0), lim)
        output_padding.append(op)
        pads_l[n + i] -= e - op
    if any(p < 0 for p in pads_l):
        raise ValueError("conv adjoint geometry not expressible as ConvTranspose")
    return "ConvTranspose", dict(strides=list(strides), dilations=list(dilations), pads=pads_l, group=group,
                                 output_padding=output_padding)


def flipped(w: np.ndarray, group: int) -> np.ndarray:
    """The weights of the stride-1 adjoint Conv: each kernel flipped, channel roles swapped."""
    M, Cg = w.shape[:2]
    k = w.shape[2:]
    wf = w.reshape((group, M // group, Cg) + k).swapaxes(1, 2).reshape((group * Cg, M // group) + k)
    return np.ascontiguousarray(wf[(slice(None), slice(None)) + (slice(None, None, -1),) * len(k)])


class OpKernels:
    """Single-op onnxruntime sessions for the heavy linear maps of the backward sweep.

    ``conv_adjoint`` runs a ConvTranspose that shares a Conv's weights (the adjoint of the
    convolution with respect to its input); ``conv`` runs a plain Conv. Sessions are
    cached per (weights, geometry).
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        # key → (weights, session): the weights are kept so their id() cannot be reused
        self._cache: dict[tuple[Any, ...], tuple[np.ndarray, ort.InferenceSession]] = {}
        self._flipped: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def release(self) -> None:
        """Drop the cached sessions and flipped weights (built again on next use)."""
        self._cache.clear()
        self._flipped.clear()

    def _single(self, key: tuple[Any, ...], op: str, w: np.ndarray, rank: int, attrs: dict[str, Any]) -> ort.InferenceSession:
        hit = self._cache.get(key)
        if hit is not None and hit[0] is w:
            return hit[1]
        else:
            weights = np.ascontiguousarray(w, np.float32)
            node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
            graph = helper.make_graph(
                [node],
                op,
                [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None] * rank)],
                [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                initializer=[shared_initializer("w", weights)],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            model.ir_version = 8
            sess = session(model, self.device, what=f"creating the {_KERNEL_WHAT[op]} session", op=op,
                           shared={"w": weights})
            self._cache[key] = (w, sess)
        return sess

    def conv_adjoint(
        self,
        y: np.ndarray,
        w: np.ndarray,
        in_spatial: Sequence[int],
        strides: Sequence[int],
        dilations: Sequence[int],
        pads: Sequence[int],
        group: int,
    ) -> np.ndarray:
        op, attrs = adjoint_geometry(w.shape, y.shape[2:], in_spatial, strides, dilations, pads, group)
        if op == "Conv":
            return self.conv(y, self._flip(w, group), strides, dilations, attrs["pads"], group)
        key = ("ConvTranspose", id(w)) + tuple(tuple(v) if isinstance(v, list) else v for v in attrs.values())
        sess = self._single(key, "ConvTranspose", w, y.ndim, attrs)
        return _run_kernel(sess, "ConvTranspose", y, w)

    def _flip(self, w: np.ndarray, group: int) -> np.ndarray:
        hit = self._flipped.get(id(w))
        if hit is not None and hit[0] is w:
            return hit[1]
        wf = flipped(w, group)
        self._flipped[id(w)] = (w, wf)
        return wf

    def conv(
        self,
        x: np.ndarray,
        w: np.ndarray,
        strides: Sequence[int],
        dilations: Sequence[int],
        pads: Sequence[int],
        group: int,
    ) -> np.ndarray:
        attrs = dict(strides=list(strides), dilations=list(dilations), pads=list(pads), group=group)
        key = ("Conv", id(w), tuple(strides), tuple(dilations), tuple(pads), group)
        sess = self._single(key, "Conv", w, x.ndim, attrs)
        return _run_kernel(sess, "Conv", x, w)


#: What each single-op kernel does in the backward sweep, for error messages.
_KERNEL_WHAT = {"ConvTranspose": "conv adjoint kernel", "Conv": "conv kernel"}


def _run_kernel(sess: ort.InferenceSession, op: str, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    try:
        return sess.run(None, {"x": np.ascontiguousarray(x, np.float32)})[0]  # type: ignore[no-any-return]
    except Exception as exc:
        raise failure(exc, f"running the {_KERNEL_WHAT[op]} (input {tuple(x.shape)}, weights "
                           f"{tuple(w.shape)})", op=op) from None
