"""NumPy references of the CUDA kernels, with exactly their conventions.

Math is float64, cast at the end; the GPU tests compare each kernel against these and
the CPU tests compare these against OpenCV (resize) and engine.postprocess (softmax).

Resize conventions (kernels/preprocess.cu): pixel centres,
``src = (dst + 0.5) * in / out - 0.5``; every tap index clamped into the image
(clamp-to-edge, what cv2.resize's BORDER_REPLICATE gives); separable filter, no
antialiasing (the filter is not widened when shrinking, as in cv2.resize); the value is
clamped to [0, 255] but not rounded; then ``(v / 255 - mean) / std`` per output channel.
Bicubic uses the Keys kernel with ``a = CUBIC_A_OPENCV = -0.75`` by default (OpenCV's
INTER_CUBIC; PIL's bicubic is -0.5 but PIL also antialiases, which this kernel does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from engine.errors import SpecError
from engine.specs import ChannelOrder, Interpolation, Preprocess

CUBIC_A_OPENCV = -0.75
CUBIC_A_PIL = -0.5


class Filter(IntEnum):
    """The kernel's ``mode`` argument."""

    BILINEAR = 0
    BICUBIC = 1
    LANCZOS4 = 2

    @property
    def taps(self) -> int:
        return {Filter.BILINEAR: 2, Filter.BICUBIC: 4, Filter.LANCZOS4: 8}[self]

    @classmethod
    def from_interpolation(cls, interpolation: Interpolation) -> "Filter":
        return {
            Interpolation.BILINEAR: cls.BILINEAR,
            Interpolation.BICUBIC: cls.BICUBIC,
            Interpolation.LANCZOS: cls.LANCZOS4,
        }[interpolation]


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
    """Kernel arguments after the geometry: filter, channel swap, mean/std per output channel."""

    filter: Filter
    swap_rb: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cubic_a: float = CUBIC_A_OPENCV

    @classmethod
    def from_preprocess(
        cls, pre: Preprocess, cubic_a: float = CUBIC_A_OPENCV, *, accept_no_antialias: bool = False
    ) -> "Normalise":
        """The kernel has no antialiasing, so a spec with ``antialias = true`` is refused
        unless the caller accepts the difference (``accept_no_antialias``), e.g. for the
        few host-decoded files of a run whose other images go through DALI."""
        if pre.antialias and not accept_no_antialias:
            raise SpecError(
                "the host-path CUDA kernel does not antialias, but this spec asks for antialias = true "
                "(use the DALI path, or set antialias = false to match cv2.resize)"
            )
        return cls(
            Filter.from_interpolation(pre.interpolation),
            pre.channel_order is ChannelOrder.BGR,
            tuple(float(m) for m in pre.mean),
            tuple(float(s) for s in pre.std),
            cubic_a,
        )


def _cubic(t: np.ndarray, a: float) -> np.ndarray:
    t = np.abs(t)
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
    return np.where(t <= 1.0, near, np.where(t < 2.0, far, 0.0))


def _lanczos4(t: np.ndarray) -> np.ndarray:
    safe = np.where(np.abs(t) < 1e-6, 1.0, t)
    w = 4.0 * np.sin(np.pi * safe) * np.sin(np.pi * safe / 4.0) / (np.pi * np.pi * safe * safe)
    return np.where(np.abs(t) < 1e-6, 1.0, w)


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
        w = _lanczos4(t)
        w = w / w.sum(axis=1, keepdims=True)
    idx = fl.astype(np.int64)[:, None] - (n // 2 - 1) + np.arange(n)[None, :]
    return np.clip(idx, 0, n_src - 1), w


def resize_crop_reference(
    image: np.ndarray, geom: ResizeCrop, filt: Filter, cubic_a: float = CUBIC_A_OPENCV
) -> np.ndarray:
    """The S x S window of the resized uint8 HWC image, float64 HWC in [0, 255] (not rounded)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if image.shape[:2] != (geom.src_h, geom.src_w):
        raise ValueError(f"image is {image.shape[:2]}, geometry says {(geom.src_h, geom.src_w)}")
    yi, wy = axis_taps(geom.top, geom.size, geom.src_h, geom.resized_h, filt, cubic_a)
    xi, wx = axis_taps(geom.left, geom.size, geom.src_w, geom.resized_w, filt, cubic_a)
    src = image.astype(np.float64)
    # Horizontal then vertical, the order the kernel sums in.
    rows = np.einsum("xi,hxic->hxc", wx, src[:, xi, :])  # (H, S, 3)
    out = np.einsum("yj,yjxc->yxc", wy, rows[yi])  # (S, S, 3)
    return np.clip(out, 0.0, 255.0)


def preprocess_reference(
    image: np.ndarray, geom: ResizeCrop, norm: Normalise, dtype: np.dtype | type = np.float32
) -> np.ndarray:
    """What preprocess_u8_to_f32 / _f16 write for one image: (3, S, S) of ``dtype``."""
    v = resize_crop_reference(image, geom, norm.filter, norm.cubic_a)
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
