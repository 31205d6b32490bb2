"""Classify frames handed in as arrays: the library API for callers that already hold
decoded images (a video decoder, a camera, an image library); `engine run` is for folders.

    from engine.frames import FrameClassifier

    with FrameClassifier(models, batch_size=16) as classifier:   # models: ResolvedModel, one per task
        results = classifier.classify(frames)                    # any iterable of uint8 arrays
        for part in classifier.iter_classify(more, on_error="row"):
            write(part.to_polars())                              # batch by batch; bad frames as error rows
    results["gender/alpha"].probabilities                        # (n, 2) float32, in input order
    results["gender/alpha"].labels                               # ("female", "male", ...) per frame
    results.to_polars()                                          # engine run's columns, ``frame`` for ``path``

Frames, each of its own size: uint8 (H, W, 3) in ``channel_order`` (RGB, or BGR as
OpenCV decodes), (H, W) grey, or (H, W, 4) with alpha last (RGBA; BGRA with
``channel_order="bgr"``), composited per each model spec's alpha mode by
:func:`engine.preprocess.decode.composite` (the DALI graph's rule, value for value).
Strided arrays are fine. Frames from an iterator are copied as they are read (a decoder
may refill one buffer); those of a list, tuple or array are read in place, so leave them
unchanged until the call returns. A full batch is classified without waiting for the
next frame (the streamed path keeps up to its ring depth of batches in flight, so their
results come a few batches later). Anything else is a bad frame: by default
:class:`~engine.errors.InputError` naming its index is raised once the frames before it
are classified, their results in the error's ``partial``; with ``on_error="row"`` it
keeps its place with its cause in :attr:`FrameResults.errors` (NaN probabilities, label
None) and the rest go on, as `engine run` makes an error row of an unreadable file.
:meth:`FrameClassifier.iter_classify` hands out each batch's results as it finishes.

Each model's view of a frame is its spec's geometry and normalisation
(:meth:`ResizeCrop.from_preprocess <kernels.reference.ResizeCrop.from_preprocess>`,
:meth:`Normalise.from_preprocess <kernels.reference.Normalise.from_preprocess>`) computed
by the host-decoded-image kernel (``kernels/preprocess.cu``) or its NumPy reference
(:func:`kernels.reference.preprocess_reference`, exact for the kernel's conventions); a BGR
input flips the kernel's channel swap instead of being copied into RGB. This is the
kernel's resize, not DALI's: the same images through `engine run` (DALI) give slightly
different probabilities (tests/engine/test_frames.py measures it).

Paths:

* ``device="cpu"`` (default): per batch, the NumPy reference per frame and view, ONNX
  Runtime per model (:func:`engine.backends.onnxruntime.open_cpu_backend`, the CPU path's own backend
  at ``precision``), :func:`engine.postprocess.classify`.
* ``device="cpu", streamed=True``: the GPU path's loop on the streamed executor's host
  device (:class:`~engine.executor.HostDevice`, ONNX Runtime behind
  :class:`~engine.executor.HostBackend`), :class:`FrameProducer` with the NumPy reference
  standing in for the kernel launch. This is how the GPU loop is tested without a GPU.
* ``device="gpu"``: :class:`engine.gpu.CudaDevice`, the backends of the GPU path
  (:func:`engine.gpu_path.open_gpu_backends`: TensorRT engines from the cache, or
  ``gpu_backend="torch"``), :class:`FrameProducer` launching ``preprocess_batch_u8_to_f16``
  / ``_f32`` (the engine's input dtype; one launch per view and batch, each frame's
  geometry read from a table uploaded with the frames) on its own stream, and the
  streamed executor copying
  each view into its slots after that stream (:meth:`StreamedExecutor.submit_device
  <engine.executor.StreamedExecutor.submit_device>`, driven by
  :class:`engine.streamed_run.StreamedInference`). THE GPU PATH HAS NOT RUN ON A GPU: it
  is written against the pycuda 2026.1 sources and engine.gpu's CudaDevice, and tested
  only through the same classes on the host device; tests/engine/test_frames.py has a
  ``gpu``-marked test for it.

Use a classifier from one thread (on the GPU, the thread that made it: the CUDA context
is current there). Nothing here imports polars except :meth:`FrameResults.to_polars`, nor
CUDA packages except on ``device="gpu"``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import weakref
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal, Mapping, Protocol, Sequence

import numpy as np

from engine.errors import EngineError, InputError
from engine.postprocess import Classified, classify
from engine.preprocess.decode import composite
from engine.specs import AlphaMode, Preprocess
from kernels.launch import FRAME_GEOM_DTYPE, INT32_MAX, Launch, frame_table, preprocess_batch_launch
from kernels.reference import Normalise, ResizeCrop, preprocess_reference

if TYPE_CHECKING:
    import polars as pl

    from engine.executor import Device, DeviceArray, StreamedExecutor
    from engine.models import ModelSource, ResolvedModel
    from engine.preprocess.dali_pipeline import DeviceBatch

log = logging.getLogger(__name__)

DeviceChoice = Literal["cpu", "gpu"]
GpuBackend = Literal["tensorrt", "torch"]
PRECISIONS = ("fp32", "fp16", "int8")
MAX_BATCH = 4096
# Each frame's pixels start at a multiple of this in the staging buffer.
STAGING_ALIGN = 256
# Staging is grown to at least this factor of its old size, so that a run of frames that
# grow slowly does not reallocate per batch.
STAGING_GROWTH = 1.5
# A batch closes early once its frames hold this many bytes, so the staging buffer
# (pinned host memory on the GPU) stays bounded however large the frames are: 16 8K
# frames would otherwise pin about 1.6 GB. A single larger frame still goes, alone.
MAX_BATCH_BYTES = 512 * 2**20
_VIEW_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class FrameView:
    """One model's view: its key, preprocessing, and the kernel's normalisation for the
    caller's channel order (``swap_rb`` flipped for BGR input)."""

    key: str
    preprocess: Preprocess
    norm: Normalise

    @classmethod
    def of(cls, model: "ResolvedModel", channel_order: str) -> "FrameView":
        pre = model.spec.preprocess
        norm = Normalise.from_preprocess(pre)
        if channel_order == "bgr":  # the kernel reads channel 0 as R: swapping fixes BGR input for free
            norm = dataclasses.replace(norm, swap_rb=not norm.swap_rb)
        return cls(model.spec.key, pre, norm)


@dataclass(frozen=True, eq=False)
class Frame:
    """One checked frame: its (H, W, 3) uint8 sources (the frame itself, a grey frame
    broadcast to three channels, or one composite per alpha mode in use; possibly
    strided views), which source each view reads, and each view's geometry."""

    index: int
    height: int
    width: int
    sources: tuple[np.ndarray, ...]
    view_source: tuple[int, ...]
    geometry: tuple[ResizeCrop, ...]


def _describe(frame: Any) -> str:
    return f"{frame.dtype} array of shape {tuple(frame.shape)}"


def frame_geometry(frame: Any, views: Sequence[FrameView], channel_order: str = "rgb") -> tuple[ResizeCrop, ...]:
    """Each view's geometry for ``frame``; :class:`InputError` saying what is wrong with
    it (one line, without the frame's index) if it is not a frame the views can take."""
    order = channel_order.upper()
    if not isinstance(frame, np.ndarray):
        hint = " (np.asarray(image) converts a PIL image; tensor.numpy() a CPU tensor)" if any(
            hasattr(frame, a) for a in ("__array__", "__array_interface__")) else ""
        raise InputError(f"expected a numpy array, got {type(frame).__name__}{hint}")
    if frame.dtype != np.uint8:
        raise InputError(f"{_describe(frame)}: the pixels must be uint8 (0-255)")
    if not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] in (3, 4))):
        raise InputError(f"{_describe(frame)}: expected (H, W, 3) {order}, (H, W) grey or (H, W, 4) {order}A")
    height, width = int(frame.shape[0]), int(frame.shape[1])
    if height == 0 or width == 0:
        raise InputError(f"{_describe(frame)} has no pixels")
    if 3 * width > INT32_MAX:
        raise InputError(f"{width} pixels wide, more than the kernel's row limit")
    geometry = []
    for view in views:
        geom = ResizeCrop.from_preprocess(view.preprocess, height, width)
        if max(geom.resized_h, geom.resized_w) > INT32_MAX:
            raise InputError(f"{height}x{width} is too elongated to resize for {view.key}")
        geometry.append(geom)
    return tuple(geometry)


def prepare_frame(frame: np.ndarray, index: int, views: Sequence[FrameView], geometry: Sequence[ResizeCrop]) -> Frame:
    """Lay out what each view of a checked frame reads. No pixel is copied except for an
    alpha composite (one per alpha mode the views use)."""
    height, width = int(frame.shape[0]), int(frame.shape[1])
    if frame.ndim == 2:
        sources: tuple[np.ndarray, ...] = (np.broadcast_to(frame[:, :, None], (height, width, 3)),)
        view_source = (0,) * len(views)
    elif frame.shape[2] == 3:
        sources, view_source = (frame,), (0,) * len(views)
    else:
        modes: list[AlphaMode] = []
        for view in views:
            if view.preprocess.alpha not in modes:
                modes.append(view.preprocess.alpha)
        sources = tuple(composite(frame[:, :, :3], frame[:, :, 3], mode) for mode in modes)
        view_source = tuple(modes.index(view.preprocess.alpha) for view in views)
    return Frame(index, height, width, sources, view_source, tuple(geometry))


def _chunks(frames: Iterable[Any], batch_size: int, max_bytes: int) -> Iterator[list[Any]]:
    """At most ``batch_size`` frames a chunk, and no more than ``max_bytes`` of pixels
    unless one frame alone is larger (it then goes alone). Objects that are not arrays
    count as 0 bytes: frame_geometry refuses them. If ``frames`` itself raises, the
    frames it gave before are handed on as a chunk first.

    A chunk of ``batch_size`` frames is handed on at once, without waiting for the next
    frame (a live source may not have it yet). Frames from an iterator (not a list, tuple
    or array) are copied as they are read: a decoder may hand out one buffer it refills,
    and its next frame would overwrite those still waiting for their batch."""
    chunk: list[Any] = []
    used = 0
    copy = not isinstance(frames, (list, tuple, np.ndarray))
    source = iter(frames)
    while True:
        try:
            f = next(source)
        except StopIteration:
            break
        except Exception as exc:
            if chunk:
                yield chunk
            raise exc
        if copy and isinstance(f, np.ndarray):
            f = np.array(f, copy=True)
        size = int(getattr(f, "nbytes", 0) or 0)
        if chunk and used + size > max_bytes:
            yield chunk
            chunk, used = [], 0
        chunk.append(f)
        used += size
        if len(chunk) == batch_size:
            yield chunk
            chunk, used = [], 0
    if chunk:
        yield chunk


OnError = Literal["raise", "row"]
ON_ERROR = ("raise", "row")


def check_on_error(on_error: Any) -> None:
    if on_error not in ON_ERROR:
        raise EngineError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")


@dataclass(frozen=True, eq=False)
class FrameChunk:
    """One batch as :func:`frame_batches` hands it on: input frames ``start`` to
    ``start + count - 1``; ``frames`` the prepared good ones in order (``Frame.index`` is
    the input index), ``errors`` each bad one's input index and one-line cause."""

    start: int
    count: int
    frames: tuple[Frame, ...]
    errors: Mapping[int, str]


def frame_batches(frames: Iterable[Any], views: Sequence[FrameView], batch_size: int,
                  channel_order: str = "rgb", max_bytes: int = MAX_BATCH_BYTES,
                  on_error: OnError = "raise") -> Iterator[FrameChunk]:
    """Chunks of prepared frames (at most ``batch_size`` frames and ``max_bytes`` of
    pixels each, see :data:`MAX_BATCH_BYTES`); a chunk's frames are all checked before
    any of them is prepared.

    A bad frame (see :func:`frame_geometry`): with ``on_error="row"`` it goes into its
    chunk's ``errors`` and the rest go on; with ``"raise"`` the good frames before it
    are handed on as one last chunk, then its :class:`InputError` is raised; no frame
    after its chunk is read."""
    check_on_error(on_error)
    start = 0
    for chunk in _chunks(frames, batch_size, max_bytes):
        checked: list[tuple[int, Any, tuple[ResizeCrop, ...]]] = []
        errors: dict[int, str] = {}
        failure: InputError | None = None
        for j, f in enumerate(chunk):
            try:
                checked.append((start + j, f, frame_geometry(f, views, channel_order)))
            except InputError as exc:
                if on_error == "raise":
                    failure = InputError(f"frame {start + j}: {exc}")
                    break
                errors[start + j] = str(exc)
        count = len(checked) if failure is not None else len(chunk)
        if count:
            prepared = tuple(prepare_frame(f, i, views, g) for i, f, g in checked)
            yield FrameChunk(start, count, prepared, errors)
        if failure is not None:
            raise failure
        start += len(chunk)


def reference_view(frame: Frame, v: int, view: FrameView, dtype: Any = np.float32) -> np.ndarray:
    """What the kernel writes for view ``v`` of ``frame``: (3, S, S) of ``dtype``."""
    source = np.ascontiguousarray(frame.sources[frame.view_source[v]])
    return preprocess_reference(source, frame.geometry[v], view.norm, dtype)


# --------------------------------------------------------------------------- producer


class Launcher(Protocol):
    """Queues one view of a whole batch on ``stream``: ``launch`` holds the batched
    kernel's arguments (addresses, image count, the geometry table's address:
    :func:`kernels.launch.frame_table`); ``src`` (the staging buffer), ``norm`` and
    ``out`` (the view's buffer) name the same buffers and normalisation as objects."""

    def __call__(self, launch: Launch, stream: Any, *, src: "DeviceArray", norm: Normalise,
                 out: "DeviceArray") -> None: ...

    def close(self) -> None: ...


class KernelLauncher:
    """``kernels/preprocess.cu`` compiled once with pycuda in the current CUDA context
    (the executor's device's: create it after the :class:`engine.gpu.CudaDevice`), launched
    asynchronously on the producer's stream (``Function.__call__(..., stream=)``).
    NOT RUN ON A GPU."""

    def __init__(self) -> None:
        import kernels

        self._module = kernels.compile_module("preprocess")
        self._functions = {name: self._module.get_function(name)
                           for name in ("preprocess_batch_u8_to_f16", "preprocess_batch_u8_to_f32")}

    def __enter__(self) -> "KernelLauncher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, launch: Launch, stream: Any, **_: Any) -> None:
        if self._module is None:
            raise RuntimeError("kernel launcher is closed")
        self._functions[launch.function](*launch.args, block=launch.block, grid=launch.grid, stream=stream)

    def close(self) -> None:
        """Drop the module (unloaded by pycuda while the context is still current: close
        this before the device)."""
        self._functions.clear()
        self._module = None


class ReferenceLauncher:
    """The kernel's NumPy reference queued on a :class:`~engine.executor.HostStream` in
    its place: in stream order, as the kernel does, reads the batch's geometry table and
    each frame from the host device's "device" staging buffer, and writes batch row z of
    the view buffer from table row z."""

    def __enter__(self) -> "ReferenceLauncher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, launch: Launch, stream: Any, *, src: Any, norm: Normalise, out: Any) -> None:
        # Addresses and sizes as the kernel gets them: from the launch.
        base, table_at, out_ptr = int(launch.args[0]), int(launch.args[1]) - int(src.ptr), int(launch.args[-1])
        count, size = launch.grid[2], int(launch.args[2])
        if base != src.ptr or out_ptr != out.ptr or size != out.shape[-1] or not 0 <= table_at < src.nbytes:
            raise ValueError(f"launch {launch.function} does not address the staging and view buffers it names")

        def run() -> None:
            staged = src.array
            table = staged[table_at : table_at + count * FRAME_GEOM_DTYPE.itemsize].view(FRAME_GEOM_DTYPE)
            for z, row in enumerate(table):
                h, w, pitch, start = int(row["src_h"]), int(row["src_w"]), int(row["src_pitch"]), int(row["offset"])
                geom = ResizeCrop(h, w, int(row["resized_h"]), int(row["resized_w"]), int(row["top"]), int(row["left"]), size)
                image = staged[start : start + h * pitch].reshape(h, pitch)[:, : 3 * w].reshape(h, w, 3)
                out.array[z] = preprocess_reference(image, geom, norm, out.dtype)

        stream.submit(run)

    def close(self) -> None:
        pass


@dataclass
class ProducerStats:
    batches: int = 0
    frames: int = 0
    staging_bytes: int = 0  # capacity of the staging buffers now
    staging_allocations: int = 0  # times the (pinned host, device) staging pair was (re)allocated
    uploaded_bytes: int = 0


class FrameProducer:
    """Frames -> one :class:`~engine.preprocess.dali_pipeline.DeviceBatch` per batch, the
    producer of :class:`engine.streamed_run.StreamedInference` for frames.

    Per batch: every frame's sources go into one staging buffer (pinned on CUDA), each at
    a multiple of :data:`STAGING_ALIGN`; one host-to-device copy on the producer's own
    stream uploads it, with each view's geometry table (one row per frame) behind the
    frames; the batched kernel (``launcher``) runs once per view for the whole batch into
    that view's device batch buffer (``max_batch`` rows, allocated once). The batch returned
    names the view buffers and the stream: the executor's slots wait on that stream, then
    copy. The staging buffers are allocated at the first batch's size (or
    ``staging_bytes``) and reallocated only when a batch needs more (counted in
    :attr:`stats`).

    Buffers are reused by the next call: the caller must synchronise the
    :class:`~engine.executor.Consumed` of the previous batch first (StreamedInference
    does). ``device`` is the executor's :class:`~engine.executor.Device`; the same class
    runs on :class:`engine.gpu.CudaDevice` with :class:`KernelLauncher` and on
    :class:`~engine.executor.HostDevice` with :class:`ReferenceLauncher`.
    """

    def __init__(self, device: "Device", views: Sequence[tuple[FrameView, Any]], max_batch: int, launcher: Launcher,
                 *, staging_bytes: int = 0, device_id: int = 0) -> None:
        self._device = device
        self._launcher = launcher
        self._device_id = device_id
        self.max_batch = int(max_batch)
        self.views = tuple(view for view, _ in views)
        self.stats = ProducerStats()
        self._closed = False
        for view, dtype in views:
            if np.dtype(dtype) not in _VIEW_DTYPES:
                raise EngineError(f"{view.key}: the model takes {np.dtype(dtype)} input; the preprocessing kernel writes float32 or float16")
        self._outputs: dict[str, Any] = {}
        self._host_staging: np.ndarray | None = None
        self._dev_staging: Any = None
        self.stream = device.stream()
        for view, dtype in views:
            size = view.preprocess.size
            self._outputs[view.key] = device.device_empty((self.max_batch, 3, size, size), np.dtype(dtype))
        if staging_bytes:
            self._grow(int(staging_bytes))

    def __enter__(self) -> "FrameProducer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _free_staging(self) -> None:
        for buf in (self._host_staging, self._dev_staging):
            if buf is not None:
                self._device.free(buf)
        self._host_staging = self._dev_staging = None

    def _grow(self, need: int) -> None:
        """Staging of at least ``need`` bytes. The old buffers are idle: the caller waited
        for the previous batch's copies (the contract above)."""
        old = self.stats.staging_bytes
        capacity = max(need, int(old * STAGING_GROWTH)) if old else need
        capacity = -(-capacity // STAGING_ALIGN) * STAGING_ALIGN
        self._free_staging()
        self._host_staging = self._device.host_empty((capacity,), np.uint8)
        self._dev_staging = self._device.device_empty((capacity,), np.uint8)
        self.stats.staging_bytes = capacity
        self.stats.staging_allocations += 1
        if old:
            log.info("frame staging grown from %d to %d bytes", old, capacity)

    def __call__(self, frames: Sequence[Frame]) -> "DeviceBatch":
        from engine.preprocess.dali_pipeline import DeviceBatch, DeviceView

        if self._closed:
            raise RuntimeError("frame producer is closed")
        n = len(frames)
        if n > self.max_batch:
            raise ValueError(f"a batch of {n} frames for a producer of at most {self.max_batch}")
        if n == 0:  # every frame of the chunk was bad: nothing to upload or launch
            return DeviceBatch(ok=(), sizes=(), errors={}, views={}, device_id=self._device_id, cuda_stream=self.stream)
        offsets: list[list[int]] = []
        used = 0
        for f in frames:
            row = []
            for src in f.sources:
                row.append(used)
                used += -(-src.size // STAGING_ALIGN) * STAGING_ALIGN
            offsets.append(row)
        tables = [frame_table([(row[f.view_source[v]], 3 * f.width, f.geometry[v]) for f, row in zip(frames, offsets)])
                  for v in range(len(self.views))]
        table_at = []
        for table in tables:  # behind the frames, in the same upload
            table_at.append(used)
            used += -(-table.nbytes // STAGING_ALIGN) * STAGING_ALIGN
        if used > self.stats.staging_bytes:
            self._grow(used)
        host, dev, stream = self._host_staging, self._dev_staging, self.stream
        for f, row in zip(frames, offsets):
            for src, off in zip(f.sources, row):
                np.copyto(host[off : off + src.size].reshape(src.shape), src)  # makes strided frames contiguous
        for table, at in zip(tables, table_at):
            host[at : at + table.nbytes] = table.view(np.uint8)
        self._device.h2d(dev, host[:used], stream)
        for view, at in zip(self.views, table_at):
            out = self._outputs[view.key]
            launch = preprocess_batch_launch(dev.ptr, dev.ptr + at, n, view.preprocess.size, view.norm, out.ptr,
                                             out_dtype=np.dtype(out.dtype).name)
            self._launcher(launch, stream, src=dev, norm=view.norm, out=out)
        self.stats.batches += 1
        self.stats.frames += n
        self.stats.uploaded_bytes += used
        views = {}
        for view in self.views:
            out = self._outputs[view.key]
            views[view.key] = DeviceView(view.key, out.ptr, (n, *out.shape[1:]), np.dtype(out.dtype), out)
        return DeviceBatch(ok=tuple(range(n)), sizes=tuple((f.height, f.width) for f in frames), errors={},
                           views=views, device_id=self._device_id, cuda_stream=stream)

    def close(self) -> None:
        """Wait for the producer's stream, free its buffers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._device.synchronize_stream(self.stream)
        finally:
            self._free_staging()
            for buf in self._outputs.values():
                self._device.free(buf)
            self._outputs.clear()
            self.stream = None  # the device drops its own reference (and destroys it) while its context is current


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class FrameResults:
    """Results for input frames ``first`` to ``first + len - 1``, in input order: per
    model key a :class:`~engine.postprocess.Classified` (``probabilities`` (n, classes)
    float32, ``index`` (n,) label indices, ``labels`` the label names), each frame's
    (height, width) in ``sizes`` (n, 2), and ``errors``, the input index and one-line
    cause of every frame that was refused (``on_error="row"``). A refused frame keeps its
    row: NaN probabilities, index -1, label None, size (-1, -1); :attr:`ok` masks them."""

    models: tuple["ResolvedModel", ...]
    sizes: np.ndarray
    outputs: Mapping[str, Classified]
    first: int = 0
    errors: Mapping[int, str] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.sizes))

    def __getitem__(self, key: str) -> Classified:
        """By model key (``"gender/alpha"``), or by task (``"gender"``)."""
        if key in self.outputs:
            return self.outputs[key]
        by_task = [k for k in self.outputs if k.split("/")[0] == key]
        if len(by_task) == 1:
            return self.outputs[by_task[0]]
        raise KeyError(f"no results for {key!r}; the keys are {', '.join(map(repr, self.outputs))}")

    def keys(self) -> tuple[str, ...]:
        return tuple(self.outputs)

    @property
    def ok(self) -> np.ndarray:
        """(n,) bool: True where the frame was classified."""
        mask = np.ones(len(self), bool)
        for i in self.errors:
            mask[i - self.first] = False
        return mask

    @classmethod
    def of_chunk(cls, models: Sequence["ResolvedModel"], chunk: FrameChunk, outputs: Mapping[str, Classified]) -> "FrameResults":
        """One chunk's results: ``outputs[key]`` rows are ``chunk.frames`` in order; the
        chunk's refused frames get their placeholder rows."""
        rows = np.array([f.index - chunk.start for f in chunk.frames], np.int64)
        sizes = np.full((chunk.count, 2), -1, np.int64)
        if len(rows):
            sizes[rows] = [(f.height, f.width) for f in chunk.frames]
        full = {}
        for m in models:
            key, classes = m.spec.key, m.spec.num_classes
            c = outputs[key]
            probabilities = np.full((chunk.count, classes), np.nan, np.float32)
            index = np.full(chunk.count, -1, np.int64)
            labels: list[str | None] = [None] * chunk.count
            if len(rows):
                probabilities[rows], index[rows] = c.probabilities, c.index
                for r, label in zip(rows.tolist(), c.labels):
                    labels[r] = label
            full[key] = Classified(probabilities, index, tuple(labels))
        return cls(tuple(models), sizes, full, chunk.start, dict(chunk.errors))

    @classmethod
    def concat(cls, models: Sequence["ResolvedModel"], parts: Sequence["FrameResults"]) -> "FrameResults":
        """Consecutive parts (each starting where the one before ends) as one."""
        first = parts[0].first if parts else 0
        at = first
        for part in parts:
            if part.first != at:
                raise ValueError(f"results for frames from {part.first} do not follow those ending at {at}")
            at += len(part)
        sizes = np.concatenate([p.sizes for p in parts]) if parts else np.zeros((0, 2), np.int64)
        outputs = {}
        for m in models:
            key, classes = m.spec.key, m.spec.num_classes
            chunks = [p.outputs[key] for p in parts]
            outputs[key] = Classified(
                np.concatenate([c.probabilities for c in chunks]) if chunks else np.zeros((0, classes), np.float32),
                np.concatenate([c.index for c in chunks]) if chunks else np.zeros((0,), np.int64),
                tuple(label for c in chunks for label in c.labels),
            )
        errors = {i: msg for p in parts for i, msg in p.errors.items()}
        return cls(tuple(models), sizes, outputs, first, errors)

    def to_polars(self) -> "pl.DataFrame":
        """One row per frame with `engine run`'s columns for these models (its row code),
        ``frame`` (the input index, Int64) in place of ``path``; a refused frame's row has
        its ``error`` and nulls, as an unreadable file's row does."""
        import polars as pl

        from engine.preprocess.result import PreprocessResult
        from engine.runner import _Batch, _rows, result_schema

        schema = dict(result_schema(self.models))
        schema["path"] = pl.Int64  # renamed below: the runner's rows fill "path"
        n = len(self)
        ok = np.flatnonzero(self.ok)
        compact = {
            key: Classified(c.probabilities[ok], c.index[ok], tuple(c.labels[i] for i in ok.tolist()))
            for key, c in self.outputs.items()
        }
        result = PreprocessResult(ok=ok.tolist(), views={}, sizes=[tuple(s) for s in self.sizes[ok].tolist()],
                                  errors={i - self.first: msg for i, msg in self.errors.items()})
        batch = _Batch(paths=list(range(self.first, self.first + n)), payload=None, read_errors={}, result=result)
        return _rows(batch, self.models, compact, schema).rename({"path": "frame"})


# --------------------------------------------------------------------------- classifier


@dataclass
class _FrameBatch:
    """What StreamedInference reads (``payload``, the chunk's good frames) and fills in
    (``result``)."""

    chunk: FrameChunk
    payload: list[Frame] | None
    result: Any = None


def _gpu_plan(models: Sequence["ResolvedModel"], choices: Sequence[Any], precision: str, gpu_backend: str,
              cache_dir: Path, batch_size: int):
    """The GPU path's :class:`~engine.gpu_path.PathPlan` for these models, or EngineError."""
    from engine.gpu_path import GPU_BACKENDS, PathPlan, gpu_prerequisites, lookup_engines

    if gpu_backend not in GPU_BACKENDS:
        raise EngineError(f"gpu_backend must be one of {', '.join(GPU_BACKENDS)}, got {gpu_backend!r}")

    def engines_for(target):
        engines, problem = lookup_engines(models, precision, target, cache_dir, batch_size)
        if problem is not None:
            problem += f"; build them with `engine build --precision {precision} --cache-dir {cache_dir}` and these models' options"
        return engines, problem

    engines, problem = gpu_prerequisites(models, choices, precision, gpu_backend, engines_for,
                                         sources_hint=" (FrameClassifier: pass sources=[ModelSource(checkpoint=...), ...])",
                                         dali=False)
    if problem is not None:
        raise EngineError(f"FrameClassifier(device='gpu'): {problem}")
    return PathPlan("gpu", "device='gpu'", precision, gpu_backend, engines)


class FrameClassifier:
    """Classifies frames held as arrays with ``models`` (resolved models, one per task;
    see the module docstring for the frames accepted and the paths).

    ``batch_size``: frames per batch (and the device buffers' rows); ``precision``: fp32,
    fp16 or int8 (int8 on the CPU needs ``calib_dir``); ``threads``: ONNX Runtime's
    (default: every core); ``channel_order``: of the 3- and 4-channel frames;
    ``streamed``: on the CPU, run the GPU path's streamed loop on the host device;
    ``gpu_backend``: TensorRT engines (built by `engine build` into ``cache_dir``) or
    PyTorch on CUDA (``"torch"``: random weights, or checkpoints named by ``sources``,
    one :class:`~engine.models.ModelSource` per model); ``cache_dir``: the model cache
    (prepared fp16/int8 graphs, engines; default :func:`engine.models.default_cache_dir`).

    Everything is opened in the constructor and released by :meth:`close` (idempotent;
    also on leaving a ``with`` block).
    """

    def __init__(
        self,
        models: Sequence["ResolvedModel"],
        *,
        device: DeviceChoice = "cpu",
        batch_size: int = 16,
        precision: str = "fp32",
        threads: int | None = None,
        channel_order: Literal["rgb", "bgr"] = "rgb",
        gpu_backend: GpuBackend = "tensorrt",
        streamed: bool = False,
        cache_dir: Path | None = None,
        calib_dir: Path | None = None,
        sources: Sequence["ModelSource"] | None = None,
    ) -> None:
        self._models = tuple(models)
        if not self._models:
            raise EngineError("FrameClassifier needs at least one model")
        tasks = [m.spec.task for m in self._models]
        if len(set(tasks)) != len(tasks):
            raise EngineError("FrameClassifier runs one model per task (the results' columns are named by task)")
        if device not in ("cpu", "gpu"):
            raise EngineError(f"device must be 'cpu' or 'gpu', got {device!r}")
        integer = isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool)  # NumPy ints too
        if not integer or not 1 <= batch_size <= MAX_BATCH:
            raise EngineError(f"batch size must be an integer between 1 and {MAX_BATCH}, got {batch_size!r}")
        batch_size = int(batch_size)
        if precision not in PRECISIONS:
            raise EngineError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        channel_order = getattr(channel_order, "value", channel_order)
        channel_order = channel_order.lower() if isinstance(channel_order, str) else channel_order
        if channel_order not in ("rgb", "bgr"):
            raise EngineError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                    or threads < 1):
            raise EngineError(f"threads must be a whole number of at least 1 (None: every core), got {threads!r}")
        if sources is not None and len(sources) != len(self._models):
            raise EngineError(f"sources: one ModelSource per model ({len(self._models)}), got {len(sources)}")
        from engine.models import default_cache_dir

        self.device = device
        self.batch_size = batch_size
        self.precision = precision
        self.channel_order = channel_order
        self.streamed = device == "gpu" or bool(streamed)
        self.views = tuple(FrameView.of(m, channel_order) for m in self._models)
        self._threads = int(threads) if threads is not None else os.cpu_count() or 1
        self._cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self._calib_dir = calib_dir
        self._calibration: Any = None  # found (and hashed) once, for every model, on first need
        self._stack = ExitStack()
        self._backends: dict[str, Any] = {}  # the plain CPU path's OrtBackends
        self._executor: StreamedExecutor | None = None
        self._producer: FrameProducer | None = None
        self._closed = False
        self._busy = False
        self._iterators: "weakref.WeakSet[_Owned]" = weakref.WeakSet()  # closed with the classifier
        self.backend = ""
        started = time.perf_counter()
        try:
            if device == "gpu":
                self._open_gpu(gpu_backend, sources)
            elif self.streamed:
                self._open_host_streamed()
            else:
                self._backends = {m.spec.key: self._stack.enter_context(self._cpu_backend(m)) for m in self._models}
                providers = "/".join(next(iter(self._backends.values())).providers)
                self.backend = f"onnxruntime {providers}, NumPy reference preprocessing"
        except BaseException:
            self._stack.close()
            raise
        log.info("frame classifier ready in %.2f s: %s, %s, batch %d", time.perf_counter() - started,
                 ", ".join(m.spec.key for m in self._models), self.backend, batch_size)

    # set-up -------------------------------------------------------------------------

    def _cpu_backend(self, model: "ResolvedModel"):
        from engine.backends.onnxruntime import calibration_images, open_cpu_backend

        if self._calibration is None and self.precision != "fp32":
            self._calibration = calibration_images(self._calib_dir)
        return open_cpu_backend(model, self.precision, threads=self._threads, cache_dir=self._cache_dir,
                                calibration=self._calibration)

    def _open_streamed(self, device: "Device", backends: Mapping[str, Any], launcher: Launcher) -> None:
        from engine.executor import ExecutorConfig, StreamedExecutor

        views = [(view, backends[view.key].inputs[0].dtype) for view in self.views]
        self._producer = self._stack.enter_context(FrameProducer(device, views, self.batch_size, launcher))
        self._executor = self._stack.enter_context(StreamedExecutor(backends, device, ExecutorConfig(self.batch_size)))

    def _open_host_streamed(self) -> None:
        from engine.executor import HostBackend, HostDevice

        device = self._stack.enter_context(HostDevice())
        backends = {
            m.spec.key: HostBackend(self._stack.enter_context(self._cpu_backend(m)), max_batch=self.batch_size)
            for m in self._models
        }
        launcher = self._stack.enter_context(ReferenceLauncher())
        self._open_streamed(device, backends, launcher)
        self.backend = f"streamed executor on the host device ({next(iter(backends.values())).name}, NumPy reference preprocessing)"

    def _open_gpu(self, gpu_backend: str, sources: Sequence["ModelSource"] | None) -> None:
        from engine.gpu import CudaDevice
        from engine.gpu_path import open_gpu_backends
        from engine.models import ModelChoice, ModelSource

        if sources is None:
            sources = [ModelSource(random_weights=m.is_random) for m in self._models]
        choices = [ModelChoice(m.spec.task, m.spec.variant, s) for m, s in zip(self._models, sources)]
        plan = _gpu_plan(self._models, choices, self.precision, gpu_backend, self._cache_dir, self.batch_size)
        device = self._stack.enter_context(CudaDevice(0))  # the context everything below lives in
        backends = open_gpu_backends(plan, self._models, choices, self.batch_size, self._stack)
        launcher = self._stack.enter_context(KernelLauncher())
        self._open_streamed(device, backends, launcher)
        what = "TensorRT" if gpu_backend == "tensorrt" else "torch-cuda"
        self.backend = f"{what} {self.precision} (streamed executor, preprocessing kernel on {device.name})"

    # lifetime -----------------------------------------------------------------------

    def __enter__(self) -> "FrameClassifier":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # keep the error on its way out; report a cleanup failure beside it
            self.close()
        except Exception as cleanup:
            log.error("while closing the frame classifier after %s: %s", exc_type.__name__, cleanup)

    def close(self) -> None:
        """Release everything (executor, producer, backends, device, in that order). Idempotent."""
        if self._closed:
            return
        self._closed = True
        # An iterator still live ends first: it waits for its queued work, while the
        # executor and buffers it uses are still there; a later next() raises.
        for live in list(self._iterators):
            live.abort()
        self._executor = self._producer = None
        self._backends = {}
        self._stack.close()

    @property
    def models(self) -> tuple["ResolvedModel", ...]:
        return self._models

    @property
    def producer_stats(self) -> ProducerStats | None:
        """The streamed paths' staging accounting (None on the plain CPU path)."""
        return self._producer.stats if self._producer is not None else None

    @property
    def executor(self) -> "StreamedExecutor | None":
        return self._executor

    # work ---------------------------------------------------------------------------

    def classify(self, frames: Iterable[np.ndarray], *, on_error: OnError = "raise") -> FrameResults:
        """Classify ``frames`` (any iterable; consumed one batch at a time) in order.

        ``on_error="raise"`` (default): a bad frame raises :class:`InputError` naming it,
        once every frame before it is classified; no frame after its batch is read. The error's
        ``partial`` holds the results of the frames before it, so no work is lost; so
        does an exception raised by ``frames`` itself (a failing decoder), raised once
        the frames it gave are classified. A KeyboardInterrupt (Ctrl-C) goes on at once:
        its ``partial`` holds the batches handed out before it, not the frames waiting for
        their batch nor the batches still in the streamed ring. ``on_error="row"``: a bad
        frame keeps its place with its cause in :attr:`FrameResults.errors` (see
        :class:`FrameResults`) and the rest go on."""
        parts: list[FrameResults] = []
        try:
            for part in self.iter_classify(frames, on_error=on_error):
                parts.append(part)
        except BaseException as exc:
            try:
                exc.partial = FrameResults.concat(self._models, parts)  # type: ignore[attr-defined]
            except (AttributeError, TypeError):  # an exception type that takes no attributes
                pass
            raise
        return FrameResults.concat(self._models, parts)

    def iter_classify(self, frames: Iterable[np.ndarray], *, on_error: OnError = "raise") -> Iterator[FrameResults]:
        """:meth:`classify` one batch at a time: yields each batch's :class:`FrameResults`
        (``first`` says where it starts) as soon as it is done, for inputs too long to
        wait for, or to write as they come. An error (``on_error="raise"``, or from
        ``frames``) is raised after the batches before it are yielded. One call at a time:
        close or finish a generator before the next call."""
        if self._closed:
            raise RuntimeError("frame classifier is closed")
        check_on_error(on_error)  # now: the generator below starts only when iterated
        if isinstance(frames, np.ndarray) and (frames.ndim == 2 or (frames.ndim == 3 and frames.shape[2] <= 4)):
            # one frame: iterating it would give its rows as "frames" ((N, H, W) is a stack of grey frames)
            raise InputError(
                f"frames is one {frames.ndim}-D array {frames.shape}: pass [frame] for a single frame, "
                "or an (N, H, W, C) array or a list for several"
            )
        live = _Owned(self._iter_classify(frames, on_error))
        self._iterators.add(live)
        return live

    def _iter_classify(self, frames: Iterable[np.ndarray], on_error: OnError) -> Iterator[FrameResults]:
        if self._busy:
            raise RuntimeError("frame classifier is already classifying: finish or close the other call's iterator first")
        self._busy = True
        try:
            source = _Held(frame_batches(frames, self.views, self.batch_size, self.channel_order, on_error=on_error))
            if self._executor is not None:
                yield from self._run_streamed(source)
            else:
                for chunk in source:
                    yield FrameResults.of_chunk(self._models, chunk, self._run_cpu(chunk.frames))
            if source.error is not None:
                raise source.error
        finally:
            self._busy = False

    def _run_cpu(self, frames: Sequence[Frame]) -> dict[str, Classified]:
        outputs = {}
        for v, (view, m) in enumerate(zip(self.views, self._models)):
            size = view.preprocess.size
            x = np.empty((len(frames), 3, size, size), np.float32)
            for j, frame in enumerate(frames):
                x[j] = reference_view(frame, v, view)
            raw = self._backends[view.key].run(x) if len(frames) else np.zeros((0, m.spec.num_classes), np.float32)
            outputs[view.key] = classify(raw, m.output_kind, m.spec.labels, m.spec.key)
        return outputs

    def _run_streamed(self, chunks: Iterable[FrameChunk]) -> Iterator[FrameResults]:
        from engine.streamed_run import StreamedInference

        inference = StreamedInference(self._models, self._executor, self._producer, backend=self.backend)
        try:
            with closing(inference.batches(_FrameBatch(c, list(c.frames)) for c in chunks)) as results:
                for batch, outputs in results:
                    yield FrameResults.of_chunk(self._models, batch.chunk, outputs)
        except BaseException:
            # A failure mid-run, or the caller dropping the iterator: wait for what is
            # queued, so the producer's buffers and the executor's slots are free for the
            # next call.
            try:
                self._executor.drain()
            except Exception as exc:
                log.error("while draining the executor after an error: %s", exc)
            raise


class _Owned:
    """The iterator :meth:`FrameClassifier.iter_classify` returns: its generator, ended
    by the classifier's close (:meth:`abort`), after which ``next`` raises instead of
    reading freed buffers."""

    def __init__(self, gen: Iterator[FrameResults]) -> None:
        self._gen = gen
        self._aborted = False

    def __iter__(self) -> "_Owned":
        return self

    def __next__(self) -> FrameResults:
        if self._aborted:
            raise RuntimeError("frame classifier is closed: this iterator ended with it")
        return next(self._gen)

    def close(self) -> None:
        """End the iteration early (waits for the work already queued)."""
        self._gen.close()

    def abort(self) -> None:
        self._aborted = True
        self._gen.close()


class _Held:
    """An iterator that ends instead of raising: the first exception of ``it`` is kept
    in :attr:`error`, so that what was queued before it is finished and handed out
    first."""

    def __init__(self, it: Iterable[Any]) -> None:
        self._it = iter(it)
        self.error: BaseException | None = None

    def __iter__(self) -> "_Held":
        return self

    def __next__(self) -> Any:
        if self.error is not None:
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            raise
        except Exception as exc:
            self.error = exc
            raise StopIteration from None
