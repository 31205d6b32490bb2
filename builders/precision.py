"""Precision preparation: decide FP32 / FP16 / INT8 in the ONNX graph, before any build.

TensorRT 10 deprecated and TensorRT 11 removed the builder's FP16/INT8 flags and the
INT8 calibrators: networks are *strongly typed*, every tensor runs in the type the
ONNX graph gives it. So precision is prepared here, on any machine, with ONNX and
ONNX Runtime only (no ModelOpt, no TensorRT):

* ``fp32``: the model as it is.
* ``fp16``: ONNX Runtime's float16 converter with FP32 inputs/outputs kept and the
  numerically sensitive ops (normalisations, softmax, reductions, exp/log) left in FP32
  behind Cast nodes; the graph is then topologically re-sorted and checked.
* ``int8``: explicit Q/DQ (ONNX Runtime ``quantize_static``, QDQ format): int8,
  symmetric activations and weights, per-channel weights, biases left unquantised, only
  Conv/MatMul/Gemm quantised; activation ranges by MinMax on real images preprocessed by
  the model's own pipeline (:mod:`builders.calibration`). The unquantised rest of the
  graph is then converted to FP16 as above (Q/DQ scales become FP16, which needs opset
  19), because in a strongly typed build an FP32 layer runs in FP32.

Every prepared graph is run with ONNX Runtime on the CPU against FP32 on the
calibration images and the agreement (argmax agreement, max |dp| on probabilities, KL)
is recorded. Prepared files are cached in ``out_dir`` next to a ``.prep.json`` sidecar
and reused while the source ONNX, precision, calibration set and recipe are unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx.version_converter import ConvertError

from builders.calibration import (
    DEFAULT_CALIBRATION_BATCH,
    CalibrationSet,
    PreprocessFn,
    load_calibration_set,
    ort_data_reader,
)
from builders.manifest import onnx_sha256, sha256_file
from builders.onnx_io import ort_errors, ort_load_error, ort_run_error, quiet_run_options, write_model_atomic
from engine.backends.base import zero_padded
from engine.errors import InputError, ModelError
from engine.fileio import write_bytes_atomic
from engine.specs import ModelSpec, OutputKind, spec_as_dict

logger = logging.getLogger(__name__)

# Bump when the conversion recipe changes: cached prepared files are then rebuilt.
RECIPE_VERSION = 1


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


# Ops kept in FP32 inside FP16 graphs: normalisations, softmax and reductions accumulate
# or divide and lose most when run in half precision; exp/log overflow easily.
FP32_OPS: frozenset[str] = frozenset(
    {
        "LayerNormalization",
        "GroupNormalization",
        "InstanceNormalization",
        "BatchNormalization",
        "LpNormalization",
        "Softmax",
        "LogSoftmax",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceProd",
        "GlobalAveragePool",
        "GlobalLpPool",
        "Exp",
        "Log",
    }
)

INT8_OPS: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
QDQ_FP16_MIN_OPSET = 19
CALIBRATION_RUN_BATCH = 1  # QuantizeLinear/DequantizeLinear accept FP16 scales from opset 19


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class AgreementBounds:
    """Limits a prepared model must meet against FP32 on the calibration images."""

    min_argmax_agreement: float
    max_abs_dp: float
    max_mean_kl: float

    @classmethod
    def default(cls, precision: Precision) -> "AgreementBounds":
        if precision is Precision.INT8:
            return cls(min_argmax_agreement=0.85, max_abs_dp=0.15, max_mean_kl=0.01)
        return cls(min_argmax_agreement=0.95, max_abs_dp=0.02, max_mean_kl=1e-4)


@dataclass(frozen=True)
class Agreement:
    """How a prepared model's outputs compare with FP32's on the same images."""

    images: int
    argmax_agreement: float  # fraction of images with the same top class
    max_abs_dp: float  # max over images and classes of |p_test - p_fp32|
    mean_kl: float  # mean over images of KL(p_fp32 || p_test), nats
    max_kl: float
    max_abs_doutput: float  # on the raw output (logits or probabilities)
    nonfinite: int  # images whose prepared output has NaN/Inf
    softmax_applied: bool  # outputs were logits, compared after a softmax

    def violations(self, bounds: AgreementBounds) -> list[str]:
        out = []
        if self.nonfinite:
            out.append(f"{self.nonfinite} image(s) give NaN/Inf")
        if self.argmax_agreement < bounds.min_argmax_agreement:
            out.append(f"argmax agreement {self.argmax_agreement:.3f} < {bounds.min_argmax_agreement}")
        if not self.max_abs_dp <= bounds.max_abs_dp:
            out.append(f"max |dp| {self.max_abs_dp:.2e} > {bounds.max_abs_dp:.2e}")
        if not self.mean_kl <= bounds.max_mean_kl:
            out.append(f"mean KL {self.mean_kl:.2e} > {bounds.max_mean_kl:.2e}")
        return out

    def summary(self) -> str:
        return (
            f"{self.images} images: argmax agreement {self.argmax_agreement:.1%}, max |dp| {self.max_abs_dp:.2e}, "
            f"KL mean {self.mean_kl:.2e} max {self.max_kl:.2e}, max |d output| {self.max_abs_doutput:.2e}"
            + (f", {self.nonfinite} non-finite" if self.nonfinite else "")
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PreparedModel:
    """An ONNX graph with its precision decided, ready for a strongly typed build."""

    path: Path
    precision: Precision
    source_sha256: str
    sha256: str  # of ``path`` (what the engine manifest records)
    agreement: Agreement | None  # None: not checked (FP32, or FP16 without images)
    calibration_sha256: str | None = None
    calibration_images: int = 0
    fp16_in_int8: bool = False  # INT8 graph carries FP16 in its unquantised layers
    notes: tuple[str, ...] = ()
    from_cache: bool = False


@dataclass(frozen=True)
class CpuSpeed:
    precision: str
    batch_size: int
    images_per_s: float
    seconds_per_batch: float
    iterations: int
    threads: int


# --------------------------------------------------------------------------- graph passes


def fold_identity_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove ``Identity`` nodes whose input is an initializer (the legacy exporter
    emits them for shared weights), rewiring consumers to the initializer, so that the
    quantiser sees those weights as weights. Identity nodes producing graph outputs stay."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    if not rename:
        return model
    del graph.node[:]
    graph.node.extend(keep)
    _rename_uses(graph, rename)
    return model


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node carries as attributes (If branches, Loop and Scan bodies)."""
    subs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            subs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            subs.extend(attr.graphs)
    return subs


def _rename_uses(graph: onnx.GraphProto, rename: Mapping[str, str]) -> None:
    """Point every use of a name in ``rename`` at its new name, in ``graph`` and in the
    subgraphs under it (which may use outer values by name); stale value_info goes."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for sub in _subgraphs(node):  # names are unique across scopes (SSA): none is shadowed
            _rename_uses(sub, rename)
    stale = [vi for vi in graph.value_info if vi.name in rename]
    for vi in stale:
        graph.value_info.remove(vi)


def topological_sort(model: onnx.ModelProto) -> onnx.ModelProto:
    """Reorder the main graph's nodes so every input is produced before use (the float16
    converter appends its Cast nodes at the end). Raises ModelError on a cycle."""
    graph = model.graph
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = list(graph.node)
    producers = {out: idx for idx, node in enumerate(nodes) for out in node.output}
    # inputs of subgraphs (If/Loop bodies) that come from the outer scope count too
    needs: list[set[str]] = []
    for node in nodes:
        names = set(node.input)
        for sub in _subgraphs(node):
            names |= _outer_names(sub)
        needs.append({n for n in names if n not in available and n in producers})
    consumers: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    indegree = [0] * len(nodes)
    for idx, names in enumerate(needs):
        deps = {producers[n] for n in names}
        indegree[idx] = len(deps)
        for dep in deps:
            consumers[dep].append(idx)
    ready = [i for i in range(len(nodes)) if indegree[i] == 0]
    order: list[int] = []
    while ready:
        idx = ready.pop(0)
        order.append(idx)
        for nxt in consumers[idx]:
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
    if len(order) != len(nodes):
        raise ModelError("ONNX graph has a cycle; cannot sort it")
    sorted_nodes = [nodes[i] for i in order]
    del graph.node[:]
    graph.node.extend(sorted_nodes)
    return model


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """The names ``graph`` (a subgraph) and the subgraphs in it take from outer scopes."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names: set[str] = set()
    for node in graph.node:
        names |= {n for n in node.input if n not in local}
        for sub in _subgraphs(node):
            names |= {n for n in _outer_names(sub) if n not in local}
        local |= set(node.output)
    return names


def name_nodes_uniquely(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node without a name, or with a name an earlier node has, a name of its
    own (``<op>_<n>``), in the main graph and in every subgraph; in place, returned.

    ONNX does not ask node names to be unique, but ONNX Runtime's float16 converter up to
    1.23 (the last release for Python 3.10) names the Casts it puts around a kept-FP32 node
    after that node: two unnamed ones made two Casts with the same output, a cycle."""
    graphs = [model.graph]
    for graph in graphs:  # grows as it goes: subgraphs of subgraphs too
        for node in graph.node:
            graphs.extend(_subgraphs(node))
    nodes = [node for graph in graphs for node in graph.node]
    used = {node.name for node in nodes}  # new names avoid every name already there
    kept: set[str] = set()
    count = 0
    for node in nodes:
        if node.name and node.name not in kept:
            kept.add(node.name)
            continue
        while f"{node.op_type}_{count}" in used:
            count += 1
        node.name = f"{node.op_type}_{count}"
        used.add(node.name)
    return model


def convert_fp16(model: onnx.ModelProto, keep_fp32_ops: frozenset[str] = FP32_OPS) -> onnx.ModelProto:
    """Mixed precision: FP16 everywhere except graph I/O and ``keep_fp32_ops``."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(
        name_nodes_uniquely(model),
        keep_io_types=True,
        op_block_list=sorted(keep_fp32_ops),
        disable_shape_infer=False,
    )
    model = topological_sort(drop_repeated_casts(model))
    _check(model, "FP16 conversion")
    return model


def drop_repeated_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep one of each set of identical Cast nodes with the same output in the main graph
    (and one of each identical value_info); in place, returned.

    ONNX Runtime's float16 converter from 1.25 to 1.31 (the GPU image has 1.30) adds, for
    every kept-FP32 node that takes a given FP16 value, its own Cast named
    ``<value>_cast_to_fp32``: a value two such nodes take (e.g. one initializer the
    exporter shared between LayerNorms and Muls) is then produced twice, which the checker
    refuses (SSA). 1.32 makes one Cast per value and shares it; so does this."""
    graph = model.graph
    nodes = _without_repeats(graph.node, lambda n: tuple(n.output), lambda n: n.op_type == "Cast")
    if len(nodes) != len(graph.node):
        del graph.node[:]
        graph.node.extend(nodes)
        infos = _without_repeats(graph.value_info, lambda vi: vi.name)
        del graph.value_info[:]
        graph.value_info.extend(infos)
    return model


def _without_repeats(items, key, droppable=lambda item: True) -> list:
    """``items`` less each droppable one that is byte for byte an earlier item of the same
    ``key`` (the first of each key is the one compared with)."""
    first: dict[Any, bytes] = {}
    kept = []
    for item in items:
        blob = item.SerializeToString(deterministic=True)
        if droppable(item) and first.get(key(item)) == blob:
            continue
        first.setdefault(key(item), blob)
        kept.append(item)
    return kept


def upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= opset:
        return model
    from onnx import version_converter

    return version_converter.convert_version(model, opset)


def _check(model: onnx.ModelProto, what: str) -> None:
    try:
        if model.ByteSize() < 2**31 - 2**20:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{what} produced an invalid ONNX graph: {str(exc).splitlines()[0]}") from None


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read ONNX file {path}: {exc}") from None


# --------------------------------------------------------------------------- running on the CPU


def cpu_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
        raise ort_load_error(path, exc) from exc


def single_input_name(session) -> str:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"expected a model with one image input, found {[i.name for i in inputs]}")
    return inputs[0].name


def graph_input_name(model: onnx.ModelProto, where: Path) -> str:
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != 1:
        raise ModelError(f"{where}: expected a model with one image input, found {names}")
    return names[0]


def input_feed(dims: Sequence[Any], float16: bool) -> tuple[int | None, np.dtype]:
    """(fixed batch or None, NumPy dtype) of a model input, from its dims and whether it
    is float16: a graph pinned to a batch is fed exactly that many rows, and a float16
    input gets float16 tensors."""
    first = dims[0] if len(dims) else None
    fixed = int(first) if isinstance(first, (int, np.integer)) and int(first) > 0 else None
    return fixed, np.dtype(np.float16 if float16 else np.float32)


def run_cpu(path: Path, tensors: np.ndarray, batch_size: int = DEFAULT_CALIBRATION_BATCH) -> np.ndarray:
    """The first output of ``path`` on ``tensors``, batch by batch, with ONNX Runtime on
    the CPU (at the graph's own batch where it is pinned to one, the last batch padded)."""
    session = cpu_session(path)
    name = single_input_name(session)
    feed = session.get_inputs()[0]
    fixed, dtype = input_feed(feed.shape, feed.type == "tensor(float16)")
    step = fixed or batch_size
    quiet = quiet_run_options()
    outs = []
    for i in range(0, len(tensors), step):
        chunk = np.ascontiguousarray(tensors[i : i + step], dtype=dtype)
        feed_rows = zero_padded(chunk, fixed) if fixed else chunk
        try:
            outs.append(session.run(None, {name: feed_rows}, quiet)[0][: len(chunk)])
        except ort_errors() as exc:
            raise ort_run_error(path, len(feed_rows), exc) from None
    return np.concatenate(outs, axis=0).astype(np.float32)


def to_probabilities(output: np.ndarray, kind: OutputKind) -> tuple[np.ndarray, bool]:
    """Probabilities from a model output, and whether a softmax was applied.

    An output declared as probabilities that is not (negative entries or rows not
    summing to 1) is treated as logits: the published models' output kind is not
    confirmed, and comparing logits as if they were probabilities would mislead."""
    out = np.asarray(output, dtype=np.float64)
    if kind is OutputKind.PROBABILITIES:
        finite = np.isfinite(out).all()
        if finite and (out >= -1e-6).all() and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
            return out, False
    shifted = out - out.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True), True


def compare_outputs(reference: np.ndarray, test: np.ndarray, kind: OutputKind) -> Agreement:
    """Agreement of ``test`` with the FP32 ``reference`` (both (n, classes) raw outputs)."""
    if reference.shape != test.shape:
        raise ModelError(f"output shapes differ: FP32 {reference.shape}, prepared {test.shape}")
    finite_rows = np.isfinite(test).all(axis=1)
    nonfinite = int((~finite_rows).sum())
    p_ref, softmaxed = to_probabilities(reference, kind)
    safe_test = np.where(np.isfinite(test), test, 0.0)
    p_test, _ = to_probabilities(safe_test, OutputKind.LOGITS if softmaxed else kind)
    eps = 1e-12
    kl = np.sum(p_ref * (np.log(p_ref + eps) - np.log(p_test + eps)), axis=1)
    kl = np.where(finite_rows, kl, np.inf)
    agree = (p_ref.argmax(axis=1) == p_test.argmax(axis=1)) & finite_rows
    dp = np.abs(p_ref - p_test)
    dout = np.abs(reference.astype(np.float64) - safe_test)
    return Agreement(
        images=int(reference.shape[0]),
        argmax_agreement=float(agree.mean()),
        max_abs_dp=float(dp.max()) if nonfinite == 0 else float("inf"),
        mean_kl=float(np.mean(kl)),
        max_kl=float(np.max(kl)),
        max_abs_doutput=float(dout.max()) if nonfinite == 0 else float("inf"),
        nonfinite=nonfinite,
        softmax_applied=softmaxed,
    )


def measure_cpu_speed(
    path: Path,
    image_size: int,
    *,
    precision: Precision | str = "",
    batch_size: int = 8,
    min_seconds: float = 3.0,
    max_iterations: int = 50,
    threads: int | None = None,
) -> CpuSpeed:
    """Images/s of ``path`` with ONNX Runtime on the CPU (synthetic input, one warm-up
    batch), fed as :func:`run_cpu` feeds it: at the graph's own batch where it is pinned
    to one (``batch_size`` otherwise), in float16 where its input is float16."""
    session = cpu_session(path, threads)
    name = single_input_name(session)
    feed = session.get_inputs()[0]
    fixed, dtype = input_feed(feed.shape, feed.type == "tensor(float16)")
    batch_size = fixed or batch_size
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((batch_size, 3, image_size, image_size), dtype=np.float32).astype(dtype)
    session.run(None, {name: batch})  # warm-up: allocations, kernel selection
    iterations, started = 0, time.perf_counter()
    while iterations < max_iterations:
        session.run(None, {name: batch})
        iterations += 1
        if time.perf_counter() - started >= min_seconds:
            break
    elapsed = time.perf_counter() - started
    return CpuSpeed(
        precision=Precision(precision).value if precision else "",
        batch_size=batch_size,
        images_per_s=batch_size * iterations / elapsed,
        seconds_per_batch=elapsed / iterations,
        iterations=iterations,
        threads=threads or os.cpu_count() or 1,
    )


# --------------------------------------------------------------------------- INT8


class _pre_process_advice_dropped(logging.Filter):
    """While open: ONNX Runtime's quantiser's advice to run its pre-processing first (two
    WARNING lines on the root logger per model, a URL each) is logged at DEBUG here
    instead. That pre-processing is not run on purpose: it rewrites the graph with ONNX
    Runtime's own optimiser, and this graph is also what TensorRT parses. (The engine's
    own exports come out of torch with BatchNorm already folded into Conv; a user's ONNX
    is quantised as given.)

    ONNX Runtime logs it with ``logging.warning``, which configures the root logger
    (``basicConfig``) of a program that has not: an unconfigured root holds a
    :class:`_LastResort` meanwhile, so the program's logging is left as it was and its
    warnings still reach stderr as they would have."""

    PREFIX = "Please consider"
    _stand_in: "logging.Handler | None" = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.PREFIX) and "pre-processing" in message:
            logger.debug("ONNX Runtime: %s", message.strip())
            return False
        return True

    def __enter__(self) -> "_pre_process_advice_dropped":
        root = logging.getLogger()
        if not root.handlers:
            self._stand_in = _LastResort()
            root.addHandler(self._stand_in)
        root.addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeFilter(self)
        if self._stand_in is not None:
            root.removeHandler(self._stand_in)
            self._stand_in = None


class _LastResort(logging.Handler):
    """A root handler standing in for "no handler at all": a record that no other
    handler on its way up takes goes to :data:`logging.lastResort`, as it would have."""

    def emit(self, record: logging.LogRecord) -> None:
        at = logging.getLogger(record.name)
        root = logging.getLogger()
        while at is not None and at is not root:
            if at.handlers:
                return  # handled on the way up: no last resort then
            at = at.parent
        last = logging.lastResort
        if last is not None and record.levelno >= last.level:
            last.handle(record)


def quantize_int8(
    source: onnx.ModelProto,
    out_path: Path,
    calib: CalibrationSet,
    input_name: str,
    *,
    fp16: bool = True,
    batch_size: int = DEFAULT_CALIBRATION_BATCH,
) -> tuple[bool, tuple[str, ...]]:
    """Write an explicit Q/DQ INT8 graph of ``source`` to ``out_path``.

    Returns (whether the unquantised layers are FP16, notes). If the FP16 step cannot be
    done (opset upgrade or conversion fails, or ONNX Runtime rejects the result) the
    INT8 graph keeps FP32 in its unquantised layers and a note says so.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    notes: list[str] = []
    started = time.perf_counter()
    logger.info("INT8 calibration (MinMax) on %d images: start", len(calib))
    decl = next(i for i in source.graph.input if i.name == input_name)
    tensor_type = decl.type.tensor_type
    fixed, feed_dtype = input_feed([d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim],
                                   tensor_type.elem_type == onnx.TensorProto.FLOAT16)
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        qdq_path = Path(tmp) / "qdq.onnx"
        write_model_atomic(fold_identity_initializers(source), fp32_path)
        try:
            with _pre_process_advice_dropped():
                quantize_static(
                    str(fp32_path),
                    str(qdq_path),
                    # one image per calibration run: ONNX Runtime keeps every calibrated tensor of
                    # a run alive (CAFormer-S36 at 384: ~2.5 GB per image in the batch)
                    ort_data_reader(calib, input_name, fixed or CALIBRATION_RUN_BATCH, dtype=feed_dtype,
                                    pad=fixed is not None),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(INT8_OPS),
                    per_channel=True,
                    reduce_range=False,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    calibration_providers=["CPUExecutionProvider"],
                    extra_options={
                        "ActivationSymmetric": True,
                        "WeightSymmetric": True,
                        "QuantizeBias": False,
                        "UseQDQContribOps": False,
                        "DedicatedQDQPair": False,
                        # Q/DQ on the inputs of the quantised ops only, as TensorRT recommends:
                        # outputs (logits included) stay in higher precision.
                        "OpTypesToExcludeOutputQuantization": list(INT8_OPS),
                    },
                )
        except (*ort_errors(), onnx.checker.ValidationError) as exc:
            # ONNX Runtime's quantiser rejects some graphs (old opsets it cannot convert,
            # shapes it cannot infer): a model problem, said in one line
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise ModelError(f"INT8 quantisation by ONNX Runtime failed on this model: {first}") from None
        logger.info("INT8 calibration: finished in %.1f s", time.perf_counter() - started)
        qdq = onnx.load(str(qdq_path))
        foreign = sorted({n.domain for n in qdq.graph.node if n.domain not in ("", "ai.onnx")})
        if foreign:
            raise ModelError(f"INT8 quantisation produced non-standard ops (domains {foreign}); TensorRT cannot parse them")
        counts = _count_ops(qdq)
        notes.append(
            f"Q/DQ: {counts.get('QuantizeLinear', 0)} QuantizeLinear, {counts.get('DequantizeLinear', 0)} DequantizeLinear"
        )
        fp16_done = False
        if fp16:
            try:
                mixed = upgrade_opset(qdq, QDQ_FP16_MIN_OPSET)
                mixed = convert_fp16(mixed)
                candidate = Path(tmp) / "qdq_fp16.onnx"
                write_model_atomic(mixed, candidate)
                cpu_session(candidate)  # ONNX Runtime must accept the graph
                write_model_atomic(mixed, out_path)
                fp16_done = True
            except (ModelError, onnx.checker.ValidationError, ConvertError, RuntimeError, ValueError) as exc:
                msg = f"FP16 in the unquantised INT8 layers not possible ({str(exc).splitlines()[0]}); they stay FP32"
                logger.warning(msg)
                notes.append(msg)
        if not fp16_done:
            write_model_atomic(qdq, out_path)
    return fp16_done, tuple(notes)


def _count_ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# --------------------------------------------------------------------------- prepare


STALE_TEMP_S = 24 * 3600  # no preparation runs this long: an older temp file is a killed run's


def _remove_stale_temp_files(folder: Path) -> None:
    """Temp files of preparations killed mid-save (they have names of their own, so
    nothing else replaces them)."""
    now = time.time()
    for tmp in folder.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()
                logger.info("removed %s, left by a preparation that was stopped", tmp)
        except OSError:
            pass  # gone already, or not ours to remove


def prepared_path(
    out_dir: Path,
    spec: ModelSpec,
    precision: Precision,
    source_sha: str,
    calib_sha: str | None = None,
    *,
    fp16_in_int8: bool = True,
) -> Path:
    """Where the prepared graph of this source (and calibration set) is kept: one file
    per (spec, precision, source, calibration set and the preprocessing it went through,
    FP16 or FP32 in the unquantised INT8 layers), so runs that alternate between models,
    sets or settings reuse each one instead of redoing it every time, and two processes
    preparing different recipes never write the same file."""
    calib = ""
    if calib_sha:
        tensors = json.dumps([calib_sha, spec_as_dict(spec)["preprocess"]], sort_keys=True)  # what calibration saw
        calib = f".c{hashlib.sha256(tensors.encode()).hexdigest()[:10]}"
    rest = ".fp32rest" if precision is Precision.INT8 and not fp16_in_int8 else ""
    return Path(out_dir) / f"{spec.key.replace('/', '-')}.{precision.value}{rest}.{source_sha[:12]}{calib}.onnx"


def _recipe_key(
    source_sha: str, spec: ModelSpec, precision: Precision, calib_sha: str | None, fp16_in_int8: bool
) -> dict[str, Any]:
    import onnxruntime

    return {
        "recipe_version": RECIPE_VERSION,
        "source_sha256": source_sha,
        "precision": precision.value,
        "calibration_sha256": calib_sha,
        "preprocess": spec_as_dict(spec)["preprocess"] if calib_sha else None,
        "fp32_ops": sorted(FP32_OPS) if precision is not Precision.FP32 else None,
        "int8_ops": list(INT8_OPS) if precision is Precision.INT8 else None,
        "fp16_in_int8": fp16_in_int8 if precision is Precision.INT8 else None,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _load_cached(path: Path, sidecar: Path, key: Mapping[str, Any], precision: Precision) -> PreparedModel | None:
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable preparation record %s: %s", sidecar, exc)
        return None
    if data.get("key") != json.loads(json.dumps(key)):
        logger.info("prepared %s is stale (source, calibration set or recipe changed); redoing it", path.name)
        return None
    sha = sha256_file(path)
    if sha != data.get("sha256"):
        logger.info("prepared %s was modified after preparation; redoing it", path.name)
        return None
    agreement = Agreement(**data["agreement"]) if data.get("agreement") else None
    return PreparedModel(
        path=path,
        precision=precision,
        source_sha256=key["source_sha256"],
        sha256=sha,
        agreement=agreement,
        calibration_sha256=key["calibration_sha256"],
        calibration_images=int(data.get("calibration_images", 0)),
        fp16_in_int8=bool(data.get("fp16_in_int8", False)),
        notes=tuple(data.get("notes", ())),
        from_cache=True,
    )


def prepare(
    model_onnx: Path,
    spec: ModelSpec,
    precision: Precision | str,
    calib_images: Sequence[Path] | None,
    out_dir: Path,
    *,
    bounds: AgreementBounds | None = None,
    strict: bool = False,
    force: bool = False,
    fp16_in_int8: bool = True,
    batch_size: int = DEFAULT_CALIBRATION_BATCH,
    preprocess: PreprocessFn | None = None,
    calib: CalibrationSet | None = None,
    output_kind: OutputKind | None = None,
    source_sha256: str | None = None,
) -> PreparedModel:
    """Prepare ``model_onnx`` for a strongly typed build at ``precision``.

    ``calib_images`` (a :class:`builders.calibration.CalibrationImages`, whose hash is
    then not read again, or paths, e.g. from :func:`find_calibration_images`) are
    required for INT8 and optional for FP16; when given, the prepared graph is checked
    against FP32 on them and :attr:`PreparedModel.agreement` is filled in.
    Agreement outside ``bounds`` (default :meth:`AgreementBounds.default`) is logged as
    a warning, or raised as :class:`ModelError` when ``strict``. ``calib`` passes
    already preprocessed tensors (then ``calib_images`` is ignored). ``output_kind``
    overrides ``spec.output`` (e.g. ``ResolvedModel.output_kind``); ``source_sha256`` is
    :func:`onnx_sha256` of ``model_onnx`` when the caller already has it (e.g.
    ``ResolvedModel.source_sha256``), so the file is not read again. The result is reused
    from ``out_dir`` while nothing it depends on changed, unless ``force``.
    """
    precision = Precision(precision)
    model_onnx = Path(model_onnx)
    if not model_onnx.is_file():
        raise ModelError(f"ONNX file {model_onnx} does not exist")
    source_sha = source_sha256 or onnx_sha256(model_onnx)
    if precision is Precision.FP32:
        return PreparedModel(path=model_onnx, precision=precision, source_sha256=source_sha, sha256=source_sha, agreement=None)
    if precision is Precision.INT8 and calib is None and not calib_images:
        raise InputError("INT8 needs calibration images: name a folder of typical input images")

    calib_sha = calib.sha256 if calib is not None else None
    if calib is None and calib_images:
        from builders.calibration import CalibrationImages

        if not isinstance(calib_images, CalibrationImages):
            calib_images = CalibrationImages(calib_images)
        calib_sha = calib_images.sha256  # read once by the caller that made the set, shared
    out_path = prepared_path(out_dir, spec, precision, source_sha, calib_sha, fp16_in_int8=fp16_in_int8)
    sidecar = out_path.with_suffix(".prep.json")
    key = _recipe_key(source_sha, spec, precision, calib_sha, fp16_in_int8)
    if not force:
        cached = _load_cached(out_path, sidecar, key, precision)
        if cached is not None:
            logger.info("reusing prepared %s (%s)", out_path.name, cached.agreement.summary() if cached.agreement else "unchecked")
            if strict and cached.agreement is not None:  # the bounds hold for a reused graph too
                problems = cached.agreement.violations(bounds or AgreementBounds.default(precision))
                if problems:
                    raise ModelError(f"{spec.key} {precision.value} disagrees with FP32 beyond bounds: {'; '.join(problems)}")
            return cached

    _remove_stale_temp_files(Path(out_dir))
    started = time.perf_counter()
    logger.info("preparing %s at %s: start", spec.key, precision.value)
    if calib is None and calib_images:
        calib = load_calibration_set(calib_images, spec, batch_size=batch_size, preprocess=preprocess)
    source = _load(model_onnx)
    input_name = graph_input_name(source, model_onnx)
    notes: tuple[str, ...] = ()
    fp16_done = False
    if precision is Precision.FP16:
        write_model_atomic(convert_fp16(fold_identity_initializers(source)), out_path)
    else:
        if calib is None:  # unreachable: INT8 without images was rejected above
            raise InputError("INT8 needs calibration images")
        fp16_done, notes = quantize_int8(
            source, out_path, calib, input_name, fp16=fp16_in_int8, batch_size=batch_size
        )
    del source

    agreement = None
    if calib is not None:
        agreement = check_agreement(
            model_onnx, out_path, calib, output_kind or spec.output, batch_size=batch_size
        )
        logger.info("%s %s vs FP32: %s", spec.key, precision.value, agreement.summary())
        problems = agreement.violations(bounds or AgreementBounds.default(precision))
        if problems:
            msg = f"{spec.key} {precision.value} disagrees with FP32 beyond bounds: {'; '.join(problems)}"
            if strict:
                raise ModelError(msg)
            logger.warning(msg)
            notes = notes + (msg,)
    else:
        logger.info("%s %s: no calibration images given, agreement with FP32 not checked", spec.key, precision.value)

    # The cache key names the source by the hash read before (possibly long before, by
    # the caller): a file replaced since must not be cached under its predecessor's key.
    if onnx_sha256(model_onnx) != source_sha:
        out_path.unlink(missing_ok=True)
        raise ModelError(f"{model_onnx} changed while it was being prepared; run again once it is complete")
    sha = sha256_file(out_path)
    record = {
        "key": key,
        "sha256": sha,
        "agreement": agreement.as_dict() if agreement else None,
        "calibration_images": len(calib) if calib is not None else 0,
        "fp16_in_int8": fp16_done,
        "notes": list(notes),
    }
    write_bytes_atomic(sidecar, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    logger.info("preparing %s at %s: finished in %.1f s", spec.key, precision.value, time.perf_counter() - started)
    return PreparedModel(
        path=out_path,
        precision=precision,
        source_sha256=source_sha,
        sha256=sha,
        agreement=agreement,
        calibration_sha256=calib_sha,
        calibration_images=len(calib) if calib is not None else 0,
        fp16_in_int8=fp16_done,
        notes=notes,
    )


def check_agreement(
    reference_onnx: Path,
    prepared_onnx: Path,
    calib: CalibrationSet,
    output_kind: OutputKind,
    *,
    batch_size: int = DEFAULT_CALIBRATION_BATCH,
) -> Agreement:
    """Run both graphs with ONNX Runtime on the CPU over the calibration tensors and compare."""
    started = time.perf_counter()
    reference = run_cpu(reference_onnx, calib.tensors, batch_size)
    test = run_cpu(prepared_onnx, calib.tensors, batch_size)
    logger.debug("agreement check on %d images took %.1f s", len(calib), time.perf_counter() - started)
    return compare_outputs(reference, test, output_kind)
