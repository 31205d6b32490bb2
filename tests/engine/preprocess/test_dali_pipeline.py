"""The DALI CPU pipeline: declarations, exact geometry, alpha, channel order, failures."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from engine.errors import EngineError, InputError
from engine.preprocess import DaliPreprocessor, PreprocessResult, ViewDecl
from engine.preprocess.reference import reference_view
from engine.specs import (
    AlphaMode,
    ChannelOrder,
    CropPosition,
    Interpolation,
    Preprocess,
    ResizeRule,
    SpecRegistry,
    Task,
)
from tests.engine.preprocess import encode, photo, png_16bit, split_white_black

REGISTRY = SpecRegistry.builtin()
GENDER = REGISTRY.get(Task.GENDER)
QUALITY = REGISTRY.get(Task.QUALITY)
BOTH = [(GENDER.key, GENDER.preprocess), (QUALITY.key, QUALITY.preprocess)]
PLAIN = Preprocess(  # no normalisation: view values are pixels / 255
    size=32,
    resize=ResizeRule.SHORT_SIDE,
    crop=CropPosition.CENTER,
    interpolation=Interpolation.BILINEAR,
    channel_order=ChannelOrder.RGB,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    alpha=AlphaMode.DROP,
)


@pytest.fixture(scope="module")
def both():
    with DaliPreprocessor(BOTH, max_batch=8, num_threads=2) as pre:
        yield pre


def run_one(views, data: bytes, **kwargs) -> PreprocessResult:
    with DaliPreprocessor(views, max_batch=2, num_threads=1, **kwargs) as pre:
        result = pre.process([data])
    assert result.ok == [0], result.errors
    return result


def pixels(view: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Undo the normalisation: (3, S, S) in 0..255."""
    mean = np.asarray(pre.mean)[:, None, None]
    std = np.asarray(pre.std)[:, None, None]
    return (view.astype(np.float64) * std + mean) * 255.0


# -- construction, lifecycle -----------------------------------------------------------


def test_importing_the_package_imports_neither_dali_nor_opencv():
    code = (
        "import sys, engine.preprocess, engine.preprocess.decode, engine.preprocess.reference, "
        "engine.preprocess.dali_pipeline; "
        "bad = [m for m in ('nvidia.dali', 'cv2') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_declarations(both):
    assert both.declarations() == (
        ViewDecl(GENDER.key, (3, 224, 224), np.dtype(np.float32), "cpu"),
        ViewDecl(QUALITY.key, (3, 384, 384), np.dtype(np.float32), "cpu"),
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"views": [], "max_batch": 2}, "at least one view"),
        ({"views": BOTH + BOTH[:1], "max_batch": 2}, "duplicate view keys"),
        ({"views": BOTH, "max_batch": 0}, "max_batch"),
        ({"views": BOTH, "max_batch": 2, "num_threads": 0}, "num_threads"),
    ],
)
def test_bad_construction_raises_engine_error(kwargs, match):
    with pytest.raises(EngineError, match=match):
        DaliPreprocessor(**kwargs)


def test_close_is_idempotent_and_process_after_close_fails():
    pre = DaliPreprocessor(BOTH[:1], max_batch=1)
    with pre:
        assert not pre.closed
    assert pre.closed
    pre.close()
    with pytest.raises(EngineError, match="closed"):
        pre.process([encode(photo("chelsea"), "PNG")])


def test_items_must_be_bytes_or_uint8_arrays(both):
    png = encode(photo("chelsea"), "PNG")
    as_array = both.process([np.frombuffer(png, np.uint8)])
    as_bytes = both.process([png])
    assert np.array_equal(as_array.views[GENDER.key], as_bytes.views[GENDER.key])
    with pytest.raises(InputError, match="item 0"):
        both.process([np.zeros(10, np.float32)])
    with pytest.raises(InputError, match="item 1"):
        both.process([png, "a/path.png"])


def test_empty_input_gives_empty_views(both):
    result = both.process([])
    assert result.ok == [] and result.errors == {} and result.sizes == []
    assert result.views[GENDER.key].shape == (0, 3, 224, 224)
    assert result.views[QUALITY.key].shape == (0, 3, 384, 384)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_batch": True}, "max_batch must be a positive integer"),
        ({"num_threads": True}, "num_threads must be a positive integer"),
        ({"hw_decoder_load": True}, "hw_decoder_load must be a number"),
        ({"hw_decoder_load": 1.5}, r"hw_decoder_load must be in \[0, 1\]"),
        ({"output_dtype": np.float64}, "output_dtype must be float32 or float16"),
        ({"output_dtype": "int8"}, "output_dtype must be float32 or float16"),
        ({"device_id": 0}, "device_id is for device='gpu'"),
        ({"device": "tpu"}, "must be 'cpu' or 'gpu'"),
    ],
)
def test_bad_settings_are_refused_before_any_pipeline_is_built(kwargs, match):
    settings = {"views": BOTH[:1], "max_batch": 2, **kwargs}
    with pytest.raises(EngineError, match=match):
        DaliPreprocessor(**settings)


@pytest.mark.parametrize("load", [0, 0.0, 1.0])
def test_hw_decoder_load_takes_both_ends_of_its_range(load):
    with DaliPreprocessor(BOTH[:1], max_batch=1, hw_decoder_load=load) as pre:
        assert not pre.closed


def test_float16_output_is_declared_and_written_on_the_cpu():
    data = encode(photo("chelsea"), "PNG")
    with DaliPreprocessor(BOTH, max_batch=1, output_dtype=np.float16) as pre:
        assert [d.dtype for d in pre.declarations()] == [np.dtype(np.float16)] * 2
        half = pre.process([data])
    full = run_one(BOTH, data)
    for key, _ in BOTH:
        assert half.views[key].dtype == np.float16
        assert np.array_equal(half.views[key], full.views[key].astype(np.float16)), key


def test_a_dali_error_is_reported_by_the_line_that_says_what_went_wrong():
    """DALI's message is the operator, the pipeline-definition traceback, then the cause
    after "encountered:", then "Current pipeline object is no longer valid."."""
    from engine.preprocess.dali_pipeline import _first_line, define_pipeline

    pipe = define_pipeline(BOTH[:1], max_batch=1, num_threads=1)
    pipe.build()
    pipe.feed_input("enc", [np.frombuffer(b"\xff\xd8\xff\xe0" + bytes(200), np.uint8)])
    pipe.feed_input("rgba", [np.zeros((1, 1, 4), np.uint8)])
    pipe.feed_input("on_host", [np.array(False)])
    with pytest.raises(RuntimeError) as failed:
        pipe.run()
    assert "encountered:" in str(failed.value)
    line = _first_line(failed.value)
    assert line and "no longer valid" not in line and "decoders.image" not in line
    assert _first_line(RuntimeError("one\n\nlast line")) == "last line"
    assert _first_line(RuntimeError("")) == "RuntimeError"


# -- geometry ----------------------------------------------------------------------------


GEOMETRY_SPECS = [
    dataclasses.replace(PLAIN, size=size, resize=rule, crop=crop)
    for size in (224, 384, 33)
    for rule in ResizeRule
    for crop in CropPosition
]


def test_graph_geometry_equals_the_spec_methods():
    """The in-graph twin of resized_shape / crop_origin, over many sizes at once."""
    from nvidia.dali import fn, pipeline_def, types

    from engine.preprocess.dali_pipeline import geometry_nodes

    rng = np.random.default_rng(3)
    sizes = [(1, 1), (1, 100000), (100000, 1), (224, 224), (225, 224), (224, 225), (383, 384), (385, 384)]
    sizes += [(1080, 1920), (1920, 1080), (120, 100), (299, 451), (451, 299), (7, 3001)]
    sizes += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(200)]

    @pipeline_def(batch_size=len(sizes), num_threads=1, device_id=None, prefetch_queue_depth=1)
    def geometry():
        h = fn.external_source(name="h", dtype=types.INT64, ndim=0)
        w = fn.external_source(name="w", dtype=types.INT64, ndim=0)
        outs = []
        for pre in GEOMETRY_SPECS:
            outs.extend(geometry_nodes(h, w, pre))
        return tuple(outs)

    pipe = geometry()
    pipe.build()
    pipe.feed_input("h", [np.array(h, np.int64) for h, _ in sizes])
    pipe.feed_input("w", [np.array(w, np.int64) for _, w in sizes])
    outputs = [[int(np.asarray(o[i])) for i in range(len(sizes))] for o in pipe.run()]
    for s, pre in enumerate(GEOMETRY_SPECS):
        out_h, out_w, top, left = outputs[4 * s : 4 * s + 4]
        for i, (h, w) in enumerate(sizes):
            resized = pre.resized_shape(h, w)
            assert (out_h[i], out_w[i]) == resized, (pre, h, w)
            assert (top[i], left[i]) == pre.crop_origin(*resized), (pre, h, w)


def test_view_shapes_and_original_sizes(both):
    files = [
        encode(photo("chelsea"), "PNG"),  # 300x451
        encode(photo("camera"), "JPEG"),  # 512x512 grey
        encode(np.dstack([photo("coffee"), np.full((400, 600), 128, np.uint8)]), "PNG"),  # host route
        encode(photo("rocket")[:100, :37], "WEBP"),  # taller than wide, enlarged
    ]
    result = both.process(files)
    assert result.ok == [0, 1, 2, 3] and result.errors == {}
    assert result.sizes == [(300, 451), (512, 512), (400, 600), (100, 37)]
    assert result.views[GENDER.key].shape == (4, 3, 224, 224)
    assert result.views[QUALITY.key].shape == (4, 3, 384, 384)
    for view in result.views.values():
        assert view.dtype == np.float32 and view.flags.c_contiguous and np.isfinite(view).all()


def test_top_left_vs_centre_crop():
    """White left half, black right half, 100x300: resized to 224x672 the top-left crop
    (gender) is all white; resized to 384x1152 the centre crop (quality) starts at
    column 384 and the edge at 576 lands in its middle (column 192)."""
    result = run_one(BOTH, encode(split_white_black(100, 300), "PNG"))
    gender = pixels(result.views[GENDER.key][0], GENDER.preprocess)
    quality = pixels(result.views[QUALITY.key][0], QUALITY.preprocess)
    assert np.abs(gender - 255).max() < 0.5
    assert np.abs(quality[:, :, :188] - 255).max() < 0.5
    assert np.abs(quality[:, :, 196:]).max() < 0.5
    edge = quality[0, 0, 186:198]
    assert edge[5] > 127 > edge[6]  # the white-to-black step sits between columns 191 and 192


def test_squash_keeps_the_whole_image():
    squash = dataclasses.replace(PLAIN, size=64, resize=ResizeRule.SQUASH, crop=CropPosition.TOP_LEFT)
    short = dataclasses.replace(PLAIN, size=64, crop=CropPosition.TOP_LEFT)
    data = encode(split_white_black(60, 200), "PNG")
    result = run_one([("squash", squash), ("short", short)], data)
    squashed = result.views["squash"][0] * 255
    assert np.abs(squashed[:, :, :30] - 255).max() < 0.5 and np.abs(squashed[:, :, 34:]).max() < 0.5
    assert np.abs(result.views["short"][0] * 255 - 255).max() < 0.5  # top-left of 64x213: white only
    expected = reference_view(data, squash, "pil")
    assert np.abs(result.views["squash"][0] - expected).max() * 255 <= 1.0


@pytest.mark.parametrize("interpolation", list(Interpolation))
def test_interpolation_follows_the_spec(interpolation):
    pre = dataclasses.replace(PLAIN, size=96, interpolation=interpolation)
    data = encode(photo("astronaut"), "PNG")
    view = run_one([("v", pre)], data).views["v"][0]
    ref = reference_view(data, pre, "pil")
    others = [reference_view(data, dataclasses.replace(pre, interpolation=i), "pil") for i in Interpolation]
    diff = np.abs(view - ref) * 255
    assert diff.mean() < 0.5, diff.mean()
    # and it is closer to its own interpolation than to the others
    assert min(float(np.abs(view - o).mean()) for o in others) == pytest.approx(float(np.abs(view - ref).mean()))


def test_fused_crop_equals_resize_then_slice():
    files = [encode(photo(n), "PNG") for n in ("chelsea", "rocket", "astronaut")]
    files.append(encode(photo("coffee")[:71, :400], "PNG"))
    with DaliPreprocessor(BOTH, max_batch=4, fused_crop=True) as pre:
        fused = pre.process(files)
    with DaliPreprocessor(BOTH, max_batch=4, fused_crop=False) as pre:
        exact = pre.process(files)
    for key, pre in BOTH:
        diff = np.abs(pixels(fused.views[key], pre) - pixels(exact.views[key], pre))
        assert diff.max() <= 1.0 + 1e-3 and (diff > 0.5).mean() < 1e-3, (key, diff.max(), (diff > 0.5).mean())


# -- colour: normalisation, channel order, alpha -----------------------------------------


def test_normalisation_uses_the_spec_mean_and_std():
    colour = (200, 30, 60)
    data = encode(np.full((50, 70, 3), colour, np.uint8), "PNG")
    result = run_one([(QUALITY.key, QUALITY.preprocess)], data)
    expected = (np.asarray(colour) / 255.0 - np.asarray(QUALITY.preprocess.mean)) / np.asarray(QUALITY.preprocess.std)
    assert np.allclose(result.views[QUALITY.key][0].mean(axis=(1, 2)), expected, atol=1e-5)
    assert np.allclose(result.views[QUALITY.key][0], expected[:, None, None], atol=1e-5)


def test_bgr_flips_the_channels_and_mean_follows_output_order():
    rgb_spec = dataclasses.replace(PLAIN, size=64)
    bgr_spec = dataclasses.replace(rgb_spec, channel_order=ChannelOrder.BGR)
    data = encode(photo("astronaut"), "JPEG")
    result = run_one([("rgb", rgb_spec), ("bgr", bgr_spec)], data)
    assert np.array_equal(result.views["bgr"][0], result.views["rgb"][0][::-1])
    assert not np.array_equal(result.views["bgr"][0], result.views["rgb"][0])
    shifted = dataclasses.replace(bgr_spec, mean=(0.1, 0.2, 0.3))
    flat = encode(np.full((20, 20, 3), (10, 20, 30), np.uint8), "PNG")
    view = run_one([("v", shifted)], flat).views["v"][0]
    assert np.allclose(view[:, 0, 0], [30 / 255 - 0.1, 20 / 255 - 0.2, 10 / 255 - 0.3], atol=1e-6)


def _rgba(colour, alpha, shape=(40, 60)) -> np.ndarray:
    img = np.zeros(shape + (4,), np.uint8)
    img[..., :3] = colour
    img[..., 3] = alpha
    return img


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_alpha_white_for_quality_stored_colour_for_gender(fmt):
    colour = (200, 30, 60)
    kwargs = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
    for alpha in (0, 128, 255):
        data = encode(_rgba(colour, alpha), fmt, **kwargs)
        result = run_one(BOTH, data)
        gender = pixels(result.views[GENDER.key][0], GENDER.preprocess)
        quality = pixels(result.views[QUALITY.key][0], QUALITY.preprocess)
        on_white = [round((c * alpha + 255 * (255 - alpha)) / 255) for c in colour]
        assert np.allclose(gender, np.asarray(colour)[:, None, None], atol=1e-3), alpha
        assert np.allclose(quality, np.asarray(on_white)[:, None, None], atol=1e-3), alpha


def test_alpha_black_and_composite_before_resize():
    """Half transparent red, half opaque blue: composited first, then resized, the
    transparent half is black (not a red smear pulled in by the filter)."""
    black = dataclasses.replace(PLAIN, size=32, alpha=AlphaMode.BLACK, crop=CropPosition.TOP_LEFT)
    img = _rgba((255, 0, 0), 0, (64, 64))
    img[:, 32:] = (0, 0, 255, 255)
    view = run_one([("v", black)], encode(img, "PNG")).views["v"][0] * 255
    assert np.abs(view[:, :, :14]).max() < 0.5  # left: black
    assert np.abs(view[2, :, 18:] - 255).max() < 0.5 and np.abs(view[:2, :, 18:]).max() < 0.5
    assert view[0].max() < 0.5  # no red anywhere


def test_host_and_dali_routes_agree_on_an_opaque_image(both):
    rgb = photo("chelsea")
    via_dali = both.process([encode(rgb, "PNG")])
    via_host = both.process([encode(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "PNG")])
    for key in via_dali.views:
        assert np.array_equal(via_dali.views[key], via_host.views[key]), key


def test_16bit_png_is_rounded_like_the_host_decoder(both):
    rng = np.random.default_rng(5)
    deep = rng.integers(0, 65536, (40, 50, 3)).astype(np.uint16)
    eight = np.round(deep / 257.0).astype(np.uint8)
    a = both.process([png_16bit(deep)])
    b = both.process([encode(eight, "PNG")])
    for key in a.views:
        assert np.array_equal(a.views[key], b.views[key]), key


# -- failures -----------------------------------------------------------------------------


def _png_with_bad_idat_crc(rgb: np.ndarray) -> bytes:
    """DALI (libpng) rejects it; PIL decodes it (it does not check IDAT CRCs)."""
    png = bytearray(encode(rgb, "PNG"))
    at = png.index(b"IDAT")
    length = int.from_bytes(png[at - 4 : at], "big")
    png[at + 4 + length] ^= 0xFF
    return bytes(png)


def test_bad_files_in_the_middle_of_a_batch():
    good_png = encode(photo("chelsea"), "PNG")
    good_jpg = encode(photo("rocket"), "JPEG")
    rgba_png = encode(np.dstack([photo("coffee"), np.full((400, 600), 90, np.uint8)]), "PNG")
    gif = encode(photo("astronaut"), "GIF")
    items = [
        good_png,
        encode(photo("coffee"), "JPEG")[:4000],  # truncated JPEG
        b"path,label\nframe_001.png,ok\n",  # a text file
        b"",  # an empty file
        gif,
        good_jpg,
        _png_with_bad_idat_crc(photo("camera")),
        rgba_png,
        b"\xff\xd8\xff\xe0" + bytes(200),  # garbage behind a JPEG magic
    ]
    with DaliPreprocessor(BOTH, max_batch=len(items), num_threads=2) as pre:
        result = pre.process(items)
        assert result.ok == [0, 4, 5, 6, 7]
        assert result.errors == {
            1: "truncated or corrupt JPEG",
            2: "cannot decode: not an image (text)",
            3: "empty file (0 bytes)",
            8: "cannot decode: corrupt or unsupported JPEG header",
        }
        assert result.sizes == [(300, 451), (512, 512), (427, 640), (512, 512), (400, 600)]
        for j, index in enumerate(result.ok):
            alone = pre.process([items[index]])
            assert alone.ok == [0]
            for key in result.views:
                assert np.array_equal(result.views[key][j], alone.views[key][0]), (index, key)
        # the GIF went the host route and matches the same image as PNG
        as_png = pre.process([encode(np.asarray(Image.open(io.BytesIO(gif)).convert("RGB")), "PNG")])
        for key in result.views:
            assert np.array_equal(result.views[key][1], as_png.views[key][0]), key


def test_batches_larger_than_max_batch_are_chunked():
    files = [encode(photo(n), "PNG") for n in ("chelsea", "coffee", "rocket", "camera", "astronaut")]
    files.insert(2, b"not an image")
    with DaliPreprocessor(BOTH[:1], max_batch=2, num_threads=1) as pre:
        result = pre.process(files)
        assert result.ok == [0, 1, 3, 4, 5] and list(result.errors) == [2]
        for j, index in enumerate(result.ok):
            assert np.array_equal(result.views[GENDER.key][j], pre.process([files[index]]).views[GENDER.key][0])


def test_a_failure_does_not_poison_the_next_call(both):
    bad = encode(photo("chelsea"), "JPEG")[:3000]
    good = encode(photo("chelsea"), "JPEG")
    first = both.process([good])
    assert both.process([bad]).errors == {0: "truncated or corrupt JPEG"}
    again = both.process([good])
    assert np.array_equal(first.views[QUALITY.key], again.views[QUALITY.key])


def test_a_failed_batch_the_host_decoder_finds_nothing_wrong_with_is_not_run_again_whole(caplog):
    """A PNG whose IDAT CRC is bad fails the DALI batch but decodes on the host: no file
    is left out, so running the same batch again could only fail again; the files go one
    at a time straight away (and the bad one takes the host route)."""
    import logging

    good = encode(photo("chelsea"), "PNG")
    bad_crc = _png_with_bad_idat_crc(photo("camera"))
    with DaliPreprocessor(BOTH[:1], max_batch=2, num_threads=1) as pre:
        with caplog.at_level(logging.DEBUG, logger="engine.preprocess.dali_pipeline"):
            result = pre.process([good, bad_crc])
    assert result.ok == [0, 1] and result.errors == {}
    assert "failed again" not in caplog.text
    assert "using the host decode" in caplog.text


def test_a_rebuild_keeps_the_pipeline_of_the_last_returned_batch_until_the_next_call():
    """process_device's outputs may still be copied from while the next call runs (the
    streamed loop does so); a failed batch in that call rebuilds the pipeline, and the
    old one, which owns those outputs' work, is shut down only when the call after
    starts. (process_device needs a GPU; the bookkeeping is the same for process.)"""
    bad = encode(photo("chelsea"), "JPEG")[:3000]
    good = encode(photo("chelsea"), "JPEG")
    with DaliPreprocessor(BOTH[:1], max_batch=2, num_threads=1) as pre:
        pre._returned_from = returned = pre._pipe  # as process_device leaves it
        shut = []
        real = returned._shutdown
        returned._shutdown = lambda: (shut.append(True), real())
        assert pre.process([good, bad]).errors == {1: "truncated or corrupt JPEG"}
        assert pre._pipe is not returned and pre._retired == [returned] and not shut
        assert pre.process([good]).ok == [0]
        assert shut == [True] and pre._retired == []
        pre._returned_from = pre._pipe
        pre.process([bad])
        assert len(pre._retired) == 1
    assert pre._retired == []  # close shut it down


def _jpeg_claiming(data: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose frame header claims another size (a decompression bomb)."""
    out = bytearray(data)
    at = out.index(b"\xff\xc0")
    out[at + 5 : at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(out)


def test_oversized_images_are_refused_from_the_header_alone_in_any_company():
    from engine.preprocess.decode import MAX_PIXELS

    good = encode(photo("rocket"), "JPEG")
    bomb = _jpeg_claiming(encode(photo("chelsea"), "JPEG"), 30000, 30000)  # 2.7 GB of pixels, a 20 kB file
    rgba_bomb = bytearray(encode(np.dstack([photo("coffee"), np.full((400, 600), 90, np.uint8)]), "PNG"))
    rgba_bomb[16:24] = (20000).to_bytes(4, "big") + (20000).to_bytes(4, "big")  # host route (alpha)
    cause = "image too large to decode safely (30000x30000 = 900000000 pixels; the limit is %d)" % MAX_PIXELS
    with DaliPreprocessor(BOTH, max_batch=4, num_threads=2) as pre:
        for items, index in (([bomb], 0), ([good, bomb, encode(photo("coffee"), "JPEG")[:4000]], 1),
                             ([bytes(rgba_bomb), bomb, good], 1)):
            result = pre.process(items)
            assert result.errors[index] == cause
        assert pre.process([bytes(rgba_bomb)]).errors[0].startswith("image too large to decode safely (20000x20000")
        assert pre.process([good, bomb]).ok == [0]


def test_a_jpeg_whose_size_the_headers_do_not_give_goes_to_the_host_decoder(caplog):
    import logging

    good = encode(photo("rocket"), "JPEG")
    at = 4 + int.from_bytes(good[4:6], "big")  # after SOI and the first segment (APP0)
    odd = good[:at] + bytes((1 << 20) + 100) + good[at:]  # junk past the header scan
    with DaliPreprocessor(BOTH[:1], max_batch=2, num_threads=1) as pre:
        with caplog.at_level(logging.DEBUG, logger="engine.preprocess.dali_pipeline"):
            result = pre.process([odd])
        clean = pre.process([good])
    assert "goes the host route" in caplog.text  # where PIL's own size limit applies
    assert result.ok == [0] and result.sizes == clean.sizes  # PIL skips the junk too
