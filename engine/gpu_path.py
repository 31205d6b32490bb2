"""Which path `engine run` takes, and how the GPU path is put together.

``--device auto`` (the default) takes the GPU path when everything it needs is here:
a visible CUDA device, the packages (DALI, pycuda, and TensorRT or PyTorch for the
chosen GPU backend) and, for TensorRT, an engine for every model at the run's
precision, built for this GPU and TensorRT from the model's own ONNX. Otherwise it
takes the CPU path and says why. ``--device gpu`` refuses to start, in one line, when
anything is missing (for a missing engine: the exact `engine build` command);
``--device cpu`` never looks.

The GPU path: DALI decodes on the GPU (nvJPEG, mixed) and writes every model's view on
one stream; the streamed executor (:mod:`engine.executor` on :class:`engine.gpu.CudaDevice`)
copies each view into its slot, runs TensorRT (or PyTorch on CUDA) and copies the
logits back, overlapping batches; :mod:`engine.streamed_run` is the loop.
"""

from __future__ import annotations

import importlib.util
import logging
import shlex
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from engine.errors import EngineError

if TYPE_CHECKING:
    from builders.manifest import BuildTarget, CacheEntry
    from engine.models import ResolvedModel
    from engine.runner import ModelChoice, RunConfig
    from engine.specs import ModelSpec

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")
GPU_BACKENDS = ("tensorrt", "torch")
# What each device runs when --precision is not given: TensorRT engines are built at
# fp16 by default (`engine build`); on the CPU fp32 is the fastest (ONNX Runtime).
DEFAULT_PRECISION = {"gpu": "fp16", "cpu": "fp32"}


@dataclass(frozen=True)
class PathPlan:
    """The path taken (``device``), why, at which precision, and for the TensorRT GPU
    path the engine chosen for each model (spec key -> cache entry)."""

    device: str  # "cpu" | "gpu"
    reason: str
    precision: str
    gpu_backend: str | None = None
    engines: Mapping[str, "CacheEntry"] = field(default_factory=dict)

    def describe(self) -> str:
        if self.device == "cpu":
            return f"CPU path (DALI on the CPU, ONNX Runtime, {self.precision}): {self.reason}"
        what = "TensorRT engines" if self.gpu_backend == "tensorrt" else "PyTorch on CUDA"
        return f"GPU path (DALI on the GPU, streamed executor, {what}, {self.precision}): {self.reason}"


# --------------------------------------------------------------------------- prerequisites


def _missing_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def gpu_problem(gpu_backend: str, device_id: int = 0, *, dali: bool = True) -> str | None:
    """What keeps the GPU path from running here (device, packages), or None. Cheap: no
    context is created, nothing heavy is imported except to ask torch about CUDA.
    ``dali``: whether DALI is needed (the frames API decodes nothing: its kernel does
    the preprocessing)."""
    from engine.gpu import cuda_absent_reason

    reason = cuda_absent_reason(device_id)
    if reason is not None:
        return f"no GPU: {reason}"
    needed = ([("nvidia-dali", "nvidia.dali")] if dali else []) + [("pycuda", "pycuda")]
    missing = [pkg for pkg, module in needed if _missing_module(module)]
    if gpu_backend == "tensorrt" and _missing_module("tensorrt"):
        missing.append("tensorrt")
    if missing:
        return f"the GPU packages are not installed ({', '.join(missing)}): pip install 'anime-batch-engine[gpu]'"
    if gpu_backend == "torch":
        if _missing_module("torch"):
            return "the torch GPU backend needs PyTorch: pip install 'anime-batch-engine[torch]'"
        import torch

        if not torch.cuda.is_available():
            return "PyTorch sees no CUDA device (a CPU-only torch build?)"
    return None


def torch_backend_problem(models: Sequence["ResolvedModel"], choices: Sequence["ModelChoice"], precision: str) -> str | None:
    """The PyTorch backend builds each model in PyTorch: it needs a checkpoint or
    random weights (it cannot run an ONNX file) and runs fp32 or fp16 autocast."""
    if precision not in ("fp32", "fp16"):
        return f"the torch GPU backend runs fp32 or fp16, not {precision}"
    for m, c in zip(models, choices):
        if c.source.checkpoint is None and not c.source.random_weights:
            return (
                f"the torch GPU backend builds {m.spec.key} in PyTorch and needs --{m.spec.task.value}-checkpoint "
                "or --random-weights (it cannot run an ONNX file); TensorRT runs ONNX"
            )
    return None


# --------------------------------------------------------------------------- engines


def build_command(config: "RunConfig", missing: Sequence[tuple["ModelChoice", "ModelSpec"]], precision: str,
                  fixed: Mapping[str, int] | None = None) -> str:
    """The `engine build` command that makes the engines this run looks for (``missing``:
    each model's choice and spec): the same models, sources, spec file and cache, at
    ``precision``, with a batch profile that admits the run's batch size where the
    default would not (not for the models in ``fixed``, by spec key: `engine build`
    gives those their fixed batch)."""
    from builders.trt_build import default_profile

    choices = [c for c, _ in missing]
    args = ["engine", "build", "--precision", precision]
    if len(choices) == 1:  # `engine build` builds both models unless told otherwise
        args += ["--only", choices[0].task.value]
    if any(c.source.random_weights for c in choices):
        args.append("--random-weights")
    if any(not c.source.download for c in choices):
        args.append("--no-download")
    for c, spec in missing:
        t = c.task.value
        if c.variant:
            args += [f"--{t}-variant", c.variant]
        if c.source.onnx is not None:
            args += [f"--{t}-onnx", str(c.source.onnx)]
        if c.source.checkpoint is not None:
            args += [f"--{t}-checkpoint", str(c.source.checkpoint)]
        profile = default_profile(spec)
        if spec.key not in (fixed or {}) and not profile.min <= config.batch_size <= profile.max:
            b = config.batch_size
            args += [f"--{t}-profile", f"1,{b},{b}"]
    if precision == "int8":
        args += ["--calib", str(config.calib_dir) if config.calib_dir else "DIR_OF_TYPICAL_FRAMES"]
        if config.calib_count is not None:
            args += ["--calib-count", str(config.calib_count)]
    if config.spec_file is not None:
        args += ["--spec-file", str(config.spec_file)]
    args += ["--cache-dir", str(config.cache_dir)]
    return shlex.join(args)


def lookup_engines(
    models: Sequence["ResolvedModel"], precision: str, target: "BuildTarget", cache_dir: Path, batch_size: int
) -> tuple[dict[str, "CacheEntry"], str | None]:
    """The cached engine of every model for a run at ``precision`` and ``batch_size``,
    or the problem: which models have none in ``cache_dir`` (with the reasons other
    engines were passed over). :func:`find_engines` adds the build command."""
    from builders.manifest import EngineCache, EngineQuery
    from engine.executor import MIN_DEPTH

    cache = EngineCache(Path(cache_dir) / "engines")
    found: dict[str, CacheEntry] = {}
    missing: list[str] = []
    notes: list[str] = []
    for m in models:
        query = EngineQuery(m.spec.key, m.source_sha256, precision, target, batch_size, contexts=MIN_DEPTH,
                            fixed_batch=m.info.input.fixed_batch)
        search = cache.find_for_run(query)
        if search.entry is None:
            missing.append(m.spec.key)
            notes += list(search.rejected)
        else:
            found[m.spec.key] = search.entry
    if not missing:
        return found, None
    problem = f"no TensorRT engine for {', '.join(missing)} at {precision} for {target.describe()} in {cache.cache_dir}"
    if notes:
        problem += f" (passed over: {'; '.join(notes)})"
    return found, problem


def find_engines(
    models: Sequence["ResolvedModel"],
    choices: Sequence["ModelChoice"],
    config: "RunConfig",
    precision: str,
    target: "BuildTarget",
) -> tuple[dict[str, "CacheEntry"], str | None]:
    """The cached engine of every model for this run, or the problem: which models have
    none here (with the reasons other engines were passed over) and the command that
    builds them."""
    found, problem = lookup_engines(models, precision, target, config.cache_dir, config.batch_size)
    if problem is None:
        return found, None
    missing = [(c, m.spec) for m, c in zip(models, choices) if m.spec.key not in found]
    fixed = {m.spec.key: m.info.input.fixed_batch for m in models if m.info.input.fixed_batch is not None}
    return found, f"{problem}; build it with: {build_command(config, missing, precision, fixed)}"


# --------------------------------------------------------------------------- choice


def gpu_prerequisites(
    models: Sequence["ResolvedModel"],
    choices: Sequence["ModelChoice"],
    precision: str,
    gpu_backend: str,
    engines_for: Callable[["BuildTarget"], tuple[dict[str, "CacheEntry"], str | None]],
    sources_hint: str = "",
    *,
    dali: bool = True,
) -> tuple[dict[str, "CacheEntry"], str | None]:
    """What the GPU path with ``gpu_backend`` needs, in order: the device and packages
    (:func:`gpu_problem`), then for torch checkpoints or random weights at fp32/fp16
    (:func:`torch_backend_problem`), for TensorRT a usable TensorRT and an engine per
    model (``engines_for(target)``: :func:`find_engines` or :func:`lookup_engines`).
    ``sources_hint`` follows a torch-backend problem (how this caller names the weights);
    ``dali``: as for :func:`gpu_problem`. Returns (engines, None) or ({}, the first problem)."""
    problem = gpu_problem(gpu_backend, dali=dali)
    if problem is None and gpu_backend == "torch":
        problem = torch_backend_problem(models, choices, precision)
        if problem is not None:
            problem += sources_hint
    if problem is None and gpu_backend == "tensorrt":
        from builders.trt_build import TensorRTUnavailable, detect_target, import_tensorrt

        try:
            target = detect_target(import_tensorrt())
        except TensorRTUnavailable as exc:
            problem = exc.reason
        else:
            return engines_for(target)
    return {}, problem


def plan_path(config: "RunConfig", models: Sequence["ResolvedModel"]) -> PathPlan:
    """Decide the path for ``config`` (see the module docstring). Raises
    :class:`EngineError` when ``--device gpu`` cannot be honoured."""
    requested = config.device
    if requested not in DEVICES:
        raise EngineError(f"--device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if config.gpu_backend not in GPU_BACKENDS:
        raise EngineError(f"--gpu-backend must be one of {', '.join(GPU_BACKENDS)}, got {config.gpu_backend!r}")
    if requested == "cpu":
        return PathPlan("cpu", "--device cpu", config.precision or DEFAULT_PRECISION["cpu"])

    precision = config.precision or DEFAULT_PRECISION["gpu"]
    engines, problem = gpu_prerequisites(
        models, config.models, precision, config.gpu_backend,
        lambda target: find_engines(models, config.models, config, precision, target),
    )
    if problem is None:
        why = "--device gpu" if requested == "gpu" else "a GPU, the GPU packages and the engines are here"
        return PathPlan("gpu", why, precision, config.gpu_backend, engines)
    if requested == "gpu":
        raise EngineError(f"--device gpu: {problem}")
    return PathPlan("cpu", f"the GPU path is not available: {problem}", config.precision or DEFAULT_PRECISION["cpu"])


# --------------------------------------------------------------------------- assembly


def _torch_module(model: "ResolvedModel", choice: "ModelChoice"):
    from builders.export import build_random_model, build_torch_model, load_checkpoint
    from engine.models import RANDOM_SEED

    spec = model.spec
    if choice.source.checkpoint is not None:
        module = build_torch_model(spec.architecture, spec.num_classes)
        return load_checkpoint(module, choice.source.checkpoint, architecture=spec.architecture.value)
    return build_random_model(spec.architecture, spec.num_classes, RANDOM_SEED)


def open_gpu_backends(
    plan: PathPlan, models: Sequence["ResolvedModel"], choices: Sequence["ModelChoice"], batch_size: int, stack: ExitStack
) -> dict[str, Any]:
    """One executor backend per model (spec key), closed by ``stack``. Call with the
    CUDA device (context) already open."""
    backends: dict[str, Any] = {}
    for m, c in zip(models, choices):
        if plan.gpu_backend == "tensorrt":
            from engine.backends.tensorrt import TensorRTBackend

            entry = plan.engines[m.spec.key]
            backend = TensorRTBackend(entry.engine_path, entry.manifest)
        else:
            from engine.backends.torch_cuda import TorchCudaBackend

            size = m.spec.preprocess.size
            backend = TorchCudaBackend(_torch_module(m, c), (3, size, size), precision=plan.precision, max_batch=batch_size)
        backends[m.spec.key] = stack.enter_context(backend)
    return backends


def view_dtype(backends: Mapping[str, Any]) -> np.dtype:
    """The dtype DALI writes: every model's input dtype (prepared graphs keep FP32 I/O,
    so it is float32 unless an engine was built with FP16 inputs)."""
    dtypes = {np.dtype(b.inputs[0].dtype) for b in backends.values()}
    if len(dtypes) != 1:
        raise EngineError(f"the models take different input dtypes ({sorted(map(str, dtypes))}); one DALI pipeline writes one")
    dtype = dtypes.pop()
    if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise EngineError(f"the models take {dtype} input; DALI writes float32 or float16")
    return dtype


def open_gpu_inference(plan: PathPlan, models: Sequence["ResolvedModel"], config: "RunConfig", threads: int, stack: ExitStack):
    """The GPU path's :class:`~engine.streamed_run.StreamedInference`, everything it
    owns registered on ``stack`` (closed in reverse: executor, DALI and its stream, backends,
    device)."""
    from engine.executor import ExecutorConfig, StreamedExecutor
    from engine.gpu import CudaDevice
    from engine.preprocess.dali_pipeline import DaliPreprocessor
    from engine.streamed_run import DaliGpuProducer, StreamedInference

    device = stack.enter_context(CudaDevice(0))
    backends = open_gpu_backends(plan, models, config.models, config.batch_size, stack)
    pre = stack.enter_context(
        DaliPreprocessor(
            views=[(m.spec.key, m.spec.preprocess) for m in models],
            max_batch=config.batch_size,
            num_threads=threads,
            device="gpu",
            device_id=0,
            output_dtype=view_dtype(backends),
        )
    )
    producer = stack.enter_context(DaliGpuProducer(pre, device.stream()))  # closes DALI, then drops its stream
    executor = stack.enter_context(StreamedExecutor(backends, device, ExecutorConfig(config.batch_size)))
    backend = "tensorrt" if plan.gpu_backend == "tensorrt" else "torch-cuda"
    return StreamedInference(models, executor, producer, backend=f"{backend} (streamed executor, DALI on the GPU)")
