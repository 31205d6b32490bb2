"""TensorRT engine as an executor :class:`~engine.executor.DeviceBackend` (TRT 10/11 API).

Kept thin on purpose: one execution context per executor slot, tensor addresses set
once in :meth:`bind`, the input shape set only when the batch size changes,
``execute_async_v3`` on the slot's stream, and CUDA graph capture through the driver
API (:func:`engine.gpu.capture_graph`) after a plain enqueue at that shape.

The engine is checked against its manifest (:func:`builders.manifest.check_engine`) and
this GPU/TensorRT (:func:`builders.manifest.check_runtime`) before it is deserialised.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends.base import TensorDecl
from engine.errors import ModelError

log = logging.getLogger(__name__)


class TensorRTBackend:
    """A deserialised engine. ``wanted`` is the manifest the engine must match (from
    :func:`builders.trt_build.plan_manifest`). Owns the runtime, engine and every
    execution context; :meth:`close` is idempotent."""

    name = "tensorrt"
    supports_graphs = True

    def __init__(self, engine_path: Path, wanted, *, device: int = 0) -> None:
        from builders.manifest import check_engine, check_runtime
        from builders.trt_build import _make_logger, detect_target, import_tensorrt

        trt = import_tensorrt()
        engine_path = Path(engine_path)
        found = check_engine(engine_path, wanted)
        check_runtime(found, detect_target(trt, device), str(engine_path))
        self.precision = found.precision
        self._trt = trt
        self._logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise ModelError(f"TensorRT could not deserialise {engine_path}; see the TensorRT messages above")
        inputs, outputs, max_batch = [], [], None
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            shape = tuple(None if d < 0 else int(d) for d in self._engine.get_tensor_shape(name))
            decl = TensorDecl(name, shape, np.dtype(trt.nptype(self._engine.get_tensor_dtype(name))), "cuda")
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(decl)
                if shape and shape[0] is None:
                    _, _, top = self._engine.get_tensor_profile_shape(name, 0)
                    max_batch = int(top[0]) if max_batch is None else min(max_batch, int(top[0]))
                elif shape:
                    max_batch = shape[0] if max_batch is None else min(max_batch, shape[0])
            else:
                outputs.append(decl)
        if not inputs or not outputs:
            raise ModelError(f"{engine_path}: engine has {len(inputs)} inputs and {len(outputs)} outputs")
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        self.max_batch = int(max_batch or 1)
        self._contexts: dict[Any, Any] = {}  # slot index (or ("eager", index)) -> context
        self._batch: dict[Any, int] = {}  # the input batch each context is set to
        self._captured: dict[int, int] = {}  # slot index -> batch its graph was captured at
        log.info("%s: loaded engine %s (%s), max batch %d", found.model, engine_path.name, self.precision, self.max_batch)

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _new_context(self, slot) -> Any:
        """An execution context with the slot's buffers as tensor addresses."""
        if self._engine is None:
            raise RuntimeError("backend is closed")
        context = self._engine.create_execution_context()
        if context is None:
            raise ModelError("TensorRT could not create an execution context (out of GPU memory?)")
        for decl in self.inputs:
            ok = context.set_tensor_address(decl.name, slot.device_inputs[decl.name].ptr)
            if ok is False:
                raise ModelError(f"TensorRT refused the address of input {decl.name!r}")
        for decl in self.outputs:
            ok = context.set_tensor_address(decl.name, slot.device_outputs[decl.name].ptr)
            if ok is False:
                raise ModelError(f"TensorRT refused the address of output {decl.name!r}")
        return context

    def bind(self, slot) -> None:
        self._contexts[slot.index] = self._new_context(slot)
        self._batch[slot.index] = 0

    def _set_batch(self, context, key, batch_size: int) -> Any:
        if self._batch[key] != batch_size:
            for decl in self.inputs:
                if decl.shape and decl.shape[0] is None:
                    dims = (batch_size, *decl.shape[1:])
                    if not context.set_input_shape(decl.name, dims):
                        raise ModelError(f"TensorRT refused input shape {dims} for {decl.name!r}")
            self._batch[key] = batch_size
        return context

    def _context_for(self, slot, batch_size: int) -> Any:
        """The slot's context at ``batch_size``. Once a graph was captured on it, its
        shape must not change (the graph was recorded for that shape), so a batch of
        another size runs on a second context of the slot, made on first need."""
        captured = self._captured.get(slot.index)
        if captured is None or captured == batch_size:
            return self._set_batch(self._contexts[slot.index], slot.index, batch_size)
        key = ("eager", slot.index)
        if key not in self._contexts:
            self._contexts[key] = self._new_context(slot)
            self._batch[key] = 0
        return self._set_batch(self._contexts[key], key, batch_size)

    def enqueue(self, slot, batch_size: int, stream) -> None:
        context = self._context_for(slot, batch_size)
        if not context.execute_async_v3(int(stream.handle)):
            raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT messages above")

    def capture(self, slot, batch_size: int, stream):
        """A CUDA graph of ``execute_async_v3`` at ``batch_size`` on this slot's context
        (the executor has already enqueued once at this shape, as TensorRT requires)."""
        from engine.gpu import capture_graph

        context = self._context_for(slot, batch_size)
        handle = int(stream.handle)

        def enqueue() -> None:
            if not context.execute_async_v3(handle):
                raise RuntimeError("execute_async_v3 failed during graph capture")

        graph = capture_graph(stream, enqueue)
        self._captured[slot.index] = batch_size
        return graph

    def release(self, slot) -> None:
        for key in (slot.index, ("eager", slot.index)):
            self._contexts.pop(key, None)
            self._batch.pop(key, None)
        self._captured.pop(slot.index, None)

    def close(self) -> None:
        """Contexts first, then the engine, then the runtime."""
        self._contexts.clear()
        self._captured.clear()
        self._engine = None
        self._runtime = None
