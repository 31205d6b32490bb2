"""The NumPy references of the kernels are right: the OpenCV-convention resize against
OpenCV's cv2.resize (no antialiasing on either side, so OpenCV is the oracle), the
PIL-convention resize against PIL's Image.resize, the whole preprocess against
engine.preprocess.reference's OpenCV and PIL paths, and softmax/argmax against
engine.postprocess."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest

from engine.postprocess import classify, softmax
from engine.specs import ChannelOrder, CropPosition, Interpolation, OutputKind, ResizeRule, SpecRegistry
from kernels.reference import (
    CUBIC_A_OPENCV,
    CUBIC_A_PIL,
    Convention,
    Filter,
    Normalise,
    ResizeCrop,
    axis_taps,
    pil_axis_bounds,
    pil_axis_taps,
    postprocess_reference,
    preprocess_reference,
    resize_crop_reference,
)

try:
    import cv2
except ImportError:  # a test extra; the tests with OpenCV as their oracle skip
    cv2 = None
Image = pytest.importorskip("PIL.Image")
ImageDraw = pytest.importorskip("PIL.ImageDraw")

NEEDS_CV2 = pytest.mark.skipif(cv2 is None, reason="OpenCV is the oracle: needs opencv-python-headless (test extra)")
CV_FLAG = {} if cv2 is None else {
    Filter.BILINEAR: cv2.INTER_LINEAR, Filter.BICUBIC: cv2.INTER_CUBIC, Filter.LANCZOS4: cv2.INTER_LANCZOS4,
}
# Max |reference - cv2.resize| in 0..255 levels. uint8 input: OpenCV rounds to uint8 and uses
# 11-bit fixed-point weights, so up to 0.5 (+ fixed-point error); float32 input: OpenCV's float
# path, clipped to [0, 255] as the reference is (Lanczos weights are float there, hence looser).
U8_BOUND = 1.0
F32_BOUND = {Filter.BILINEAR: 1e-3, Filter.BICUBIC: 1e-3, Filter.LANCZOS4: 0.05}

# (source h, w) -> (resized h, w): up-, down-, mixed scaling, odd sizes, exact 2x, identity.
CASES = [
    ((101, 157), (224, 348)),
    ((613, 1001), (224, 365)),
    ((1080, 1920), (384, 682)),
    ((50, 37), (302, 224)),
    ((448, 448), (224, 224)),
    ((300, 211), (318, 224)),
    ((224, 300), (224, 300)),
]


def random_image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth_image(h, w):
    y, x = np.mgrid[0:h, 0:w]
    planes = [127.5 + 120 * np.sin(x / 17 + c) * np.cos(y / 23 - c) for c in range(3)]
    return np.stack(planes, -1).round().astype(np.uint8)


def opencv_window(image, geom, filt):
    resized = cv2.resize(image, (geom.resized_w, geom.resized_h), interpolation=CV_FLAG[filt])
    return resized[geom.top : geom.top + geom.size, geom.left : geom.left + geom.size].astype(np.float64)


@NEEDS_CV2
@pytest.mark.parametrize("filt", list(Filter), ids=lambda f: f.name.lower())
@pytest.mark.parametrize("kind", ["random", "smooth"])
@pytest.mark.parametrize("shapes", CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-{c[1][0]}x{c[1][1]}")
def test_resize_matches_opencv(shapes, kind, filt):
    (h, w), (rh, rw) = shapes
    image = random_image(np.random.default_rng(h * w), h, w) if kind == "random" else smooth_image(h, w)
    size = min(rh, rw) - 3  # a window strictly inside, off-centre
    geom = ResizeCrop(h, w, rh, rw, (rh - size) // 3, (rw - size) // 2, size)
    ref = resize_crop_reference(image, geom, filt)
    assert ref.shape == (size, size, 3) and ref.dtype == np.float64

    d_u8 = np.abs(ref - opencv_window(image, geom, filt))
    assert d_u8.max() <= U8_BOUND, d_u8.max()
    assert d_u8.mean() <= 0.35, d_u8.mean()  # rounding alone gives 0.25 on average

    f32 = np.clip(opencv_window(image.astype(np.float32), geom, filt), 0, 255)
    assert np.abs(ref - f32).max() <= F32_BOUND[filt]


@NEEDS_CV2
def test_opencv_cubic_is_a_minus_075():
    """Documented choice: -0.75 matches cv2 to float precision; -0.5 (PIL's) does not."""
    image = random_image(np.random.default_rng(1), 40, 50)
    geom = ResizeCrop(40, 50, 97, 121, 0, 0, 97)
    oracle = np.clip(opencv_window(image.astype(np.float32), geom, Filter.BICUBIC), 0, 255)
    assert CUBIC_A_OPENCV == -0.75
    assert np.abs(resize_crop_reference(image, geom, Filter.BICUBIC, -0.75) - oracle).max() < 1e-3
    assert np.abs(resize_crop_reference(image, geom, Filter.BICUBIC, -0.5) - oracle).max() > 1.0


@pytest.mark.parametrize("filt", list(Filter), ids=lambda f: f.name.lower())
def test_weights_sum_to_one_and_indices_stay_inside(filt):
    for n_src, n_resized in [(7, 300), (1920, 224), (224, 224), (5, 5), (1, 9)]:
        idx, w = axis_taps(0, n_resized, n_src, n_resized, filt)
        assert idx.shape == w.shape == (n_resized, filt.taps)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
        assert idx.min() >= 0 and idx.max() <= n_src - 1


@pytest.mark.parametrize("filt", list(Filter), ids=lambda f: f.name.lower())
def test_same_size_is_identity(filt):
    image = random_image(np.random.default_rng(2), 31, 45)
    geom = ResizeCrop(31, 45, 31, 45, 3, 10, 27)
    np.testing.assert_allclose(resize_crop_reference(image, geom, filt), image[3:30, 10:37], atol=1e-9)


def test_one_pixel_image_is_constant():
    image = np.array([[[10, 200, 77]]], np.uint8)
    geom = ResizeCrop(1, 1, 9, 9, 0, 0, 9)
    for filt in Filter:
        np.testing.assert_allclose(resize_crop_reference(image, geom, filt), np.broadcast_to(image, (9, 9, 3)), atol=1e-9)


def _specs():
    reg = SpecRegistry.builtin()
    gender = reg.get("gender").preprocess  # lanczos, top-left, antialias off
    quality = dataclasses.replace(reg.get("quality").preprocess, antialias=False)  # bicubic, centre, ImageNet
    return {
        "gender": gender,
        "gender-bgr-bilinear": dataclasses.replace(
            gender, channel_order=ChannelOrder.BGR, interpolation=Interpolation.BILINEAR, mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.4)
        ),
        "quality-noaa": quality,
        "quality-squash-small": dataclasses.replace(quality, size=61, resize=ResizeRule.SQUASH),
        "quality-center-rgb-bicubic": dataclasses.replace(quality, crop=CropPosition.CENTER, size=97),
    }


@NEEDS_CV2
@pytest.mark.parametrize("spec_name", list(_specs()))
@pytest.mark.parametrize("hw", [(333, 517), (517, 333), (1080, 1920), (64, 64)])
def test_preprocess_matches_the_projects_opencv_reference(spec_name, hw):
    """Geometry from Preprocess.resized_shape/crop_origin, normalisation and channel order:
    the kernel reference equals engine.preprocess.reference's OpenCV path on a PNG of the
    same pixels (up to OpenCV's uint8 rounding)."""
    from engine.preprocess.reference import reference_view

    pre = _specs()[spec_name]
    h, w = hw
    rgb = random_image(np.random.default_rng(h + w), h, w)
    ok, png = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    expected = reference_view(png.tobytes(), pre, "opencv")

    geom = ResizeCrop.from_preprocess(pre, h, w)
    got = preprocess_reference(rgb, geom, Normalise.from_preprocess(pre), np.float32)
    assert got.shape == expected.shape == (3, pre.size, pre.size) and got.dtype == np.float32
    bound = U8_BOUND / 255.0 / min(pre.std) + 1e-6
    assert np.abs(got - expected).max() <= bound


def test_channel_swap_and_per_output_channel_mean_std():
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 255, 51, 0  # R, G, B
    geom = ResizeCrop(4, 4, 4, 4, 0, 0, 4)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    rgb = preprocess_reference(image, geom, Normalise(Filter.BILINEAR, False, mean, std), np.float64)
    bgr = preprocess_reference(image, geom, Normalise(Filter.BILINEAR, True, mean, std), np.float64)
    np.testing.assert_allclose(rgb[:, 0, 0], [(1 - 0.1) / 0.5, (0.2 - 0.2) / 0.25, (0 - 0.3) / 0.125])
    np.testing.assert_allclose(bgr[:, 0, 0], [(0 - 0.1) / 0.5, (0.2 - 0.2) / 0.25, (1 - 0.3) / 0.125])


def test_float16_output_is_the_rounded_float64():
    pre = SpecRegistry.builtin().get("gender").preprocess
    image = random_image(np.random.default_rng(3), 250, 260)
    geom = ResizeCrop.from_preprocess(pre, 250, 260)
    norm = Normalise.from_preprocess(pre)
    f16 = preprocess_reference(image, geom, norm, np.float16)
    f64 = preprocess_reference(image, geom, norm, np.float64)
    assert f16.dtype == np.float16 and (f16 == f64.astype(np.float16)).all()


def test_antialias_selects_the_convention():
    """antialias = true is PIL's resize (a = -0.5, Lanczos3), false is OpenCV's (a = -0.75,
    Lanczos4), whatever the filter; cubic_a can still be overridden."""
    reg = SpecRegistry.builtin()
    quality, gender = reg.get("quality").preprocess, reg.get("gender").preprocess
    assert quality.antialias and not gender.antialias
    q = Normalise.from_preprocess(quality)
    assert (q.convention, q.filter, q.cubic_a) == (Convention.PIL, Filter.BICUBIC, CUBIC_A_PIL)
    g = Normalise.from_preprocess(gender)
    assert (g.convention, g.filter, g.cubic_a) == (Convention.OPENCV, Filter.LANCZOS4, CUBIC_A_OPENCV)
    g_aa = Normalise.from_preprocess(dataclasses.replace(gender, antialias=True))
    assert (g_aa.convention, g_aa.filter) == (Convention.PIL, Filter.LANCZOS4)
    q_noaa = Normalise.from_preprocess(dataclasses.replace(quality, antialias=False))
    assert (q_noaa.convention, q_noaa.cubic_a) == (Convention.OPENCV, CUBIC_A_OPENCV)
    assert Normalise.from_preprocess(quality, cubic_a=-0.6).cubic_a == -0.6
    assert Normalise(Filter.BICUBIC, False, (0, 0, 0), (1, 1, 1)).convention is Convention.OPENCV


def test_geometry_is_validated():
    with pytest.raises(ValueError, match="leaves the resized image"):
        ResizeCrop(100, 100, 224, 300, 1, 0, 224)
    with pytest.raises(ValueError, match="empty"):
        ResizeCrop(0, 100, 224, 224, 0, 0, 224)
    with pytest.raises(ValueError, match="geometry says"):
        resize_crop_reference(np.zeros((5, 6, 3), np.uint8), ResizeCrop(6, 5, 6, 5, 0, 0, 5), Filter.BILINEAR)


def test_an_empty_window_is_refused():
    with pytest.raises(ValueError, match="empty"):
        ResizeCrop(10, 10, 10, 10, 0, 0, 0)
    with pytest.raises(ValueError, match="negative crop origin"):
        ResizeCrop(10, 10, 12, 12, -1, 0, 10)


def test_the_bicubic_parameter_defaults_to_the_conventions():
    """Without cubic_a, the PIL convention uses PIL's -0.5 and the OpenCV one OpenCV's -0.75."""
    image = random_image(np.random.default_rng(4), 40, 50)
    geom = ResizeCrop(40, 50, 97, 121, 0, 0, 97)
    for convention, a, other in ((Convention.PIL, CUBIC_A_PIL, CUBIC_A_OPENCV), (Convention.OPENCV, CUBIC_A_OPENCV, CUBIC_A_PIL)):
        default = resize_crop_reference(image, geom, Filter.BICUBIC, convention=convention)
        assert np.array_equal(default, resize_crop_reference(image, geom, Filter.BICUBIC, a, convention))
        assert not np.allclose(default, resize_crop_reference(image, geom, Filter.BICUBIC, other, convention), atol=0.5)


# -- PIL convention -------------------------------------------------------------------

PIL_FLAG = {Filter.BILINEAR: Image.BILINEAR, Filter.BICUBIC: Image.BICUBIC, Filter.LANCZOS4: Image.LANCZOS}
PIL_NAME = {Filter.BILINEAR: "bilinear", Filter.BICUBIC: "bicubic", Filter.LANCZOS4: "lanczos3"}
# Mean |reference - PIL| in grey levels: PIL's two roundings alone give ~0.3 on average (its
# intermediate ties, e.g. exact 2x bilinear weights of 1/8, push a smooth image to ~0.36).
PIL_MEAN_BOUND = 0.4

# (source h, w) -> the quality spec's geometry (short side 384, centre crop), or an explicit
# (resized h, w, top, left, size) window.
PIL_CASES = {
    "1080x1920-frame": ((1080, 1920), None),
    "120x100-head-up": ((120, 100), None),
    "50x2000-strip": ((50, 2000), None),
    "2000x50-strip": ((2000, 50), None),
    "768x768-exact-2x": ((768, 768), None),
    "333x517-odd": ((333, 517), None),
    "64x16000-167-taps": ((64, 16000), (48, 384, 0, 101, 48)),
}


def line_art(h, w, seed):
    """Hard black and colour strokes on white, what anime frames are made of: bicubic and
    Lanczos overshoot at every edge, so PIL's clip after its horizontal pass shows."""
    im = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    rng = np.random.default_rng(seed)
    for _ in range(60):
        x0, x1 = rng.integers(0, w, 2)
        y0, y1 = rng.integers(0, h, 2)
        colour = (0, 0, 0) if rng.random() < 0.5 else tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line([(int(x0), int(y0)), (int(x1), int(y1))], fill=colour, width=int(rng.integers(1, 6)))
    return np.asarray(im)


def pil_case(name, kind):
    (h, w), window = PIL_CASES[name]
    if window is None:
        geom = ResizeCrop.from_preprocess(SpecRegistry.builtin().get("quality").preprocess, h, w)
    else:
        geom = ResizeCrop(h, w, *window)
    if kind == "random":
        image = random_image(np.random.default_rng(h * w), h, w)
    elif kind == "smooth":
        image = smooth_image(h, w)
    else:
        image = line_art(h, w, h + w)
    return image, geom


def pil_window(image, geom, filt):
    resized = Image.fromarray(image).resize((geom.resized_w, geom.resized_h), PIL_FLAG[filt])
    window = np.asarray(resized)[geom.top : geom.top + geom.size, geom.left : geom.left + geom.size]
    return window.astype(np.float64)


def pil_rounding_bound(geom, filt):
    """Largest |float result - PIL| PIL's uint8 roundings allow: 0.5 after the vertical pass,
    plus each row's 0.5 after the horizontal pass carried by the vertical weights, plus a
    little for PIL's 22-bit fixed-point weights."""
    _, wy = pil_axis_taps(geom.top, geom.size, geom.src_h, geom.resized_h, filt)
    return 0.5 + 0.5 * float(np.abs(wy).sum(axis=1).max()) + 0.01


@pytest.mark.parametrize("filt", list(Filter), ids=PIL_NAME.get)
@pytest.mark.parametrize("kind", ["random", "smooth", "line-art"])
@pytest.mark.parametrize("case", list(PIL_CASES))
def test_pil_convention_matches_pil(case, kind, filt):
    image, geom = pil_case(case, kind)
    ref = resize_crop_reference(image, geom, filt, CUBIC_A_PIL, Convention.PIL)
    assert ref.shape == (geom.size, geom.size, 3) and ref.dtype == np.float64
    d = np.abs(ref - pil_window(image, geom, filt))
    bound = pil_rounding_bound(geom, filt)
    print(f"PIL {case} {kind} {PIL_NAME[filt]}: max {d.max():.4f} (bound {bound:.4f}) mean {d.mean():.4f}")
    assert d.max() <= bound, d.max()
    assert d.mean() <= PIL_MEAN_BOUND, d.mean()


def test_pil_bound_is_tight_enough_to_fail():
    """The checks above can fail: OpenCV's convention (no antialiasing), OpenCV's bicubic
    parameter, and PIL's convention without its clip between the passes all break them."""
    image, geom = pil_case("768x768-exact-2x", "random")
    oracle = pil_window(image, geom, Filter.BICUBIC)
    bound = pil_rounding_bound(geom, Filter.BICUBIC)
    ok = np.abs(resize_crop_reference(image, geom, Filter.BICUBIC, CUBIC_A_PIL, Convention.PIL) - oracle)
    assert ok.max() <= bound
    opencv = np.abs(resize_crop_reference(image, geom, Filter.BICUBIC, CUBIC_A_PIL, Convention.OPENCV) - oracle)
    assert opencv.mean() > 10 * PIL_MEAN_BOUND
    a075 = np.abs(resize_crop_reference(image, geom, Filter.BICUBIC, CUBIC_A_OPENCV, Convention.PIL) - oracle)
    assert a075.max() > bound
    up_image, up_geom = pil_case("120x100-head-up", "line-art")
    up_oracle = pil_window(up_image, up_geom, Filter.LANCZOS4)
    yi, wy = pil_axis_taps(up_geom.top, up_geom.size, up_geom.src_h, up_geom.resized_h, Filter.LANCZOS4)
    xi, wx = pil_axis_taps(up_geom.left, up_geom.size, up_geom.src_w, up_geom.resized_w, Filter.LANCZOS4)
    rows = np.einsum("xk,hxkc->hxc", wx, up_image[:, xi, :].astype(np.float64))  # not clipped
    unclipped = np.clip(np.einsum("yk,ykxc->yxc", wy, rows[yi]), 0, 255)
    assert np.abs(unclipped - up_oracle).max() > 5 * pil_rounding_bound(up_geom, Filter.LANCZOS4)


@pytest.mark.parametrize("filt", list(Filter), ids=PIL_NAME.get)
def test_pil_taps_follow_the_scale(filt):
    """Weights sum to 1, indices stay inside (no clamping: taps outside are dropped, so
    edge rows have fewer), and a 16000 -> 384 shrink has ~2 * support * 41.7 taps."""
    for n_src, n_resized in [(7, 300), (1920, 384), (384, 384), (5, 5), (1, 9), (16000, 384)]:
        idx, w = pil_axis_taps(0, n_resized, n_src, n_resized, filt)
        assert idx.shape == w.shape and idx.shape[0] == n_resized
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
        assert idx.min() >= 0 and idx.max() <= n_src - 1
        scale = max(n_src / n_resized, 1.0)
        assert idx.shape[1] <= int(np.ceil(filt.pil_support * scale)) * 2 + 1  # PIL's ksize
    idx, w = pil_axis_taps(0, 384, 16000, 384, filt)
    assert idx.shape[1] >= 2 * filt.pil_support * 16000 / 384 - 1
    lo, n, _ = pil_axis_bounds(0, 384, 16000, 384, filt)
    assert lo[0] == 0 and n[0] < n[192] and n[-1] < n[192], "edge taps outside the image are dropped"
    assert lo[-1] + n[-1] == 16000


@pytest.mark.parametrize("filt", list(Filter), ids=PIL_NAME.get)
def test_pil_same_size_is_identity_and_one_pixel_is_constant(filt):
    image = random_image(np.random.default_rng(2), 31, 45)
    geom = ResizeCrop(31, 45, 31, 45, 3, 10, 27)
    got = resize_crop_reference(image, geom, filt, convention=Convention.PIL)
    np.testing.assert_allclose(got, image[3:30, 10:37], atol=1e-9)
    dot = np.array([[[10, 200, 77]]], np.uint8)
    got = resize_crop_reference(dot, ResizeCrop(1, 1, 9, 9, 0, 0, 9), filt, convention=Convention.PIL)
    np.testing.assert_allclose(got, np.broadcast_to(dot, (9, 9, 3)), atol=1e-9)


@pytest.mark.parametrize("kind", ["random", "line-art"])
@pytest.mark.parametrize("hw", [(1080, 1920), (120, 100), (333, 517), (517, 333), (64, 64)])
def test_quality_preprocess_matches_the_cards_pil_reference(hw, kind):
    """The quality spec as it is (antialias = true, bicubic, centre crop, ImageNet mean/std):
    geometry from Preprocess.resized_shape/crop_origin and the PIL convention give
    engine.preprocess.reference's PIL/timm path on a PNG of the same pixels, up to PIL's
    uint8 roundings (pil_rounding_bound grey levels, / 255 / std)."""
    from engine.preprocess.reference import reference_view

    pre = SpecRegistry.builtin().get("quality").preprocess
    assert pre.antialias and pre.interpolation is Interpolation.BICUBIC
    h, w = hw
    rgb = np.ascontiguousarray(line_art(h, w, 7) if kind == "line-art" else random_image(np.random.default_rng(h + w), h, w))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    expected = reference_view(buf.getvalue(), pre, "pil")

    geom = ResizeCrop.from_preprocess(pre, h, w)
    norm = Normalise.from_preprocess(pre)
    got = preprocess_reference(rgb, geom, norm, np.float32)
    assert got.shape == expected.shape == (3, pre.size, pre.size) and got.dtype == np.float32
    d = np.abs(got.astype(np.float64) - expected) * 255.0 * np.asarray(pre.std)[:, None, None]  # grey levels
    bound = pil_rounding_bound(geom, Filter.BICUBIC) + 1e-3
    print(f"quality {h}x{w} {kind} vs reference_view: max {d.max():.4f} (bound {bound:.4f}) mean {d.mean():.4f} grey levels")
    assert d.max() <= bound
    assert d.mean() <= PIL_MEAN_BOUND


# -- softmax / argmax -----------------------------------------------------------------


@pytest.mark.parametrize("classes", [2, 4, 7, 1000, 1024])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_postprocess_reference_matches_engine_softmax(classes, dtype):
    rng = np.random.default_rng(classes)
    logits = (rng.standard_normal((37, classes)) * 4).astype(dtype)
    probs, index = postprocess_reference(logits)
    assert probs.dtype == np.float32 and index.dtype == np.int32
    np.testing.assert_allclose(probs, softmax(logits), rtol=1e-5, atol=1e-7)
    labels = tuple(f"c{i}" for i in range(classes))
    assert (index == classify(logits, OutputKind.LOGITS, labels, "m").index).all()


def test_postprocess_reference_probabilities_mode():
    rng = np.random.default_rng(5)
    p = softmax(rng.standard_normal((11, 4)).astype(np.float32))
    probs, index = postprocess_reference(p, probabilities_input=True)
    expected = classify(p, OutputKind.PROBABILITIES, ("a", "b", "c", "d"), "m")
    assert (probs == expected.probabilities).all() and (index == expected.index).all()


def test_postprocess_reference_ties_and_nonfinite_rows():
    logits = np.array([[1, 3, 3, 0], [2, 2, 2, 2], [0, np.nan, 1, 0], [0, np.inf, 1, 0]], np.float32)
    probs, index = postprocess_reference(logits)
    assert list(index[:2]) == [1, 0]  # lowest index wins a tie, as numpy.argmax
    np.testing.assert_allclose(probs[1], 0.25)
    assert np.isnan(probs[2]).all() and np.isnan(probs[3]).all()


def test_postprocess_reference_is_stable_for_large_logits():
    """exp(x - max): logits far beyond float exp's range still give exact probabilities
    (a plain exp(x) would overflow to inf / inf = NaN)."""
    logits = np.array([[1000.0, 0.0], [-1000.0, 0.0], [800.0, 800.0], [60000.0, 59999.0]], np.float32)
    probs, index = postprocess_reference(logits)
    np.testing.assert_allclose(probs[:3], [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], atol=1e-7)
    np.testing.assert_allclose(probs[3], softmax(np.array([[1.0, 0.0]], np.float32))[0], rtol=1e-6)
    assert list(index) == [0, 1, 0, 0]
    with pytest.raises(ValueError, match="classes >= 1"):
        postprocess_reference(np.zeros((3, 0), np.float32))
