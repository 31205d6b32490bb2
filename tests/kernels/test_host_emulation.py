"""The real kernel sources, executed on the CPU and compared with the NumPy references.

kernels/preprocess.cu and kernels/postprocess.cu are compiled unmodified by g++ as host
C++ (tests/kernels/host_emulation: shim.h force-included, with the CUDA toolkit's own
cuda_fp16.h for __half, and harness.cpp around the source). Each launch that
kernels.launch builds is run over its whole grid and block, every thread, with the
arguments exactly as launch.py packs them for pycuda; warp shuffles are emulated with
the 32 lanes of a warp as fibers that meet at each shuffle. Outputs are NaN-filled first,
so a match also proves every element was written, and the slots around the written one
must stay NaN. The cases and tolerances are the GPU tests' (cases.py, test_gpu_kernels),
on smaller images (this is a logic test: indexing, taps, bounds, reductions, packing).
Each argument is checked against the kernel's own parameter types, and two broken
copies of the sources are built to show that the comparison can fail.

What this does NOT verify: device code generation (nvcc, ptxas); device math precision
(sinpif/expf ulp error, FMA contraction, which the host build turns off); launch limits
(block and grid sizes, registers, per-thread stack); memory coalescing or speed; and
races between threads of different warps (blocks and warps run one after another here).
The gpu-marked tests cover those.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import kernels
from engine.specs import SpecRegistry
from kernels.launch import FRAME_GEOM_DTYPE, postprocess_launch, preprocess_batch_launch, preprocess_launch
from kernels.reference import (
    CUBIC_A_PIL,
    Convention,
    Filter,
    Normalise,
    ResizeCrop,
    pil_axis_bounds,
    postprocess_reference,
    preprocess_reference,
)
from tests.kernels import host_emulation
from tests.kernels.cases import opencv_specs, pil_specs, staged_batch
from tests.kernels.test_gpu_kernels import tolerance

pytestmark = pytest.mark.skipif(host_emulation.absent_reason() is not None,
                                reason=f"host emulation of the kernels: {host_emulation.absent_reason()}")

_OUT = {"float32": np.float32, "float16": np.float16}
MAX_SIZE = 64  # the specs' 224/384 views shrunk: same filters and crops, a fraction of the work
SIZES = [(97, 131), (131, 97), (17, 23), (200, 300)]  # landscape, portrait, enlarged, shrunk ~3x


def build_sources(tmp_path, texts: dict[str, str]) -> dict[str, host_emulation.Emulated]:
    """Write each source text as <name>.cu under tmp_path and build its emulation."""
    paths = []
    for name, text in texts.items():
        path = tmp_path / f"{name}.cu"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return {name: host_emulation.Emulated(lib) for name, lib in host_emulation.build(paths, tmp_path).items()}


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    """name -> the emulation of kernels/<name>.cu, exactly the text pycuda compiles."""
    return build_sources(tmp_path_factory.mktemp("kernel-host-emulation"),
                         {name: kernels.load_source(name) for name in kernels.sources()})


def small(pre):
    return dataclasses.replace(pre, size=min(pre.size, MAX_SIZE))


def image_of(hw, seed) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


def run_one(lib, image, geom, norm, out_dtype, pad=5, seed=0) -> np.ndarray:
    """Launch the one-image kernel into batch slot 1 of 3 and return the whole (3, 3, S, S)
    buffer. The source rows are `pad` bytes longer than the pixels and there are rows
    above and below the image; all of that is random, so a read outside the image's
    pixels shows up as a wrong value."""
    h, w, _ = image.shape
    pitch = 3 * w + pad
    rng = np.random.default_rng(seed)
    buf = rng.integers(0, 256, (h + 4, pitch), dtype=np.uint8)
    buf[2 : 2 + h, : 3 * w] = image.reshape(h, 3 * w)
    out = np.full((3, 3, geom.size, geom.size), np.nan, _OUT[out_dtype])
    lib.run(preprocess_launch(buf[2:].ctypes.data, pitch, geom, norm, out.ctypes.data, 1, out_dtype))
    return out


def check_one(lib, image, geom, norm, out_dtype, **kwargs) -> None:
    out = run_one(lib, image, geom, norm, out_dtype, **kwargs)
    assert np.isnan(out[0]).all() and np.isnan(out[2]).all(), "wrote outside its batch slot"
    assert not np.isnan(out[1]).any(), "some output elements were not written"
    expected = preprocess_reference(image, geom, norm, np.float64)
    np.testing.assert_allclose(out[1].astype(np.float64), expected, **tolerance(norm, out_dtype))


# -- the emulation itself ----------------------------------------------------------------


def test_every_entry_point_is_emulated(emulated):
    for name in kernels.sources():
        assert emulated[name].entry_points == host_emulation.entry_points(kernels.load_source(name))
    assert set(emulated["preprocess"].entry_points) == {
        "preprocess_u8_to_f32", "preprocess_u8_to_f16", "preprocess_batch_u8_to_f32", "preprocess_batch_u8_to_f16"}
    assert set(emulated["postprocess"].entry_points) == {"softmax_argmax_f32", "softmax_argmax_f16"}


def test_fp16_is_the_toolkits_round_to_nearest_even(emulated):
    """The float16 outputs go through the toolkit's host __float2half_rn; NumPy's cast is
    IEEE round-to-nearest-even too, so both must agree bit for bit (ties, subnormals,
    overflow to inf included), and __half2float must be exact for every half."""
    lib = emulated["preprocess"]
    every_half = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    back = lib.half2float(every_half)
    finite = ~np.isnan(every_half)
    np.testing.assert_array_equal(back[finite], every_half[finite].astype(np.float32))
    assert np.isnan(back[~finite]).all()
    halves = every_half[np.isfinite(every_half)].astype(np.float64)
    halves = np.unique(halves)
    midpoints = ((halves[1:] + halves[:-1]) / 2).astype(np.float32)  # exact in float32: the ties
    rng = np.random.default_rng(0)
    x = np.concatenate([midpoints, np.nextafter(midpoints, np.float32(np.inf)), rng.standard_normal(20000) * 3e4,
                        rng.standard_normal(20000) * 1e-5, [65504.0, 65519.99, 65520.0, 1e9, -1e9, np.inf, -np.inf]])
    x = x.astype(np.float32)
    with np.errstate(over="ignore"):  # the values past 65504 are there to overflow
        expected = x.astype(np.float16)
    np.testing.assert_array_equal(lib.float2half_rn(x).view(np.uint16), expected.view(np.uint16))
    assert np.isnan(lib.float2half_rn(np.array([np.nan], np.float32))).all()


def test_sinpif_shim(emulated):
    """Exact zeros at integers and +-1 at half-integers (as CUDA documents), within an ulp
    of sin(pi x) elsewhere."""
    lib = emulated["preprocess"]
    ints = np.arange(-9, 10, dtype=np.float32)
    assert (lib.sinpif(ints) == 0).all()
    np.testing.assert_array_equal(lib.sinpif(ints + 0.5), np.where(ints.astype(int) % 2 == 0, 1.0, -1.0))
    x = np.random.default_rng(1).uniform(-8, 8, 50000).astype(np.float32)
    exact = np.sin(np.pi * x.astype(np.float64))
    assert (np.abs(lib.sinpif(x) - exact) <= np.spacing(np.abs(exact).astype(np.float32))).all()


def test_nvcc_include_lines_are_read_quoted_or_bare():
    printed = ('#$ _NVVM_BRANCH_=nvvm\n'
               '#$ INCLUDES="-I/opt/cuda/bin/../targets/x86_64-linux/include"  \n'
               '#$ SYSTEM_INCLUDES="-isystem" "/opt/cuda/include/cccl"\n'
               '#$ INCLUDES=-I/usr/local/cuda-13.0/include -I/usr/local/cuda-13.0/include\n'
               'nvcc fatal   : not a line to read\n')
    assert host_emulation.dryrun_include_dirs(printed) == [
        "/opt/cuda/bin/../targets/x86_64-linux/include", "/opt/cuda/include/cccl", "/usr/local/cuda-13.0/include"]


def test_packing_is_checked_against_the_kernel_signature(emulated):
    """An argument that pycuda would pack with the wrong size (a Python int is int64 to
    NumPy) is refused, and so is a wrong argument count."""
    geom = ResizeCrop(4, 4, 4, 4, 0, 0, 4)
    norm = Normalise(Filter.BILINEAR, False, (0, 0, 0), (1, 1, 1))
    src, out = np.zeros(48, np.uint8), np.zeros(48, np.float32)
    good = preprocess_launch(src.ctypes.data, 12, geom, norm, out.ctypes.data, 0, "float32")
    emulated["preprocess"].run(good)
    bad = dataclasses.replace(good, args=(good.args[0], 4, *good.args[2:]))
    with pytest.raises(host_emulation.EmulationError, match="argument 1 packed as i8"):
        emulated["preprocess"].run(bad)
    with pytest.raises(host_emulation.EmulationError, match="takes 21 arguments, got 20"):
        emulated["preprocess"].run(dataclasses.replace(good, args=good.args[:-1]))


# -- preprocess, one image -----------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize("spec_name", list(opencv_specs()))
@pytest.mark.parametrize("hw", SIZES)
def test_preprocess_opencv_convention(emulated, spec_name, hw, out_dtype):
    pre = small(opencv_specs()[spec_name])
    image = image_of(hw, hw[0] * 1000 + hw[1])
    norm = Normalise.from_preprocess(pre)
    assert norm.convention is Convention.OPENCV
    check_one(emulated["preprocess"], image, ResizeCrop.from_preprocess(pre, *hw), norm, out_dtype)


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize("spec_name", list(pil_specs()))
@pytest.mark.parametrize("hw", SIZES)
def test_preprocess_pil_convention(emulated, spec_name, hw, out_dtype):
    pre = small(pil_specs()[spec_name])
    image = image_of(hw, hw[0] * 1000 + hw[1] + 1)
    norm = Normalise.from_preprocess(pre)
    assert norm.convention is Convention.PIL
    check_one(emulated["preprocess"], image, ResizeCrop.from_preprocess(pre, *hw), norm, out_dtype)


@pytest.mark.parametrize("task", ["gender", "quality"])
def test_preprocess_full_size_view_of_a_1080p_frame(emulated, task):
    """The workload's own sizes once: the built-in spec's whole 224/384 view of a 1920x1080
    frame (a grid of 14x14 or 24x24 blocks, filters shrinking ~5x or ~3x)."""
    pre = SpecRegistry.builtin().get(task).preprocess
    hw = (1080, 1920)
    norm = Normalise.from_preprocess(pre)
    check_one(emulated["preprocess"], image_of(hw, 7), ResizeCrop.from_preprocess(pre, *hw), norm, "float16")


@pytest.mark.parametrize("filt", list(Filter), ids=["bilinear", "bicubic", "lanczos3"])
@pytest.mark.parametrize("geom", [ResizeCrop(200, 300, 12, 18, 0, 6, 12), ResizeCrop(64, 3000, 4, 180, 0, 176, 4)],
                         ids=["16x-both-axes", "17x-right-edge"])
def test_preprocess_pil_filters_longer_than_the_weight_cache(emulated, filt, geom):
    """The small-image counterpart of cases.pil_long_filter_case: shrinking ~16x makes
    every filter longer than the kPilCache = 32 x weights a thread keeps, so the
    recomputed-weight path runs too; the second window ends at the right edge."""
    longest = pil_axis_bounds(geom.left, geom.size, geom.src_w, geom.resized_w, filt)[1].max()
    assert longest > 32
    norm = Normalise(filt, True, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), CUBIC_A_PIL, Convention.PIL)
    for out_dtype in ("float32", "float16"):
        check_one(emulated["preprocess"], image_of((geom.src_h, geom.src_w), 5), geom, norm, out_dtype, pad=3)


@pytest.mark.parametrize("convention", list(Convention), ids=lambda c: c.name.lower())
@pytest.mark.parametrize("filt", list(Filter), ids=lambda f: f.name.lower())
def test_preprocess_flat_and_extreme_images(emulated, filt, convention):
    """All-0 and all-255 images (the clamps), and a one-pixel-wide strip enlarged (every
    tap clamped to the same column, or dropped)."""
    norm = Normalise(filt, True, (0.5, 0.25, 0.0), (0.5, 1.0, 2.0), convention.cubic_a, convention)
    for value in (0, 255):
        image = np.full((23, 31, 3), value, np.uint8)
        check_one(emulated["preprocess"], image, ResizeCrop(23, 31, 40, 54, 3, 7, 37), norm, "float32")
    check_one(emulated["preprocess"], image_of((60, 1), 9), ResizeCrop(60, 1, 33, 17, 0, 0, 17), norm, "float16")


@pytest.mark.parametrize("spec", [*(("opencv", n) for n in opencv_specs()), *(("pil", n) for n in pil_specs())],
                         ids="-".join)
def test_float16_output_is_the_float32_one_rounded_to_nearest(emulated, spec):
    """Both entry points compute the same float and only the store differs, so the half
    output must be the float one rounded to nearest even, bit for bit: the reference
    tolerance for float16 (1e-3 relative) is too loose to notice a wrong rounding mode."""
    pre = small((opencv_specs() if spec[0] == "opencv" else pil_specs())[spec[1]])
    image = image_of((131, 97), 3)
    geom, norm = ResizeCrop.from_preprocess(pre, 131, 97), Normalise.from_preprocess(pre)
    f32 = run_one(emulated["preprocess"], image, geom, norm, "float32")[1]
    f16 = run_one(emulated["preprocess"], image, geom, norm, "float16")[1]
    np.testing.assert_array_equal(f16.view(np.uint16), f32.astype(np.float16).view(np.uint16))


# -- preprocess, batched --------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize("task", ["gender", "quality"])
def test_batched_preprocess(emulated, task, out_dtype):
    """One launch over images of mixed sizes and pitches, scattered over one staging
    buffer in reverse order (only the FrameGeom table says where each is), at an odd
    view size: image z lands in batch item z and equals both the reference and the
    one-image kernel; the items past the batch stay NaN."""
    pre = dataclasses.replace(SpecRegistry.builtin().get(task).preprocess, size=45)
    norm = Normalise.from_preprocess(pre)
    rng = np.random.default_rng(7)
    sizes = ((97, 131), (17, 23), (200, 300), (64, 64), (3, 190))
    images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in sizes]
    staging, rows, table_at = staged_batch(images, pre, pitch_pad=7, start=4096, reverse=True)
    table = staging[table_at : table_at + len(images) * FRAME_GEOM_DTYPE.itemsize].view(FRAME_GEOM_DTYPE)
    assert table["offset"].tolist() == [r[0] for r in rows] and table["offset"][0] > table["offset"][-1]
    out = np.full((len(images) + 2, 3, pre.size, pre.size), np.nan, _OUT[out_dtype])
    launch = preprocess_batch_launch(staging.ctypes.data, staging.ctypes.data + table_at, len(images), pre.size, norm,
                                     out.ctypes.data, out_dtype)
    emulated["preprocess"].run(launch)
    assert np.isnan(out[len(images):]).all(), "wrote past the batch"
    for z, (image, (_, pitch, geom)) in enumerate(zip(images, rows)):
        assert not np.isnan(out[z]).any(), f"image {z}: some output elements were not written"
        expected = preprocess_reference(image, geom, norm, np.float64)
        np.testing.assert_allclose(out[z].astype(np.float64), expected, **tolerance(norm, out_dtype))
        one = run_one(emulated["preprocess"], image, geom, norm, out_dtype, pad=pitch - 3 * image.shape[1])[1]
        np.testing.assert_array_equal(out[z], one)  # the same code on the same host: bit for bit


# -- softmax / argmax -----------------------------------------------------------------------


def run_postprocess(lib, raw: np.ndarray, probabilities_input: bool = False):
    rows, classes = raw.shape
    raw = np.ascontiguousarray(raw)
    probs = np.full((rows, classes), np.nan, np.float32)
    index = np.full(rows, -1, np.int32)
    in_dtype = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}[raw.dtype]
    lib.run(postprocess_launch(raw.ctypes.data, probs.ctypes.data, index.ctypes.data, rows, classes, in_dtype,
                               probabilities_input))
    return probs, index


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("classes", [1, 2, 4, 7, 32, 33, 1000, 1024, 1031])
def test_softmax_argmax(emulated, rows, classes, dtype):
    """Rows not a multiple of the 4 per block (whole warps leave early), classes below,
    at and above the warp's 32 lanes."""
    raw = (np.random.default_rng(rows * 7919 + classes).standard_normal((rows, classes)) * 5).astype(dtype)
    probs, index = run_postprocess(emulated["postprocess"], raw)
    ref_probs, ref_index = postprocess_reference(raw)
    assert not np.isnan(probs).any() and (index >= 0).all(), "some outputs were not written"
    np.testing.assert_allclose(probs, ref_probs, rtol=2e-5, atol=1e-7)  # test_gpu_kernels' tolerance
    np.testing.assert_array_equal(index, ref_index)  # float16 ties often: lowest index on both sides


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(9, 4), (6, 100)])
def test_probabilities_input_is_copied_and_argmaxed(emulated, dtype, shape):
    p = np.random.default_rng(3).random(shape)
    raw = (p / p.sum(axis=1, keepdims=True)).astype(dtype)
    probs, index = run_postprocess(emulated["postprocess"], raw, probabilities_input=True)
    ref_probs, ref_index = postprocess_reference(raw, probabilities_input=True)
    np.testing.assert_array_equal(probs, ref_probs)
    np.testing.assert_array_equal(index, ref_index)


def test_ties_and_nonfinite_rows(emulated):
    """test_gpu_kernels' rows, and ties whose copies sit in different lanes or in the same
    lane on different strides (the shuffle reduction must keep the lowest index)."""
    raw = np.array(
        [[1, 3, 3, 0], [2, 2, 2, 2], [0, np.nan, 1, 0], [0, np.inf, 1, 0], [-np.inf, -np.inf, 5, -np.inf]], np.float32
    )
    probs, index = run_postprocess(emulated["postprocess"], raw)
    assert list(index[[0, 1, 3, 4]]) == [1, 0, 1, 2]
    np.testing.assert_allclose(probs[1], 0.25, rtol=1e-6)
    assert np.isnan(probs[2]).all() and np.isnan(probs[3]).all()
    np.testing.assert_array_equal(probs[4], [0, 0, 1, 0])

    wide = np.zeros((4, 100), np.float32)
    for row, at in enumerate(([99, 37, 5], [31, 63], [40, 8], [70, 71, 69])):
        wide[row, at] = 4.0
    probs, index = run_postprocess(emulated["postprocess"], wide)
    assert index.tolist() == [5, 31, 8, 69]
    np.testing.assert_allclose(probs, postprocess_reference(wide)[0], rtol=2e-5, atol=1e-7)


# -- the check can fail ---------------------------------------------------------------------


_MUTANTS = {
    # OpenCV bicubic taps one pixel to the right.
    "preprocess": ("        first = i0 - 1;\n", "        first = i0;\n"),
    # The sum's butterfly skips its last step: each lane sums only half the warp.
    "postprocess": ("for (int off = kWarp / 2; off > 0; off /= 2) sum +=",
                    "for (int off = kWarp / 2; off > 1; off /= 2) sum +="),
}


@pytest.fixture(scope="module")
def mutants(tmp_path_factory):
    texts = {}
    for name, (old, new) in _MUTANTS.items():
        source = kernels.load_source(name)
        assert source.count(old) == 1, f"{name}.cu changed: update the mutant"
        texts[name] = source.replace(old, new)
    return build_sources(tmp_path_factory.mktemp("kernel-host-emulation-mutants"), texts)


def test_a_broken_preprocess_kernel_fails(mutants):
    pre = small(opencv_specs()["quality-bicubic"])
    image = image_of((97, 131), 1)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        check_one(mutants["preprocess"], image, ResizeCrop.from_preprocess(pre, 97, 131),
                  Normalise.from_preprocess(pre), "float32")


def test_a_broken_postprocess_kernel_fails(mutants):
    raw = np.random.default_rng(0).standard_normal((5, 33)).astype(np.float32)
    probs, _ = run_postprocess(mutants["postprocess"], raw)
    assert not np.allclose(probs, postprocess_reference(raw)[0], rtol=2e-5, atol=1e-7)


# -- the frames API's GPU loop, with the real kernel -----------------------------------------


class EmulatedLauncher:
    """engine.frames' launcher interface (as KernelLauncher on a GPU) with the emulated
    kernel: each batch's launch runs in stream order on the host device's stream, on the
    addresses the producer packed (its staging buffer, geometry table and view buffers)."""

    def __init__(self, lib: host_emulation.Emulated) -> None:
        self._lib = lib
        self.launches = 0

    def __enter__(self) -> "EmulatedLauncher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, launch, stream, **_) -> None:
        self.launches += 1
        stream.submit(lambda: self._lib.run(launch))

    def close(self) -> None:
        pass


def test_frames_streamed_path_with_the_real_kernel_matches_the_cpu_path(emulated, random_models, model_cache_dir,
                                                                         monkeypatch):
    """FrameClassifier's streamed path on the executor's host device, with the real
    preprocess kernel (emulated) where a GPU run has KernelLauncher: frames staged with
    their geometry table, one batched launch per view and batch, the executor and ONNX
    Runtime behind it, a partial last batch, grey and RGBA frames. Against the plain CPU
    path (the kernel's NumPy reference per frame); the kernel itself is within the
    tolerances above of that reference."""
    import engine.frames as frames_api

    model = random_models["gender/alpha"]
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, hw + c, dtype=np.uint8) for hw, c in (
        ((90, 160), (3,)), ((61, 47), (3,)), ((40, 40), ()), ((72, 96), (4,)), ((300, 200), (3,)))]
    with frames_api.FrameClassifier([model], threads=2, batch_size=2, cache_dir=model_cache_dir) as fc:
        want = fc.classify(frames)["gender"].probabilities
    launcher = EmulatedLauncher(emulated["preprocess"])
    monkeypatch.setattr(frames_api, "ReferenceLauncher", lambda: launcher)
    with frames_api.FrameClassifier([model], threads=2, batch_size=2, streamed=True, cache_dir=model_cache_dir) as fc:
        got = fc.classify(frames)["gender"].probabilities
    assert launcher.launches == 3  # batches of 2, 2 and 1; one view
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
