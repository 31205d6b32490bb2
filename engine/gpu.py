"""CUDA context ownership, GPU detection and the pycuda :class:`~engine.executor.Device`.

* :func:`cuda_absent_reason`: why no CUDA device is usable here (driver API through
  ctypes; no pycuda, no toolkit), or None.
* :class:`CudaContext`: the one owner of the executor's CUDA context. It retains the
  device's *primary* context (the one the CUDA runtime, TensorRT and PyTorch use, so
  device pointers are shared with them) and makes it current on the creating thread;
  ``close()`` pops and releases it. No ``pycuda.autoinit``, no ``__del__``.
* :class:`CudaDevice`: the executor's device on pycuda: pinned host buffers, device
  buffers, streams and events, every allocation counted and freed explicitly. One left
  open is closed at interpreter exit (pycuda aborts the process otherwise).
* :func:`capture_graph` / :class:`DriverGraph`: CUDA graph capture of work queued on a
  stream, through the driver API (pycuda has no graph capture); used for TensorRT.

Everything imports pycuda lazily; importing this module touches no CUDA.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from typing import Any, Callable

import numpy as np

from engine.errors import DependencyError, EngineError

log = logging.getLogger(__name__)

# cuda.h values (stable across CUDA 11-13)
CU_EVENT_DISABLE_TIMING = 0x2
CU_STREAM_NON_BLOCKING = 0x1
CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1


class CudaError(EngineError):
    """A CUDA driver call failed."""


def cuda_absent_reason(device_id: int = 0) -> str | None:
    """Why CUDA device ``device_id`` cannot be used here, or None when it can."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 not found)"
    if lib.cuInit(0) != 0:
        return "CUDA driver present but cuInit failed (no usable GPU)"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= device_id:
        return f"CUDA device {device_id} not visible ({count.value} device(s))"
    return None


def import_pycuda():
    """``pycuda.driver``, or :class:`DependencyError`."""
    try:
        import pycuda.driver as cuda
    except ImportError:
        raise DependencyError("pycuda", "gpu", "The GPU executor") from None
    return cuda


class _Driver:
    """The few driver-API calls pycuda does not wrap (graphs, foreign-stream events)."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError:
            raise CudaError("no NVIDIA driver (libcuda.so.1 not found)") from None
        self.lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]

    def check(self, name: str, rc: int) -> None:
        if rc != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(text))
            raise CudaError(f"{name} failed: {(text.value or b'unknown error').decode()} ({rc})")

    def call(self, name: str, *args: Any) -> None:
        self.check(name, getattr(self.lib, name)(*args))


_driver: _Driver | None = None


def driver() -> _Driver:
    global _driver
    if _driver is None:
        _driver = _Driver()
    return _driver


def stream_handle(stream: Any) -> int:
    """The CUstream of what DALI also takes as a stream: an integer, a ``ctypes.c_void_p``,
    an object with the ``__cuda_stream__`` protocol (``(version, handle)``), a pycuda
    stream (``handle``), a torch stream (``cuda_stream``) or a CuPy one (``ptr``)."""
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
        return int(stream)
    if isinstance(stream, ctypes.c_void_p):
        return int(stream.value or 0)
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is not None:
        _version, handle = protocol()
        return int(handle)
    for attr in ("handle", "cuda_stream", "ptr"):
        value = getattr(stream, attr, None)
        if value is not None:
            return int(value)
    raise TypeError(f"not a CUDA stream: {stream!r}")


class DriverGraph:
    """An instantiated CUDA graph; ``launch`` replays it on a stream."""

    def __init__(self, graph: ctypes.c_void_p, exec_: ctypes.c_void_p) -> None:
        self._graph = graph
        self._exec = exec_

    def launch(self, stream: Any) -> None:
        if self._exec is None:
            raise RuntimeError("graph is closed")
        driver().call("cuGraphLaunch", self._exec, ctypes.c_void_p(stream_handle(stream)))

    def close(self) -> None:
        drv = driver()
        if self._exec is not None:
            exec_, self._exec = self._exec, None
            drv.call("cuGraphExecDestroy", exec_)
        if self._graph is not None:
            graph, self._graph = self._graph, None
            drv.call("cuGraphDestroy", graph)


def capture_graph(stream: Any, enqueue: Callable[[], None]) -> DriverGraph:
    """Capture what ``enqueue()`` queues on ``stream`` (thread-local capture mode, so
    other threads' CUDA calls are not affected) and instantiate it. The capture is
    always ended, also when ``enqueue`` raises; a failed capture raises."""
    drv = driver()
    handle = ctypes.c_void_p(stream_handle(stream))
    drv.call("cuStreamBeginCapture_v2", handle, ctypes.c_int(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL))
    graph = ctypes.c_void_p()
    enqueued = False
    try:
        enqueue()
        enqueued = True
    finally:
        end_rc = drv.lib.cuStreamEndCapture(handle, ctypes.byref(graph))
        if (end_rc != 0 or not enqueued) and graph.value:  # never instantiated: not leaked
            drv.lib.cuGraphDestroy(graph)
    drv.check("cuStreamEndCapture", end_rc)
    exec_ = ctypes.c_void_p()
    try:
        drv.call("cuGraphInstantiateWithFlags", ctypes.byref(exec_), graph, ctypes.c_ulonglong(0))
    except CudaError:
        drv.lib.cuGraphDestroy(graph)
        raise
    return DriverGraph(graph, exec_)


class CudaContext:
    """Retains device ``device_id``'s primary context and makes it current on this
    thread until :meth:`close` (idempotent). The thread's context stack is as it was
    before, once closed; contexts opened on one thread close in reverse order (as
    ``with`` blocks do)."""

    def __init__(self, device_id: int = 0) -> None:
        cuda = import_pycuda()
        reason = cuda_absent_reason(device_id)
        if reason is not None:
            raise EngineError(f"the GPU executor needs a CUDA device: {reason}")
        cuda.init()
        self.device_id = device_id
        self.device = cuda.Device(device_id)
        self._thread = threading.get_ident()
        # a context pycuda made current before us (pycuda.autoinit, another CudaContext):
        # close must hand it back through pycuda (see close)
        self._under_pycuda = cuda.Context.get_current() is not None
        self._ctx = self.device.retain_primary_context()
        self._ctx.push()  # on the driver's stack and pycuda's own
        self.name = self.device.name()
        log.debug("CUDA context on device %d (%s) made current", device_id, self.name)

    def __enter__(self) -> "CudaContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def close(self) -> None:
        if self._ctx is None:
            return
        if threading.get_ident() != self._thread:
            # context stacks are per thread: from here it would pop another context
            raise CudaError("a CUDA context must be closed on the thread that opened it")
        ctx, self._ctx = self._ctx, None
        # pycuda 2026.1 (cuda.hpp, context::pop/detach), with "S" its own stack:
        # - ours alone on S: detach() while current releases the primary context and
        #   forgets it, leaving the driver's stack alone; one pop removes our push.
        # - a pycuda context X below ours on S: detach() while current would push X
        #   again (to make it current), so pop() first, which hands X back; detach() of
        #   a context no longer current then pushes ours once more to release it and
        #   leaves that entry: one pop removes it.
        # Either way exactly one entry of ours is left on the driver's stack.
        if self._under_pycuda:
            ctx.pop()
        ctx.detach()
        driver().call("cuCtxPopCurrent_v2", ctypes.byref(ctypes.c_void_p()))


# Devices not closed yet, oldest first: (the device, weakly: a dropped one is freed by
# pycuda as before; its context, whose entry on the thread's stack must go either way).
_left_open: list[tuple["weakref.ref[CudaDevice]", "CudaContext"]] = []
_exit_hook = False


def _close_left_open() -> None:
    """At interpreter exit, close the devices the program left open, newest first, on
    the thread exiting (the main one): pycuda aborts the process (SIGABRT) when its
    context stack is not empty at module clean-up."""
    me = threading.get_ident()
    for ref, context in reversed(list(_left_open)):
        if context.closed or context._thread != me:
            continue  # another thread's stack: closing from here would pop the wrong context
        log.warning("closing a CUDA device left open at exit (close FrameClassifier(device='gpu') or the "
                    "executor's device, or use them in a `with` block)")
        device = ref()
        try:
            (device or context).close()
        except Exception as exc:
            log.warning("closing the CUDA device at exit failed: %s", exc)


def _track_open(device: "CudaDevice") -> None:
    global _exit_hook
    if not _exit_hook:
        import atexit

        atexit.register(_close_left_open)  # after pycuda's import: runs before its clean-up
        _exit_hook = True
    _left_open.append((weakref.ref(device), device.context))


class CudaArray:
    """A pycuda device allocation with its shape and dtype."""

    __slots__ = ("allocation", "shape", "dtype", "nbytes")

    def __init__(self, allocation: Any, shape: tuple[int, ...], dtype: np.dtype, nbytes: int) -> None:
        self.allocation = allocation
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = nbytes

    @property
    def ptr(self) -> int:
        return int(self.allocation)


class CudaDevice:
    """The :class:`engine.executor.Device` interface on pycuda. Owns its context (a
    :class:`CudaContext`) and every buffer, stream and event it hands out; close()
    frees them, then releases the context. Use from the creating thread."""

    kind = "cuda"

    def __init__(self, device_id: int = 0) -> None:
        self._cuda = import_pycuda()
        self.context = CudaContext(device_id)
        self.allocations = 0
        self._host: list[np.ndarray] = []
        self._device: list[CudaArray] = []
        self._streams: list[Any] = []
        self._events: list[Any] = []
        self._producer_event: ctypes.c_void_p | None = None
        _track_open(self)

    def __enter__(self) -> "CudaDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def name(self) -> str:
        return self.context.name

    # buffers ----------------------------------------------------------------------

    def host_empty(self, shape, dtype) -> np.ndarray:
        array = self._cuda.pagelocked_empty(tuple(shape), np.dtype(dtype))
        self.allocations += 1
        self._host.append(array)
        return array

    def device_empty(self, shape, dtype) -> CudaArray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        array = CudaArray(self._cuda.mem_alloc(max(nbytes, 1)), shape, dtype, nbytes)
        self.allocations += 1
        self._device.append(array)
        return array

    def free(self, buffer: Any) -> None:
        if isinstance(buffer, CudaArray):
            self._device = [b for b in self._device if b is not buffer]
            buffer.allocation.free()
        elif isinstance(buffer, np.ndarray):
            self._host = [b for b in self._host if b is not buffer]
            buffer.base.free()  # pagelocked_empty's array is based on its HostAllocation
        else:
            raise TypeError(f"not a buffer of this device: {type(buffer).__name__}")

    # streams and events -----------------------------------------------------------

    def stream(self) -> Any:
        # CU_STREAM_NON_BLOCKING: no implicit sync with the legacy default stream, so a
        # stray default-stream call elsewhere does not serialise every slot.
        s = self._cuda.Stream(flags=CU_STREAM_NON_BLOCKING)
        self._streams.append(s)
        return s

    def event(self, timing: bool = False) -> Any:
        flags = self._cuda.event_flags.BLOCKING_SYNC  # the host sleeps in synchronize()
        if not timing:
            flags |= self._cuda.event_flags.DISABLE_TIMING
        e = self._cuda.Event(flags)
        self._events.append(e)
        return e

    def h2d(self, dst: CudaArray, src: np.ndarray, stream: Any) -> None:
        if src.nbytes > dst.nbytes:
            raise ValueError(f"copy of {src.nbytes} bytes into a {dst.nbytes}-byte buffer")
        self._cuda.memcpy_htod_async(dst.ptr, src, stream)

    def d2h(self, dst: np.ndarray, src: CudaArray, stream: Any) -> None:
        if dst.nbytes > src.nbytes:
            raise ValueError(f"copy of {dst.nbytes} bytes from a {src.nbytes}-byte buffer")
        self._cuda.memcpy_dtoh_async(dst, src.ptr, stream)

    def d2d(self, dst_ptr: int, src_ptr: int, nbytes: int, stream: Any) -> None:
        self._cuda.memcpy_dtod_async(int(dst_ptr), int(src_ptr), int(nbytes), stream)

    def zero(self, dst_ptr: int, nbytes: int, stream: Any) -> None:
        self._cuda.memset_d8_async(int(dst_ptr), 0, int(nbytes), stream)

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_for_event(event)

    def wait_producer(self, stream: Any, producer: Any) -> None:
        """Make ``stream`` wait for the work queued so far on ``producer`` (a CUstream
        handle as an int, a pycuda or torch stream; None: nothing to wait for). One
        driver event is recorded on the producer's stream and waited on: no host wait."""
        if producer is None:
            return
        drv = driver()
        if self._producer_event is None:
            ev = ctypes.c_void_p()
            drv.call("cuEventCreate", ctypes.byref(ev), ctypes.c_uint(CU_EVENT_DISABLE_TIMING))
            self._producer_event = ev
        drv.call("cuEventRecord", self._producer_event, ctypes.c_void_p(stream_handle(producer)))
        drv.call("cuStreamWaitEvent", ctypes.c_void_p(stream_handle(stream)), self._producer_event, ctypes.c_uint(0))

    def synchronize(self, event: Any) -> None:
        event.synchronize()

    def query(self, event: Any) -> bool:
        return bool(event.query())

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(end.time_since(start))

    def synchronize_stream(self, stream: Any) -> None:
        stream.synchronize()

    # lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Free what is left (after waiting for each stream), then release the context.
        Idempotent."""
        if self.context.closed:
            return
        try:
            for s in self._streams:
                s.synchronize()
            for buf in list(self._device):
                self.free(buf)
            for arr in list(self._host):
                self.free(arr)
            if self._producer_event is not None:
                ev, self._producer_event = self._producer_event, None
                driver().call("cuEventDestroy_v2", ev)
            # pycuda destroys streams and events when the last reference goes: drop them
            # while the context is still current.
            self._events.clear()
            self._streams.clear()
        finally:
            self.context.close()
            _left_open[:] = [entry for entry in _left_open if entry[1] is not self.context]
