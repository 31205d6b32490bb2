"""The CUDA kernels against their NumPy references, on a GPU (auto-skipped without one).

Each output buffer is filled with NaN (argmax with -1) before the launch, so a result
that matches the reference also proves every element was written; a batch slot that is
not launched must still be NaN afterwards (writes stay inside their image's slot).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc

import numpy as np
import pytest

import kernels
from engine.specs import SpecRegistry
from kernels.launch import Launch, postprocess_launch, preprocess_batch_launch, preprocess_launch
from kernels.reference import (
    Convention,
    Filter,
    Normalise,
    ResizeCrop,
    postprocess_reference,
    preprocess_reference,
)
from tests.kernels.cases import opencv_specs, pil_long_filter_case, pil_specs, staged_batch

pytestmark = pytest.mark.gpu

_OUT = {"float32": np.float32, "float16": np.float16}


class Gpu:
    """A CUDA context made current for this module, and the compiled kernel modules."""

    def __init__(self, cuda) -> None:
        self.cuda = cuda
        self.modules: dict = {}

    def run(self, launch: Launch, module: str) -> None:
        function = self.modules[module].get_function(launch.function)
        function(*launch.args, block=launch.block, grid=launch.grid)
        self.cuda.Context.synchronize()

    @contextlib.contextmanager
    def buffers(self):
        """Device allocations made through ``alloc`` are freed on exit, errors or not."""
        made = []

        def alloc(host: np.ndarray):
            buf = self.cuda.mem_alloc(max(host.nbytes, 1))
            made.append(buf)
            self.cuda.memcpy_htod(buf, np.ascontiguousarray(host))
            return buf

        try:
            yield alloc
        finally:
            for buf in made:
                buf.free()

    def fetch(self, buf, like: np.ndarray) -> np.ndarray:
        host = np.empty_like(like)
        self.cuda.memcpy_dtoh(host, buf)
        return host


@pytest.fixture(scope="module")
def gpu():
    pytest.importorskip("pycuda")
    import pycuda.driver as cuda

    cuda.init()
    ctx = cuda.Device(0).make_context()
    holder = Gpu(cuda)
    try:
        for name in kernels.sources():
            holder.modules[name] = kernels.compile_module(name)
        yield holder
    finally:
        holder.modules.clear()  # unload the modules while their context is still current
        gc.collect()
        ctx.pop()
        ctx.detach()


def pitched(image: np.ndarray, pad: int) -> tuple[np.ndarray, int]:
    """The image's rows in a (h, 3w + pad) uint8 buffer, and that pitch in bytes."""
    h, w, _ = image.shape
    pitch = 3 * w + pad
    host = np.zeros((h, pitch), np.uint8)
    host[:, : 3 * w] = image.reshape(h, 3 * w)
    return host, pitch


def tolerance(norm: Normalise, out_dtype: str) -> dict:
    # Float accumulation of up to 64 taps (OpenCV convention) or a few hundred (PIL
    # convention, long filters) on 0..255 values: far below 0.05 grey level.
    atol = 0.05 / 255.0 / min(norm.std)
    if out_dtype == "float16":
        return {"rtol": 1e-3, "atol": atol + 1e-3}  # fp16 half-ulp is 2**-11 relative
    return {"rtol": 1e-5, "atol": atol}


def run_preprocess(gpu, image, geom, norm, out_dtype, batch=1, index=0, pad=0):
    out_host = np.full((batch, 3, geom.size, geom.size), np.nan, _OUT[out_dtype])
    src_host, pitch = pitched(image, pad)
    with gpu.buffers() as alloc:
        src, out = alloc(src_host), alloc(out_host)
        gpu.run(preprocess_launch(int(src), pitch, geom, norm, int(out), index, out_dtype), "preprocess")
        return gpu.fetch(out, out_host)


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize("spec_name", list(opencv_specs()))
@pytest.mark.parametrize("hw", [(97, 131), (131, 97), (333, 517), (17, 23)])
def test_preprocess_matches_reference(gpu, spec_name, hw, out_dtype):
    pre = opencv_specs()[spec_name]
    h, w = hw
    image = np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    geom = ResizeCrop.from_preprocess(pre, h, w)
    norm = Normalise.from_preprocess(pre)
    got = run_preprocess(gpu, image, geom, norm, out_dtype, pad=5)[0]
    assert not np.isnan(got).any(), "some output elements were not written"
    expected = preprocess_reference(image, geom, norm, np.float64)
    np.testing.assert_allclose(got.astype(np.float64), expected, **tolerance(norm, out_dtype))


@pytest.mark.parametrize("filt", list(Filter), ids=lambda f: f.name.lower())
@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_preprocess_full_hd_frame(gpu, filt, out_dtype):
    """A 1080x1920 frame to a 224 view: coordinates up to ~1900 px stay exact."""
    image = np.random.default_rng(7).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    geom = ResizeCrop(1080, 1920, 224, 398, 0, 87, 224)
    norm = Normalise(filt, False, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    got = run_preprocess(gpu, image, geom, norm, out_dtype)[0]
    assert not np.isnan(got).any()
    expected = preprocess_reference(image, geom, norm, np.float64)
    np.testing.assert_allclose(got.astype(np.float64), expected, **tolerance(norm, out_dtype))


def check_batch_slots(gpu, specs: dict, images: dict, out_dtype: str, seed: int) -> None:
    """Launch image ``images[slot]`` with ``specs[slot]`` into batch slot ``slot`` of a
    4-slot buffer (slot 2 is never launched): each slot must hold its own image's
    reference, fully written, and slot 2 must stay NaN."""
    size = next(iter(specs.values())).size
    rng = np.random.default_rng(seed)
    out_host = np.full((4, 3, size, size), np.nan, _OUT[out_dtype])
    expected = {}
    with gpu.buffers() as alloc:
        out = alloc(out_host)
        for index, (h, w) in images.items():
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            geom = ResizeCrop.from_preprocess(specs[index], h, w)
            norm = Normalise.from_preprocess(specs[index])
            src_host, pitch = pitched(image, pad=index)
            src = alloc(src_host)
            gpu.run(preprocess_launch(int(src), pitch, geom, norm, int(out), index, out_dtype), "preprocess")
            expected[index] = (preprocess_reference(image, geom, norm, np.float64), norm)
        got = gpu.fetch(out, out_host)
    for index, (ref, norm) in expected.items():
        assert not np.isnan(got[index]).any()
        np.testing.assert_allclose(got[index].astype(np.float64), ref, **tolerance(norm, out_dtype))
    assert np.isnan(got[2]).all(), "a launch wrote outside its own batch slot"


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_preprocess_batch_is_filled_image_by_image(gpu, out_dtype):
    pre = dataclasses.replace(SpecRegistry.builtin().get("quality").preprocess, size=45, antialias=False)
    check_batch_slots(gpu, {0: pre, 1: pre, 3: pre}, {0: (61, 90), 1: (200, 45), 3: (45, 45)}, out_dtype, seed=11)


# -- PIL convention (antialias = true) --------------------------------------------------


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize("spec_name", list(pil_specs()))
@pytest.mark.parametrize("hw", [(97, 131), (131, 97), (120, 100), (17, 23), (1080, 1920)])
def test_preprocess_pil_convention_matches_reference(gpu, spec_name, hw, out_dtype):
    """Up- and downscaling with the filter widened (antialiased) as PIL does."""
    pre = pil_specs()[spec_name]
    h, w = hw
    image = np.random.default_rng(h * 1000 + w + 1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    geom = ResizeCrop.from_preprocess(pre, h, w)
    norm = Normalise.from_preprocess(pre)
    assert norm.convention is Convention.PIL
    got = run_preprocess(gpu, image, geom, norm, out_dtype, pad=5)[0]
    assert not np.isnan(got).any(), "some output elements were not written"
    expected = preprocess_reference(image, geom, norm, np.float64)
    np.testing.assert_allclose(got.astype(np.float64), expected, **tolerance(norm, out_dtype))


@pytest.mark.parametrize("spec", [*(("opencv", n) for n in opencv_specs()), *(("pil", n) for n in pil_specs())],
                         ids="-".join)
def test_float16_output_is_the_float32_one_rounded_to_nearest(gpu, spec):
    """The half store must round to nearest even (the float16 reference tolerance is too
    loose to see round-toward-zero; the host emulation checks this bit for bit). On the
    device the two entry points may contract differently (an fp32 ulp apart), so a value
    may round the other way only where the float one sits at a rounding tie."""
    pre = (opencv_specs() if spec[0] == "opencv" else pil_specs())[spec[1]]
    image = np.random.default_rng(3).integers(0, 256, (131, 97, 3), dtype=np.uint8)
    geom, norm = ResizeCrop.from_preprocess(pre, 131, 97), Normalise.from_preprocess(pre)
    f32 = run_preprocess(gpu, image, geom, norm, "float32")[0]
    f16 = run_preprocess(gpu, image, geom, norm, "float16")[0]
    assert not np.isnan(f16).any() and not np.isnan(f32).any()
    nearest = f32.astype(np.float16)
    differ = f16.view(np.uint16) != nearest.view(np.uint16)
    # where they differ, the float value must sit (within a few of its ulps) halfway
    # between the half written and the nearest one
    tie = (f16[differ].astype(np.float64) + nearest[differ].astype(np.float64)) / 2
    off_tie = np.abs(f32[differ].astype(np.float64) - tie) > 4 * np.spacing(np.abs(f32[differ]))
    assert not off_tie.any(), f"{off_tie.sum()} of {f16.size} values not rounded to nearest"
    assert differ.mean() < 1e-3


@pytest.mark.parametrize("filt", list(Filter), ids=["bilinear", "bicubic", "lanczos3"])
@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_preprocess_pil_long_filters(gpu, filt, out_dtype):
    """The shared long-filter case (tests/kernels/cases.py)."""
    image, geom, norm = pil_long_filter_case(filt)
    got = run_preprocess(gpu, image, geom, norm, out_dtype, pad=3)[0]
    assert not np.isnan(got).any()
    expected = preprocess_reference(image, geom, norm, np.float64)
    np.testing.assert_allclose(got.astype(np.float64), expected, **tolerance(norm, out_dtype))


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_preprocess_pil_batch_mixes_conventions(gpu, out_dtype):
    """PIL- and OpenCV-convention launches into one batch: each slot has its own image's
    result and slot 2, never launched, stays NaN."""
    quality = dataclasses.replace(SpecRegistry.builtin().get("quality").preprocess, size=45)
    specs = {0: quality, 1: dataclasses.replace(quality, antialias=False), 3: quality}
    check_batch_slots(gpu, specs, {0: (610, 900), 1: (200, 45), 3: (45, 45)}, out_dtype, seed=13)


# -- softmax / argmax -----------------------------------------------------------------


def run_postprocess(gpu, raw: np.ndarray, probabilities_input: bool = False):
    rows, classes = raw.shape
    probs_host = np.full((rows, classes), np.nan, np.float32)
    index_host = np.full(rows, -1, np.int32)
    in_dtype = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}[raw.dtype]
    with gpu.buffers() as alloc:
        src, probs, index = alloc(raw), alloc(probs_host), alloc(index_host)
        launch = postprocess_launch(int(src), int(probs), int(index), rows, classes, in_dtype, probabilities_input)
        gpu.run(launch, "postprocess")
        return gpu.fetch(probs, probs_host), gpu.fetch(index, index_host)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("classes", [2, 4, 7, 33, 1000, 1024, 1031])
def test_softmax_argmax_matches_reference(gpu, rows, classes, dtype):
    raw = (np.random.default_rng(rows * 7919 + classes).standard_normal((rows, classes)) * 5).astype(dtype)
    probs, index = run_postprocess(gpu, raw)
    ref_probs, ref_index = postprocess_reference(raw)
    assert not np.isnan(probs).any() and (index >= 0).all(), "some outputs were not written"
    np.testing.assert_allclose(probs, ref_probs, rtol=2e-5, atol=1e-7)
    assert (index == ref_index).all()  # float16 inputs tie often: lowest index on both sides


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_probabilities_input_is_copied_and_argmaxed(gpu, dtype):
    rng = np.random.default_rng(3)
    p = rng.random((9, 4))
    raw = (p / p.sum(axis=1, keepdims=True)).astype(dtype)
    probs, index = run_postprocess(gpu, raw, probabilities_input=True)
    ref_probs, ref_index = postprocess_reference(raw, probabilities_input=True)
    assert (probs == ref_probs).all() and (index == ref_index).all()


def test_ties_and_nonfinite_rows(gpu):
    raw = np.array(
        [[1, 3, 3, 0], [2, 2, 2, 2], [0, np.nan, 1, 0], [0, np.inf, 1, 0], [-np.inf, -np.inf, 5, -np.inf]], np.float32
    )
    probs, index = run_postprocess(gpu, raw)
    assert list(index[[0, 1, 3, 4]]) == [1, 0, 1, 2]
    np.testing.assert_allclose(probs[1], 0.25, rtol=1e-6)
    assert np.isnan(probs[2]).all() and np.isnan(probs[3]).all()  # the host's finiteness check sees them
    np.testing.assert_array_equal(probs[4], [0, 0, 1, 0])


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize("task", ["gender", "quality"])
def test_batched_preprocess_matches_the_one_image_kernel(gpu, task, out_dtype):
    """One batched launch over images of different sizes at scattered offsets of one
    buffer, its geometry table uploaded beside them (as FrameProducer does), gives what
    the one-image kernel gives image by image; rows past the batch stay NaN."""
    pre = SpecRegistry.builtin().get(task).preprocess
    norm = Normalise.from_preprocess(pre)
    rng = np.random.default_rng(11)
    images = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in ((97, 131), (17, 23), (1080, 1920), (64, 64))]
    staging, rows, offset = staged_batch(images, pre)
    out_host = np.full((len(images) + 2, 3, pre.size, pre.size), np.nan, _OUT[out_dtype])
    with gpu.buffers() as alloc:
        base, out = alloc(staging), alloc(out_host)
        gpu.run(preprocess_batch_launch(int(base), int(base) + offset, len(images), pre.size, norm, int(out), out_dtype),
                "preprocess")
        got = gpu.fetch(out, out_host)
    assert np.isnan(got[len(images):]).all()
    for z, (image, (_, _, geom)) in enumerate(zip(images, rows)):
        assert not np.isnan(got[z]).any()
        one = run_preprocess(gpu, image, geom, norm, out_dtype)[0]
        np.testing.assert_allclose(got[z].astype(np.float64), one.astype(np.float64), **tolerance(norm, out_dtype))
