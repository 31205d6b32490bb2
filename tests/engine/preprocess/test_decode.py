"""Container sniffing, alpha from headers, and the host (PIL) decoder."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.errors import EngineError
from engine.preprocess.decode import MAX_PIXELS, Container, ImageDecodeError, decode_rgba, header_size, probe, sniff
from tests.engine.preprocess import bmp_with_alpha, encode, png_16bit

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (18, 26, 3), dtype=np.uint8)
RGBA = RNG.integers(0, 256, (18, 26, 4), dtype=np.uint8)


@pytest.mark.parametrize(
    "data, container",
    [
        (encode(RGB, "JPEG"), Container.JPEG),
        (encode(RGB, "PNG"), Container.PNG),
        (encode(RGB, "WEBP"), Container.WEBP),
        (encode(RGB, "BMP"), Container.BMP),
        (encode(RGB, "GIF"), Container.GIF),
        (encode(RGB, "TIFF"), Container.TIFF),
        (b"hello, this is a text file\n", Container.UNKNOWN),
        (b"", Container.UNKNOWN),
        (b"BM", Container.UNKNOWN),  # too short for a BMP header
    ],
)
def test_sniff(data, container):
    assert sniff(data) is container


# (file, has_alpha, animated, decodable by DALI)
PROBES = {
    "png rgb": (encode(RGB, "PNG"), False, False, True),
    "png rgba": (encode(RGBA, "PNG"), True, False, False),
    "png grey+alpha": (encode(Image.fromarray(RGBA[..., :2], "LA"), "PNG"), True, False, False),
    "png rgb + tRNS": (encode(RGB, "PNG", transparency=(1, 2, 3)), True, False, False),
    "png palette": (encode(Image.fromarray(RGB).quantize(16), "PNG"), False, False, True),
    "png palette + tRNS": (encode(Image.fromarray(RGB).quantize(16), "PNG", transparency=0), True, False, False),
    "webp lossy": (encode(RGB, "WEBP"), False, False, True),
    "webp lossless": (encode(RGB, "WEBP", lossless=True), False, False, True),
    "webp lossy + alpha (VP8X)": (encode(RGBA, "WEBP"), True, False, False),
    "webp lossless + alpha (VP8L)": (encode(RGBA, "WEBP", lossless=True), True, False, False),
    "webp animated": (
        encode(RGB, "WEBP", save_all=True, append_images=[Image.fromarray(RGB[::-1])]),
        False,
        True,
        False,
    ),
    "bmp 24-bit": (encode(RGB, "BMP"), False, False, True),
    "bmp 32-bit, no alpha mask": (encode(RGBA, "BMP"), False, False, True),
    "bmp 32-bit V4 with alpha mask": (bmp_with_alpha(RGBA), True, False, False),
    "jpeg": (encode(RGB, "JPEG"), False, False, True),
    "gif": (encode(RGB, "GIF"), False, False, False),
}


@pytest.mark.parametrize("name", list(PROBES))
def test_probe_reads_alpha_from_headers(name):
    data, has_alpha, animated, dali = PROBES[name]
    info = probe(data)
    assert (info.has_alpha, info.animated, info.dali_decodable) == (has_alpha, animated, dali)


def test_a_png_whose_chunks_are_cut_short_goes_to_the_host_decoder():
    """DALI's PNG parser prints its own error for such a file and fails its whole batch
    (a pipeline rebuild); PIL names it as one error row."""
    whole = encode(RNG.integers(0, 256, (64, 80, 3), dtype=np.uint8), "PNG")
    assert probe(whole).complete and probe(whole).dali_decodable
    assert probe(whole + b"trailing junk").complete  # past IEND: as PNG decoders read it
    for cut in (len(whole) // 2, len(whole) - 12, 40):  # in IDAT, IEND missing, in the first chunk after IHDR
        info = probe(whole[:cut])
        assert info.size == (80, 64) and not info.complete and not info.dali_decodable, cut
    with pytest.raises(ImageDecodeError, match="truncated or corrupt PNG"):
        decode_rgba(whole[: len(whole) // 2])
    for cut in (1, 4):  # only IEND's CRC cut: libpng prints "PNG input buffer is incomplete"
        info = probe(whole[:-cut])
        assert not info.complete and not info.dali_decodable, cut
        np.testing.assert_array_equal(decode_rgba(whole[:-cut]), decode_rgba(whole))  # the host decoder reads it whole


@pytest.mark.parametrize("name", [n for n in PROBES if not n.startswith("gif")])
def test_header_size_is_the_decoded_size(name):
    data = PROBES[name][0]
    h, w = decode_rgba(data).shape[:2]
    assert header_size(data) == (w, h) and probe(data).size == (w, h)


@pytest.mark.parametrize("fmt, kwargs", [("JPEG", {"progressive": True}), ("JPEG", {"exif": b"Exif\x00\x00" + bytes(3000)}),
                                         ("BMP", {}), ("GIF", {}), ("WEBP", {"lossless": True})])
def test_header_size_of_other_encodings(fmt, kwargs):
    odd = RNG.integers(0, 256, (37, 301, 3), dtype=np.uint8)  # sizes that are not multiples of 8 or 16
    assert header_size(encode(odd, fmt, **kwargs)) == (301, 37)


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">II5B", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk  # no pixel data: only what a header claims


def _jpeg_header(width: int, height: int) -> bytes:
    import struct

    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + b"\xff\xff" + sof0 + b"\xff\xda"  # with a fill byte before the SOF


def test_size_limit_from_the_headers():
    side = int(MAX_PIXELS**0.5)
    assert probe(_png_header(side, side)).too_large() is None
    cause = probe(_png_header(30000, 30000)).too_large()
    assert cause.startswith("image too large to decode safely (30000x30000 = 900000000 pixels")
    assert probe(_jpeg_header(30000, 30000)).size == (30000, 30000)
    assert probe(_jpeg_header(640, 480)).too_large() is None
    junk = _jpeg_header(30000, 30000).replace(b"\xff\xff\xff\xc0", b"\x00\x17\xff\xc0")  # junk before the SOF
    assert header_size(junk) == (30000, 30000)  # skipped, as PIL does
    big = _jpeg_header(30000, 30000)
    soi, rest = big[:20], big[20:]  # SOI + APP0 | the rest
    # a stuffed zero (0xFF 0x00) is two bytes, not a segment whose "length" jumps into an
    # APP1 that hides a fake 10x10 frame header
    app1 = b"\xff\xe1" + (2 + 11 + 3).to_bytes(2, "big") + _jpeg_header(10, 10)[20:34][:14]
    fake = soi + b"\x00\xff\x00\x00\x06" + app1 + rest
    assert header_size(fake) == (30000, 30000)
    assert header_size(soi + bytes(70000) + rest) == (30000, 30000)  # long junk, no 0xFF in it
    assert header_size(soi + b"\xff" * 100000 + rest) == (30000, 30000)  # a long run of fill bytes
    assert header_size(soi + bytes(2 << 20) + rest) is None  # beyond the scan: left to PIL
    for cut in (b"\xff\xd8\xff", _jpeg_header(10, 10)[:25], _png_header(5, 5)[:20], b"\xff\xd8\xff\xda"):
        assert header_size(cut) is None  # cut short: left to the decoder
    assert header_size(encode(RGB, "TIFF")) is None  # PIL's own limit applies


def test_decode_rgb_png_is_exact_with_opaque_alpha():
    out = decode_rgba(encode(RGB, "PNG"))
    assert out.shape == (18, 26, 4) and out.dtype == np.uint8
    assert np.array_equal(out[..., :3], RGB)
    assert (out[..., 3] == 255).all()


def test_decode_rgba_keeps_stored_colour_and_alpha():
    assert np.array_equal(decode_rgba(encode(RGBA, "PNG")), RGBA)
    assert np.array_equal(decode_rgba(encode(RGBA, "WEBP", lossless=True, exact=True)), RGBA)
    assert np.array_equal(decode_rgba(bmp_with_alpha(RGBA)), RGBA)


def test_decode_grey_and_grey_alpha():
    grey = RGB[..., 0]
    out = decode_rgba(encode(grey, "PNG"))
    assert np.array_equal(out[..., :3], np.repeat(grey[..., None], 3, axis=2))
    la = decode_rgba(encode(Image.fromarray(RGBA[..., :2], "LA"), "PNG"))
    assert np.array_equal(la[..., 0], RGBA[..., 0]) and np.array_equal(la[..., 2], RGBA[..., 0])
    assert np.array_equal(la[..., 3], RGBA[..., 1])


def test_decode_palette_with_transparency():
    pal = Image.fromarray(RGB).quantize(16)
    index = np.asarray(pal)
    out = decode_rgba(encode(pal, "PNG", transparency=0))
    assert np.array_equal(out[..., 3] == 0, index == 0)
    colours = np.asarray(pal.getpalette(), np.uint8).reshape(-1, 3)
    assert np.array_equal(out[..., :3], colours[index])


def test_decode_16bit_grey_rounds_like_dali():
    values = np.array([[0, 128, 129, 257, 32767], [32896, 65278, 65279, 65534, 65535]], np.uint16)
    out = decode_rgba(png_16bit(values))
    expected = np.round(values / 257.0).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected)
    assert out[0, 2, 0] == 1 and out[1, 2, 0] == 254  # not the clipping PIL's convert() does


def test_decode_gif_takes_the_first_frame():
    first = np.zeros((10, 12, 3), np.uint8)
    first[:, :6] = 255
    second = 255 - first
    data = encode(Image.fromarray(first), "GIF", save_all=True, append_images=[Image.fromarray(second)])
    out = decode_rgba(data)
    assert np.array_equal(out[..., :3], first)


def test_decode_applies_exif_orientation():
    img = Image.fromarray(RGB)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif)
    out = decode_rgba(buf.getvalue())
    assert out.shape[:2] == (26, 18)
    assert np.array_equal(out[..., :3], np.rot90(RGB, k=-1))


@pytest.mark.parametrize(
    "data, cause",
    [
        (b"", "empty file (0 bytes)"),
        (b"name,score\nalice,3\nbob,4\n", "cannot decode: not an image (text)"),
        (bytes(range(256)) * 4, "cannot decode: not an image (unrecognised format)"),
        (encode(RGB, "JPEG")[:200], "truncated or corrupt JPEG"),
        (encode(RGB, "PNG")[:60], "truncated or corrupt PNG"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot decode: corrupt or unsupported PNG header"),
    ],
)
def test_decode_failures_have_one_line_causes(data, cause):
    with pytest.raises(ImageDecodeError) as info:
        decode_rgba(data)
    assert str(info.value) == cause
    assert isinstance(info.value, EngineError)


def _bmp32(rgba: np.ndarray, header_size: int, compression: int) -> bytes:
    """A 32-bit BMP whose info header is ``header_size`` bytes, with an alpha mask: in the
    header from V3 (56 bytes) on, after a 40-byte one (BI_ALPHABITFIELDS, compression 6)."""
    h, w = rgba.shape[:2]
    pixels = np.ascontiguousarray(rgba[::-1, :, [2, 1, 0, 3]]).tobytes()  # bottom-up BGRA
    header = bytearray(header_size)
    header[0:4] = header_size.to_bytes(4, "little")
    header[4:8] = w.to_bytes(4, "little", signed=True)
    header[8:12] = h.to_bytes(4, "little", signed=True)
    header[12:14] = (1).to_bytes(2, "little")
    header[14:16] = (32).to_bytes(2, "little")
    header[16:20] = compression.to_bytes(4, "little")
    header[20:24] = len(pixels).to_bytes(4, "little")
    masks = b"".join(m.to_bytes(4, "little") for m in (0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000))
    extra = b""
    if header_size >= 56:
        header[40:56] = masks
    else:
        extra = masks
    offset = 14 + header_size + len(extra)
    file_header = b"BM" + (offset + len(pixels)).to_bytes(4, "little") + b"\0\0\0\0" + offset.to_bytes(4, "little")
    return file_header + bytes(header) + extra + pixels


def test_a_bmp_v3_header_with_an_alpha_mask_has_alpha():
    """BITMAPV3INFOHEADER (56 bytes, Adobe's): its alpha mask is read, so the file goes to
    the host decoder, which keeps the alpha (DALI's RGB output would drop it)."""
    data = _bmp32(RGBA, 56, 3)
    info = probe(data)
    assert info.has_alpha and not info.dali_decodable and info.size == (26, 18)
    assert np.array_equal(decode_rgba(data), RGBA)


def test_a_bmp_of_alpha_bitfields_has_alpha():
    assert probe(_bmp32(RGBA, 40, 6)).has_alpha


def test_a_top_down_bmp_declares_its_size_positive_and_is_held_to_the_limit():
    data = bytearray(encode(RGB, "BMP"))
    data[22:26] = (-18).to_bytes(4, "little", signed=True)  # negative height: rows stored top-down
    assert header_size(bytes(data)) == (26, 18)
    assert decode_rgba(bytes(data)).shape[:2] == (18, 26)
    data[18:22] = (30000).to_bytes(4, "little", signed=True)
    data[22:26] = (-30000).to_bytes(4, "little", signed=True)
    assert probe(bytes(data)).too_large().startswith("image too large to decode safely (30000x30000")


def test_the_size_limit_admits_exactly_max_pixels():
    assert probe(_png_header(MAX_PIXELS, 1)).too_large() is None
    assert probe(_png_header(MAX_PIXELS + 1, 1)).too_large() is not None


def test_no_frame_header_is_looked_for_after_the_scan_starts():
    """SOS (or EOI) before any SOF: what follows is entropy-coded data, where the bytes of
    a frame header can occur by chance; the size is unknown, not read from there."""
    fake_sof = _jpeg_header(30000, 30000)[22:]  # 0xFF 0xC0 ... then SOS
    sos = b"\xff\xda" + (8).to_bytes(2, "big") + bytes(6)
    assert header_size(b"\xff\xd8" + sos + b"\x12\x34" + fake_sof) is None
    assert header_size(b"\xff\xd8" + b"\xff\xd9" + b"\x00\x02" + fake_sof) is None
