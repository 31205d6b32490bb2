"""The NumPy references of the kernels are right: the resize reference against OpenCV's
cv2.resize (no antialiasing on either side, so OpenCV is the oracle), the whole
preprocess against engine.preprocess.reference's OpenCV path, and softmax/argmax against
engine.postprocess."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.errors import SpecError
from engine.postprocess import classify, softmax
from engine.specs import ChannelOrder, CropPosition, Interpolation, OutputKind, ResizeRule, SpecRegistry
from kernels.reference import (
    CUBIC_A_OPENCV,
    Filter,
    Normalise,
    ResizeCrop,
    axis_taps,
    postprocess_reference,
    preprocess_reference,
    resize_crop_reference,
)

cv2 = pytest.importorskip("cv2")

CV_FLAG = {Filter.BILINEAR: cv2.INTER_LINEAR, Filter.BICUBIC: cv2.INTER_CUBIC, Filter.LANCZOS4: cv2.INTER_LANCZOS4}
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


def test_antialiased_spec_is_refused_unless_accepted():
    quality = SpecRegistry.builtin().get("quality").preprocess
    assert quality.antialias
    with pytest.raises(SpecError, match="does not antialias"):
        Normalise.from_preprocess(quality)
    assert Normalise.from_preprocess(quality, accept_no_antialias=True).filter is Filter.BICUBIC


def test_geometry_is_validated():
    with pytest.raises(ValueError, match="leaves the resized image"):
        ResizeCrop(100, 100, 224, 300, 1, 0, 224)
    with pytest.raises(ValueError, match="empty"):
        ResizeCrop(0, 100, 224, 224, 0, 0, 224)
    with pytest.raises(ValueError, match="geometry says"):
        resize_crop_reference(np.zeros((5, 6, 3), np.uint8), ResizeCrop(6, 5, 6, 5, 0, 0, 5), Filter.BILINEAR)


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
