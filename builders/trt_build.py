"""TensorRT engines from prepared ONNX graphs, the TensorRT 10/11 way.

The precision is already decided in the graph (:mod:`builders.precision`), so the
network is created *strongly typed* and no precision flag is set on the builder (TRT 11
has none). What this module adds is the build configuration: an optimisation profile
over batch sizes, a workspace limit, the builder optimisation level and a persistent
timing cache; and the bookkeeping: every engine is stored with a
:class:`~builders.manifest.Manifest` in an :class:`~builders.manifest.EngineCache` and
reused only when the manifest key matches.

``tensorrt`` is imported lazily, inside :func:`build_engine`; everything up to the
TensorRT calls (profile, manifest, cache lookup, GPU query) is plain Python and tested
on machines without a GPU. Without TensorRT or a GPU :func:`build_engine` raises
:class:`TensorRTUnavailable`, one line the CLI prints after the prepared ONNX and its
agreement have been reported.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import onnx

from builders.manifest import BuildTarget, EngineCache, Manifest, ShapeRange
from builders.precision import PreparedModel
from engine.errors import DependencyError, EngineError, ModelError
from engine.executor import MIN_DEPTH
from engine.fileio import write_bytes_atomic
from engine.specs import Architecture, ModelSpec

logger = logging.getLogger(__name__)

DEFAULT_WORKSPACE_BYTES = 4 << 30
DEFAULT_OPTIMIZATION_LEVEL = 3  # TensorRT's own default; 0 (fast build) .. 5 (slowest, most tactics)
# Optimisation profiles per engine, all the same batch range: on a dynamic-shape engine
# TensorRT gives each execution context in concurrent use its own profile, and the
# streamed executor keeps one context per ring slot (MIN_DEPTH, the depth every caller
# uses). More cost engine size and build time, not memory at run time.
DEFAULT_CONTEXTS = MIN_DEPTH
MAX_CONTEXTS = 16


class TensorRTUnavailable(DependencyError):
    """The engine build step cannot run here (no TensorRT package, or no usable GPU)."""

    def __init__(self, reason: str) -> None:
        EngineError.__init__(
            self,
            f"TensorRT engine build needs TensorRT and an NVIDIA GPU ({reason}); the prepared ONNX is ready, "
            "run `engine build` again on a GPU machine with pip install 'anime-batch-engine[gpu]'",
        )
        self.package = "tensorrt"
        self.extra = "gpu"
        self.reason = reason


# --------------------------------------------------------------------------- profile and options


MAX_PROFILE_BATCH = 4096  # engine run's and the frames API's largest batch size


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes the engine accepts (min..max) and is tuned for (opt)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.min, self.opt, self.max)):
            raise ModelError("batch profile sizes must be integers")
        if not 1 <= self.min <= self.opt <= self.max:
            raise ModelError(f"batch profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        if self.max > MAX_PROFILE_BATCH:
            raise ModelError(f"batch profile max {self.max} is above {MAX_PROFILE_BATCH}, the largest batch "
                             f"`engine run` takes")

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        """``"1,32,64"`` or ``"1:32:64"`` (min, opt, max)."""
        parts = [p for p in re.split(r"[,:/ ]+", text.strip()) if p]
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ModelError(f"batch profile must be three integers min,opt,max; got {text!r}")
        return cls(*(int(p) for p in parts))


# Sized for a data-centre GPU: the small ResNet saturates at large batches, CAFormer-S36
# at 384 (22 GMACs per image) at a few dozen.
_DEFAULT_PROFILES: dict[Architecture, BatchProfile] = {
    Architecture.RESNET18: BatchProfile(1, 128, 256),
    Architecture.RESNET50: BatchProfile(1, 64, 128),
    Architecture.CAFORMER_S36: BatchProfile(1, 32, 64),
}


def default_profile(spec: ModelSpec) -> BatchProfile:
    return _DEFAULT_PROFILES.get(spec.architecture, BatchProfile(1, 32, 64))


def engine_profile(spec: ModelSpec, fixed_batch: int | None, given: BatchProfile | None = None) -> BatchProfile:
    """The batch profile to build ``spec``'s engine with: ``given`` (``--<task>-profile``)
    or the architecture's default; for a model that runs a fixed batch (its graph pins
    it, or the batching check of :func:`engine.models.resolve_model` found that its
    rows are not independent) only that batch, whatever the graph declares: a run
    feeds such an engine batches in pieces of it."""
    if fixed_batch is None:
        return given or default_profile(spec)
    pinned = BatchProfile(fixed_batch, fixed_batch, fixed_batch)
    if given is not None and given != pinned:
        raise ModelError(f"{spec.key}: the model runs a fixed batch of {fixed_batch}, so its engine's batch profile "
                         f"is {fixed_batch},{fixed_batch},{fixed_batch}, not {given.min},{given.opt},{given.max}; "
                         f"drop --{spec.task.value}-profile")
    return pinned


@dataclass(frozen=True)
class BuildOptions:
    """How to build. Engines are built on CUDA device 0, the device TensorRT uses when
    nothing else is made current (pick another GPU with CUDA_VISIBLE_DEVICES), and the
    manifest names that device."""

    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL
    timing_cache: bool = True  # load and save <cache_dir>/timing.*.cache
    contexts: int = DEFAULT_CONTEXTS  # identical optimisation profiles (see DEFAULT_CONTEXTS)

    def __post_init__(self) -> None:
        if isinstance(self.contexts, bool) or not isinstance(self.contexts, int) or not 1 <= self.contexts <= MAX_CONTEXTS:
            raise ModelError(f"concurrent execution contexts must be an integer 1..{MAX_CONTEXTS}, got {self.contexts!r}")
        if self.workspace_bytes < (16 << 20):
            raise ModelError(f"workspace limit must be at least 16 MiB, got {self.workspace_bytes} bytes")
        if not 0 <= self.optimization_level <= 5:
            raise ModelError(f"builder optimisation level must be 0..5, got {self.optimization_level}")


@dataclass(frozen=True)
class EngineArtifact:
    path: Path  # the serialised engine
    manifest_path: Path
    manifest: Manifest
    from_cache: bool


# --------------------------------------------------------------------------- shapes and manifest


def input_shape_range(onnx_path: Path, spec: ModelSpec, profile: BatchProfile) -> ShapeRange:
    """The profile for the model's single image input: batch from ``profile``, the rest
    from the graph (or the spec's image size where the graph leaves it dynamic)."""
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except OSError as exc:
        raise ModelError(f"cannot read ONNX file {onnx_path}: {exc.strerror or exc}") from None
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"{onnx_path}: expected one image input, found {[i.name for i in inputs]}")
    decl = inputs[0]
    dims = decl.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ModelError(f"{onnx_path}: input {decl.name!r} has rank {len(dims)}, expected NCHW")
    size = spec.preprocess.size
    rest = []
    for i, dim in enumerate(dims[1:], start=1):
        value = dim.dim_value if dim.HasField("dim_value") else (3 if i == 1 else size)
        rest.append(int(value))
    if rest != [3, size, size]:
        raise ModelError(f"{onnx_path}: input {decl.name!r} is {['N', *rest]}, spec {spec.key} expects N x 3 x {size} x {size}")
    batch = dims[0]
    if batch.HasField("dim_value") and batch.dim_value > 0:
        fixed = int(batch.dim_value)
        if (profile.min, profile.max) != (fixed, fixed):
            raise ModelError(
                f"{onnx_path}: input batch is fixed at {fixed}; the batch profile must be {fixed},{fixed},{fixed}"
            )
    return ShapeRange(
        name=decl.name,
        min=(profile.min, *rest),
        opt=(profile.opt, *rest),
        max=(profile.max, *rest),
    )


def output_names(onnx_path: Path) -> tuple[str, ...]:
    model = onnx.load(str(onnx_path), load_external_data=False)
    return tuple(o.name for o in model.graph.output)


def plan_manifest(
    prepared: PreparedModel,
    spec: ModelSpec,
    profile: BatchProfile,
    target: BuildTarget,
    options: BuildOptions = BuildOptions(),
) -> Manifest:
    """The manifest an engine built now would carry (provenance fields empty). Its key
    is what the cache is searched for."""
    shape = input_shape_range(prepared.path, spec, profile)
    return Manifest(
        model=spec.key,
        onnx_sha256=prepared.sha256,
        precision=prepared.precision.value,
        profile=(shape,),
        target=target,
        builder_optimization_level=options.optimization_level,
        workspace_bytes=options.workspace_bytes,
        contexts=options.contexts,
        source_onnx_sha256=prepared.source_sha256,
        input_names=(shape.name,),
        output_names=output_names(prepared.path),
    )


def timing_cache_path(cache_dir: Path, target: BuildTarget) -> Path:
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", target.gpu_name).strip("-").lower() or "gpu"
    return Path(cache_dir) / f"timing.{gpu}.sm{target.compute_capability}.trt{target.tensorrt_version}.cache"


# --------------------------------------------------------------------------- environment


def gpu_info(device: int = 0) -> tuple[str, str]:
    """(name, "major.minor") of CUDA device ``device`` through the driver API (no toolkit,
    no pycuda). Raises :class:`TensorRTUnavailable` when there is no usable GPU."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise TensorRTUnavailable("no NVIDIA driver: libcuda.so.1 not found") from None
    if cuda.cuInit(0) != 0:
        raise TensorRTUnavailable("the CUDA driver is present but cuInit failed (no usable GPU)")
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= device:
        raise TensorRTUnavailable(f"CUDA device {device} is not visible ({count.value} device(s))")
    handle = ctypes.c_int(0)
    if cuda.cuDeviceGet(ctypes.byref(handle), device) != 0:
        raise TensorRTUnavailable(f"cannot open CUDA device {device}")
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, handle)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, handle)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, handle)
    return name.value.decode(errors="replace").strip(), f"{major.value}.{minor.value}"


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` with the reason."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(f"the 'tensorrt' package is not installed ({exc})") from None
    return tensorrt


def tensorrt_unavailable_reason(device: int = 0) -> str | None:
    """Why no engine can be built here, or None. Cheap; loads tensorrt and the driver."""
    try:
        import_tensorrt()
        gpu_info(device)
    except TensorRTUnavailable as exc:
        return exc.reason
    return None


def detect_target(trt, device: int = 0) -> BuildTarget:
    name, cc = gpu_info(device)
    return BuildTarget(gpu_name=name, compute_capability=cc, tensorrt_version=str(trt.__version__))


# --------------------------------------------------------------------------- build


def build_engine(
    prepared: PreparedModel,
    spec: ModelSpec,
    cache_dir: Path,
    profile: BatchProfile | None = None,
    options: BuildOptions = BuildOptions(),
    *,
    force: bool = False,
) -> EngineArtifact:
    """Build (or reuse from ``cache_dir``) the TensorRT engine of ``prepared``.

    Raises :class:`TensorRTUnavailable` without TensorRT or a GPU, :class:`ModelError`
    when the parser rejects the graph (one line per failing node) or the build fails.
    """
    profile = profile or default_profile(spec)
    trt = import_tensorrt()
    target = detect_target(trt)
    wanted = plan_manifest(prepared, spec, profile, target, options)
    cache = EngineCache(cache_dir)
    if not force:
        hit = cache.lookup(wanted)
        if hit is not None:
            logger.info("reusing cached engine %s", hit.engine_path.name)
            return EngineArtifact(hit.engine_path, hit.engine_path.with_suffix(".json"), hit.manifest, True)

    started = time.perf_counter()
    logger.info(
        "building %s %s engine for %s, batch %d/%d/%d, %d profiles: start",
        spec.key, prepared.precision.value, target.describe(), profile.min, profile.opt, profile.max, wanted.contexts,
    )
    trt_logger = _make_logger(trt)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(prepared.path)):
        raise ModelError(f"TensorRT cannot parse {prepared.path}: " + " | ".join(parser_errors(parser)))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.optimization_level
    dynamic = any(int(d) < 0 for i in range(network.num_inputs) for d in network.get_input(i).shape)
    if not dynamic:  # every context of a static engine runs on its one implicit profile
        logger.info("%s: every input shape is fixed; the engine needs no optimisation profiles", spec.key)
    for k in range(wanted.contexts if dynamic else 0):  # profile k serves one context in use at a time
        trt_profile = builder.create_optimization_profile()
        for shape in wanted.profile:
            try:  # the binding raises (it does not return False) on inconsistent shapes
                trt_profile.set_shape(shape.name, shape.min, shape.opt, shape.max)
            except (RuntimeError, TypeError, ValueError) as exc:
                raise ModelError(f"TensorRT refused the shapes {shape.min}/{shape.opt}/{shape.max} of input "
                                 f"{shape.name!r} for {spec.key}: {exc}") from None
        if config.add_optimization_profile(trt_profile) < 0:
            raise ModelError(f"TensorRT refused optimisation profile {k} of {wanted.contexts} for {spec.key}")

    cache_file = timing_cache_path(cache_dir, target)
    if options.timing_cache:
        blob = cache_file.read_bytes() if cache_file.is_file() else b""
        timing = config.create_timing_cache(blob)
        if timing is None and blob:
            logger.warning("timing cache %s is unreadable; starting a new one", cache_file.name)
            timing = config.create_timing_cache(b"")
        if not config.set_timing_cache(timing, ignore_mismatch=False):
            logger.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", cache_file.name)
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(
            f"TensorRT failed to build {spec.key} ({prepared.precision.value}); see the TensorRT messages above"
        )
    engine_bytes = bytes(memoryview(serialized))
    if options.timing_cache:
        write_bytes_atomic(cache_file, bytes(memoryview(config.get_timing_cache().serialize())))

    seconds = time.perf_counter() - started
    manifest = dataclasses.replace(
        wanted, build_seconds=round(seconds, 3), built_at=datetime.now(timezone.utc).isoformat(timespec="seconds")
    )
    entry = cache.store(engine_bytes, manifest)
    logger.info("built %s (%.1f MB) in %.1f s", entry.engine_path.name, len(engine_bytes) / 1e6, seconds)
    return EngineArtifact(entry.engine_path, entry.engine_path.with_suffix(".json"), entry.manifest, False)


def parser_errors(parser) -> list[str]:
    """One line per ONNX parser error: node index, name and operator, then the message."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = f"node {err.node()}"
        name = err.node_name() if hasattr(err, "node_name") else ""
        op = err.node_operator() if hasattr(err, "node_operator") else ""
        if name or op:
            where += f" {name!r} ({op})" if op else f" {name!r}"
        lines.append(f"{where}: {err.desc()} [{err.code()}]")
    return lines or ["the parser reported failure without details"]


_TRT_LOGGER = None


def _make_logger(trt):
    """The process's TensorRT logger, forwarding to this module's :mod:`logging` logger.
    One instance for every Builder and Runtime: TensorRT keeps the first logger it is
    given as its global one (and warns about others), so it must live as long as they do."""
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        _TRT_LOGGER = _new_logger(trt)
    return _TRT_LOGGER


def _new_logger(trt):
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class _Forward(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            # An ILogger subclass is handed every message, VERBOSE included (only
            # trt.Logger filters); the builder emits thousands.
            level = levels.get(severity, logging.INFO)
            if logger.isEnabledFor(level):
                logger.log(level, "TensorRT: %s", msg)

    return _Forward()


def build_all(
    prepared: Sequence[tuple[PreparedModel, ModelSpec]],
    cache_dir: Path,
    profiles: dict[str, BatchProfile] | None = None,
    options: BuildOptions = BuildOptions(),
) -> list[EngineArtifact]:
    """Build every (prepared model, spec) pair; checks TensorRT/GPU once up front."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise TensorRTUnavailable(reason)
    profiles = profiles or {}
    return [build_engine(p, s, cache_dir, profiles.get(s.key), options) for p, s in prepared]
