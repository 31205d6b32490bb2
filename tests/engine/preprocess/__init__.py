"""Preprocess tests. Shared test images live here: real photographs from scikit-image and
small generated ones, encoded in memory."""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(array_or_image, fmt: str, **kwargs) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """A scikit-image sample photograph as uint8 (HxWx3, or HxW for 'camera')."""
    from skimage import data

    return np.ascontiguousarray(getattr(data, name)())


def with_alpha(rgb: np.ndarray) -> np.ndarray:
    """RGBA: a radial alpha ramp, fully transparent corners whose stored colour is kept."""
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    alpha = np.clip((1.2 - r) * 255, 0, 255).astype(np.uint8)
    return np.dstack([rgb, alpha])


def frame_1080p() -> np.ndarray:
    """A 1920x1080 RGB mosaic of the photographs at their native scale (real detail,
    not an upscale)."""
    canvas = np.zeros((1080, 1920, 3), np.uint8)
    tiles = ["astronaut", "coffee", "rocket", "chelsea", "astronaut", "coffee", "chelsea", "rocket"]
    y = x = 0
    row_h = 0
    for name in tiles * 3:
        tile = photo(name)
        th, tw = tile.shape[:2]
        if x + tw > 1920:
            x, y, row_h = 0, y + row_h, 0
        if y >= 1080:
            break
        h, w = min(th, 1080 - y), min(tw, 1920 - x)
        canvas[y : y + h, x : x + w] = tile[:h, :w]
        x += w
        row_h = max(row_h, h)
    return canvas


def split_white_black(height: int, width: int) -> np.ndarray:
    """White left half, black right half."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:, : width // 2] = 255
    return img


def png_16bit(samples: np.ndarray) -> bytes:
    """A 16-bit PNG of ``samples`` (HxW grey, HxWx3 RGB or HxWx4 RGBA), written by hand:
    PIL writes 16 bits only for grey, and OpenCV is a test extra the floor run lacks."""
    samples = np.asarray(samples)
    h, w = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = samples.astype(">u2").reshape(h, w * channels).view(np.uint8)
    raw = np.hstack([np.zeros((h, 1), np.uint8), rows]).tobytes()  # filter type 0 before each row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def bmp_with_alpha(rgba: np.ndarray) -> bytes:
    """A 32-bit BMP with a BITMAPV4HEADER and an alpha mask (PIL writes no such file)."""
    h, w = rgba.shape[:2]
    pixels = np.ascontiguousarray(rgba[::-1, :, [2, 1, 0, 3]]).tobytes()  # bottom-up BGRA
    header = bytearray(108)
    header[0:4] = (108).to_bytes(4, "little")
    header[4:8] = w.to_bytes(4, "little", signed=True)
    header[8:12] = h.to_bytes(4, "little", signed=True)
    header[12:14] = (1).to_bytes(2, "little")
    header[14:16] = (32).to_bytes(2, "little")
    header[16:20] = (3).to_bytes(4, "little")  # BI_BITFIELDS
    header[20:24] = len(pixels).to_bytes(4, "little")
    header[40:44] = (0x00FF0000).to_bytes(4, "little")  # red mask
    header[44:48] = (0x0000FF00).to_bytes(4, "little")
    header[48:52] = (0x000000FF).to_bytes(4, "little")
    header[52:56] = (0xFF000000).to_bytes(4, "little")  # alpha mask
    header[56:60] = b"BGRs"
    offset = 14 + len(header)
    file_header = b"BM" + (offset + len(pixels)).to_bytes(4, "little") + b"\0\0\0\0" + offset.to_bytes(4, "little")
    return file_header + bytes(header) + pixels
