"""The streamed executor: a ring of slots per model, copy-in / compute / copy-out overlapped.

Layout (DESIGN.md section 3)::

    model "gender":  slot 0: pinned in -> dev in -> [backend] -> dev out -> pinned out   (stream 0)
                     slot 1: ...                                                          (stream 1)
                     slot 2: ...                                                          (stream 2)
    model "quality": its own ring of slots and streams

Every slot owns its buffers (allocated once, from the backend's declarations), its
stream and its events. Batch k goes to slot ``k % depth``: its copy-in, inference and
copy-out are queued on that slot's stream, so copy-in of batch k+1, inference of batch
k and copy-out of batch k-1 run on three different streams and overlap. A slot is
reused only after the host has waited on *its* "done" event (never a device-wide
sync); outputs come back in submission order because slots retire oldest first.

Separation of concerns, so that most of this is tested on the CPU for real:

* :class:`Device` is the small device interface (buffers, streams, events, copies).
  :class:`engine.gpu.CudaDevice` implements it with pycuda; :class:`HostDevice` here
  implements it with numpy and one thread per stream (a genuine second
  implementation: run the executor without a GPU, e.g. around ONNX Runtime).
* :class:`DeviceBackend` is what the executor drives without knowing which backend it
  is (TensorRT, the PyTorch reference on CUDA, ONNX Runtime binding the slot buffers
  with IOBinding (:class:`engine.backends.onnxruntime.OrtDeviceBackend`), :class:`HostBackend`).
* :func:`plan_batch`, :class:`Ring`, :class:`LaneStats` and :class:`OverlapReport` are
  pure logic: padding/trimming of a partial batch, slot state machine and order,
  per-stage timing bookkeeping.

Threading: one caller thread drives an executor (the CUDA context is current on that
thread). Nothing here imports pycuda, tensorrt or torch.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from engine.backends.base import Backend, TensorDecl
from engine.errors import EngineError, ModelError

log = logging.getLogger(__name__)

Stage = Literal["host", "h2d", "compute", "d2h"]
STAGES: tuple[Stage, ...] = ("host", "h2d", "compute", "d2h")
MIN_DEPTH = 3


# --------------------------------------------------------------------------- interfaces


@runtime_checkable
class DeviceArray(Protocol):
    """A device buffer: its address and what it holds."""

    @property
    def ptr(self) -> int: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def nbytes(self) -> int: ...


class Device(Protocol):
    """What the executor needs from a device. Copies, records and waits are queued on
    ``stream`` and return at once; only :meth:`synchronize` (one event) and
    :meth:`synchronize_stream` (set-up only) block the host."""

    kind: str
    allocations: int  # every host/device buffer ever allocated (steady state: constant)

    def host_empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray: ...  # pinned on CUDA

    def device_empty(self, shape: tuple[int, ...], dtype: np.dtype) -> DeviceArray: ...

    def free(self, buffer: Any) -> None: ...

    def stream(self) -> Any: ...

    def event(self, timing: bool = False) -> Any: ...

    def h2d(self, dst: DeviceArray, src: np.ndarray, stream: Any) -> None: ...  # src.nbytes to dst's start

    def d2h(self, dst: np.ndarray, src: DeviceArray, stream: Any) -> None: ...  # dst.nbytes from src's start

    def d2d(self, dst_ptr: int, src_ptr: int, nbytes: int, stream: Any) -> None: ...

    def zero(self, dst_ptr: int, nbytes: int, stream: Any) -> None: ...

    def record(self, event: Any, stream: Any) -> None: ...

    def wait(self, stream: Any, event: Any) -> None: ...

    def wait_producer(self, stream: Any, producer: Any) -> None: ...  # order after work queued on a foreign stream

    def synchronize(self, event: Any) -> None: ...

    def query(self, event: Any) -> bool: ...

    def elapsed_ms(self, start: Any, end: Any) -> float: ...

    def synchronize_stream(self, stream: Any) -> None: ...

    def close(self) -> None: ...


class Graph(Protocol):
    """A captured launch for one (slot, batch size): replays the same work on the same
    addresses."""

    def launch(self, stream: Any) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class DeviceBackend(Protocol):
    """A model the executor drives on a :class:`Device`.

    ``inputs``/``outputs`` are declarations with ``None`` for the dynamic batch; the
    executor allocates every buffer from them, once, at ``batch_size`` rows (at most
    ``max_batch``; a backend may also declare ``min_batch``, the smallest batch it
    runs, and shorter batches are padded up to it). Inputs that declare a fixed batch
    get buffers of that many rows, and a larger submission runs in pieces of it, one
    slot each. ``bind`` is called once per slot (set tensor addresses there);
    ``enqueue`` queues the model on ``stream`` for ``batch_size`` rows of the slot's
    device buffers and returns without waiting. ``capture`` returns a graph of that
    enqueue (or None where the backend cannot); it is called only after one plain
    enqueue at the same batch size and with the slot's stream idle.
    """

    name: str
    precision: str
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]
    max_batch: int
    supports_graphs: bool

    def bind(self, slot: "Slot") -> None: ...

    def enqueue(self, slot: "Slot", batch_size: int, stream: Any) -> None: ...

    def capture(self, slot: "Slot", batch_size: int, stream: Any) -> Graph | None: ...

    def release(self, slot: "Slot") -> None: ...


# --------------------------------------------------------------------------- pure logic


@dataclass(frozen=True)
class ExecutorConfig:
    """``batch_size``: rows per batch (the buffers' capacity); ``depth``: slots per model
    (>= 3: copy-in, compute and copy-out in flight at once); ``graphs``: capture CUDA
    graphs at ``batch_size`` where the backend allows; ``pad_partial``: run a short
    batch padded (zeros) through the full-size graph instead of a plain enqueue;
    ``timing``: record per-stage events (for :class:`LaneStats`)."""

    batch_size: int
    depth: int = MIN_DEPTH
    graphs: bool = True
    pad_partial: bool = True
    timing: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise EngineError(f"executor batch size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.depth, int) or self.depth < MIN_DEPTH:
            raise EngineError(f"executor ring depth must be at least {MIN_DEPTH}, got {self.depth!r}")


@dataclass(frozen=True)
class BatchPlan:
    """``rows`` real rows, run as ``exec_rows`` (padded with zeros past ``rows``), through
    the captured graph or not. Outputs are trimmed back to ``rows``."""

    rows: int
    exec_rows: int
    graph: bool

    @property
    def padded(self) -> bool:
        return self.exec_rows > self.rows


def plan_batch(rows: int, capacity: int, *, fixed_batch: int | None = None, graph_batch: int | None = None,
               pad_partial: bool = True, min_batch: int = 1) -> BatchPlan:
    """How to run a batch of ``rows`` on buffers of ``capacity`` rows.

    A fixed-batch model always runs its fixed batch; a dynamic one runs the graph batch
    when it has a graph of that size (a short batch is padded when ``pad_partial``),
    else exactly ``rows``, padded up to ``min_batch`` (the smallest batch the backend
    accepts, e.g. a TensorRT profile that starts above 1)."""
    if not isinstance(rows, (int, np.integer)) or rows < 1:
        raise ValueError(f"a batch needs at least one row, got {rows!r}")
    if rows > capacity:
        raise ValueError(f"batch of {rows} rows exceeds the executor batch size {capacity}")
    if fixed_batch is not None:
        return BatchPlan(int(rows), fixed_batch, graph_batch == fixed_batch)
    if graph_batch is not None and (rows == graph_batch or (pad_partial and rows < graph_batch)):
        return BatchPlan(int(rows), graph_batch, True)
    if min_batch > capacity:
        raise ValueError(f"the backend's smallest batch {min_batch} exceeds the executor batch size {capacity}")
    return BatchPlan(int(rows), max(int(rows), int(min_batch)), False)


class SlotState(str, Enum):
    FREE = "free"
    FILLING = "filling"  # the host is writing its pinned input / queueing its work
    IN_FLIGHT = "in_flight"  # work queued; outputs valid once its done event completes


_TRANSITIONS = {
    SlotState.FREE: {SlotState.FILLING},
    SlotState.FILLING: {SlotState.IN_FLIGHT, SlotState.FREE},  # FREE: queueing failed
    SlotState.IN_FLIGHT: {SlotState.FREE},
}


@dataclass(frozen=True)
class Ticket:
    seq: int
    slot: int
    plan: BatchPlan


class Ring:
    """Round-robin slot assignment with oldest-first retirement.

    Because slots retire in the order they were taken, the next slot is free whenever
    the ring is not full, and results come out in submission order."""

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"ring depth must be positive, got {depth}")
        self.depth = depth
        self.states = [SlotState.FREE] * depth
        self._in_flight: deque[Ticket] = deque()
        self._next = 0

    def _move(self, slot: int, to: SlotState) -> None:
        now = self.states[slot]
        if to not in _TRANSITIONS[now]:
            raise RuntimeError(f"slot {slot}: illegal transition {now.value} -> {to.value}")
        self.states[slot] = to

    @property
    def full(self) -> bool:
        return len(self._in_flight) + sum(s is SlotState.FILLING for s in self.states) >= self.depth

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def acquire(self) -> int:
        """The next slot, now FILLING. The ring must not be full (retire first)."""
        if self.full:
            raise RuntimeError("ring is full: retire the oldest batch first")
        slot = self._next
        self._move(slot, SlotState.FILLING)
        self._next = (self._next + 1) % self.depth
        return slot

    def abandon(self, slot: int) -> None:
        """Queueing into ``slot`` failed: give it back (it is the newest taken)."""
        self._move(slot, SlotState.FREE)
        self._next = slot

    def launched(self, ticket: Ticket) -> None:
        self._move(ticket.slot, SlotState.IN_FLIGHT)
        self._in_flight.append(ticket)

    def oldest(self) -> Ticket | None:
        return self._in_flight[0] if self._in_flight else None

    def retire(self) -> Ticket:
        ticket = self._in_flight.popleft()
        self._move(ticket.slot, SlotState.FREE)
        return ticket


@dataclass
class LaneStats:
    """Per-model bookkeeping: device time per stage (from the slot's events) and host
    time spent filling pinned buffers, queueing work and waiting for results. A batch
    here is one slot's run: a submission, or one piece of it for a model that runs a
    fixed batch below the executor's batch size."""

    batches: int = 0
    images: int = 0
    padded_batches: int = 0
    graph_batches: int = 0
    h2d_ms: float = 0.0
    compute_ms: float = 0.0
    d2h_ms: float = 0.0
    host_fill_s: float = 0.0
    host_enqueue_s: float = 0.0
    host_wait_s: float = 0.0

    def add_device_times(self, h2d_ms: float, compute_ms: float, d2h_ms: float) -> None:
        self.h2d_ms += h2d_ms
        self.compute_ms += compute_ms
        self.d2h_ms += d2h_ms

    @property
    def host_overhead_ms_per_batch(self) -> float:
        """Host time per batch that is not waiting (fill + enqueue)."""
        return 1e3 * (self.host_fill_s + self.host_enqueue_s) / self.batches if self.batches else 0.0

    @property
    def device_ms_per_batch(self) -> float:
        return (self.h2d_ms + self.compute_ms + self.d2h_ms) / self.batches if self.batches else 0.0


@dataclass(frozen=True)
class OverlapReport:
    """Each stage alone and the pipelined run, over the same batches.

    ``stage_seconds[model][stage]``: wall time of that stage alone (``host`` is the copy
    into pinned memory). The GPU's copy engines and SMs are shared by both models, so
    the bottleneck is the stage whose total over the models is largest;
    ``efficiency = bottleneck_seconds / pipelined_seconds`` (1.0: perfect overlap).
    """

    images: int
    stage_seconds: Mapping[str, Mapping[str, float]]
    pipelined_seconds: float

    @property
    def stage_totals(self) -> dict[str, float]:
        return {s: sum(m.get(s, 0.0) for m in self.stage_seconds.values()) for s in STAGES}

    @property
    def bottleneck(self) -> str:
        totals = self.stage_totals
        return max(totals, key=totals.__getitem__)

    @property
    def bottleneck_seconds(self) -> float:
        return self.stage_totals[self.bottleneck]

    @property
    def efficiency(self) -> float:
        return self.bottleneck_seconds / self.pipelined_seconds if self.pipelined_seconds > 0 else 0.0

    @property
    def stage_images_per_s(self) -> dict[str, dict[str, float]]:
        return {
            m: {s: (self.images / t if t > 0 else float("inf")) for s, t in stages.items()}
            for m, stages in self.stage_seconds.items()
        }

    @property
    def pipelined_images_per_s(self) -> float:
        return self.images / self.pipelined_seconds if self.pipelined_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "stage_seconds": {m: dict(s) for m, s in self.stage_seconds.items()},
            "stage_images_per_s": self.stage_images_per_s,
            "pipelined_seconds": self.pipelined_seconds,
            "pipelined_images_per_s": self.pipelined_images_per_s,
            "bottleneck": self.bottleneck,
            "efficiency": self.efficiency,
        }


# --------------------------------------------------------------------------- host device


class HostArray:
    """A "device" buffer of :class:`HostDevice`: a numpy array with an address."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    @property
    def ptr(self) -> int:
        return int(self.array.ctypes.data)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


class _Op:
    __slots__ = ("fn", "always")

    def __init__(self, fn: Callable[[], None], always: bool = False) -> None:
        self.fn = fn
        self.always = always  # event completions run even after an error, so no waiter hangs


class HostStream:
    """An in-order queue of work run by one thread: the CPU analogue of a CUDA stream.
    After an operation fails, later work is skipped (events still complete, carrying
    the error), like a CUDA error that poisons the stream."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.error: BaseException | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def handle(self) -> int:
        return id(self)

    def submit(self, fn: Callable[[], None], *, always: bool = False) -> None:
        if not self._thread.is_alive():
            raise RuntimeError(f"stream {self.name} is closed")
        self._queue.put(_Op(fn, always))

    def _loop(self) -> None:
        while True:
            op = self._queue.get()
            if op is None:
                return
            if self.error is not None and not op.always:
                continue
            try:
                op.fn()
            except BaseException as exc:  # kept and raised by synchronize() on the host
                log.debug("work on %s failed: %s", self.name, exc)
                self.error = exc

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class HostEvent:
    """Marks a point in a :class:`HostStream`; like a CUDA event, a wait or synchronize
    refers to its most recent record."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.recorded = 0
        self.completed = 0
        self.time: float | None = None
        self.error: BaseException | None = None

    def _complete(self, generation: int, stream: HostStream) -> None:
        with self._cond:
            self.completed = max(self.completed, generation)
            self.time = time.perf_counter()
            self.error = stream.error
            self._cond.notify_all()

    def _wait(self, generation: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.completed >= generation)


class HostDevice:
    """The :class:`Device` interface on numpy and threads: "device" memory is ordinary
    memory, each stream a worker thread, copies are memmoves queued on it. Runs the
    executor (ordering, padding, overlap of the stages) on machines without a GPU."""

    kind = "host"

    def __init__(self) -> None:
        self.allocations = 0
        self._streams: list[HostStream] = []
        self._closed = False

    def __enter__(self) -> "HostDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def host_empty(self, shape, dtype) -> np.ndarray:
        self.allocations += 1
        return np.zeros(shape, dtype)

    def device_empty(self, shape, dtype) -> HostArray:
        self.allocations += 1
        return HostArray(np.zeros(shape, dtype))

    def free(self, buffer: Any) -> None:
        pass  # garbage-collected memory; nothing to return to a driver

    def stream(self) -> HostStream:
        if self._closed:
            raise RuntimeError("device is closed")
        s = HostStream(f"host-stream-{len(self._streams)}")
        self._streams.append(s)
        return s

    def event(self, timing: bool = False) -> HostEvent:
        return HostEvent()

    @staticmethod
    def _memmove(dst: int, src: int, nbytes: int, keep: tuple) -> Callable[[], None]:
        def run() -> None:
            if keep is None:  # `keep` holds the buffers alive until the copy has run
                raise RuntimeError("copy without its buffers")
            ctypes.memmove(dst, src, nbytes)

        return run

    def h2d(self, dst: DeviceArray, src: np.ndarray, stream: HostStream) -> None:
        _check_copy(src.nbytes, dst.nbytes, src)
        stream.submit(self._memmove(dst.ptr, int(src.ctypes.data), src.nbytes, (dst, src)))

    def d2h(self, dst: np.ndarray, src: DeviceArray, stream: HostStream) -> None:
        _check_copy(dst.nbytes, src.nbytes, dst)
        stream.submit(self._memmove(int(dst.ctypes.data), src.ptr, dst.nbytes, (dst, src)))

    def d2d(self, dst_ptr: int, src_ptr: int, nbytes: int, stream: HostStream) -> None:
        stream.submit(self._memmove(int(dst_ptr), int(src_ptr), int(nbytes), ()))

    def zero(self, dst_ptr: int, nbytes: int, stream: HostStream) -> None:
        stream.submit(lambda: ctypes.memset(int(dst_ptr), 0, int(nbytes)))

    def record(self, event: HostEvent, stream: HostStream) -> None:
        with event._cond:
            event.recorded += 1
            generation = event.recorded
        stream.submit(lambda: event._complete(generation, stream), always=True)

    def wait(self, stream: HostStream, event: HostEvent) -> None:
        generation = event.recorded
        if generation:
            stream.submit(lambda: event._wait(generation), always=True)

    def wait_producer(self, stream: HostStream, producer: Any) -> None:
        """``producer``: a :class:`HostStream` whose queued work must finish first, or
        None when the data is already complete."""
        if producer is None:
            return
        marker = HostEvent()
        self.record(marker, producer)
        self.wait(stream, marker)

    def synchronize(self, event: HostEvent) -> None:
        event._wait(event.recorded)
        if isinstance(event.error, EngineError):  # the model's own error (a wrong output shape): as is
            raise event.error
        if event.error is not None:
            raise RuntimeError(f"device work failed: {event.error}") from event.error

    def query(self, event: HostEvent) -> bool:
        return event.completed >= event.recorded

    def elapsed_ms(self, start: HostEvent, end: HostEvent) -> float:
        if start.time is None or end.time is None:
            raise RuntimeError("event was never completed")
        return 1e3 * (end.time - start.time)

    def synchronize_stream(self, stream: HostStream) -> None:
        marker = HostEvent()
        self.record(marker, stream)
        self.synchronize(marker)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self._streams:
            s.close()
        self._streams.clear()


def _check_copy(nbytes: int, capacity: int, host: np.ndarray) -> None:
    if nbytes > capacity:
        raise ValueError(f"copy of {nbytes} bytes into a {capacity}-byte buffer")
    if not host.flags.c_contiguous:
        raise ValueError("host buffer for a copy must be C-contiguous")


class HostGraph:
    """A "graph" on the host device: the enqueue bound once to fixed buffers (``fn``),
    replayed on the slot's stream thread. Any host-device backend's ``capture`` returns
    one (:class:`HostBackend`, the host mode of ONNX Runtime's IOBinding backend)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn

    def launch(self, stream: HostStream) -> None:
        if self._fn is None:
            raise RuntimeError("graph is closed")
        stream.submit(self._fn)

    def close(self) -> None:
        self._fn = None


class HostBackend:
    """Any :class:`~engine.backends.base.Backend` (``run(batch) -> output``; e.g. ONNX
    Runtime) as a :class:`DeviceBackend` on :class:`HostDevice`: it runs on the slot's
    stream thread, reading the slot's input buffer and writing its output buffer."""

    supports_graphs = True

    def __init__(self, backend: Backend, max_batch: int = 4096, min_batch: int = 1) -> None:
        if len(backend.inputs) != 1 or len(backend.outputs) != 1:
            raise ModelError(f"{backend.name}: the host adapter runs single-input, single-output models")
        self._backend = backend
        self.name = f"host:{backend.name}"
        self.precision = backend.precision
        self.inputs = tuple(dataclasses.replace(d, device="cpu") for d in backend.inputs)
        self.outputs = tuple(dataclasses.replace(d, device="cpu") for d in backend.outputs)
        self.max_batch = max_batch
        self.min_batch = min_batch  # a backend that runs no smaller batch (as a TensorRT profile can)
        self._views: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def bind(self, slot: "Slot") -> None:
        x = slot.device_inputs[self.inputs[0].name]
        y = slot.device_outputs[self.outputs[0].name]
        self._views[slot.index] = (x.array, y.array)

    def _compute(self, slot_index: int, rows: int) -> None:
        x, y = self._views[slot_index]
        out = np.asarray(self._backend.run(x[:rows]))
        if out.shape != y[:rows].shape:
            raise ModelError(f"{self.name}: output shape {out.shape}, declared {y[:rows].shape}")
        np.copyto(y[:rows], out, casting="same_kind")

    def enqueue(self, slot: "Slot", batch_size: int, stream: HostStream) -> None:
        index = slot.index
        stream.submit(lambda: self._compute(index, batch_size))

    def capture(self, slot: "Slot", batch_size: int, stream: HostStream) -> HostGraph:
        index = slot.index
        return HostGraph(lambda: self._compute(index, batch_size))

    def release(self, slot: "Slot") -> None:
        self._views.pop(slot.index, None)


# --------------------------------------------------------------------------- slots and lanes


@dataclass(eq=False)
class Slot:
    """One ring entry: buffers (allocated once), a stream and events. Backends read
    ``device_inputs[name].ptr`` / ``device_outputs[name].ptr`` in ``bind``.
    ``host_inputs`` (pinned) are allocated on the slot's first host submission: a lane
    fed from device memory (DALI's outputs) never needs them."""

    index: int
    capacity: int
    stream: Any
    host_inputs: dict[str, np.ndarray]
    host_outputs: dict[str, np.ndarray]
    device_inputs: dict[str, DeviceArray]
    device_outputs: dict[str, DeviceArray]
    start: Any
    copied_in: Any
    computed: Any
    done: Any
    graphs: dict[int, Graph] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceView:
    """A batch already on the device (e.g. a DALI ``TensorListGPU``: ``as_tensor()`` then
    ``data_ptr()``): dense, C-contiguous, ``shape[0]`` rows."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class Completed:
    """The outputs of one submission: ``outputs[model][output_name]``, trimmed to the
    rows submitted, in submission order."""

    seq: int
    tag: Any
    outputs: Mapping[str, Mapping[str, np.ndarray]]

    def output(self, model: str) -> np.ndarray:
        """The single output of ``model``."""
        (array,) = self.outputs[model].values()
        return array


class Consumed:
    """Returned by :meth:`StreamedExecutor.submit_device`: once :meth:`synchronize`
    returns, the device copies out of the producer's buffers are done and the producer
    (DALI) may release or overwrite them."""

    def __init__(self, device: Device, events: Sequence[Any]) -> None:
        self._device = device
        self.events = tuple(events)

    def synchronize(self) -> None:
        for e in self.events:
            self._device.synchronize(e)


def _row_shape(decl: TensorDecl) -> tuple[int, ...]:
    rest = decl.shape[1:]
    if any(d is None for d in rest):
        raise ModelError(f"tensor {decl.name!r}: only the batch dimension may be dynamic, got {decl.shape}")
    return tuple(int(d) for d in rest)


class _Lane:
    """One model: its backend and ring of slots."""

    def __init__(self, key: str, backend: DeviceBackend, device: Device, config: ExecutorConfig) -> None:
        self.key = key
        self.backend = backend
        self.device = device
        self.config = config
        fixed = {d.fixed_batch for d in backend.inputs if d.fixed_batch is not None}
        self.fixed_batch = fixed.pop() if len(fixed) == 1 else None
        if len(fixed) > 0:
            raise ModelError(f"{key}: inputs pinned to different batch sizes")
        if self.fixed_batch is None and config.batch_size > backend.max_batch:
            raise ModelError(f"{key}: batch size {config.batch_size} exceeds the backend's maximum {backend.max_batch}")
        self.min_batch = int(getattr(backend, "min_batch", 1))
        if self.fixed_batch is None and config.batch_size < self.min_batch:
            raise ModelError(f"{key}: batch size {config.batch_size} is below the smallest batch the backend runs "
                             f"({self.min_batch}, its engine's optimisation profile); use --batch-size "
                             f"{self.min_batch} or more, or rebuild the engine with a profile that starts at 1")
        # A model pinned to a batch below the executor's runs each submission in pieces
        # of its own batch, one slot (one ticket) a piece: the ring keeps ``depth`` slots,
        # as many as a TensorRT engine has optimisation profiles for.
        self.capacity = self.fixed_batch or config.batch_size
        self.rows = {d.name: _row_shape(d) for d in (*backend.inputs, *backend.outputs)}
        self.input_names = tuple(d.name for d in backend.inputs)
        self.ring = Ring(config.depth)
        self.stats = LaneStats()
        self.graph_batch: int | None = None
        self.slots: list[Slot] = []
        for i in range(config.depth):
            self.slots.append(self._make_slot(i))

    def _shape(self, decl: TensorDecl) -> tuple[int, ...]:
        """A slot buffer's shape for ``decl``: ``capacity`` rows."""
        return (self.capacity, *self.rows[decl.name])

    def _make_slot(self, index: int) -> Slot:
        dev, shape, timing = self.device, self._shape, self.config.timing
        return Slot(
            index=index,
            capacity=self.capacity,
            stream=dev.stream(),
            host_inputs={},  # see _host_inputs
            host_outputs={d.name: dev.host_empty(shape(d), np.dtype(d.dtype)) for d in self.backend.outputs},
            device_inputs={d.name: dev.device_empty(shape(d), np.dtype(d.dtype)) for d in self.backend.inputs},
            device_outputs={d.name: dev.device_empty(shape(d), np.dtype(d.dtype)) for d in self.backend.outputs},
            start=dev.event(timing),
            copied_in=dev.event(timing),
            computed=dev.event(timing),
            done=dev.event(timing),
        )

    def _host_inputs(self, slot: Slot) -> dict[str, np.ndarray]:
        """The slot's pinned input buffers, allocated on first need (once per slot)."""
        if not slot.host_inputs:
            slot.host_inputs.update({d.name: self.device.host_empty(self._shape(d), np.dtype(d.dtype))
                                     for d in self.backend.inputs})
        return slot.host_inputs

    # set-up -----------------------------------------------------------------------

    def bind_and_warm(self) -> None:
        for slot in self.slots:
            self.backend.bind(slot)
        run_at = self.fixed_batch or self.config.batch_size
        for slot in self.slots:  # first enqueue does lazy set-up (TensorRT, cuDNN); not timed
            self.backend.enqueue(slot, run_at, slot.stream)
        for slot in self.slots:
            self.device.synchronize_stream(slot.stream)
        if not (self.config.graphs and self.backend.supports_graphs):
            return
        for slot in self.slots:
            try:
                graph = self.backend.capture(slot, run_at, slot.stream)
            except Exception as exc:  # capture is an optimisation: fall back, loudly
                log.warning("%s: graph capture failed on slot %d (%s); running without graphs", self.key, slot.index, exc)
                graph = None
            if graph is None:
                self._drop_graphs()
                return
            slot.graphs[run_at] = graph
        self.graph_batch = run_at
        log.debug("%s: captured graphs at batch %d on %d slots", self.key, run_at, len(self.slots))

    def _drop_graphs(self) -> None:
        for slot in self.slots:
            for g in slot.graphs.values():
                g.close()
            slot.graphs.clear()
        self.graph_batch = None

    # steady state -----------------------------------------------------------------

    def plan(self, rows: int) -> BatchPlan:
        return plan_batch(rows, self.capacity, fixed_batch=self.fixed_batch, graph_batch=self.graph_batch,
                          pad_partial=self.config.pad_partial, min_batch=self.min_batch)

    def _check(self, name: str, shape: tuple[int, ...], dtype: np.dtype, what: str) -> int:
        want = self.rows.get(name)
        if want is None or name not in self.input_names:
            raise ValueError(f"{self.key}: no input named {name!r} (inputs: {list(self.input_names)})")
        if len(shape) != 1 + len(want) or tuple(shape[1:]) != want:
            raise ValueError(f"{self.key}: {what} {name!r} has shape {tuple(shape)}, expected (N, {', '.join(map(str, want))})")
        if np.dtype(dtype).kind != "f":
            raise ValueError(f"{self.key}: {what} {name!r} is {np.dtype(dtype)}, a float batch is expected")
        return int(shape[0])

    def _named(self, value: Any) -> Mapping[str, Any]:
        if isinstance(value, Mapping):
            return value
        if len(self.backend.inputs) != 1:
            raise ValueError(f"{self.key}: the model has several inputs; pass a mapping name -> batch")
        return {self.backend.inputs[0].name: value}

    def _spans(self, rows: set[int], names: set[str]) -> list[tuple[int, int, BatchPlan]]:
        """(start, stop, plan) of each piece of a batch: one piece, or pieces of the
        model's fixed batch where that is below the executor's batch size."""
        if len(rows) != 1 or names != set(self.input_names):
            raise ValueError(f"{self.key}: give every input {list(self.input_names)} with the same rows")
        total = rows.pop()
        if total > self.config.batch_size:
            raise ValueError(f"{self.key}: batch of {total} rows exceeds the executor batch size {self.config.batch_size}")
        return [(start, min(start + self.capacity, total), self.plan(min(self.capacity, total - start)))
                for start in range(0, max(total, 1), self.capacity)]

    def host_pieces(self, value: Any) -> list[tuple[dict[str, np.ndarray], BatchPlan]]:
        """A host batch checked and cut into the pieces :meth:`submit_host` takes."""
        arrays = {n: np.asarray(a) for n, a in self._named(value).items()}
        rows = {self._check(n, a.shape, a.dtype, "batch") for n, a in arrays.items()}
        return [({n: a[start:stop] for n, a in arrays.items()}, plan)
                for start, stop, plan in self._spans(rows, set(arrays))]

    def device_pieces(self, value: Any) -> list[tuple[dict[str, DeviceView], BatchPlan]]:
        """A device batch checked and cut into the pieces :meth:`submit_device` takes
        (views into the producer's buffer, by row offset)."""
        views: Mapping[str, DeviceView] = self._named(value)
        rows = {self._check(n, v.shape, v.dtype, "device batch") for n, v in views.items()}
        for n, v in views.items():
            decl_dtype = self.slots[0].device_inputs[n].dtype
            if np.dtype(v.dtype) != decl_dtype:
                raise ValueError(f"{self.key}: device batch {n!r} is {np.dtype(v.dtype)}, the model takes {decl_dtype}")
        spans = self._spans(rows, set(views))
        if len(spans) == 1:
            return [(dict(views), spans[0][2])]
        row_bytes = {n: int(np.prod(v.shape[1:], dtype=np.int64)) * np.dtype(v.dtype).itemsize for n, v in views.items()}
        return [({n: DeviceView(v.ptr + start * row_bytes[n], (stop - start, *v.shape[1:]), v.dtype)
                  for n, v in views.items()}, plan) for start, stop, plan in spans]

    def submit_host(self, seq: int, arrays: Mapping[str, np.ndarray], plan: BatchPlan) -> Ticket:
        """Queue one piece (from :meth:`host_pieces`) on the next slot."""
        index = self.ring.acquire()
        slot = self.slots[index]
        try:
            host_inputs = self._host_inputs(slot)
            t0 = time.perf_counter()
            for name, array in arrays.items():
                host = host_inputs[name]
                np.copyto(host[: plan.rows], array, casting="same_kind")
                if plan.padded:
                    host[plan.rows : plan.exec_rows] = 0
            t1 = time.perf_counter()
            self.device.record(slot.start, slot.stream)
            for name, host in host_inputs.items():
                self.device.h2d(slot.device_inputs[name], host[: plan.exec_rows], slot.stream)
            self._launch(slot, plan)
        except BaseException:
            self._abandon(index)
            raise
        self.stats.host_fill_s += t1 - t0
        self.stats.host_enqueue_s += time.perf_counter() - t1
        ticket = Ticket(seq, index, plan)
        self.ring.launched(ticket)
        return ticket

    def submit_device(self, seq: int, views: Mapping[str, DeviceView], plan: BatchPlan, producer: Any) -> tuple[Ticket, Any]:
        """Queue one piece (from :meth:`device_pieces`) on the next slot."""
        index = self.ring.acquire()
        slot = self.slots[index]
        try:
            t0 = time.perf_counter()
            # Ordering: the slot's stream waits for the producer's stream (DALI's), then
            # copies device-to-device; `copied_in` marks the producer's buffers as free.
            self.device.wait_producer(slot.stream, producer)
            self.device.record(slot.start, slot.stream)
            for name, view in views.items():
                dst = slot.device_inputs[name]
                row_bytes = dst.nbytes // self.capacity
                self.device.d2d(dst.ptr, view.ptr, plan.rows * row_bytes, slot.stream)
                if plan.padded:
                    self.device.zero(dst.ptr + plan.rows * row_bytes, (plan.exec_rows - plan.rows) * row_bytes, slot.stream)
            self._launch(slot, plan)
        except BaseException:
            self._abandon(index)
            raise
        self.stats.host_enqueue_s += time.perf_counter() - t0
        ticket = Ticket(seq, index, plan)
        self.ring.launched(ticket)
        return ticket, slot.copied_in

    def _abandon(self, index: int) -> None:
        """Queueing into slot ``index`` failed part-way: wait for what it did queue (a copy
        out of the producer's buffer or into the slot's own, which close() would not wait
        for and the next use of the slot would race), then give the slot back."""
        try:
            self.device.synchronize_stream(self.slots[index].stream)
        except Exception as exc:  # the queueing error is the one to report
            log.error("%s: while waiting for the work of a failed batch: %s", self.key, exc)
        self.ring.abandon(index)

    def _launch(self, slot: Slot, plan: BatchPlan) -> None:
        """Queue compute and copy-out after the copy-in already queued on the slot."""
        dev, stream = self.device, slot.stream
        dev.record(slot.copied_in, stream)
        if plan.graph:
            slot.graphs[plan.exec_rows].launch(stream)
        else:
            self.backend.enqueue(slot, plan.exec_rows, stream)
        dev.record(slot.computed, stream)
        for name, host in slot.host_outputs.items():
            dev.d2h(host[: plan.rows], slot.device_outputs[name], stream)
        dev.record(slot.done, stream)

    def harvest(self) -> tuple[Ticket, dict[str, np.ndarray]]:
        """Wait for the oldest batch (its own event only) and copy its outputs out of the
        pinned buffers, which the slot reuses."""
        ticket = self.ring.oldest()
        if ticket is None:
            raise RuntimeError(f"{self.key}: nothing in flight")
        slot = self.slots[ticket.slot]
        t0 = time.perf_counter()
        self.device.synchronize(slot.done)
        self.stats.host_wait_s += time.perf_counter() - t0
        outputs = {name: host[: ticket.plan.rows].copy() for name, host in slot.host_outputs.items()}
        if self.config.timing:
            e = self.device.elapsed_ms
            self.stats.add_device_times(e(slot.start, slot.copied_in), e(slot.copied_in, slot.computed), e(slot.computed, slot.done))
        s = self.stats
        s.batches += 1
        s.images += ticket.plan.rows
        s.padded_batches += ticket.plan.padded
        s.graph_batches += ticket.plan.graph
        self.ring.retire()
        return ticket, outputs

    def wait_idle(self) -> None:
        """Wait for every queued batch (used before freeing buffers); results dropped."""
        for slot in self.slots:
            self.device.synchronize(slot.done)

    # stage-alone timing (measure_overlap) --------------------------------------------

    def time_stage(self, stage: Stage, batches: Sequence[np.ndarray]) -> float:
        """Wall seconds to run only ``stage`` of every batch, slots round-robin (so the
        stage overlaps with itself as in the pipelined run). Lane must be idle."""
        if self.ring.in_flight:
            raise RuntimeError(f"{self.key}: drain the executor before timing stages")
        dev = self.device
        pieces = [piece for b in batches for piece in self.host_pieces(b)]
        for slot in self.slots:  # allocated before the clock starts
            self._host_inputs(slot)
        start = time.perf_counter()
        for k, (arrays, plan) in enumerate(pieces):
            slot = self.slots[k % len(self.slots)]
            if stage == "host":
                for name, array in arrays.items():
                    np.copyto(slot.host_inputs[name][: plan.rows], array, casting="same_kind")
                continue
            dev.synchronize(slot.done)  # the slot's previous stage work
            if stage == "h2d":
                for name, host in slot.host_inputs.items():
                    dev.h2d(slot.device_inputs[name], host[: plan.exec_rows], slot.stream)
            elif stage == "compute":
                if plan.graph:
                    slot.graphs[plan.exec_rows].launch(slot.stream)
                else:
                    self.backend.enqueue(slot, plan.exec_rows, slot.stream)
            elif stage == "d2h":
                for name, host in slot.host_outputs.items():
                    dev.d2h(host[: plan.rows], slot.device_outputs[name], slot.stream)
            else:
                raise ValueError(f"unknown stage {stage!r}")
            dev.record(slot.done, slot.stream)
        if stage != "host":
            for slot in self.slots:
                dev.synchronize(slot.done)
        return time.perf_counter() - start

    def close(self) -> None:
        self._drop_graphs()
        for slot in self.slots:
            self.backend.release(slot)
            for buf in (*slot.host_inputs.values(), *slot.host_outputs.values(),
                        *slot.device_inputs.values(), *slot.device_outputs.values()):
                self.device.free(buf)
        self.slots.clear()


@dataclass
class _Pending:
    """One submission: per model, the pieces still in flight and those collected (in
    order; one piece unless the model's fixed batch is below the batch size)."""

    seq: int
    tag: Any
    waiting: dict[str, int] = field(default_factory=dict)
    parts: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    failed: bool = False  # queuing failed part-way: collected, then dropped

    def completed(self) -> "Completed":
        outputs = {key: parts[0] if len(parts) == 1 else {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}
                   for key, parts in self.parts.items()}
        return Completed(self.seq, self.tag, outputs)


# --------------------------------------------------------------------------- executor


class StreamedExecutor:
    """Runs batches through one or more models (one ring of slots per model, models
    concurrently), returning outputs in submission order.

    ``device``: ``"cuda"`` (an :class:`engine.gpu.CudaDevice` on ``device_id`` is
    created and owned: the executor owns the CUDA context), ``"host"`` (a
    :class:`HostDevice`, owned), or a :class:`Device` instance the caller owns (and
    closes after the executor). Use from one thread; enter before submitting::

        with StreamedExecutor({"gender": b1, "quality": b2}, "cuda", ExecutorConfig(64)) as ex:
            for done in ex.run({"gender": g, "quality": q} for g, q in views):
                done.output("gender"), done.output("quality"), done.tag

    For CUDA the device must exist before backends that allocate CUDA memory (TensorRT
    engine, a torch module on CUDA) are bound; backends are bound (per slot) and warmed
    in :meth:`open`, after every buffer is allocated.
    """

    def __init__(
        self,
        backends: Mapping[str, DeviceBackend],
        device: Device | Literal["cuda", "host"] = "cuda",
        config: ExecutorConfig | None = None,
        *,
        device_id: int = 0,
    ) -> None:
        if not backends:
            raise EngineError("the executor needs at least one model")
        self._backends = dict(backends)
        self.config = config or ExecutorConfig(batch_size=min(b.max_batch for b in backends.values()))
        self._device_arg = device
        self._device_id = device_id
        self._owns_device = isinstance(device, str)
        self.device: Device | None = None if self._owns_device else device
        self._lanes: dict[str, _Lane] = {}
        self._pending: deque[_Pending] = deque()
        self._seq = 0
        self._open = False
        self._closed = False

    # lifetime ---------------------------------------------------------------------

    def __enter__(self) -> "StreamedExecutor":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an error is already on its way out: report cleanup failures, keep the first error
            self.close()
        except Exception as cleanup:
            log.error("while closing the executor after %s: %s", exc_type.__name__, cleanup)

    def open(self) -> None:
        if self._closed:
            raise RuntimeError("executor is closed")
        if self._open:
            return
        try:
            if self.device is None:
                self.device = make_device(self._device_arg, self._device_id)
            started = time.perf_counter()
            for key, backend in self._backends.items():
                self._lanes[key] = _Lane(key, backend, self.device, self.config)
            for lane in self._lanes.values():
                lane.bind_and_warm()
            self._open = True
            log.info(
                "executor ready on %s in %.2f s: %s, batch %d, depth %d, %d buffers",
                self.device.kind, time.perf_counter() - started,
                ", ".join(f"{k} ({l.backend.name}{', graphs' if l.graph_batch else ''})" for k, l in self._lanes.items()),
                self.config.batch_size, self.config.depth, self.device.allocations,
            )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Wait for queued work, free every buffer, release the device if owned.
        Idempotent; raises the first cleanup error after cleaning up the rest."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        for lane in self._lanes.values():
            try:
                lane.wait_idle()
            except Exception as exc:
                errors.append(exc)
        for lane in self._lanes.values():
            try:
                lane.close()
            except Exception as exc:
                errors.append(exc)
        self._lanes.clear()
        self._pending.clear()
        if self._owns_device and self.device is not None:
            try:
                self.device.close()
            except Exception as exc:
                errors.append(exc)
        self.device = None
        for exc in errors[1:]:
            log.error("another error while closing the executor: %s", exc)
        if errors:
            raise errors[0]

    # submission -------------------------------------------------------------------

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._backends)

    @property
    def stats(self) -> dict[str, LaneStats]:
        return {k: l.stats for k, l in self._lanes.items()}

    @property
    def allocations(self) -> int:
        return self.device.allocations if self.device is not None else 0

    def graph_batch(self, model: str) -> int | None:
        return self._lanes[model].graph_batch

    def _lanes_for(self, inputs: Mapping[str, Any]) -> list[_Lane]:
        if not self._open:
            raise RuntimeError("executor is not open: use it as a context manager")
        unknown = set(inputs) - set(self._lanes)
        if unknown or not inputs:
            raise ValueError(f"inputs for unknown models {sorted(unknown)} (models: {list(self._lanes)})")
        return [self._lanes[k] for k in inputs]

    def submit(self, inputs: Mapping[str, Any], tag: Any = None) -> list[Completed]:
        """Queue one batch per model: ``inputs[model]`` is an NCHW numpy batch (float32 or
        float16; converted to the model's dtype while copying into pinned memory), or a
        mapping input name -> batch. Returns the submissions completed meanwhile, in
        order (waiting, if a ring is full, for that ring's oldest batch only)."""
        lanes = self._lanes_for(inputs)
        # every model's batch is checked (and cut into pieces) before any work is queued
        pieces = {lane.key: lane.host_pieces(inputs[lane.key]) for lane in lanes}
        return self._queue(lanes, pieces, tag, lambda lane, seq, piece: lane.submit_host(seq, *piece), [])

    def _queue(self, lanes: Sequence[_Lane], pieces: Mapping[str, Sequence[Any]], tag: Any,
               submit_one: Callable[[_Lane, int, Any], Any], results: list[Any]) -> list[Completed]:
        """Queue one submission, every lane's pieces, under a new sequence number,
        appending each piece's result to ``results``; a full ring first gives up its
        oldest batch (an earlier submission's, or an earlier piece of this one). Returns
        the submissions completed meanwhile. If a piece fails after others were queued,
        they are still collected when they finish (their slots come back) and then
        dropped, never matched to a later submission; the error propagates, ``results``
        holds what was queued, and the submissions completed meanwhile are handed out by
        the next call."""
        seq = self._seq
        self._seq += 1
        entry = _Pending(seq, tag)
        self._pending.append(entry)  # before queueing: a full ring may hand back this one's own pieces
        try:
            for lane in lanes:
                for piece in pieces[lane.key]:
                    if lane.ring.full:
                        self._collect(lane)
                    results.append(submit_one(lane, seq, piece))
                    entry.waiting[lane.key] = entry.waiting.get(lane.key, 0) + 1
        except BaseException:
            if entry.waiting or entry.parts:
                entry.failed = True
            else:
                self._pending.pop()  # nothing queued: it is the newest
            raise
        return self._ready()

    def submit_device(self, inputs: Mapping[str, Any], producer: Any = None, tag: Any = None) -> tuple[list[Completed], Consumed]:
        """Queue one batch per model from device memory: ``inputs[model]`` is a
        :class:`DeviceView` (or a mapping input name -> view) in the model's dtype.

        Ordering: each slot's stream first waits for ``producer`` (on CUDA the integer
        handle of the stream the producer's work is queued on, e.g. the one passed to
        DALI's ``Pipeline.outputs(cuda_stream=...)``; None when the data is already
        complete), then copies device-to-device into the slot's own input buffer. The
        producer's buffers must stay valid until the returned :class:`Consumed` is
        synchronised (before the producer reuses them: with DALI's dynamic executor,
        as long as the outputs are referenced); after that, inference proceeds from the
        executor's own copy. If queuing fails part-way, the copies already queued are
        waited for before the error propagates, so the buffers may go at once."""
        lanes = self._lanes_for(inputs)
        pieces = {lane.key: lane.device_pieces(inputs[lane.key]) for lane in lanes}
        queued: list[tuple[Ticket, Any]] = []
        try:
            done = self._queue(lanes, pieces, tag, lambda lane, seq, piece: lane.submit_device(seq, *piece, producer),
                               queued)
        except BaseException:
            try:
                Consumed(self.device, [event for _, event in queued]).synchronize()
            except Exception as exc:  # the first error is the one to report
                log.error("while waiting for the copies of a failed submission: %s", exc)
            raise
        return done, Consumed(self.device, [event for _, event in queued])

    def _collect(self, lane: _Lane) -> None:
        ticket, outputs = lane.harvest()
        for entry in self._pending:
            if entry.seq == ticket.seq:
                entry.parts.setdefault(lane.key, []).append(outputs)
                entry.waiting[lane.key] -= 1
                if not entry.waiting[lane.key]:
                    del entry.waiting[lane.key]
                return
        raise RuntimeError(f"{lane.key}: result for unknown submission {ticket.seq}")

    def _ready(self) -> list[Completed]:
        out: list[Completed] = []
        while self._pending and not self._pending[0].waiting:
            e = self._pending.popleft()
            if not e.failed:
                out.append(e.completed())
        return out

    def drain(self) -> list[Completed]:
        """Wait for everything queued; return the remaining results in order."""
        out: list[Completed] = []
        while self._pending:
            head = self._pending[0]
            for key in sorted(head.waiting):
                lane = self._lanes[key]
                while key in head.waiting:  # the lane's oldest is this submission or earlier
                    self._collect(lane)
            out.extend(self._ready())
        return out

    def run(self, batches: Iterable[Mapping[str, Any]], tags: Iterable[Any] | None = None) -> Iterator[Completed]:
        """Submit every batch, yielding results in submission order as they complete."""
        tag_iter = iter(tags) if tags is not None else None
        for inputs in batches:
            tag = next(tag_iter) if tag_iter is not None else None
            yield from self.submit(inputs, tag)
        yield from self.drain()

    def time_stage(self, model: str, stage: Stage, batches: Sequence[Any]) -> float:
        if self._pending:
            raise RuntimeError("drain the executor before timing stages")
        return self._lanes[model].time_stage(stage, batches)


def make_device(kind: str, device_id: int = 0) -> Device:
    if kind == "host":
        return HostDevice()
    if kind == "cuda":
        from engine.gpu import CudaDevice

        return CudaDevice(device_id)
    raise EngineError(f"unknown executor device {kind!r} (cuda, host)")


def measure_overlap(executor: StreamedExecutor, batches: Sequence[Mapping[str, Any]], *, warmup: bool = True) -> OverlapReport:
    """Time each stage alone (host copy into pinned memory, H2D, compute, D2H; per model)
    and the pipelined run over the same ``batches``; see :class:`OverlapReport`."""
    if not batches:
        raise ValueError("measure_overlap needs at least one batch")
    executor.drain()
    if warmup:
        for _ in executor.run(batches[: executor.config.depth]):
            pass
    stage_seconds: dict[str, dict[str, float]] = {}
    for model in executor.models:
        per = [b[model] for b in batches if model in b]
        stage_seconds[model] = {s: executor.time_stage(model, s, per) for s in STAGES}
    start = time.perf_counter()
    for _ in executor.run(batches):
        pass
    pipelined = time.perf_counter() - start
    first = executor.models[0]
    images = sum(len(next(iter(_as_named(b[first]).values()))) for b in batches if first in b)
    report = OverlapReport(images, stage_seconds, pipelined)
    log.info("overlap: %.0f images/s pipelined, bottleneck %s, efficiency %.3f",
             report.pipelined_images_per_s, report.bottleneck, report.efficiency)
    return report


def _as_named(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {"": value}
