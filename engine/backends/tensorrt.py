"""TensorRT engine as an executor :class:`~engine.executor.DeviceBackend` (TRT 10/11 API).

Kept thin on purpose: one execution context per executor slot, tensor addresses set
once in :meth:`bind`, the input shape set only when the batch size changes,
``execute_async_v3`` on the slot's stream, and CUDA graph capture through the driver
API (:func:`engine.gpu.capture_graph`) after a plain enqueue at that shape.

Contexts run concurrently (one per slot, each on its own stream), and TensorRT gives
each context in concurrent use of a dynamic-shape engine its own optimisation profile:
`engine build` makes the engine with ``contexts`` identical profiles (the manifest says
how many), and every context takes a free one (``set_optimization_profile_async`` on
its slot's stream, before its shapes are set) and hands it back when released.

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


def _pinned_by_profiles(name: str, shape: tuple, ranges, engine_path: Path) -> tuple:
    """``shape`` (None where dynamic) with the dimensions every optimisation profile
    fixes filled in where the engine leaves them dynamic: height/width, as for an ONNX
    with dynamic height/width (`engine build` pins them to the spec's size), and the
    batch where every profile admits one batch only (`engine build` does that for a
    model that runs a fixed batch; the executor then feeds it pieces of that batch).
    ``ranges`` holds each profile's ``[min, opt, max]`` shapes of this input."""
    if not shape or None not in shape:
        return shape
    if None in shape[1:]:
        pinned = {tuple(int(x) for x in dims[1:]) for r in ranges for dims in (r[0], r[2])}
        if len(pinned) != 1:
            raise ModelError(f"{engine_path}: input {name!r} is {shape} and its optimisation profiles do not fix the "
                             f"dimensions after the batch; the executor needs a fixed image size (build the engine "
                             f"with `engine build`, which pins them to the spec's size)")
        shape = (shape[0], *pinned.pop())
    batches = {int(dims[0]) for r in ranges for dims in (r[0], r[2])}
    if shape[0] is None and len(batches) == 1:
        shape = (batches.pop(), *shape[1:])
    return shape


class ProfilePool:
    """Which of an engine's ``count`` optimisation profiles each execution context holds
    (keyed by the backend's context key); the lowest free one goes first."""

    def __init__(self, count: int) -> None:
        self.count = int(count)
        self._free = list(range(self.count))
        self._held: dict[Any, int] = {}

    def take(self, key: Any) -> int:
        if key in self._held:
            raise ValueError(f"context {key!r} already holds profile {self._held[key]}")
        if not self._free:
            raise ModelError(
                f"TensorRT engine has {self.count} optimisation profile(s), one per execution context in "
                f"concurrent use, and all are taken; rebuild it with `engine build --contexts N` for a "
                f"deeper executor ring, or run partial batches padded"
            )
        profile = self._free.pop(0)
        self._held[key] = profile
        return profile

    def give(self, key: Any) -> None:
        """Hand ``key``'s profile back (its context must be destroyed first); no-op if it
        holds none."""
        profile = self._held.pop(key, None)
        if profile is not None:
            self._free.append(profile)
            self._free.sort()

    @property
    def held(self) -> dict[Any, int]:
        return dict(self._held)

    @property
    def free(self) -> int:
        return len(self._free)


class _ContextGraph:
    """A graph captured on a slot's context. Closing it (the executor drops every slot's
    graph when a capture fails on one) frees that context to change shape again."""

    def __init__(self, graph, on_close) -> None:
        self._graph = graph
        self._on_close = on_close

    def launch(self, stream) -> None:
        self._graph.launch(stream)

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
        self._graph.close()


class TensorRTBackend:
    """A deserialised engine. ``wanted`` is the manifest the engine must match (from
    :func:`builders.trt_build.plan_manifest`). Owns the runtime, engine and every
    execution context; :meth:`close` is idempotent."""

    name = "tensorrt"
    supports_graphs = True

    def __init__(self, engine_path: Path, wanted) -> None:
        from builders.manifest import check_engine, check_runtime
        from builders.trt_build import _make_logger, detect_target, import_tensorrt

        trt = import_tensorrt()
        engine_path = Path(engine_path)
        found = check_engine(engine_path, wanted)
        check_runtime(found, detect_target(trt), str(engine_path))  # CUDA device 0, as builds
        self.precision = found.precision
        self._trt = trt
        self._logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise ModelError(f"TensorRT could not deserialise {engine_path}; see the TensorRT messages above")
        engine = self._engine
        profiles = range(engine.num_optimization_profiles)
        inputs, outputs = [], []
        max_batch: int | None = None
        min_batch = 1
        dynamic: set[str] = set()  # inputs whose shape each context must be given (-1 in the engine)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(None if d < 0 else int(d) for d in engine.get_tensor_shape(name))
            try:
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            except TypeError:  # bf16, fp8, fp4, int4: no NumPy type (prepared graphs keep FP32 I/O)
                raise ModelError(f"{engine_path}: tensor {name!r} is {engine.get_tensor_dtype(name)}, which has no "
                                 f"NumPy type; the engine's inputs and outputs must be FP32, FP16 or integers") from None
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                if None in shape:  # profile shapes exist for dynamic inputs only
                    dynamic.add(name)
                    ranges = [engine.get_tensor_profile_shape(name, k) for k in profiles]  # [min, opt, max] each
                    shape = _pinned_by_profiles(name, shape, ranges, engine_path)
                if shape and shape[0] is None:  # the batch range every profile admits
                    top = min(int(r[2][0]) for r in ranges)
                    min_batch = max(min_batch, *(int(r[0][0]) for r in ranges))
                    max_batch = top if max_batch is None else min(max_batch, top)
                elif shape:
                    max_batch = shape[0] if max_batch is None else min(max_batch, shape[0])
                inputs.append(TensorDecl(name, shape, dtype, "cuda"))
            else:
                outputs.append(TensorDecl(name, shape, dtype, "cuda"))
        if not inputs or not outputs:
            raise ModelError(f"{engine_path}: engine has {len(inputs)} inputs and {len(outputs)} outputs")
        if max_batch is not None and min_batch > max_batch:
            raise ModelError(f"{engine_path}: no batch size fits every optimisation profile "
                             f"(smallest {min_batch}, largest {max_batch})")
        if any(None in d.shape[1:] for d in outputs):
            outputs = self._resolve_output_shapes(inputs, outputs, min_batch, engine_path)
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        self._dynamic = frozenset(dynamic)
        self.max_batch = int(max_batch or 1)
        self.min_batch = min_batch  # shorter batches are padded up to it by the executor
        self.profiles = ProfilePool(engine.num_optimization_profiles)
        self._warned_full = False
        self._contexts: dict[Any, Any] = {}  # slot index (or ("eager", index)) -> context
        self._batch: dict[Any, int] = {}  # the input batch each context is set to
        self._captured: dict[int, int] = {}  # slot index -> batch its graph was captured at
        log.info("%s: loaded engine %s (%s), batch %d..%d", found.model, engine_path.name, self.precision,
                 self.min_batch, self.max_batch)

    def _resolve_output_shapes(self, inputs, outputs, batch: int, engine_path: Path) -> list[TensorDecl]:
        """Output shapes with their non-batch dimensions filled in: an engine built from
        an ONNX with dynamic height/width reports -1 there even though every profile pins
        the input. A context (on profile 0) at ``batch``, the smallest batch every profile
        admits, tells; it is dropped again."""
        context = self._engine.create_execution_context()
        if context is None:
            raise ModelError("TensorRT could not create an execution context (out of GPU memory?)")
        try:
            for decl in inputs:
                dims = tuple(batch if d is None else d for d in decl.shape)
                if not context.set_input_shape(decl.name, dims):
                    raise ModelError(f"TensorRT refused input shape {dims} for {decl.name!r}")
            resolved = []
            for decl in outputs:
                dims = tuple(int(d) for d in context.get_tensor_shape(decl.name))
                if any(d < 0 for d in dims[1:]):
                    raise ModelError(f"{engine_path}: output {decl.name!r} has shape {dims} even with every input "
                                     f"shape set; only the batch dimension may vary")
                resolved.append(TensorDecl(decl.name, (decl.shape[0], *dims[1:]), decl.dtype, decl.device))
            return resolved
        finally:
            del context

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _new_context(self, slot, key) -> Any:
        """An execution context on a free optimisation profile, the slot's buffers as its
        tensor addresses."""
        from engine.gpu import stream_handle

        if self._engine is None:
            raise RuntimeError("backend is closed")
        # An engine without dynamic inputs needs no profile of its own per context: they
        # all run on profile 0 ("need not be called" for such engines, says TensorRT).
        profile = self.profiles.take(key) if self._dynamic else None
        context = None
        try:
            context = self._engine.create_execution_context()
            if context is None:
                raise ModelError("TensorRT could not create an execution context (out of GPU memory?)")
            # Before any shape is set (a new context starts on profile 0, which another
            # context may hold). The binding raises on failure rather than returning False.
            try:
                ok = profile is None or context.set_optimization_profile_async(profile, stream_handle(slot.stream))
            except RuntimeError as exc:
                raise ModelError(f"TensorRT refused optimisation profile {profile} for a new execution context: "
                                 f"{exc}") from None
            if ok is False:
                raise ModelError(f"TensorRT refused optimisation profile {profile} for a new execution context")
            for decl in self.inputs:
                if context.set_tensor_address(decl.name, slot.device_inputs[decl.name].ptr) is False:
                    raise ModelError(f"TensorRT refused the address of input {decl.name!r}")
            for decl in self.outputs:
                if context.set_tensor_address(decl.name, slot.device_outputs[decl.name].ptr) is False:
                    raise ModelError(f"TensorRT refused the address of output {decl.name!r}")
        except BaseException:
            context = None  # destroyed before its profile is free again
            self.profiles.give(key)
            raise
        return context

    def bind(self, slot) -> None:
        self._contexts[slot.index] = self._new_context(slot, slot.index)
        self._batch[slot.index] = 0

    def _set_batch(self, context, key, batch_size: int) -> Any:
        if self._batch[key] != batch_size:
            for decl in self.inputs:  # a batch pinned by the profiles still has to be set
                if decl.name in self._dynamic:
                    dims = (batch_size, *decl.shape[1:])
                    if not context.set_input_shape(decl.name, dims):
                        raise ModelError(f"TensorRT refused input shape {dims} for {decl.name!r}")
            self._batch[key] = batch_size
        return context

    def _context_for(self, slot, batch_size: int) -> Any:
        """The slot's context at ``batch_size``. Once a graph was captured on it, its
        shape must not change (the graph was recorded for that shape), so a batch of
        another size runs on a second context of the slot, made on first need. With no
        optimisation profile left for one, the batch runs at the graph's size on the
        slot's own context: rows are independent, so the rows past ``batch_size`` (stale
        data) cost time but change nothing the executor reads back."""
        captured = self._captured.get(slot.index)
        if captured is None or captured == batch_size:
            return self._set_batch(self._contexts[slot.index], slot.index, batch_size)
        key = ("eager", slot.index)
        if key not in self._contexts:
            if self._dynamic and not self.profiles.free:
                if not self._warned_full:
                    log.info("TensorRT: no optimisation profile left for a second context; batches of other "
                             "sizes run at the captured batch %d", captured)
                    self._warned_full = True
                return self._contexts[slot.index]
            self._contexts[key] = self._new_context(slot, key)
            self._batch[key] = 0
        return self._set_batch(self._contexts[key], key, batch_size)

    def enqueue(self, slot, batch_size: int, stream) -> None:
        from engine.gpu import stream_handle

        context = self._context_for(slot, batch_size)
        if not context.execute_async_v3(stream_handle(stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT messages above")

    def capture(self, slot, batch_size: int, stream):
        """A CUDA graph of ``execute_async_v3`` at ``batch_size`` on this slot's context
        (the executor has already enqueued once at this shape, as TensorRT requires)."""
        from engine.gpu import capture_graph, stream_handle

        context = self._context_for(slot, batch_size)
        handle = stream_handle(stream)

        def enqueue() -> None:
            if not context.execute_async_v3(handle):
                raise RuntimeError("execute_async_v3 failed during graph capture")

        graph = capture_graph(stream, enqueue)
        self._captured[slot.index] = batch_size
        return _ContextGraph(graph, lambda: self._captured.pop(slot.index, None))

    def release(self, slot) -> None:
        """Drop the slot's contexts (the executor has waited for its stream) and hand
        their profiles back."""
        for key in (slot.index, ("eager", slot.index)):
            self._contexts.pop(key, None)  # the context is destroyed here, before its profile is free again
            self._batch.pop(key, None)
            self.profiles.give(key)
        self._captured.pop(slot.index, None)

    def close(self) -> None:
        """Contexts first, then the engine, then the runtime."""
        self._contexts.clear()
        self._captured.clear()
        for key in list(self.profiles.held):
            self.profiles.give(key)
        self._engine = None
        self._runtime = None
