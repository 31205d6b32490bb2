"""Looking at encoded images without decoding them, and the host (PIL) decoder.

:func:`probe` reads the container from the magic bytes and, from the headers alone,
whether the image carries alpha (PNG colour type 4/6 or a ``tRNS`` chunk, WebP VP8X
alpha flag or VP8L alpha hint, 32-bit BMP with an alpha mask) and whether it is
animated. The DALI pipeline uses it to route each file: plain JPEG/PNG/WebP/BMP are
decoded by DALI; images with alpha and the other formats are decoded here, by
:func:`decode_rgba`, once, to RGBA.

:func:`decode_rgba` returns the first frame as HxWx4 uint8 (alpha 255 where the file
has none). 16-bit samples become 8-bit by ``round(v / 257)`` (what DALI does), palette
and grey+alpha images are expanded, and the EXIF orientation is applied (as DALI's
decoder does by default). Failures raise :class:`ImageDecodeError` with a one-line
cause such as "truncated or corrupt JPEG" or "cannot decode: not an image (text)".

:func:`composite` is the NumPy form of the alpha rule the DALI graph applies to RGBA
(``dali_pipeline._composite``), value for value: the OpenCV reference and the frames API
(:mod:`engine.frames`) use it.
"""

from __future__ import annotations

import io
import logging
import re
import struct
from dataclasses import dataclass
from enum import Enum

import numpy as np

from engine.errors import InputError
from engine.specs import AlphaMode

log = logging.getLogger(__name__)


class Container(str, Enum):
    JPEG = "jpeg"
    PNG = "png"
    WEBP = "webp"
    BMP = "bmp"
    GIF = "gif"
    TIFF = "tiff"
    UNKNOWN = "unknown"


# Containers the DALI CPU decoder takes; anything else goes to the host decoder.
DALI_CONTAINERS = frozenset({Container.JPEG, Container.PNG, Container.WEBP, Container.BMP})

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageDecodeError(InputError):
    """One file cannot be decoded; the message is the one-line cause."""


# The most pixels an image may have to be decoded: PIL's own refusal level (twice its
# MAX_IMAGE_PIXELS warning level, about 13400 x 13400), applied from the headers to every
# file whichever decoder it goes to, so that a file is refused or decoded on its own
# merits, never by which decoder its batch ended up on. A 30000 x 30000 image would
# need 2.7 GB for its pixels alone; its file can be a few hundred bytes.
MAX_PIXELS = 178_956_970


@dataclass(frozen=True)
class Probe:
    """What the headers say, without decoding pixels."""

    container: Container
    has_alpha: bool
    animated: bool  # read for WebP only (GIF goes to the host decoder whatever it holds)
    size: tuple[int, int] | None = None  # (width, height) the header declares; None: not read
    # False for a PNG whose chunks run past the end of the file (or stop before IEND): the
    # host decoder names it, where DALI's parser would print its own error and fail the
    # whole batch (a pipeline rebuild)
    complete: bool = True

    def too_large(self, limit: int = MAX_PIXELS) -> str | None:
        """The one-line cause when the declared size exceeds ``limit`` pixels, else None."""
        if self.size is None:
            return None
        w, h = self.size
        if w * h <= limit:
            return None
        return f"image too large to decode safely ({w}x{h} = {w * h} pixels; the limit is {limit})"

    @property
    def dali_decodable(self) -> bool:
        """True when DALI's decoder (output RGB) gives everything the views need and the
        headers give the size (so that :meth:`too_large` could judge it; a file whose
        size they do not give is left to PIL, which applies its own limit)."""
        return (self.container in DALI_CONTAINERS and not self.has_alpha and not self.animated
                and self.size is not None and self.complete)


def sniff(data: bytes | memoryview) -> Container:
    """The container named by the file's magic bytes."""
    head = bytes(data[:12])
    if head.startswith(b"\xff\xd8\xff"):
        return Container.JPEG
    if head.startswith(_PNG_MAGIC):
        return Container.PNG
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return Container.WEBP
    if head.startswith(b"BM") and len(data) >= 26:
        return Container.BMP
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return Container.GIF
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return Container.TIFF
    return Container.UNKNOWN


def probe(data: bytes | memoryview) -> Probe:
    """Container, alpha and animation read from the headers (malformed headers read
    as "no alpha"; the decoder then reports what is wrong)."""
    container = sniff(data)
    has_alpha = animated = False
    if container is Container.PNG:
        has_alpha, complete = _png_chunks(data)
        return Probe(container, has_alpha, animated, header_size(data, container), complete)
    elif container is Container.WEBP:  # one read of its first chunk gives the size too
        size, has_alpha, animated = _webp_header(data)
        return Probe(container, has_alpha, animated, size)
    elif container is Container.BMP:
        has_alpha = _bmp_has_alpha(data)
    return Probe(container, has_alpha, animated, header_size(data, container))


def header_size(data: bytes | memoryview, container: Container | None = None) -> tuple[int, int] | None:
    """(width, height) as the file's headers declare it, without decoding; None where
    the headers are cut short or malformed (the decoder then says what is wrong) and for
    TIFF (PIL's own limit applies there). For a JPEG, the first frame header (SOF)."""
    container = container or sniff(data)
    try:
        if container is Container.PNG:
            if bytes(data[12:16]) == b"IHDR":
                return struct.unpack(">II", bytes(data[16:24]))
        elif container is Container.JPEG:
            return _jpeg_size(data)
        elif container is Container.WEBP:
            return _webp_header(data)[0]
        elif container is Container.BMP:
            if int.from_bytes(bytes(data[14:18]), "little") == 12:  # OS/2 core header
                return struct.unpack("<HH", bytes(data[18:22]))
            w, h = struct.unpack("<ii", bytes(data[18:26]))
            return abs(w), abs(h)  # a negative height: rows stored top-down
        elif container is Container.GIF:
            return struct.unpack("<HH", bytes(data[6:10]))  # the logical screen
    except struct.error:
        return None
    return None


# SOF markers: C0-CF but C4 (DHT), C8 (JPG extension) and CC (DAC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_SCAN = 1 << 20  # a frame header further in than this is left to PIL (see probe's callers)
_FILL = re.compile(rb"\xff+")


def _jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """The size in the first frame header (SOF), scanning segments as libjpeg does:
    fill bytes (runs of 0xFF) and junk between segments are skipped, 0xFF 0x00 is a
    stuffed zero. None when no SOF is found within the first MiB."""
    buf = bytes(data[:_JPEG_SCAN])
    pos, n = 2, len(buf)
    while pos + 4 <= n:
        if buf[pos] != 0xFF:  # junk between segments: on to the next 0xFF
            pos = buf.find(b"\xff", pos)
            if pos < 0:
                return None
            continue
        pos = _FILL.match(buf, pos).end() - 1  # the last 0xFF of a run of fill bytes
        if pos + 4 > n:
            return None
        marker = buf[pos + 1]
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # stuffed zero, TEM, RSTn: no length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS before any frame header
            return None
        if marker in _JPEG_SOF:
            if pos + 9 > n:
                return None
            h, w = struct.unpack(">HH", buf[pos + 5 : pos + 9])
            return w, h
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        if length < 2:
            return None
        pos += 2 + length
    return None


def _webp_header(data: bytes | memoryview) -> tuple[tuple[int, int] | None, bool, bool]:
    """(size or None, has_alpha, animated) from a WebP file's first chunk: VP8X (the
    extended header), VP8L (lossless) or "VP8 " (lossy, never alpha)."""
    chunk = bytes(data[12:16])
    if chunk == b"VP8X" and len(data) >= 21:
        flags = data[20]
        size = None
        if len(data) >= 30:
            size = (int.from_bytes(bytes(data[24:27]), "little") + 1, int.from_bytes(bytes(data[27:30]), "little") + 1)
        return size, bool(flags & 0x10), bool(flags & 0x02)
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(bytes(data[21:25]), "little")
        return ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1), bool((bits >> 28) & 1), False
    if chunk == b"VP8 " and len(data) >= 30 and bytes(data[23:26]) == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", bytes(data[26:30]))
        return (w & 0x3FFF, h & 0x3FFF), False, False
    return None, False, False


def _png_chunks(data: bytes | memoryview) -> tuple[bool, bool]:
    """(has_alpha, complete) of a PNG from its chunk headers: alpha from the colour type
    (grey or RGB + alpha) or a tRNS chunk before the image data; complete when the chain
    of chunks reaches IEND, its CRC included, inside the file (libpng reports a cut CRC,
    "PNG input buffer is incomplete", on stderr)."""
    if len(data) < 33 or bytes(data[12:16]) != b"IHDR":
        return False, False
    has_alpha = data[25] in (4, 6)
    seen_data = False
    pos, n = 8, len(data)
    while pos + 8 <= n:
        length, ctype = struct.unpack(">I4s", bytes(data[pos : pos + 8]))
        if ctype == b"IEND":
            return has_alpha, pos + 12 + length <= n
        if ctype == b"tRNS" and not seen_data:
            has_alpha = True
        seen_data = seen_data or ctype == b"IDAT"
        pos += 12 + length  # length, type, data, CRC
    return has_alpha, False


def _bmp_has_alpha(data: bytes | memoryview) -> bool:
    if len(data) < 34:
        return False
    header_size = int.from_bytes(bytes(data[14:18]), "little")
    if header_size < 40:
        return False  # OS/2 core header: no 32-bit alpha
    bit_count = int.from_bytes(bytes(data[28:30]), "little")
    compression = int.from_bytes(bytes(data[30:34]), "little")
    if bit_count != 32:
        return False
    if compression == 6:  # BI_ALPHABITFIELDS
        return True
    if header_size >= 56 and len(data) >= 70:
        return int.from_bytes(bytes(data[66:70]), "little") != 0  # V3+ alpha mask
    return False


def looks_like_text(data: bytes | memoryview) -> bool:
    """True when the start of ``data`` reads as text (UTF-8, no NUL, mostly printable)."""
    sample = bytes(data[:1024])
    if not sample or b"\x00" in sample:
        return False
    text = sample.decode("utf-8", errors="replace")
    printable = sum(1 for ch in text if ch.isprintable() or ch in "\t\r\n")
    return printable >= 0.95 * len(text)


def undecodable_cause(data: bytes | memoryview, container: Container | None = None) -> str:
    """The one-line cause for a file no decoder accepts."""
    if len(data) == 0:
        return "empty file (0 bytes)"
    container = container or sniff(data)
    if container is Container.UNKNOWN:
        kind = "text" if looks_like_text(data) else "unrecognised format"
        return f"cannot decode: not an image ({kind})"
    return f"truncated or corrupt {container.name}"


def composite(colour: np.ndarray, alpha: np.ndarray, mode: AlphaMode) -> np.ndarray:
    """(H, W, 3) uint8 from ``colour`` (H, W, 3) uint8 and ``alpha`` (H, W) or (H, W, 1)
    uint8 per the alpha mode: ``colour * a + background * (1 - a)`` in float32 with
    ``a = alpha / 255``, rounded to nearest (what the DALI graph's cast to uint8 gives:
    equal on all 256 x 256 value/alpha pairs, tests/engine/test_frames.py), over white
    (255) or black (0). ``DROP`` returns ``colour`` itself (possibly a strided view).
    The channels are composited alike, so their order (RGB or BGR) passes through."""
    if mode is AlphaMode.DROP:
        return colour
    a = alpha.reshape(alpha.shape[0], alpha.shape[1], 1).astype(np.float32) / 255.0
    background = 255.0 if mode is AlphaMode.WHITE else 0.0
    out = colour.astype(np.float32) * a + background * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def too_large_to_decode(bomb: Exception) -> ImageDecodeError:
    """The error for PIL's DecompressionBombError (a size PIL itself refuses)."""
    return ImageDecodeError(f"image too large to decode safely ({bomb})")


def decode_rgba(data: bytes | memoryview) -> np.ndarray:
    """Decode the first frame of ``data`` with PIL to HxWx4 uint8 RGBA."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) == 0:
        raise ImageDecodeError(undecodable_cause(data))
    container = sniff(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # the first frame
            oriented = ImageOps.exif_transpose(im)
            rgba = _to_rgba(oriented)
    except UnidentifiedImageError:
        if container is Container.UNKNOWN:
            raise ImageDecodeError(undecodable_cause(data, container)) from None
        raise ImageDecodeError(f"cannot decode: corrupt or unsupported {container.name} header") from None
    except Image.DecompressionBombError as exc:
        raise too_large_to_decode(exc) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        log.debug("host decode of a %s failed: %s", container.value, exc)
        raise ImageDecodeError(undecodable_cause(data, container)) from None
    if rgba.shape[0] == 0 or rgba.shape[1] == 0:
        raise ImageDecodeError(f"image has no pixels ({rgba.shape[0]}x{rgba.shape[1]})")
    return rgba


_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def _to_rgba(im) -> np.ndarray:
    if im.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        alpha = np.full_like(grey, 255)
        return np.ascontiguousarray(np.stack([grey, grey, grey, alpha], axis=-1))
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return np.ascontiguousarray(np.asarray(im.convert("RGBA"), dtype=np.uint8))
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    out = np.empty(rgb.shape[:2] + (4,), np.uint8)
    out[..., :3] = rgb
    out[..., 3] = 255
    return out
