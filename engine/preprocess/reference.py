"""The model cards' own preprocessing, independent of DALI (for parity tests and benchmarks).

* ``"opencv"``, the gender card's ``use.py``: ``cv2.imdecode`` with ``IMREAD_COLOR``
  (BGR; alpha dropped, colour kept as stored; EXIF orientation applied), ``cv2.resize``
  to ``Preprocess.resized_shape`` (Lanczos = ``INTER_LANCZOS4``; OpenCV does not
  antialias when it shrinks), top-left crop. For a spec that composites alpha, the file
  is read with ``IMREAD_UNCHANGED`` (which skips the EXIF rotation) and composited over
  the background first.
* ``"pil"``, timm's eval transform as the quality card uses it: ``Image.open``, first
  frame, RGBA composited on the background with ``alpha_composite``, ``convert("RGB")``,
  ``resize`` (``Image.BICUBIC`` ...) to ``resized_shape``, crop at ``crop_origin``, /255,
  mean/std. PIL's own quirks are kept (no EXIF rotation; ``convert("RGB")`` of a
  16-bit grey image clips instead of scaling).

Both follow every :class:`~engine.specs.Preprocess` field; mean and std apply to the
channels in output order. OpenCV is a test/benchmark dependency (extra ``test``) and is
imported only when used. Both refuse an image larger than the engine's decoders do
(:data:`engine.preprocess.decode.MAX_PIXELS`) as an :class:`ImageDecodeError`.
"""

from __future__ import annotations

import io
import struct
from typing import Literal

import numpy as np

from engine.errors import DependencyError
from engine.preprocess.decode import ImageDecodeError, composite, probe, too_large_to_decode, undecodable_cause
from engine.specs import AlphaMode, ChannelOrder, Interpolation, Preprocess, Task

Library = Literal["opencv", "pil"]

REFERENCE_LIBRARY: dict[Task, Library] = {Task.GENDER: "opencv", Task.QUALITY: "pil"}


def reference_view(data: bytes, pre: Preprocess, library: Library) -> np.ndarray:
    """One image's view as a (3, S, S) float32 array, computed the way ``library`` does."""
    if library == "opencv":
        rgb = _opencv_resized_rgb(data, pre)
    elif library == "pil":
        rgb = _pil_resized_rgb(data, pre)
    else:
        raise ValueError(f"unknown reference library {library!r} (use 'opencv' or 'pil')")
    return _crop_normalise(rgb, pre)


def _crop_normalise(resized_rgb: np.ndarray, pre: Preprocess) -> np.ndarray:
    h, w = resized_rgb.shape[:2]
    top, left = pre.crop_origin(h, w)
    crop = resized_rgb[top : top + pre.size, left : left + pre.size]
    if pre.channel_order is ChannelOrder.BGR:
        crop = crop[..., ::-1]
    mean = np.asarray(pre.mean, np.float32)
    std = np.asarray(pre.std, np.float32)
    x = (crop.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


# -- OpenCV ---------------------------------------------------------------------------


def _cv2():
    try:
        import cv2
    except ImportError:
        raise DependencyError("opencv-python-headless", "test", "the OpenCV reference preprocessing") from None
    return cv2


def _opencv_resized_rgb(data: bytes, pre: Preprocess) -> np.ndarray:
    cv2 = _cv2()
    buf = np.frombuffer(data, np.uint8)
    if buf.size == 0:
        raise ImageDecodeError(undecodable_cause(buf))
    # OpenCV's own limit (2^30 pixels) lets a 20 kB JPEG claiming 30000 x 30000 allocate
    # 2.7 GB; the engine's limit, read from the headers, applies here too (PIL has its own)
    cause = probe(data).too_large()
    if cause:
        raise ImageDecodeError(cause)
    if pre.alpha is AlphaMode.DROP:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        if bgr is None:
            raise ImageDecodeError(undecodable_cause(buf))
        rgb = bgr[..., ::-1]
    else:
        raw = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise ImageDecodeError(undecodable_cause(buf))
        rgb = _opencv_composite(raw, pre.alpha)
    h, w = rgb.shape[:2]
    out_h, out_w = pre.resized_shape(h, w)
    flags = {
        Interpolation.BILINEAR: cv2.INTER_LINEAR,
        Interpolation.BICUBIC: cv2.INTER_CUBIC,
        Interpolation.LANCZOS: cv2.INTER_LANCZOS4,
    }[pre.interpolation]
    return cv2.resize(np.ascontiguousarray(rgb), (out_w, out_h), interpolation=flags)


def _opencv_composite(raw: np.ndarray, alpha: AlphaMode) -> np.ndarray:
    """RGB uint8 from an IMREAD_UNCHANGED array (grey, BGR or BGRA; 8 or 16 bit)."""
    if raw.dtype == np.uint16:
        raw = ((raw.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif raw.dtype != np.uint8:
        raise ImageDecodeError(f"unsupported sample type {raw.dtype} in the OpenCV reference")
    if raw.ndim == 2:
        raw = raw[..., None]
    channels = raw.shape[2]
    if channels in (1, 2):  # grey, grey + alpha
        colour = np.repeat(raw[..., :1], 3, axis=2)
    else:
        colour = raw[..., 2::-1]  # BGR(A) -> RGB
    if channels not in (2, 4):
        return np.ascontiguousarray(colour)
    return composite(colour, raw[..., -1], alpha)


# -- PIL ------------------------------------------------------------------------------


def _pil_resized_rgb(data: bytes, pre: Preprocess) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if len(data) == 0:
        raise ImageDecodeError(undecodable_cause(data))
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb_image = _pil_rgb(im, pre.alpha)
    except Image.DecompressionBombError as exc:
        raise too_large_to_decode(exc) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error):
        raise ImageDecodeError(undecodable_cause(data)) from None
    out_h, out_w = pre.resized_shape(rgb_image.height, rgb_image.width)
    resample = {
        Interpolation.BILINEAR: Image.BILINEAR,
        Interpolation.BICUBIC: Image.BICUBIC,
        Interpolation.LANCZOS: Image.LANCZOS,
    }[pre.interpolation]
    return np.asarray(rgb_image.resize((out_w, out_h), resample), dtype=np.uint8)


def _pil_rgb(im, alpha: AlphaMode):
    from PIL import Image

    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if not has_alpha or alpha is AlphaMode.DROP:
        return im.convert("RGB")
    rgba = im.convert("RGBA")
    fill = (255, 255, 255, 255) if alpha is AlphaMode.WHITE else (0, 0, 0, 255)
    background = Image.new("RGBA", rgba.size, fill)
    background.alpha_composite(rgba)
    return background.convert("RGB")
