"""NumPy references of the CUDA kernels, with exactly their conventions.

Math is float64, cast at the end; the GPU tests compare each kernel against these and
the CPU tests compare these against OpenCV / PIL (resize) and engine.postprocess (softmax).

The resize has two conventions (kernels/preprocess.cu, argument ``convention``):

* :attr:`Convention.OPENCV` (``antialias = false`` specs; cv2.resize): pixel centres,
  ``src = (dst + 0.5) * in / out - 0.5``; every tap index clamped into the image
  (clamp-to-edge, what cv2.resize's BORDER_REPLICATE gives); fixed-width separable filter,
  no antialiasing (the filter is not widened when shrinking). Bicubic uses the Keys kernel
  with ``a = CUBIC_A_OPENCV = -0.75`` by default (OpenCV's INTER_CUBIC); Lanczos is
  Lanczos4 (8 taps).
* :attr:`Convention.PIL` (``antialias = true`` specs; PIL's ``Image.resize`` with
  ``reducing_gap=None``, i.e. the convolution of Pillow's ``ImagingResample``): per axis,
  ``scale = in / out``, the filter is widened by ``filterscale = max(scale, 1)`` (so it
  antialiases when shrinking), ``center = (dst + 0.5) * scale``, taps
  ``[max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in))`` with
  ``support = filter_support * filterscale``, weights ``filter((i - center + 0.5) /
  filterscale)`` normalised by their sum; taps outside the image are dropped (no
  clamping). Filters as PIL defines them: bilinear (support 1), bicubic with
  ``a = CUBIC_A_PIL = -0.5`` (support 2), Lanczos3 (support 3; PIL's ``LANCZOS``). The tap
  count grows with the shrink factor, without bound.

In both, the value is clamped to [0, 255] but not rounded, then ``(v / 255 - mean) / std``
per output channel. Under :attr:`Convention.PIL` the horizontal pass is also clamped to
[0, 255] before the vertical pass, because PIL clips there (it stores that pass as uint8):
without it, the overshoot of bicubic/Lanczos at hard edges (line art, noise) would survive
into the vertical pass and the result would depart from PIL's by tens of grey levels.

Not reproduced: the rounding. OpenCV and PIL round to uint8 at the end, PIL also between
its horizontal and vertical passes, and both use fixed-point weights; the references and
the kernel stay in float through both passes. So they differ from PIL's own output by at
most ``0.5 + 0.5 * sum(|vertical weights|)`` grey levels (about 1, up to ~1.25 for
Lanczos3) and by ~0.3 on average; tests/kernels/test_reference.py measures and bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Iterator

import numpy as np

from engine.specs import ChannelOrder, Interpolation, Preprocess

CUBIC_A_OPENCV = -0.75
CUBIC_A_PIL = -0.5


class Filter(IntEnum):
    """The kernel's ``mode`` argument. ``LANCZOS4`` is the Lanczos filter of the convention:
    Lanczos4 under :attr:`Convention.OPENCV`, Lanczos3 (PIL's ``LANCZOS``) under
    :attr:`Convention.PIL`."""

    BILINEAR = 0
    BICUBIC = 1
    LANCZOS4 = 2

    @property
    def taps(self) -> int:
        """Taps per axis under :attr:`Convention.OPENCV` (PIL's count depends on the scale)."""
        return {Filter.BILINEAR: 2, Filter.BICUBIC: 4, Filter.LANCZOS4: 8}[self]

    @property
    def pil_support(self) -> float:
        """Half-width of the filter under :attr:`Convention.PIL`, before widening."""
        return {Filter.BILINEAR: 1.0, Filter.BICUBIC: 2.0, Filter.LANCZOS4: 3.0}[self]

    @classmethod
    def from_interpolation(cls, interpolation: Interpolation) -> "Filter":
        return {
            Interpolation.BILINEAR: cls.BILINEAR,
            Interpolation.BICUBIC: cls.BICUBIC,
            Interpolation.LANCZOS: cls.LANCZOS4,
        }[interpolation]


class Convention(IntEnum):
    """The kernel's ``convention`` argument: whose resize it reproduces (module docstring)."""

    OPENCV = 0  # cv2.resize: fixed taps, clamp-to-edge, no antialiasing
    PIL = 1  # PIL Image.resize: filter widened when shrinking, out-of-image taps dropped

    @classmethod
    def from_antialias(cls, antialias: bool) -> "Convention":
        return cls.PIL if antialias else cls.OPENCV

    @property
    def cubic_a(self) -> float:
        """The library's bicubic parameter."""
        return CUBIC_A_PIL if self is Convention.PIL else CUBIC_A_OPENCV


@dataclass(frozen=True)
class ResizeCrop:
    """Where the S x S output window comes from: the source is resized to
    (resized_h, resized_w) and the window at (top, left) of that is kept."""

    src_h: int
    src_w: int
    resized_h: int
    resized_w: int
    top: int
    left: int
    size: int

    def __post_init__(self) -> None:
        if min(self.src_h, self.src_w, self.resized_h, self.resized_w, self.size) <= 0:
            raise ValueError(f"empty geometry {self}")
        if self.top < 0 or self.left < 0:
            raise ValueError(f"negative crop origin in {self}")
        if self.top + self.size > self.resized_h or self.left + self.size > self.resized_w:
            raise ValueError(f"the {self.size}x{self.size} crop leaves the resized image in {self}")

    @classmethod
    def from_preprocess(cls, pre: Preprocess, src_h: int, src_w: int) -> "ResizeCrop":
        rh, rw = pre.resized_shape(src_h, src_w)
        top, left = pre.crop_origin(rh, rw)
        return cls(src_h, src_w, rh, rw, top, left, pre.size)


@dataclass(frozen=True)
class Normalise:
    """Kernel arguments after the geometry: filter, channel swap, mean/std per output
    channel, bicubic parameter and resize convention."""

    filter: Filter
    swap_rb: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cubic_a: float = CUBIC_A_OPENCV
    convention: Convention = Convention.OPENCV

    @classmethod
    def from_preprocess(cls, pre: Preprocess, cubic_a: float | None = None) -> "Normalise":
        """``antialias = true`` selects PIL's resize (bicubic a = -0.5, Lanczos3),
        ``antialias = false`` OpenCV's (bicubic a = -0.75, Lanczos4). ``cubic_a`` overrides
        the convention's bicubic parameter."""
        convention = Convention.from_antialias(pre.antialias)
        return cls(
            Filter.from_interpolation(pre.interpolation),
            pre.channel_order is ChannelOrder.BGR,
            tuple(float(m) for m in pre.mean),
            tuple(float(s) for s in pre.std),
            convention.cubic_a if cubic_a is None else float(cubic_a),
            convention,
        )


def _cubic(t: np.ndarray, a: float) -> np.ndarray:
    t = np.abs(t)
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
    return np.where(t <= 1.0, near, np.where(t < 2.0, far, 0.0))


def _lanczos(t: np.ndarray, a: float) -> np.ndarray:
    """sinc(t) sinc(t / a), unwindowed: Lanczos4 (a = 4) for OpenCV, whose 8 taps lie
    inside (-4, 4) anyway; :func:`_lanczos3` windows a = 3 for PIL."""
    safe = np.where(np.abs(t) < 1e-6, 1.0, t)
    w = a * np.sin(np.pi * safe) * np.sin(np.pi * safe / a) / (np.pi * np.pi * safe * safe)
    return np.where(np.abs(t) < 1e-6, 1.0, w)


def _lanczos3(t: np.ndarray) -> np.ndarray:
    """PIL's LANCZOS: sinc(t) sinc(t / 3) on [-3, 3), zero outside."""
    return np.where((t >= -3.0) & (t < 3.0), _lanczos(t, 3.0), 0.0)


def _pil_filter(t: np.ndarray, filt: Filter, cubic_a: float) -> np.ndarray:
    if filt is Filter.BILINEAR:
        return np.maximum(1.0 - np.abs(t), 0.0)
    if filt is Filter.BICUBIC:
        return _cubic(t, cubic_a)
    return _lanczos3(t)


def axis_taps(
    first_dst: int, count: int, n_src: int, n_resized: int, filt: Filter, cubic_a: float = CUBIC_A_OPENCV
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (count, taps), for destinations first_dst .. first_dst+count-1
    of an axis resized from n_src to n_resized; indices already clamped to the image."""
    dst = np.arange(first_dst, first_dst + count, dtype=np.float64)
    s = (dst + 0.5) * (n_src / n_resized) - 0.5
    fl = np.floor(s)
    f = (s - fl)[:, None]
    n = filt.taps
    k = np.arange(n, dtype=np.float64)[None, :]
    # Taps sit at floor(s) - (n/2 - 1) + k; t = distance from the sample point to the tap.
    t = f + (n // 2 - 1) - k
    if filt is Filter.BILINEAR:
        w = 1.0 - np.abs(t)
    elif filt is Filter.BICUBIC:
        w = _cubic(t, cubic_a)
    else:
        w = _lanczos(t, 4.0)
        w = w / w.sum(axis=1, keepdims=True)
    idx = fl.astype(np.int64)[:, None] - (n // 2 - 1) + np.arange(n)[None, :]
    return np.clip(idx, 0, n_src - 1), w


def pil_axis_bounds(
    first_dst: int, count: int, n_src: int, n_resized: int, filt: Filter
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PIL convention: (first tap, tap count, centre), each (count,), for destinations
    first_dst .. first_dst+count-1 of an axis resized from n_src to n_resized. Same double
    arithmetic as Pillow's precompute_coeffs (C truncation of the rounded bounds)."""
    scale = n_src / n_resized
    support = filt.pil_support * max(scale, 1.0)
    center = (np.arange(first_dst, first_dst + count, dtype=np.float64) + 0.5) * scale
    lo = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    hi = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), n_src)
    return lo, hi - lo, center


def pil_axis_taps(
    first_dst: int, count: int, n_src: int, n_resized: int, filt: Filter, cubic_a: float = CUBIC_A_PIL
) -> tuple[np.ndarray, np.ndarray]:
    """PIL convention: (indices, weights), each (count, K) with K the largest tap count of
    the axis; rows with fewer taps are padded with weight 0 (at a valid index). Weights are
    normalised to sum 1 per destination; taps outside the image never appear."""
    lo, n, center = pil_axis_bounds(first_dst, count, n_src, n_resized, filt)
    k = np.arange(int(n.max()))[None, :]
    valid = k < n[:, None]
    filterscale = max(n_src / n_resized, 1.0)
    t = ((k + lo[:, None]).astype(np.float64) - center[:, None] + 0.5) / filterscale
    w = np.where(valid, _pil_filter(t, filt, cubic_a), 0.0)
    # The sum is > 0: the tap nearest the centre is always inside and weighs >= 1/2 before
    # normalisation (PIL skips the division for a zero sum; it cannot happen here).
    w = w / w.sum(axis=1, keepdims=True)
    idx = np.where(valid, k + lo[:, None], lo[:, None])
    return idx, w


# Output-row pixels of the horizontal pass computed at once by the PIL-convention reference
# (bounds its memory for large images and long filters: (rows, S, 3) float64 slabs).
_PIL_CHUNK_PIXELS = 1 << 20


def _row_chunks(n_rows: int, row_pixels: int) -> Iterator[slice]:
    step = max(1, _PIL_CHUNK_PIXELS // max(row_pixels, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _pil_resize_crop(image: np.ndarray, geom: ResizeCrop, filt: Filter, cubic_a: float) -> np.ndarray:
    yi, wy = pil_axis_taps(geom.top, geom.size, geom.src_h, geom.resized_h, filt, cubic_a)
    xi, wx = pil_axis_taps(geom.left, geom.size, geom.src_w, geom.resized_w, filt, cubic_a)
    # Horizontal pass over the source rows the vertical taps use, one tap at a time
    # (ascending, as the kernel sums), a slab of rows at a time.
    row0, row1 = int(yi.min()), int(yi.max()) + 1
    rows = np.zeros((row1 - row0, geom.size, 3), np.float64)
    for sl in _row_chunks(row1 - row0, geom.size):
        band = image[row0 + sl.start : row0 + sl.stop]
        acc = rows[sl]
        for k in range(xi.shape[1]):
            acc += wx[None, :, k, None] * band[:, xi[:, k], :]
    # PIL clips the horizontal pass to uint8 (and rounds it, which is not reproduced).
    np.clip(rows, 0.0, 255.0, out=rows)
    out = np.zeros((geom.size, geom.size, 3), np.float64)
    for k in range(yi.shape[1]):
        out += wy[:, k, None, None] * rows[yi[:, k] - row0]
    return np.clip(out, 0.0, 255.0)


def resize_crop_reference(
    image: np.ndarray,
    geom: ResizeCrop,
    filt: Filter,
    cubic_a: float | None = None,
    convention: Convention = Convention.OPENCV,
) -> np.ndarray:
    """The S x S window of the resized uint8 HWC image, float64 HWC in [0, 255] (not rounded).

    ``cubic_a`` defaults to the convention's (-0.75 OpenCV, -0.5 PIL). Under
    :attr:`Convention.PIL` this is PIL's ``Image.resize``, the horizontal pass clamped to
    [0, 255] as PIL clips it, but without PIL's uint8 rounding after each pass."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if image.shape[:2] != (geom.src_h, geom.src_w):
        raise ValueError(f"image is {image.shape[:2]}, geometry says {(geom.src_h, geom.src_w)}")
    convention = Convention(convention)
    if cubic_a is None:
        cubic_a = convention.cubic_a
    if convention is Convention.PIL:
        return _pil_resize_crop(image, geom, filt, cubic_a)
    yi, wy = axis_taps(geom.top, geom.size, geom.src_h, geom.resized_h, filt, cubic_a)
    xi, wx = axis_taps(geom.left, geom.size, geom.src_w, geom.resized_w, filt, cubic_a)
    # Horizontal then vertical, the order the kernel sums in. The horizontal pass covers
    # only the source rows the vertical taps read, a slab at a time, gathering the taps'
    # columns before widening to float64: memory follows the crop, not the frame (a
    # 200000 x 1 frame took 9 GB).
    row0, row1 = int(yi.min()), int(yi.max()) + 1
    rows = np.empty((row1 - row0, geom.size, 3), np.float64)
    for sl in _row_chunks(row1 - row0, xi.size):
        band = image[row0 + sl.start : row0 + sl.stop][:, xi, :].astype(np.float64)  # (h, S, taps, 3)
        rows[sl] = np.einsum("xi,hxic->hxc", wx, band)
    out = np.einsum("yj,yjxc->yxc", wy, rows[yi - row0])  # (S, S, 3)
    return np.clip(out, 0.0, 255.0)


def preprocess_reference(
    image: np.ndarray, geom: ResizeCrop, norm: Normalise, dtype: np.dtype | type = np.float32
) -> np.ndarray:
    """What preprocess_u8_to_f32 / _f16 write for one image: (3, S, S) of ``dtype``."""
    v = resize_crop_reference(image, geom, norm.filter, norm.cubic_a, norm.convention)
    if norm.swap_rb:
        v = v[..., ::-1]
    x = (v / 255.0 - np.asarray(norm.mean, np.float64)) / np.asarray(norm.std, np.float64)
    return np.ascontiguousarray(x.transpose(2, 0, 1)).astype(dtype)


def postprocess_reference(raw: np.ndarray, probabilities_input: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """What softmax_argmax_f32 / _f16 write: float32 probabilities (rows, classes) and int32
    argmax (rows,). Argmax is over the input (lowest index on ties); float64 softmax."""
    if raw.ndim != 2 or raw.shape[1] == 0:
        raise ValueError(f"expected (rows, classes) with classes >= 1, got {raw.shape}")
    x = raw.astype(np.float64)
    index = x.argmax(axis=1).astype(np.int32)
    if probabilities_input:
        return x.astype(np.float32), index
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
    return probs.astype(np.float32), index
