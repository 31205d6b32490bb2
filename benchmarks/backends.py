"""The engine backends the suite measures: one registry entry per backend.

Adding a backend is one line in :data:`BACKENDS`: a name, the device it runs on, the
precisions it offers, and ``"module:function"`` of a factory with the signature of
:data:`BackendFactory` that returns an :class:`engine.backends.base.Backend` (a context
manager with ``run(batch) -> output``). Optionally ``"module:function"`` of an
availability check returning ``None`` when usable here, else the reason it is not.
Both are imported only when the backend is measured, so this module stays light.

Entries with ``executor`` set return an :class:`engine.executor.DeviceBackend` instead,
driven by the streamed executor on that device (``"cuda"``: pycuda; ``"host"``: the
executor's numpy/thread device), exactly as ``engine run`` drives it on the GPU path;
``run_backend`` is then the ``--gpu-backend`` that `engine run` takes for it.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from benchmarks.config import Device, Precision
from engine.errors import InputError

if TYPE_CHECKING:
    from engine.backends.base import Backend
    from engine.models import ResolvedModel

log = logging.getLogger(__name__)

FP32, FP16, INT8 = Precision.FP32, Precision.FP16, Precision.INT8


@dataclass(frozen=True)
class BackendContext:
    """What a factory may need beyond the model: threads, batch size, a folder for
    prepared graphs or engines, and images to calibrate on (INT8)."""

    threads: int
    batch_size: int
    work_dir: Path
    calibration_images: Sequence[Path] = ()  # a builders.calibration.CalibrationImages: hashed once


class BackendFactory(Protocol):
    def __call__(self, model: "ResolvedModel", precision: Precision, context: BackendContext) -> "Backend": ...


@dataclass(frozen=True)
class BackendEntry:
    name: str
    device: Device
    precisions: tuple[Precision, ...]
    factory: str  # "module:function", a BackendFactory
    available: str | None = None  # "module:function" -> None or the reason it is unusable here
    preprocess_device: str = "cpu"  # where the DALI pipeline runs for this backend (DALI's words: "cpu" or "gpu")
    runner: bool = False  # `engine run` (engine.runner.run) drives exactly this backend
    executor: str | None = None  # "cuda" / "host": the factory returns a DeviceBackend for the streamed executor
    run_backend: str | None = None  # `engine run --gpu-backend` for this entry (GPU entries)

    def config_id(self, precision: Precision) -> str:
        return f"engine/{self.name}/{self.device}/{precision.value}"

    def unavailable_reason(self) -> str | None:
        if self.available is None:
            return None
        return _load(self.available)()

    def create(self, model: "ResolvedModel", precision: Precision, context: BackendContext) -> "Backend":
        return _load(self.factory)(model, precision, context)


def _load(ref: str) -> Callable:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


# --------------------------------------------------------------------------- ONNX Runtime


def ort_cpu_unavailable() -> str | None:
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    return None


def ort_cuda_unavailable() -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)"
    return None


def _prepared_onnx(model: "ResolvedModel", precision: Precision, context: BackendContext) -> Path:
    """The model's ONNX with ``precision`` decided in the graph (builders.precision)."""
    if precision is Precision.FP32:
        return model.onnx_path
    from builders.precision import prepare

    calib = context.calibration_images if precision is Precision.INT8 else None
    if precision is Precision.INT8 and not calib:
        raise InputError("INT8 needs calibration images; the benchmark passes its own image set")
    prepared = prepare(
        model.onnx_path,
        model.spec,
        precision.value,
        calib,
        context.work_dir / "prepared",
        # On ONNX Runtime the unquantised INT8 layers stay FP32: FP16 there is for
        # TensorRT's strongly typed builds and only slows the CPU down.
        fp16_in_int8=False,
        batch_size=min(context.batch_size, 8),
        output_kind=model.output_kind,
        source_sha256=model.source_sha256,
    )
    return prepared.path


def ort_cpu_factory(model: "ResolvedModel", precision: Precision, context: BackendContext) -> "Backend":
    from engine.backends.onnxruntime import OrtBackend

    path = _prepared_onnx(model, precision, context)
    return OrtBackend(path, model.info.input, model.info.output, precision=precision.value, threads=context.threads)


def ort_cuda_factory(model: "ResolvedModel", precision: Precision, context: BackendContext) -> "Backend":
    from engine.backends.onnxruntime import OrtBackend

    path = _prepared_onnx(model, precision, context)
    return OrtBackend(
        path,
        model.info.input,
        model.info.output,
        precision=precision.value,
        threads=context.threads,
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    )


# --------------------------------------------------------------------------- streamed executor


def host_executor_factory(model: "ResolvedModel", precision: Precision, context: BackendContext):
    """ONNX Runtime on the executor's host device, the slot buffers bound with IOBinding
    (:class:`engine.backends.onnxruntime.OrtDeviceBackend`, as a GPU backend binds its
    device buffers): the streamed executor's own scheduling measured on the CPU (slots
    on threads instead of CUDA streams)."""
    from engine.backends.onnxruntime import OrtDeviceBackend

    path = _prepared_onnx(model, precision, context)
    return OrtDeviceBackend(path, model.info.input, model.info.output, device_kind="host", precision=precision.value,
                            threads=context.threads, max_batch=context.batch_size)


def torch_cuda_unavailable() -> str | None:
    from engine.gpu_path import gpu_problem

    return gpu_problem("torch")


def torch_cuda_factory(model: "ResolvedModel", precision: Precision, context: BackendContext):
    """The model in PyTorch on CUDA (same architecture and seeded random weights as the
    benchmark's ONNX), FP32 or FP16 autocast, channels_last."""
    from builders.export import build_random_model
    from engine.backends.torch_cuda import TorchCudaBackend
    from engine.models import RANDOM_SEED

    spec = model.spec
    module = build_random_model(spec.architecture, spec.num_classes, RANDOM_SEED)
    size = spec.preprocess.size
    return TorchCudaBackend(module, (3, size, size), precision=precision.value, max_batch=context.batch_size)


def tensorrt_unavailable() -> str | None:
    from engine.gpu_path import gpu_problem

    return gpu_problem("tensorrt")


def tensorrt_factory(model: "ResolvedModel", precision: Precision, context: BackendContext):
    """Prepare the graph at ``precision``, build (or reuse) its engine under
    ``work_dir/engines`` with a profile that admits the batch size (a model that runs a
    fixed batch: that batch only, fed in pieces), and load it."""
    from builders.precision import prepare
    from builders.trt_build import BatchProfile, build_engine, default_profile, engine_profile
    from engine.backends.tensorrt import TensorRTBackend

    calib = context.calibration_images if precision is Precision.INT8 else None
    prepared = prepare(model.onnx_path, model.spec, precision.value, calib, context.work_dir / "prepared",
                       output_kind=model.output_kind, source_sha256=model.source_sha256)
    fixed, b = model.info.input.fixed_batch, context.batch_size
    profile = (engine_profile(model.spec, fixed) if fixed is not None
               else BatchProfile(1, b, max(default_profile(model.spec).max, b)))
    artifact = build_engine(prepared, model.spec, context.work_dir / "engines", profile)
    return TensorRTBackend(artifact.path, artifact.manifest)


BACKENDS: tuple[BackendEntry, ...] = (
    # INT8 (Q/DQ) is not offered on the CPU: ONNX Runtime ran the calibrated resnet18 at
    # half its FP32 speed on the CI box (27 vs 57 images/s); it is a TensorRT precision.
    BackendEntry("onnxruntime", "cpu", (FP32,), "benchmarks.backends:ort_cpu_factory", "benchmarks.backends:ort_cpu_unavailable", runner=True),
    BackendEntry("onnxruntime-cuda", "cuda", (FP32, FP16), "benchmarks.backends:ort_cuda_factory", "benchmarks.backends:ort_cuda_unavailable"),
    BackendEntry("onnxruntime-executor", "cpu", (FP32,), "benchmarks.backends:host_executor_factory", "benchmarks.backends:ort_cpu_unavailable", executor="host"),
    BackendEntry("torch-cuda", "cuda", (FP32, FP16), "benchmarks.backends:torch_cuda_factory", "benchmarks.backends:torch_cuda_unavailable",
                 preprocess_device="gpu", runner=True, executor="cuda", run_backend="torch"),
    BackendEntry("tensorrt", "cuda", (FP16, INT8, FP32), "benchmarks.backends:tensorrt_factory", "benchmarks.backends:tensorrt_unavailable",
                 preprocess_device="gpu", runner=True, executor="cuda", run_backend="tensorrt"),
)


def find_backend(name: str) -> BackendEntry:
    for entry in BACKENDS:
        if entry.name == name:
            return entry
    raise InputError(f"unknown benchmark backend '{name}' (known: {', '.join(e.name for e in BACKENDS)})")
