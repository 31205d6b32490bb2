"""ONNX Runtime backends: the CPU default (and its CUDA provider where installed).

* :class:`OrtBackend`: ``run(numpy) -> numpy`` (the CPU path of `engine run`; behind
  :class:`engine.executor.HostBackend` on the executor's host device).
* :class:`OrtDeviceBackend`: an executor :class:`~engine.executor.DeviceBackend` that
  binds the slot's own buffers with ONNX Runtime's IOBinding (no copies through numpy),
  on the executor's host device or, with the CUDA execution provider, on CUDA slots.
* :func:`open_cpu_backend` (with :func:`precision_graph`, :func:`calibration_images`):
  the CPU path's backend for one resolved model at a precision, shared by `engine run`
  and :mod:`engine.frames`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np

from builders.onnx_io import ort_load_error, ort_run_error
from engine.backends.base import TensorDecl, zero_padded
from engine.errors import EngineError, ModelError

if TYPE_CHECKING:
    from builders.calibration import CalibrationImages
    from engine.executor import HostGraph
    from engine.models import ResolvedModel

log = logging.getLogger(__name__)

DeviceKind = Literal["host", "cuda"]
CUDA_PROVIDER = "CUDAExecutionProvider"
# RunOptions config key (onnxruntime_run_options_config_keys.h): "1" = do not synchronise
# the execution providers with the CPU at the end of Run (CUDA EP: no
# cudaStreamSynchronize on the compute stream), so a run only queues work on the stream.
DISABLE_SYNC_AT_RUN_END = "disable_synchronize_execution_providers"


def _session_options(ort, threads: int | None):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.log_severity_level = 3
    return options


def _open_session(ort, onnx_path: Path, threads: int | None, providers: list) -> Any:
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=_session_options(ort, threads), providers=providers)
    except Exception as exc:  # ORT raises its own exception types for bad graphs
        raise ort_load_error(onnx_path, exc) from exc


def require_provider(session: Any, provider: str, onnx_path: Path) -> Any:
    """``session``, if ONNX Runtime really gave it ``provider``. When a provider fails to
    start (for CUDA: missing or mismatched CUDA/cuDNN libraries) ORT prints an error and
    quietly retries with the providers left, which would run a CUDA backend on the CPU."""
    got = list(session.get_providers())
    if provider not in got:
        raise ModelError(
            f"ONNX Runtime could not start the {provider} for {onnx_path} (the session fell back to "
            f"{', '.join(got) or 'nothing'}); see ONNX Runtime's error above: usually the CUDA and cuDNN "
            "libraries onnxruntime-gpu was built for are missing"
        )
    return session


class OrtBackend:
    """Runs one ONNX model with ONNX Runtime.

    A model pinned to a fixed batch (some published ONNX files are) is fed in chunks of
    that batch, the last one zero-padded; a dynamic-batch model takes the whole batch.
    """

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: Path,
        input_decl: TensorDecl,
        output_decl: TensorDecl,
        *,
        precision: str = "fp32",
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.precision = precision
        self.inputs = (input_decl,)
        self.outputs = (output_decl,)
        providers = list(providers or ["CPUExecutionProvider"])
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]
        self._session = require_provider(_open_session(ort, onnx_path, threads, providers), first, onnx_path)
        self._in_name = input_decl.name
        self._out_name = output_decl.name
        self._in_dtype = np.dtype(input_decl.dtype)
        self._fixed = input_decl.fixed_batch
        self._path = Path(onnx_path)
        from builders.onnx_io import ort_errors, quiet_run_options

        self._errors = ort_errors()  # looked up once, not per batch
        self._run_options = quiet_run_options()
        self.providers = tuple(self._session.get_providers())
        log.debug("loaded %s with %s (fixed batch: %s)", onnx_path, self.providers, self._fixed)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The model's output for ``batch``: one row per input row, checked (a graph that
        drops, adds or pools rows would otherwise hand rows to the wrong files)."""
        if self._session is None:
            raise RuntimeError("backend is closed")
        x = np.ascontiguousarray(batch, dtype=self._in_dtype)
        if self._fixed is None or self._fixed == len(x):
            return self._checked(self._run(x), len(x))
        out = []
        for start in range(0, len(x), self._fixed):
            chunk = x[start : start + self._fixed]
            out.append(self._checked(self._run(zero_padded(chunk, self._fixed)), self._fixed)[: len(chunk)])
        return np.concatenate(out)

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            return self._session.run([self._out_name], {self._in_name: x}, self._run_options)[0]
        except self._errors as exc:
            raise ort_run_error(self._path, len(x), exc) from None

    def _checked(self, out: np.ndarray, rows: int) -> np.ndarray:
        want = self.outputs[0].shape[1:]
        if out.ndim != 1 + len(want) or out.shape[0] != rows or any(
                w is not None and w != d for w, d in zip(want, out.shape[1:])):
            raise ModelError(f"{self._path}: output {self._out_name!r} has shape {tuple(out.shape)} for a batch of "
                             f"{rows}; expected ({rows}, {', '.join('?' if w is None else str(w) for w in want)}): "
                             f"the graph must give one row per image")
        return out

    def close(self) -> None:
        self._session = None

    def __enter__(self) -> "OrtBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OrtDeviceBackend:
    """ONNX Runtime as an executor :class:`~engine.executor.DeviceBackend`: the model reads
    the slot's input buffer and writes its output buffer in place, both bound with
    IOBinding (``bind_input``/``bind_output`` with the buffer's address). A binding is
    made once per (slot, batch size) and reused for every later batch of that size: the
    executor's full batches share one per slot, a partial last batch gets its own.

    ``device_kind`` must match the executor's device:

    * ``"host"`` (:class:`engine.executor.HostDevice`, numpy buffers): one CPU session
      for every slot (``Run`` is thread-safe), bound with device type ``"cpu"``; each run
      is queued on the slot's :class:`~engine.executor.HostStream` thread, as
      :class:`~engine.executor.HostBackend` does, but without its ``run(numpy)`` call and
      copy of the result. ``supports_graphs`` is True here: the "graph" of a (slot, batch
      size) is the replay of its bound run, so the executor pads a partial batch into the
      full-size binding exactly as it does for HostBackend and the CUDA backends.
    * ``"cuda"`` (:class:`engine.gpu.CudaDevice`): one session per slot on the CUDA
      execution provider with that slot's stream as its compute stream
      (``user_compute_stream``), bound with device type ``"cuda"``, run with
      ``disable_synchronize_execution_providers`` so ``enqueue`` only queues the model
      on the slot's stream and returns. ``supports_graphs`` is False (ONNX Runtime has
      its own CUDA graph support, not used here). The slot buffers are pycuda
      allocations in the primary context, the one ONNX Runtime's CUDA runtime uses.
      THIS MODE HAS NOT RUN ON A GPU: it is written from the ONNX Runtime sources and
      docs and only its refusal without the CUDA provider is tested.

    ``input_decl``/``output_decl`` are the model's declarations from its ONNX graph (as
    for :class:`OrtBackend`); a model pinned to a fixed batch always runs that batch
    (the executor pads to it). ``max_batch`` bounds the executor batch of a dynamic model.
    """

    def __init__(
        self,
        onnx_path: Path,
        input_decl: TensorDecl,
        output_decl: TensorDecl,
        *,
        device_kind: DeviceKind = "host",
        precision: str = "fp32",
        threads: int | None = None,
        max_batch: int = 4096,
        device_id: int = 0,
    ) -> None:
        import onnxruntime as ort

        if device_kind not in ("host", "cuda"):
            raise EngineError(f"ONNX Runtime device backend: device_kind must be 'host' or 'cuda', got {device_kind!r}")
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise ModelError(f"ONNX Runtime cannot load {onnx_path}: no such file")
        if device_kind == "cuda" and CUDA_PROVIDER not in ort.get_available_providers():
            raise ModelError(
                f"ONNX Runtime on CUDA needs the {CUDA_PROVIDER}, which this onnxruntime build lacks "
                f"(it has {', '.join(ort.get_available_providers())}): install onnxruntime-gpu"
            )
        self._ort = ort
        self._path = onnx_path
        self._threads = threads
        self.device_kind: DeviceKind = device_kind
        self._device_type = "cpu" if device_kind == "host" else "cuda"
        self._device_id = device_id if device_kind == "cuda" else 0
        self.name = "onnxruntime-iobinding" if device_kind == "host" else "onnxruntime-cuda-iobinding"
        self.precision = precision
        self.inputs = (TensorDecl(input_decl.name, input_decl.shape, np.dtype(input_decl.dtype), self._device_type),)
        self.outputs = (TensorDecl(output_decl.name, output_decl.shape, np.dtype(output_decl.dtype), self._device_type),)
        fixed = {d.fixed_batch for d in (*self.inputs, *self.outputs)} - {None}
        if len(fixed) > 1:
            raise ModelError(f"{onnx_path}: inputs and outputs are pinned to different batch sizes {sorted(fixed)}")
        self.fixed_batch: int | None = fixed.pop() if fixed else None
        self.max_batch = self.fixed_batch or max_batch
        self.supports_graphs = device_kind == "host"
        self._session: Any = None  # host: shared by every slot
        self._sessions: dict[int, Any] = {}  # cuda: slot index -> session on that slot's stream
        self._bindings: dict[tuple[int, int], Any] = {}  # (slot index, batch size) -> IOBinding
        self.bindings_created = 0  # every IOBinding ever made (steady state: constant)
        self._closed = False
        from builders.onnx_io import quiet_run_options

        self._run_options = quiet_run_options()
        if device_kind == "host":
            self._session = self._check_names(_open_session(ort, onnx_path, threads, ["CPUExecutionProvider"]))
            self.providers = tuple(self._session.get_providers())
        else:
            self._run_options.add_run_config_entry(DISABLE_SYNC_AT_RUN_END, "1")
            self.providers = (CUDA_PROVIDER, "CPUExecutionProvider")
        log.debug("%s: %s on %s (fixed batch: %s)", self.name, onnx_path, self.providers, self.fixed_batch)

    def __enter__(self) -> "OrtDeviceBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def bindings(self) -> dict[tuple[int, int], Any]:
        """The cached IOBindings by (slot index, batch size) (a copy of the mapping)."""
        return dict(self._bindings)

    def _check_names(self, session) -> Any:
        have_in = {a.name for a in session.get_inputs()}
        have_out = {a.name for a in session.get_outputs()}
        for decls, have, what in ((self.inputs, have_in, "input"), (self.outputs, have_out, "output")):
            for d in decls:
                if d.name not in have:
                    raise ModelError(f"{self._path}: the graph has no {what} named {d.name!r} (it has {', '.join(sorted(have))})")
        return session

    def _live(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name}: backend is closed")

    def _cuda_session(self, slot) -> Any:
        from engine.gpu import stream_handle

        handle = stream_handle(slot.stream)
        cuda_options = {
            "device_id": str(self._device_id),
            # Since ORT 1.17 (#19229) the Python API derives has_user_compute_stream from
            # user_compute_stream (the stream's address as a decimal string); set both.
            "has_user_compute_stream": "1",
            "user_compute_stream": str(handle),
        }
        providers = [(CUDA_PROVIDER, cuda_options), "CPUExecutionProvider"]
        session = _open_session(self._ort, self._path, self._threads or 1, providers)
        return self._check_names(require_provider(session, CUDA_PROVIDER, self._path))

    def _session_for(self, slot_index: int) -> Any:
        return self._session if self.device_kind == "host" else self._sessions[slot_index]

    # DeviceBackend ------------------------------------------------------------------

    def bind(self, slot) -> None:
        """Check the slot's buffers are this mode's memory; on CUDA open the slot's
        session on its stream. Binds the slot's full-capacity batch at once."""
        self._live()
        from engine.executor import HostArray

        buffers = [slot.device_inputs[d.name] for d in self.inputs] + [slot.device_outputs[d.name] for d in self.outputs]
        on_host = [isinstance(b, HostArray) for b in buffers]
        if self.device_kind == "host" and not all(on_host):
            raise ModelError(f"{self.name}: device_kind='host' needs the executor's host device; use device_kind='cuda' on CUDA")
        if self.device_kind == "cuda" and any(on_host):
            raise ModelError(f"{self.name}: device_kind='cuda' got host-device buffers; use device_kind='host' there")
        self.release(slot)  # a slot index bound before (another executor): its addresses are stale
        if self.device_kind == "cuda":
            self._sessions[slot.index] = self._cuda_session(slot)
        self._binding(slot, self.fixed_batch or slot.capacity)

    def _binding(self, slot, rows: int) -> Any:
        key = (slot.index, rows)
        binding = self._bindings.get(key)
        if binding is not None:
            return binding
        if self.fixed_batch is not None and rows != self.fixed_batch:
            raise ModelError(f"{self.name}: the model runs a fixed batch of {self.fixed_batch}, asked for {rows}")
        if not 1 <= rows <= slot.capacity:
            raise ValueError(f"{self.name}: batch of {rows} rows on a slot of {slot.capacity}")
        binding = self._session_for(slot.index).io_binding()
        for decls, buffers, bind in ((self.inputs, slot.device_inputs, binding.bind_input),
                                     (self.outputs, slot.device_outputs, binding.bind_output)):
            for d in decls:
                buf = buffers[d.name]
                bind(d.name, self._device_type, self._device_id, np.dtype(d.dtype), [rows, *buf.shape[1:]], int(buf.ptr))
        self._bindings[key] = binding
        self.bindings_created += 1
        return binding

    def _runner(self, slot, batch_size: int) -> Callable[[], None]:
        session = self._session_for(slot.index)
        binding = self._binding(slot, batch_size)
        options = self._run_options
        return lambda: session.run_with_iobinding(binding, options)

    def enqueue(self, slot, batch_size: int, stream) -> None:
        """Host: queue the bound run on the slot's stream thread. CUDA: run it now; with
        the slot's stream as ORT's compute stream and no sync at the end, this queues the
        kernels behind the slot's copy-in and returns."""
        self._live()
        run = self._runner(slot, batch_size)
        if self.device_kind == "host":
            stream.submit(run)
        else:
            run()

    def capture(self, slot, batch_size: int, stream) -> HostGraph | None:
        self._live()
        if self.device_kind != "host":
            return None
        from engine.executor import HostGraph

        return HostGraph(self._runner(slot, batch_size))

    def release(self, slot) -> None:
        """Drop the slot's bindings (every batch size) and, on CUDA, its session."""
        for key in [k for k in self._bindings if k[0] == slot.index]:
            del self._bindings[key]
        self._sessions.pop(slot.index, None)

    def close(self) -> None:
        """Bindings first, then the sessions. Idempotent."""
        self._closed = True
        self._bindings.clear()
        self._sessions.clear()
        self._session = None


# --------------------------------------------------------------------------- per model
# (here rather than in engine.runner, so that engine.frames opens its CPU backends
# without importing polars or DALI)


def calibration_images(calib_dir: Path | None, count: int | None = None) -> "CalibrationImages | None":
    """A run's calibration images (found once; their hash read once, when first asked
    for), or None without ``calib_dir``."""
    if calib_dir is None:
        return None
    from builders.calibration import CalibrationImages

    return CalibrationImages.find(calib_dir, count)


def precision_graph(model: "ResolvedModel", precision: str, cache_dir: Path,
                    calibration: "CalibrationImages | None" = None) -> Path:
    """The ONNX to run on the CPU: the model itself for fp32, else its prepared
    fp16/int8 graph (made once by builders.precision and cached under ``cache_dir``;
    FP32 inputs and outputs are kept; int8 is calibrated on ``calibration``, fp16 checked
    on it)."""
    if precision == "fp32":
        return model.onnx_path
    from builders.precision import prepare

    if precision == "int8" and not calibration:
        raise EngineError("int8 needs calibration images: a folder of typical frames "
                          "(--calib DIR for the engine commands, calib_dir= for engine.frames)")
    prepared = prepare(
        model.onnx_path, model.spec, precision, calibration, Path(cache_dir) / "prepared",
        output_kind=model.output_kind, source_sha256=model.source_sha256,
    )
    return prepared.path


def open_cpu_backend(model: "ResolvedModel", precision: str, *, threads: int | None, cache_dir: Path,
                     calibration: "CalibrationImages | None" = None):
    """ONNX Runtime on the CPU for ``model`` at ``precision`` (its :func:`precision_graph`):
    what the CPU path runs, also used by :mod:`engine.frames`."""
    return OrtBackend(precision_graph(model, precision, cache_dir, calibration), model.info.input, model.info.output,
                      precision=precision, threads=threads)
