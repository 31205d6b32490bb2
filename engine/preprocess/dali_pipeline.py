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

Only the CPU pipeline exists here (``device_id=None``); the GPU path (nvJPEG, GPU
resize) is tracked separately.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any, Sequence

import numpy as np

from engine.errors import EngineError, InputError
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
    views: tuple[np.ndarray, ...]  # one (3, S, S) float32 per view, in view order
    size: tuple[int, int]


class DaliPreprocessor:
    """Decode once, produce every view. A context manager; ``close()`` is idempotent.

    ``views`` is a sequence of (key, Preprocess), usually ``(spec.key, spec.preprocess)``.
    Each view antialiases when it shrinks as its ``Preprocess.antialias`` says.
    ``fused_crop=False`` resizes the whole image to
    ``resized_shape`` and then slices the crop out (bit-exact geometry, slower, memory
    growing with the aspect ratio); the default resamples only the crop window.
    """

    def __init__(
        self,
        views: Sequence[tuple[str, Preprocess]],
        max_batch: int,
        num_threads: int = 2,
        device: str = "cpu",
        *,
        fused_crop: bool = True,
    ) -> None:
        if device != "cpu":
            raise EngineError(
                f"DALI preprocessing on device '{device}' is not available yet: only the CPU pipeline "
                "exists (the GPU path is tracked separately); use device='cpu'"
            )
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
        self._antialias: tuple[bool, ...] = tuple(pre.antialias for _, pre in views)
        self._fused_crop = bool(fused_crop)
        self._max_batch = max_batch
        self._num_threads = num_threads
        self._device = device
        self._pipe: Any = None
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
        self._drop_pipeline()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def declarations(self) -> tuple[ViewDecl, ...]:
        return tuple(
            ViewDecl(key=key, shape=(3, pre.size, pre.size), dtype=np.dtype(np.float32), device=self._device)
            for key, pre in self._views
        )

    def _build(self) -> None:
        started = time.perf_counter()
        self._pipe = build_pipeline(
            self._views, self._max_batch, self._num_threads, self._antialias, fused_crop=self._fused_crop
        )
        log.debug("DALI pipeline built in %.3f s (%d views)", time.perf_counter() - started, len(self._views))

    def _drop_pipeline(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            # DALI exposes no public teardown; _shutdown is what its __del__ calls.
            pipe._shutdown()

    def _rebuild(self) -> None:
        self._drop_pipeline()
        self._build()

    # -- processing ----------------------------------------------------------------

    def process(self, items: Sequence[bytes | bytearray | memoryview | np.ndarray]) -> PreprocessResult:
        """Preprocess encoded image files; one failing file never costs the others."""
        if self._closed:
            raise EngineError("DaliPreprocessor is closed")
        errors: dict[int, str] = {}
        entries: list[_Entry] = []
        for index, item in enumerate(items):
            data = _as_uint8(item, index)
            if data.size == 0:
                errors[index] = undecodable_cause(data)
                continue
            info = probe(data)
            route = Route.DALI if info.dali_decodable else Route.HOST
            if route is Route.HOST:
                log.debug("item %d (%s, alpha=%s) goes the host route", index, info.container.value, info.has_alpha)
            entries.append(_Entry(index, data, route))
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
            out = np.empty((len(ok), 3, pre.size, pre.size), np.float32)
            for j, index in enumerate(ok):
                out[j] = rows[index].views[v]
            views[key] = out
        return PreprocessResult(
            ok=ok, views=views, sizes=[rows[i].size for i in ok], errors=dict(sorted(errors.items()))
        )

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
        on_host = [e.route is Route.HOST for e in batch]
        self._pipe.feed_input(_ENC, [self._placeholder_enc if h else e.data for e, h in zip(batch, on_host)])
        self._pipe.feed_input(_RGBA, [e.rgba if h else self._placeholder_rgba for e, h in zip(batch, on_host)])
        self._pipe.feed_input(_ON_HOST, [np.array(h) for h in on_host])
        outputs = self._pipe.run()
        decoded_shapes = outputs[0]
        views = [np.array(out.as_array(), dtype=np.float32, copy=True) for out in outputs[1:]]
        rows: dict[int, _Row] = {}
        for j, (entry, host) in enumerate(zip(batch, on_host)):
            if host:
                size = (int(entry.rgba.shape[0]), int(entry.rgba.shape[1]))
            else:
                shape = np.asarray(decoded_shapes[j])
                size = (int(shape[0]), int(shape[1]))
            rows[entry.index] = _Row(tuple(v[j] for v in views), size)
        return rows


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


def build_pipeline(
    views: Sequence[tuple[str, Preprocess]],
    max_batch: int,
    num_threads: int,
    antialias: Sequence[bool] | None = None,
    fused_crop: bool = True,
) -> Any:
    """Build the CPU pipeline. Outputs: the decoded shape, then one CHW float32 per view."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as exc:
        raise EngineError(
            f"DALI preprocessing needs the nvidia-dali-cuda130 package (Linux): pip install nvidia-dali-cuda130 ({exc})"
        ) from None

    views = tuple(views)
    antialias = tuple(antialias) if antialias is not None else (True,) * len(views)

    def define():
        enc = fn.external_source(name=_ENC, dtype=types.UINT8, ndim=1)
        rgba = fn.external_source(name=_RGBA, dtype=types.UINT8, ndim=3, layout="HWC")
        on_host = fn.external_source(name=_ON_HOST, dtype=types.BOOL, ndim=0)
        decoded = fn.decoders.image(enc, device="cpu", output_type=types.RGB)
        selected: dict[AlphaMode, Any] = {}
        outputs = [decoded.shape(dtype=types.INT64)]
        for (_key, pre), smooth in zip(views, antialias):
            if pre.alpha not in selected:
                selected[pre.alpha] = _select(on_host, _composite(rgba, pre.alpha), decoded)
            outputs.append(_view(selected[pre.alpha], pre, smooth, fused_crop))
        return tuple(outputs)

    pipe = pipeline_def(
        define,
        batch_size=max_batch,
        num_threads=num_threads,
        device_id=None,
        enable_conditionals=True,
        prefetch_queue_depth=1,
    )()
    pipe.build()
    return pipe


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


def _view(image, pre: Preprocess, antialias: bool, fused_crop: bool):
    from nvidia.dali import fn, types

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
        crop = fn.slice(resized, anchor, np.array([pre.size, pre.size], np.int32), axes=[0, 1])
    if pre.channel_order is ChannelOrder.BGR:
        crop = fn.color_space_conversion(crop, image_type=types.RGB, output_type=types.BGR)
    return fn.crop_mirror_normalize(
        crop,
        dtype=types.FLOAT,
        mean=[m * 255.0 for m in pre.mean],
        std=[s * 255.0 for s in pre.std],
        output_layout="CHW",
    )
