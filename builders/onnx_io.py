"""Reading ONNX files: their single input and output, opset and metadata; and turning a
published fixed-batch graph into a dynamic-batch one where that is provably safe.

``onnx`` and ``onnxruntime`` are core dependencies but are still imported inside the
functions, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends.base import TensorDecl
from engine.errors import ModelError
from engine.fileio import replacing, sync_folder

logger = logging.getLogger(__name__)

BATCH_DIM_NAME = "batch"


@dataclass(frozen=True)
class OnnxInfo:
    """What the engine needs to know about an ONNX classifier before running it."""

    path: Path
    input: TensorDecl
    output: TensorDecl
    opset: int
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def dynamic_batch(self) -> bool:
        return self.input.fixed_batch is None


def _load_model(path: Path, *, external_data: bool):
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"ONNX file {path} does not exist")
    try:
        return onnx.load(str(path), load_external_data=external_data)
    except DecodeError:
        raise ModelError(f"{path} is not a readable ONNX file (corrupt or another format)") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read ONNX file {path}: {exc}") from None


def _dims(value_info) -> tuple[int | None, ...]:
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return ()
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim)


def _decl(value_info, path: Path) -> TensorDecl:
    import onnx.helper

    if not value_info.type.HasField("tensor_type"):
        raise ModelError(f"{path}: '{value_info.name}' is not a tensor")
    elem = value_info.type.tensor_type.elem_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{path}: '{value_info.name}' has an unsupported element type ({elem})") from None
    return TensorDecl(name=value_info.name, shape=_dims(value_info), dtype=dtype)


def _real_inputs(graph) -> list[Any]:
    # Graphs from old exporters (IR < 4) list every weight as a graph input too.
    initializers = {init.name for init in graph.initializer}
    initializers.update(init.name for init in graph.sparse_initializer)
    return [vi for vi in graph.input if vi.name not in initializers]


def _info_from_model(model, path: Path) -> OnnxInfo:
    graph = model.graph
    if len(graph.node) == 0:
        raise ModelError(f"{path} is not a usable ONNX model (its graph has no nodes)")
    inputs = _real_inputs(graph)
    outputs = list(graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(
            f"{path}: expected a classifier with one input and one output, found "
            f"{len(inputs)} input(s) {[i.name for i in inputs]} and {len(outputs)} output(s) {[o.name for o in outputs]}"
        )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    metadata = {p.key: p.value for p in model.metadata_props}
    return OnnxInfo(
        path=Path(path),
        input=_decl(inputs[0], path),
        output=_decl(outputs[0], path),
        opset=int(opset),
        metadata=metadata,
    )


def inspect_onnx(path: Path) -> OnnxInfo:
    """Read the input, output, opset and metadata of the ONNX classifier at ``path``.

    Raises :class:`ModelError` (one line) when the file is missing, unreadable, or not a
    one-input one-output graph. External weight files are not loaded.
    """
    path = Path(path)
    return _info_from_model(_load_model(path, external_data=False), path)


def _fixed_batch_dims(value_infos) -> list[Any]:
    """The dim-0 protos of ``value_infos`` that are fixed numbers."""
    dims = []
    for vi in value_infos:
        shape = vi.type.tensor_type.shape
        if len(shape.dim) and shape.dim[0].HasField("dim_value"):
            dims.append(shape.dim[0])
    return dims


def _random_input(decl: TensorDecl, batch: int, rng: np.random.Generator) -> np.ndarray | None:
    rest = decl.shape[1:]
    if not decl.shape or any(d is None for d in rest):
        return None
    shape = (batch, *rest)
    if np.issubdtype(decl.dtype, np.floating):
        return rng.standard_normal(shape).astype(decl.dtype)
    if np.issubdtype(decl.dtype, np.integer):
        return rng.integers(0, 8, size=shape).astype(decl.dtype)
    return None


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exceptions ONNX Runtime raises for a graph it cannot load, check or run."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "RuntimeException", "NotImplemented", "InvalidProtobuf")
    return tuple(getattr(state, n) for n in names if hasattr(state, n)) + (RuntimeError, ValueError)


def ort_reason(exc: BaseException, limit: int = 300) -> str:
    """ONNX Runtime's message for ``exc`` on one line of at most ``limit`` characters. A
    longer one keeps its start (the failing node) and its end, where ORT puts the reason
    after the C++ source location and signature (``... cannot be reshaped to the requested
    shape. Input shape:{1,3,1,1}, requested shape:{2,-1}``)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


def ort_run_error(where: Path, rows: int, exc: BaseException) -> ModelError:
    """The one-line error for a batch of ``rows`` that ONNX Runtime refused to run."""
    return ModelError(f"{where}: ONNX Runtime failed on a batch of {rows}: {ort_reason(exc)}")


def ort_load_error(path: Path, exc: BaseException) -> ModelError:
    """The one-line error for an ONNX file ONNX Runtime refused to open (a long reason,
    such as the opset check's, keeps its end, where ORT says what it supports)."""
    return ModelError(f"ONNX Runtime cannot load {path}: {ort_reason(exc)}")


def quiet_run_options():
    """ONNX Runtime RunOptions that keep it from logging a failed run itself (a red
    ``[E:onnxruntime:...]`` line on stderr): the exception says the same, and the caller
    turns it into one line, or, for a probe, into an expected answer. Errors while a
    session opens are still logged (a provider that fails to start says why there)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4  # fatal only
    return options


def _session(model_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a failing probe is an expected outcome
    return ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])


def _runs_batched(original: bytes, dynamic: bytes, decl: TensorDecl, fixed: int, probe: int, src: Path) -> bool:
    """Whether ``dynamic`` runs at batch ``probe`` and agrees, sample by sample, with
    ``original`` run at its fixed batch."""
    rng = np.random.default_rng(0)
    x = _random_input(decl, probe, rng)
    if x is None:
        logger.info("%s: cannot probe a batch of %d (non-batch dims are not fixed numbers)", src, probe)
        return False
    quiet = quiet_run_options()
    try:
        dyn_sess = _session(dynamic)
        out = dyn_sess.run(None, {decl.name: x}, quiet)[0]
        ref_sess = _session(original)
        # Run the original model on the same samples, `fixed` at a time.
        refs = []
        for start in range(0, probe, fixed):
            chunk = x[start : start + fixed]
            if len(chunk) < fixed:
                pad = np.repeat(chunk[-1:], fixed - len(chunk), axis=0)
                chunk = np.concatenate([chunk, pad])
            refs.append(ref_sess.run(None, {decl.name: chunk}, quiet)[0])
        ref = np.concatenate(refs)[:probe]
    except ort_errors() as exc:
        logger.info("%s: the graph does not run at batch %d (%s)", src, probe, ort_reason(exc, 200))
        return False
    if out.shape != ref.shape:
        logger.info("%s: at batch %d the output has shape %s, expected %s", src, probe, out.shape, ref.shape)
        return False
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    if not np.allclose(out, ref, rtol=1e-3, atol=1e-4 * scale):
        logger.info("%s: batched outputs differ from per-sample outputs (batch is mixed inside the graph)", src)
        return False
    return True


def batches_cleanly(path: Path, decl: TensorDecl, *, probe: int = 2) -> bool:
    """Whether the model at ``path``, declared with a dynamic batch, gives at batch
    ``probe`` what it gives image by image (on random input): False for a graph with the
    batch baked in (a Reshape to [1, -1]) or one that mixes the rows of a batch."""
    model = _load_model(Path(path), external_data=True).SerializeToString()
    return _runs_batched(model, model, decl, 1, probe, Path(path))


# protobuf's 2 GiB limit, less room for the graph: a larger model keeps its weights beside it
EXTERNAL_DATA_BYTES = 2**31 - 2**20


def _uses_external_data(path: Path) -> bool:
    """Whether any tensor of the model at ``path`` (initializers, and tensor attributes
    of its nodes, subgraphs included) keeps its data in another file."""
    import onnx

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(sub)

    graph = _load_model(path, external_data=False).graph
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors(graph))


def write_model_atomic(model, dst: Path) -> None:
    """Save ``model`` at ``dst``: a temp name of its own (two writers of one file must
    not rename each other's away), then a rename. One self-contained file, except for a
    model past protobuf's limit, whose weights go to ``<dst name>.data`` beside it: the
    graph names that file, so both are written whole in a folder of the writer's own and
    renamed into place, the weights first. ``model`` is left as it was (ONNX's external
    save moves the weights out of the proto it is given)."""
    import onnx

    dst = Path(dst)
    if dst.exists() and not dst.is_file():  # a device or FIFO (callers refuse it first): never replaced
        raise ModelError(f"{dst} is not a regular file; not replacing it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() < EXTERNAL_DATA_BYTES:
        with replacing(dst) as tmp:
            onnx.save_model(model, tmp)
        return
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    data = dst.with_name(f"{dst.name}.data")
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmpdir", dir=dst.parent))
    try:
        onnx.save_model(whole, str(work / dst.name), save_as_external_data=True, location=data.name, size_threshold=0)
        for name in (data.name, dst.name):
            with open(work / name, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(work / data.name, data)
        os.replace(work / dst.name, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sync_folder(dst.parent)


def make_batch_dynamic(src: Path, dst: Path, *, probe_batch: int = 2) -> bool:
    """Write to ``dst`` a copy of ``src`` whose batch dimension is symbolic ("batch").

    The rewrite only changes the declared shapes; a graph with the batch baked into
    its ops (say a ``Reshape`` to ``[1, -1]``) would break or silently mix samples, so
    the result is verified with ONNX Runtime (CPU) at ``probe_batch`` on random input
    against the original run sample by sample. Returns True when ``dst`` holds a
    verified dynamic-batch model, False (``dst`` untouched) when the model must keep
    its fixed batch. A model that is already dynamic is copied as is (one whose weights
    are in external files is saved whole, since they are named relative to ``src``).
    """
    src, dst = Path(src), Path(dst)
    started = time.perf_counter()
    model = _load_model(src, external_data=True)
    info = _info_from_model(model, src)
    if info.input.fixed_batch is None:
        if _uses_external_data(src):  # its weights' file is named relative to src
            write_model_atomic(model, dst)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            with replacing(dst) as tmp:
                shutil.copyfile(src, tmp)
        return True
    fixed = info.input.fixed_batch
    original = model.SerializeToString()

    graph = model.graph
    for dim in _fixed_batch_dims(_real_inputs(graph)) + _fixed_batch_dims(graph.output):
        dim.ClearField("dim_value")
        dim.dim_param = BATCH_DIM_NAME
    # Shapes inferred at the fixed batch would contradict the new declaration.
    del graph.value_info[:]
    dynamic = model.SerializeToString()

    decl = _info_from_model(model, src).input
    if not _runs_batched(original, dynamic, decl, fixed, probe_batch, src):
        logger.info("%s keeps its fixed batch of %d", src, fixed)
        return False
    write_model_atomic(model, dst)
    logger.info("%s: batch made dynamic in %s (%.1f s)", src, dst, time.perf_counter() - started)
    return True
