"""One DALI pipeline: decode each image once, branch into every model's view.

Graph (per sample)::

    enc ──> decoders.image(RGB) ────────────────────────┐
                                                        ├─ select(on_host) ─> resize+crop ─> [RGB->BGR] ─> normalise
    rgba ─> composite per alpha mode (drop/white/black) ┘   (one chain per view; CHW float32 out)

Each file is routed on the host from its headers (:func:`engine.preprocess.decode.probe`):

* plain JPEG/PNG/WebP/BMP go to ``enc`` and are decoded by DALI;
* files with alpha, and formats DALI does not take (GIF, TIFF, animated WebP, ...)
  are decoded once by PIL (on a thread pool) to RGBA and go to ``rgba``; each view
  composites them per its spec's alpha mode BEFORE resizing.

Both external sources receive a full batch; a sample on the other route gets a 1x1
placeholder, and a per-sample DALI conditional (``if on_host``) picks the real branch
(one select per alpha mode in use). The views then share the same ops:

* geometry: ``Preprocess.resized_shape(h, w)`` and ``Preprocess.crop_origin``, computed
  in the graph with integer arithmetic from the decoded shape
  (``int(long * size / short) == (long * size) // short`` for positive integers; the
  centre offset rounds half to even like Python's ``round``);
* resize + crop, fused by default: DALI resamples only the ``size x size`` window, given
  as ``roi_start``/``roi_end`` (the window mapped back to input coordinates by the
  resize's own scale, in/resized per axis) with ``size=[S, S]``. That is the sampling
  grid and filter of "resize to resized_shape, then crop"; only the float32 window
  coordinates can move a value by one unit (measured at under 0.01 % of pixels). It is
  faster on 1080p frames and keeps memory bounded for extreme aspect ratios (a 1x2000
  strip would otherwise be resized to 224x448000 and 384x768000 pixels).
  ``fused_crop=False`` resizes the whole image, then slices;
* interpolation per spec (linear, cubic, Lanczos3), antialiasing when shrinking as
  ``Preprocess.antialias`` says: on for the quality spec, as PIL (timm) does; off for
  the gender spec, as the card's OpenCV ``cv2.resize`` (see
  tests/engine/preprocess/test_parity.py for what it changes);
* channel order: RGB, or BGR by a colour-space conversion;
* ``crop_mirror_normalize`` with ``mean * 255`` and ``std * 255`` to float32 CHW. Mean
  and std apply to the channels in output order (``mean[0]`` to the first channel).

A batch DALI cannot finish (a truncated JPEG, a PNG with a bad CRC) leaves the
pipeline unusable: it is rebuilt, the DALI-routed files of that batch are checked with
the host decoder, those it rejects become errors, and the rest are run again; if the
batch still fails, its files run one at a time and a file DALI fails on alone goes
the host route. Good rows never depend on the company they keep.

GPU pipeline (``device="gpu"``): the same graph, built by the same code, with
``decoders.image(device="mixed")`` (nvJPEG, using the hardware JPEG decoder where the
GPU has one, as ``hw_decoder_load`` says; PNG, WebP and BMP as DALI's mixed decoder
does them: decoded on the host, then copied) and every later op on the GPU. The host
route's RGBA goes to the GPU with ``.gpu()`` and is composited there. The geometry
stays on the CPU: ``DataNode.shape()`` of a GPU node is a CPU node under DALI's
dynamic executor, which the GPU pipeline therefore asks for (``exec_dynamic=True``),
and ``resize``'s ROI arguments must be CPU nodes. Normalisation writes FP16 or FP32
(``output_dtype``) straight from ``crop_mirror_normalize``. Two ways out:

* :meth:`DaliPreprocessor.process` copies the views back to host numpy arrays (tests,
  the CPU ONNX Runtime fallback), the same :class:`PreprocessResult` as the CPU path;
* :meth:`DaliPreprocessor.process_device` hands out the GPU outputs of ONE DALI run as
  a :class:`DeviceBatch` (pointers to contiguous NCHW buffers, owned by DALI), ordered
  on the CUDA stream the caller passes; valid only until the next call (see there).

Failure isolation is the same on both devices: rebuild, check with the host decoder,
run the rest; in device mode the isolated survivors then run once more together, so
that what is handed out is one run's outputs.
"""

from __future__ import annotations

import ctypes
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from engine.errors import EngineError, InputError, OutputError, no_room_message
from engine.gpu import cuda_absent_reason, stream_handle
from engine.preprocess.decode import ImageDecodeError, decode_rgba, probe, undecodable_cause
from engine.preprocess.result import PreprocessResult, ViewDecl
from engine.specs import AlphaMode, ChannelOrder, CropPosition, Interpolation, Preprocess, ResizeRule

log = logging.getLogger(__name__)

_ENC = "enc"
_RGBA = "rgba"
_ON_HOST = "on_host"


class Route(str, Enum):
    DALI = "dali"  # encoded bytes, decoded by DALI
    HOST = "host"  # decoded by PIL to RGBA, composited in the graph


@dataclass
class _Entry:
    index: int
    data: np.ndarray  # encoded bytes as uint8
    route: Route
    rgba: np.ndarray | None = None  # HxWx4, for the host route


@dataclass(frozen=True)
class _Row:
    views: tuple[np.ndarray, ...]  # one (3, S, S) array per view, in view order
    size: tuple[int, int]


_OUTPUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


@dataclass(frozen=True)
class DeviceView:
    """One view of a :class:`DeviceBatch`: ``shape[0]`` samples of (3, S, S), contiguous
    (NCHW, C order) in the memory of GPU ``device_id``, starting at ``ptr``.

    ``tensors`` is the DALI ``TensorListGPU`` that owns the memory (None for an empty
    batch, ``ptr`` is then 0). The memory is DALI's: never free it, never write to it.
    """

    key: str
    ptr: int
    shape: tuple[int, int, int, int]
    dtype: np.dtype
    tensors: Any
    stream: int | None = None  # the cudaStream_t the data is ordered on (None: complete)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def copy_to(self, dst_ptr: int, cuda_stream: int | None = None) -> None:
        """Copy the whole view to ``dst_ptr`` (``nbytes`` bytes of GPU memory).

        With ``cuda_stream`` (a ``cudaStream_t`` as an int) the copy is queued on it and
        the call does not wait: the data is in place once the stream gets there. That
        stream must be the view's own (``stream``) or one already ordered after it: DALI
        does not make the copy wait for the stream its outputs were produced on. Without
        one the copy runs on the view's own stream and the call returns when it is done."""
        if self.tensors is None:
            return
        self._dali_owned("copy_to")
        dst = ctypes.c_void_p(int(dst_ptr))
        if cuda_stream is not None:
            self.tensors.copy_to_external(dst, ctypes.c_void_p(int(cuda_stream)), non_blocking=True)
        elif self.stream is not None:
            self.tensors.copy_to_external(dst, ctypes.c_void_p(self.stream), non_blocking=False)
        else:  # host-synchronous outputs
            self.tensors.copy_to_external(dst, None, non_blocking=False)

    def to_numpy(self) -> np.ndarray:
        """A host copy (synchronous), shape ``shape``, dtype ``dtype``."""
        if self.tensors is None:
            return np.empty(self.shape, self.dtype)
        self._dali_owned("to_numpy")
        return np.array(self.tensors.as_cpu().as_array(), dtype=self.dtype, copy=True)

    def _dali_owned(self, what: str) -> None:
        if not hasattr(self.tensors, "copy_to_external"):  # the frames API's own buffers
            raise TypeError(f"{self.key}: {what}() copies out of DALI's outputs; this view's memory is a "
                            f"{type(self.tensors).__name__} (read it with the executor's device)")


@dataclass(frozen=True)
class DeviceBatch:
    """The GPU outputs of one DALI run (:meth:`DaliPreprocessor.process_device`).

    Row ``j`` of every view and ``sizes[j]`` belong to input ``ok[j]``; every other
    input index has a one-line cause in ``errors``, as in :class:`PreprocessResult`.

    Validity: the buffers stay valid through the next ``process``/``process_device``
    call (and while referenced, until ``close()``, unless a later call had to rebuild
    the pipeline after a failed batch): the GPU pipeline runs DALI's dynamic executor
    (``exec_dynamic=True``), which does not recycle an output that is still
    referenced (``Pipeline.release_outputs``: "the buffers are not invalidated"), and
    a rebuild keeps the pipeline of the last returned batch until the call after. The
    streamed loop relies on this to run DALI on batch k+1 while the executor still
    copies out of batch k; drop the batch once your copies are done. (Not yet checked
    on a GPU; `benchmarks/gpu_check` runs the GPU tests that would show it.)

    Ordering: when ``cuda_stream`` is not None the outputs are ready in that stream's
    order (``Pipeline.run(cuda_stream)``): work enqueued on that stream after the call
    sees them; another stream must first wait on an event recorded on it. When it is
    None the outputs were host-synchronous: ready when ``process_device`` returned.
    """

    ok: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]
    errors: Mapping[int, str]
    views: Mapping[str, DeviceView]
    device_id: int
    cuda_stream: Any

    def to_result(self) -> PreprocessResult:
        """Host copies of the views, as :meth:`DaliPreprocessor.process` returns them."""
        return PreprocessResult(
            ok=list(self.ok),
            views={key: view.to_numpy() for key, view in self.views.items()},
            sizes=list(self.sizes),
            errors=dict(self.errors),
        )


class DaliPreprocessor:
    """Decode once, produce every view. A context manager; ``close()`` is idempotent.

    ``views`` is a sequence of (key, Preprocess), usually ``(spec.key, spec.preprocess)``.
    Each view antialiases when it shrinks as its ``Preprocess.antialias`` says.
    ``fused_crop=False`` resizes the whole image to
    ``resized_shape`` and then slices the crop out (bit-exact geometry, slower, memory
    growing with the aspect ratio); the default resamples only the crop window.

    ``device="gpu"`` decodes with DALI's mixed decoder (nvJPEG; ``hw_decoder_load`` is
    the share of JPEGs given to the hardware decoder where the GPU has one;
    ``jpeg_fancy_upsampling``, on by default, upsamples chroma as libjpeg-turbo does, so
    JPEGs decode as on the CPU pipeline and as the cards' PIL/OpenCV decode them; nvJPEG's
    default is cheaper and differs at colour edges) and resizes, crops and normalises on
    GPU ``device_id`` (default 0). ``output_dtype``
    (float32 or float16) is what ``crop_mirror_normalize`` writes, on either device.
    """

    def __init__(
        self,
        views: Sequence[tuple[str, Preprocess]],
        max_batch: int,
        num_threads: int = 2,
        device: str = "cpu",
        *,
        fused_crop: bool = True,
        device_id: int | None = None,
        output_dtype: Any = np.float32,
        hw_decoder_load: float = 0.65,
        jpeg_fancy_upsampling: bool = True,
    ) -> None:
        if device not in ("cpu", "gpu"):
            raise EngineError(f"DALI preprocessing device must be 'cpu' or 'gpu', got {device!r}")
        if device == "cpu" and device_id is not None:
            raise EngineError("device_id is for device='gpu'; the CPU pipeline takes none")
        if device == "gpu":
            device_id = 0 if device_id is None else device_id
            if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
                raise EngineError(f"device_id must be a non-negative integer, got {device_id!r}")
        try:
            dtype = np.dtype(output_dtype)
        except TypeError:
            dtype = None
        if dtype not in _OUTPUT_DTYPES:
            raise EngineError(f"output_dtype must be float32 or float16, got {output_dtype!r}")
        if isinstance(hw_decoder_load, bool) or not isinstance(hw_decoder_load, (int, float)):
            raise EngineError(f"hw_decoder_load must be a number in [0, 1], got {hw_decoder_load!r}")
        if not 0.0 <= float(hw_decoder_load) <= 1.0:
            raise EngineError(f"hw_decoder_load must be in [0, 1], got {hw_decoder_load!r}")
        views = list(views)
        if not views:
            raise EngineError("DaliPreprocessor needs at least one view")
        keys = [k for k, _ in views]
        if len(set(keys)) != len(keys):
            raise EngineError(f"duplicate view keys: {keys}")
        for key, pre in views:
            if not isinstance(pre, Preprocess):
                raise EngineError(f"view '{key}': expected a Preprocess, got {type(pre).__name__}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise EngineError(f"max_batch must be a positive integer, got {max_batch!r}")
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise EngineError(f"num_threads must be a positive integer, got {num_threads!r}")
        self._views: tuple[tuple[str, Preprocess], ...] = tuple(views)
        self._fused_crop = bool(fused_crop)
        self._max_batch = max_batch
        self._num_threads = num_threads
        self._device = device
        self._device_id: int | None = device_id
        self._dtype = dtype
        self._hw_decoder_load = float(hw_decoder_load)
        self._fancy_upsampling = bool(jpeg_fancy_upsampling)
        self._pipe: Any = None
        # A rebuild (after a failed batch) must not tear down the pipeline whose outputs
        # the caller may still be copying (the last batch process_device returned): it is
        # retired instead, and shut down when the next call starts.
        self._returned_from: Any = None
        self._retired: list[Any] = []
        self._closed = False
        # Host decodes (PIL releases the GIL while decoding) run num_threads at a time.
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="host-decode")
        self._placeholder_enc = _placeholder_png()
        self._placeholder_rgba = np.zeros((1, 1, 4), np.uint8)
        self._build()

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> "DaliPreprocessor":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._returned_from = None
        self._drop_pipeline()
        self._flush_retired()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def device(self) -> str:
        return self._device

    @property
    def device_id(self) -> int | None:
        return self._device_id

    def declarations(self) -> tuple[ViewDecl, ...]:
        return tuple(
            ViewDecl(key=key, shape=(3, pre.size, pre.size), dtype=self._dtype, device=self._device)
            for key, pre in self._views
        )

    def _build(self) -> None:
        started = time.perf_counter()
        on_gpu = self._device != "cpu"
        if on_gpu:
            absent = cuda_absent_reason(self._device_id or 0)
            if absent is not None:
                raise EngineError(
                    f"DALI preprocessing on device 'gpu' needs a usable NVIDIA GPU: {absent}; use device='cpu'"
                )
        try:
            pipe = define_pipeline(
                self._views,
                self._max_batch,
                self._num_threads,
                fused_crop=self._fused_crop,
                device=self._device,
                device_id=self._device_id,
                output_dtype=self._dtype,
                hw_decoder_load=self._hw_decoder_load,
                jpeg_fancy_upsampling=self._fancy_upsampling,
            )
        except TypeError as exc:
            # DALI compiles the pipeline's `if` into generated code that it writes to a temp
            # file first; when that write fails it runs the function as is, and the `if`
            # fails on a DataNode. Say what failed instead.
            no_room = next(filter(None, map(no_room_message, _exception_chain(exc))), None)
            if no_room is None:
                raise
            raise OutputError(
                f"DALI cannot write its generated pipeline code to the temp folder {tempfile.gettempdir()}: "
                f"{no_room} (or set TMPDIR to a folder with room)"
            ) from None
        try:
            pipe.build()
        except RuntimeError as exc:
            if not on_gpu:
                raise
            raise EngineError(
                f"cannot build the DALI GPU pipeline on device {self._device_id}: {_first_line(exc)} "
                "(use device='cpu' on a machine without a usable NVIDIA GPU)"
            ) from None
        self._pipe = pipe
        log.debug(
            "DALI %s pipeline built in %.3f s (%d views)",
            self._device,
            time.perf_counter() - started,
            len(self._views),
        )

    def _drop_pipeline(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            # DALI exposes no public teardown; _shutdown is what its __del__ calls.
            pipe._shutdown()

    def _rebuild(self) -> None:
        if self._pipe is not None and self._pipe is self._returned_from:
            self._retired.append(self._pipe)  # its last outputs may still be read
            self._pipe = None
        self._drop_pipeline()
        self._build()

    def _flush_retired(self) -> None:
        """Shut down pipelines retired by earlier calls: by the time a new call starts,
        the caller is done with the batches they produced (see :class:`DeviceBatch`)."""
        while self._retired:
            self._retired.pop()._shutdown()

    # -- processing ----------------------------------------------------------------

    def process(self, items: Sequence[bytes | bytearray | memoryview | np.ndarray]) -> PreprocessResult:
        """Preprocess encoded image files; one failing file never costs the others.

        The views come back as host arrays on either device (the GPU pipeline copies
        them back); see :meth:`process_device` to keep them on the GPU."""
        self._check_open()
        self._flush_retired()
        errors: dict[int, str] = {}
        entries = self._entries(items, errors)
        rows: dict[int, _Row] = {}
        for start in range(0, len(entries), self._max_batch):
            chunk = entries[start : start + self._max_batch]
            batch = self._host_decode([e for e in chunk if e.route is Route.HOST], errors)
            batch_ids = {e.index for e in batch}
            batch = [e for e in chunk if e.route is Route.DALI or e.index in batch_ids]
            rows.update(self._run_batch(batch, errors))
        ok = sorted(rows)
        views = {}
        for v, (key, pre) in enumerate(self._views):
            out = np.empty((len(ok), 3, pre.size, pre.size), self._dtype)
            for j, index in enumerate(ok):
                out[j] = rows[index].views[v]
            views[key] = out
        return PreprocessResult(
            ok=ok, views=views, sizes=[rows[i].size for i in ok], errors=dict(sorted(errors.items()))
        )

    def process_device(
        self, items: Sequence[bytes | bytearray | memoryview | np.ndarray], cuda_stream: Any = None
    ) -> DeviceBatch:
        """Preprocess at most ``max_batch`` files and leave the views on the GPU.

        The result holds the outputs of ONE DALI run, valid through the next call to
        ``process``/``process_device`` (see :class:`DeviceBatch`). With
        ``cuda_stream`` (a ``cudaStream_t`` as an int, or an object DALI converts, such
        as a ``torch.cuda.Stream``) the outputs are ordered on that stream and the call
        does not wait for the GPU; without it they are host-synchronous. Failing files
        are isolated as in :meth:`process`; when a batch fails, its survivors run once
        more together, so a bad file costs extra runs but never a good file's row.
        """
        self._check_open()
        if self._device != "gpu":
            raise EngineError("process_device needs a DaliPreprocessor built with device='gpu'")
        if len(items) > self._max_batch:
            raise InputError(f"process_device takes at most max_batch={self._max_batch} items, got {len(items)}")
        self._flush_retired()
        errors: dict[int, str] = {}
        entries = self._entries(items, errors)
        batch = self._host_decode([e for e in entries if e.route is Route.HOST], errors)
        batch_ids = {e.index for e in batch}
        batch = [e for e in entries if e.route is Route.DALI or e.index in batch_ids]
        try:
            outputs = self._execute(batch, cuda_stream)
        except _DALI_ERRORS as exc:
            log.debug("DALI batch of %d failed (%s); rebuilding and finding the culprit", len(batch), _first_line(exc))
            self._rebuild()
            rows = self._isolate(batch, errors)
            # _isolate may have moved entries to the host route; keep them as they are now.
            batch = [e for e in batch if e.index in rows]
            try:
                outputs = self._execute(batch, cuda_stream)
            except _DALI_ERRORS as exc2:
                self._rebuild()
                raise EngineError(
                    f"DALI failed on a batch whose files each succeeded alone: {_first_line(exc2)}"
                ) from None
        self._returned_from = self._pipe
        return self._device_batch(batch, outputs, errors, cuda_stream)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("DaliPreprocessor is closed")

    def _entries(self, items: Sequence[Any], errors: dict[int, str]) -> list[_Entry]:
        """Validate, sniff and route the items; empty files go to ``errors``."""
        entries: list[_Entry] = []
        for index, item in enumerate(items):
            data = _as_uint8(item, index)
            if data.size == 0:
                errors[index] = undecodable_cause(data)
                continue
            info = probe(data)
            too_large = info.too_large()
            if too_large is not None:  # refused alike on either route (see decode.MAX_PIXELS)
                errors[index] = too_large
                continue
            route = Route.DALI if info.dali_decodable else Route.HOST
            if route is Route.HOST:
                log.debug("item %d (%s, alpha=%s) goes the host route", index, info.container.value, info.has_alpha)
            entries.append(_Entry(index, data, route))
        return entries

    def _host_decode(self, entries: list[_Entry], errors: dict[int, str]) -> list[_Entry]:
        """Decode ``entries`` with PIL on the thread pool, filling ``entry.rgba``; returns
        those that decoded (the others get their cause in ``errors``)."""
        decoded: list[_Entry] = []
        for entry, outcome in zip(entries, self._pool.map(_try_decode, [e.data for e in entries])):
            if isinstance(outcome, ImageDecodeError):
                errors[entry.index] = str(outcome)
            else:
                entry.rgba = outcome
                decoded.append(entry)
        return decoded

    def _run_batch(self, batch: list[_Entry], errors: dict[int, str]) -> dict[int, _Row]:
        try:
            return self._run_once(batch)
        except _DALI_ERRORS as exc:
            log.debug("DALI batch of %d failed (%s); rebuilding and finding the culprit", len(batch), _first_line(exc))
            self._rebuild()
        return self._isolate(batch, errors)

    def _isolate(self, batch: list[_Entry], errors: dict[int, str]) -> dict[int, _Row]:
        """After ``batch`` failed (and the pipeline was rebuilt): the rows of the files
        that can be processed, the causes of the others in ``errors``."""
        # Check the DALI-routed files with the host decoder; what it rejects is an error.
        checked = {e.index for e in self._host_decode([e for e in batch if e.route is Route.DALI], errors)}
        survivors = [e for e in batch if e.route is Route.HOST or e.index in checked]
        if len(survivors) < len(batch):
            try:
                return self._run_once(survivors)
            except _DALI_ERRORS as exc:
                log.debug("DALI batch failed again (%s); running its files one at a time", _first_line(exc))
                self._rebuild()
        rows: dict[int, _Row] = {}
        for entry in survivors:
            row = self._run_alone(entry, errors)
            if row is not None:
                rows[entry.index] = row
        return rows

    def _run_alone(self, entry: _Entry, errors: dict[int, str]) -> _Row | None:
        try:
            return self._run_once([entry])[entry.index]
        except _DALI_ERRORS as exc:
            cause = _first_line(exc)
            self._rebuild()
        if entry.route is Route.DALI and entry.rgba is not None:
            log.debug("DALI cannot process item %d (%s); using the host decode", entry.index, cause)
            entry.route = Route.HOST
            try:
                return self._run_once([entry])[entry.index]
            except _DALI_ERRORS as exc:
                cause = _first_line(exc)
                self._rebuild()
        errors[entry.index] = f"preprocessing failed: {cause}"
        return None

    def _run_once(self, batch: list[_Entry]) -> dict[int, _Row]:
        if not batch:
            return {}
        outputs = self._execute(batch)
        decoded_shapes = outputs[0]
        views = [_host_array(out, self._dtype) for out in outputs[1:]]
        rows: dict[int, _Row] = {}
        for j, entry in enumerate(batch):
            rows[entry.index] = _Row(tuple(v[j] for v in views), _original_size(entry, decoded_shapes, j))
        return rows

    def _execute(self, batch: list[_Entry], cuda_stream: Any = None) -> tuple[Any, ...]:
        """Feed ``batch`` (non-empty) and run once; the raw DALI outputs."""
        if not batch:
            return ()
        on_host = [e.route is Route.HOST for e in batch]
        self._pipe.feed_input(_ENC, [self._placeholder_enc if h else e.data for e, h in zip(batch, on_host)])
        self._pipe.feed_input(_RGBA, [e.rgba if h else self._placeholder_rgba for e, h in zip(batch, on_host)])
        self._pipe.feed_input(_ON_HOST, [np.array(h) for h in on_host])
        if cuda_stream is None:
            return tuple(self._pipe.run())
        return tuple(self._pipe.run(cuda_stream))

    def _device_batch(
        self, batch: list[_Entry], outputs: tuple[Any, ...], errors: dict[int, str], cuda_stream: Any
    ) -> DeviceBatch:
        views: dict[str, DeviceView] = {}
        for v, (key, pre) in enumerate(self._views):
            shape = (len(batch), 3, pre.size, pre.size)
            if not batch:
                views[key] = DeviceView(key, 0, shape, self._dtype, None)
                continue
            tensors = outputs[1 + v]
            views[key] = DeviceView(key, _dense_pointer(tensors, shape, self._dtype, key), shape, self._dtype, tensors,
                                    None if cuda_stream is None else stream_handle(cuda_stream))
        sizes = tuple(_original_size(e, outputs[0], j) for j, e in enumerate(batch)) if batch else ()
        return DeviceBatch(
            ok=tuple(e.index for e in batch),
            sizes=sizes,
            errors=dict(sorted(errors.items())),
            views=views,
            device_id=int(self._device_id or 0),
            cuda_stream=cuda_stream,
        )


def _original_size(entry: _Entry, decoded_shapes: Any, j: int) -> tuple[int, int]:
    if entry.route is Route.HOST:
        return (int(entry.rgba.shape[0]), int(entry.rgba.shape[1]))
    shape = np.asarray(decoded_shapes[j])
    return (int(shape[0]), int(shape[1]))


def _host_array(out: Any, dtype: np.dtype) -> np.ndarray:
    """A host copy of one view output (a TensorListGPU is copied back first)."""
    if not hasattr(out, "as_array"):
        out = out.as_cpu()
    return np.array(out.as_array(), dtype=dtype, copy=True)


def _dali_float_type(dtype: Any) -> Any:
    """DALI's type for a view dtype (float16 or float32): what crop_mirror_normalize
    writes and what process_device checks its outputs against."""
    from nvidia.dali import types

    return types.FLOAT16 if np.dtype(dtype) == np.dtype(np.float16) else types.FLOAT


def _dense_pointer(tensors: Any, shape: tuple[int, int, int, int], dtype: np.dtype, key: str) -> int:
    """The address of sample 0, after checking that the samples have the declared dtype
    and shape and lie back to back (DALI makes pipeline outputs contiguous). Addresses
    are read per sample: a TensorList's own ``data_ptr`` raises when it is not one
    buffer."""
    count, sample = shape[0], shape[1:]
    if len(tensors) != count:
        raise EngineError(f"view '{key}': DALI returned {len(tensors)} samples for a batch of {count}")
    want = _dali_float_type(dtype)
    if tensors.dtype != want:
        raise EngineError(f"view '{key}': DALI returned {tensors.dtype} samples, expected {want}")
    if count == 0:
        return 0
    stride = int(np.prod(sample)) * np.dtype(dtype).itemsize
    base = int(tensors[0].data_ptr())
    for j in range(count):
        item = tensors[j]
        if tuple(item.shape()) != sample:
            raise EngineError(f"view '{key}': sample {j} has shape {tuple(item.shape())}, expected {sample}")
        if int(item.data_ptr()) != base + j * stride:
            raise EngineError(f"view '{key}': DALI output is not one contiguous buffer (sample {j})")
    return base


# What a failed DALI run raises: RuntimeError for decode failures, ValueError for some
# operator errors (e.g. a division by zero on an image DALI decodes as 0 pixels wide).
_DALI_ERRORS = (RuntimeError, ValueError)


def _as_uint8(item: object, index: int) -> np.ndarray:
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise InputError(f"item {index}: expected encoded bytes as uint8, got an array of {item.dtype}")
        return np.ascontiguousarray(item).reshape(-1)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return np.frombuffer(item, dtype=np.uint8)
    raise InputError(f"item {index}: expected encoded file bytes, got {type(item).__name__}")


def _try_decode(data: np.ndarray) -> np.ndarray | ImageDecodeError:
    try:
        return decode_rgba(data)
    except ImageDecodeError as exc:
        return exc


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, innermost last."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _first_line(exc: BaseException) -> str:
    """The line of a DALI error that says what went wrong (the line after "encountered:",
    which follows the operator's name and the pipeline-definition traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if "encountered:" in lines:
        after = lines[lines.index("encountered:") + 1 :]
        if after:
            return after[0][:200]
    return (lines or [type(exc).__name__])[-1][:200]


def _placeholder_png() -> np.ndarray:
    """A valid 1x1 PNG for the ``enc`` slots of host-routed samples."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


# -- graph ---------------------------------------------------------------------------


def define_pipeline(
    views: Sequence[tuple[str, Preprocess]],
    max_batch: int,
    num_threads: int,
    fused_crop: bool = True,
    *,
    device: str = "cpu",
    device_id: int | None = None,
    output_dtype: Any = np.float32,
    hw_decoder_load: float = 0.65,
    jpeg_fancy_upsampling: bool = True,
) -> Any:
    """The pipeline object, not built (building a GPU pipeline needs a GPU; tracing its
    graph does not)."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as exc:
        raise EngineError(
            f"DALI preprocessing needs the nvidia-dali-cuda130 package (Linux): pip install nvidia-dali-cuda130 ({exc})"
        ) from None

    views = tuple(views)
    on_gpu = device == "gpu"
    out_type = _dali_float_type(output_dtype)

    def define():
        enc = fn.external_source(name=_ENC, dtype=types.UINT8, ndim=1)
        rgba = fn.external_source(name=_RGBA, dtype=types.UINT8, ndim=3, layout="HWC")
        on_host = fn.external_source(name=_ON_HOST, dtype=types.BOOL, ndim=0)
        if on_gpu:
            decoded = fn.decoders.image(enc, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load,
                                        jpeg_fancy_upsampling=bool(jpeg_fancy_upsampling))
            rgba = rgba.gpu()
        else:
            decoded = fn.decoders.image(enc, device="cpu", output_type=types.RGB)
        selected: dict[AlphaMode, Any] = {}
        outputs = [decoded.shape(dtype=types.INT64)]
        for _key, pre in views:
            if pre.alpha not in selected:
                selected[pre.alpha] = _select(on_host, _composite(rgba, pre.alpha), decoded)
            outputs.append(_view(selected[pre.alpha], pre, pre.antialias, fused_crop, out_type))
        return tuple(outputs)

    if on_gpu:
        # exec_dynamic: shape() of a GPU node (the geometry) is a CPU node only under
        # DALI's dynamic executor; it is also what keeps outputs reference counted.
        return pipeline_def(
            define,
            batch_size=max_batch,
            num_threads=num_threads,
            device_id=device_id,
            enable_conditionals=True,
            prefetch_queue_depth=1,
            exec_dynamic=True,
        )()
    return pipeline_def(
        define,
        batch_size=max_batch,
        num_threads=num_threads,
        device_id=None,
        enable_conditionals=True,
        prefetch_queue_depth=1,
    )()


def _select(on_host, host_image, decoded_image):
    """Per-sample choice between the host branch and the DALI-decoded branch."""
    if on_host:
        image = host_image
    else:
        image = decoded_image
    return image


def _composite(rgba, mode: AlphaMode):
    """HWC uint8 RGB from RGBA per the alpha mode (the same rounding as PIL's
    ``alpha_composite`` over an opaque background)."""
    from nvidia.dali import fn, types

    rgb = rgba[:, :, 0:3]
    if mode is AlphaMode.DROP:
        return rgb
    alpha = fn.cast(rgba[:, :, 3:4], dtype=types.FLOAT) * (1.0 / 255.0)
    background = 255.0 if mode is AlphaMode.WHITE else 0.0
    return fn.cast(rgb * alpha + background * (1.0 - alpha), dtype=types.UINT8)


_INTERP = {
    Interpolation.BILINEAR: "INTERP_LINEAR",
    Interpolation.BICUBIC: "INTERP_CUBIC",
    Interpolation.LANCZOS: "INTERP_LANCZOS3",
}


def geometry_nodes(height, width, pre: Preprocess):
    """(resized_h, resized_w, top, left) as int64 graph nodes; the graph twin of
    ``Preprocess.resized_shape`` and ``Preprocess.crop_origin``."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    size = pre.size
    if pre.resize is ResizeRule.SQUASH:
        out_h = height * 0 + size
        out_w = width * 0 + size
    else:
        landscape = fn.cast(height <= width, dtype=types.INT64)
        long_w = dmath.max(size, width * size // height)
        long_h = dmath.max(size, height * size // width)
        out_h = landscape * size + (1 - landscape) * long_h
        out_w = landscape * long_w + (1 - landscape) * size
    if pre.crop is CropPosition.TOP_LEFT:
        return out_h, out_w, out_h * 0, out_w * 0
    return out_h, out_w, _half_round_even(out_h - size), _half_round_even(out_w - size)


def _half_round_even(excess):
    """``int(round(excess / 2.0))`` for non-negative integer nodes (round half to even)."""
    half = excess // 2
    odd_excess = excess - 2 * half
    odd_half = half - 2 * (half // 2)
    return half + odd_excess * odd_half


def _view(image, pre: Preprocess, antialias: bool, fused_crop: bool, out_type=None):
    from nvidia.dali import fn, types

    out_type = types.FLOAT if out_type is None else out_type

    shape = image.shape(dtype=types.INT64)
    height, width = shape[0], shape[1]
    out_h, out_w, top, left = geometry_nodes(height, width, pre)
    interp = getattr(types, _INTERP[pre.interpolation])
    if fused_crop:
        # Resample only the size x size window: the window of the resized image at
        # (top, left), mapped back to input coordinates with the resize's own scale.
        def f64(node):
            return fn.cast(node, dtype=types.FLOAT64)

        scale_y = f64(height) / f64(out_h)
        scale_x = f64(width) / f64(out_w)
        start = fn.stack(f64(top) * scale_y, f64(left) * scale_x)
        end = fn.stack(f64(top + pre.size) * scale_y, f64(left + pre.size) * scale_x)
        crop = fn.resize(
            image,
            size=[pre.size, pre.size],
            roi_start=fn.cast(start, dtype=types.FLOAT),
            roi_end=fn.cast(end, dtype=types.FLOAT),
            roi_relative=False,
            interp_type=interp,
            antialias=antialias,
        )
    else:
        resized = fn.resize(
            image,
            resize_y=fn.cast(out_h, dtype=types.FLOAT),
            resize_x=fn.cast(out_w, dtype=types.FLOAT),
            interp_type=interp,
            antialias=antialias,
        )
        anchor = fn.cast(fn.stack(top, left), dtype=types.INT32)
        # start and shape as CPU argument inputs: a shape given as a positional input would
        # become a GPU constant on the GPU graph, costing a device-to-host sync per batch
        crop = fn.slice(resized, start=anchor, shape=[pre.size, pre.size], axes=[0, 1])
    if pre.channel_order is ChannelOrder.BGR:
        crop = fn.color_space_conversion(crop, image_type=types.RGB, output_type=types.BGR)
    return fn.crop_mirror_normalize(
        crop,
        dtype=out_type,
        mean=[m * 255.0 for m in pre.mean],
        std=[s * 255.0 for s in pre.std],
        output_layout="CHW",
    )
