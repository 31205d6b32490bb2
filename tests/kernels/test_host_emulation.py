"""The kernels' own .cu sources, run on the CPU: each is compiled as C++ by the host
compiler with the few CUDA builtins it uses shimmed (blockIdx/threadIdx, fp16 via
_Float16, warp shuffles as 32 host threads meeting at a barrier), launched over the whole
grid that kernels.launch computes, and compared with the NumPy reference.

This checks indexing, tap positions, channel order, batch offsets, grid coverage and the
warp reductions without a GPU. It does not check device code generation or device math
(sinpif/expf accuracy, FMA contraction, __float2half_rn): the gpu-marked tests do.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

import kernels
from kernels.launch import FRAME_GEOM_DTYPE, postprocess_launch, preprocess_batch_launch, preprocess_launch
from kernels.reference import (
    Convention,
    Filter,
    Normalise,
    ResizeCrop,
    postprocess_reference,
    preprocess_reference,
)
from tests.kernels.cases import opencv_specs, pil_long_filter_case, pil_specs, staged_batch

CXX = shutil.which("g++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler (g++/clang++) to emulate the kernels")

_FP16_SHIM = """#pragma once
typedef _Float16 __half;
inline __half __float2half_rn(float v) { return (_Float16)v; }
inline float __half2float(__half h) { return (float)h; }
"""

_COMMON = """#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>
using std::max;
using std::min;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
struct Dim3 { unsigned x, y, z; };
static thread_local Dim3 blockIdx, threadIdx;
static Dim3 blockDim;
static inline float sinpif(float x) { return (float)std::sin(M_PI * (double)x); }
static std::barrier<>* warp_barrier;
static unsigned long long warp_slots[32];
template <typename T> T __shfl_xor_sync(unsigned, T v, int off) {
    const int lane = threadIdx.x % 32;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    warp_slots[lane] = bits;
    warp_barrier->arrive_and_wait();
    T out;
    bits = warp_slots[lane ^ off];
    std::memcpy(&out, &bits, sizeof(T));
    warp_barrier->arrive_and_wait();
    return out;
}
"""

_PREPROCESS = """
#include "preprocess.cu"
extern "C" void run(int f16, const unsigned char* src, const int* ints, float cubic_a, const float* ms, void* out,
                    int batch_index, int gx, int gy, int bx, int by) {
    blockDim = {(unsigned)bx, (unsigned)by, 1};
    for (int b = 0; b < gx * gy; ++b)
        for (int t = 0; t < bx * by; ++t) {
            blockIdx = {(unsigned)(b % gx), (unsigned)(b / gx), 0};
            threadIdx = {(unsigned)(t % bx), (unsigned)(t / bx), 0};
            if (f16)
                preprocess_u8_to_f16(src, ints[0], ints[1], ints[2], ints[3], ints[4], ints[5], ints[6], ints[7],
                                     ints[8], ints[9], cubic_a, ints[10], ms[0], ms[1], ms[2], ms[3], ms[4], ms[5],
                                     (__half*)out, batch_index);
            else
                preprocess_u8_to_f32(src, ints[0], ints[1], ints[2], ints[3], ints[4], ints[5], ints[6], ints[7],
                                     ints[8], ints[9], cubic_a, ints[10], ms[0], ms[1], ms[2], ms[3], ms[4], ms[5],
                                     (float*)out, batch_index);
        }
}
extern "C" void run_batch(int f16, const unsigned char* base, const void* frames, const int* ints, float cubic_a,
                          const float* ms, void* out, int gx, int gy, int gz, int bx, int by) {
    blockDim = {(unsigned)bx, (unsigned)by, 1};
    for (int z = 0; z < gz; ++z)
        for (int b = 0; b < gx * gy; ++b)
            for (int t = 0; t < bx * by; ++t) {
                blockIdx = {(unsigned)(b % gx), (unsigned)(b / gx), (unsigned)z};
                threadIdx = {(unsigned)(t % bx), (unsigned)(t / bx), 0};
                if (f16)
                    preprocess_batch_u8_to_f16(base, (const FrameGeom*)frames, ints[0], ints[1], ints[2], cubic_a,
                                               ints[3], ms[0], ms[1], ms[2], ms[3], ms[4], ms[5], (__half*)out);
                else
                    preprocess_batch_u8_to_f32(base, (const FrameGeom*)frames, ints[0], ints[1], ints[2], cubic_a,
                                               ints[3], ms[0], ms[1], ms[2], ms[3], ms[4], ms[5], (float*)out);
            }
}
"""

_POSTPROCESS = """
#include "postprocess.cu"
extern "C" void run(int f16, const void* in, float* probs, int* argmax, int rows, int classes, int pin, int gx,
                    int bx) {
    blockDim = {(unsigned)bx, 1, 1};
    for (int b = 0; b < gx; ++b)
        for (int w = 0; w < bx / 32; ++w) {  // one warp at a time, its 32 lanes as threads
            std::barrier<> bar(32);
            warp_barrier = &bar;
            std::vector<std::thread> lanes;
            for (int l = 0; l < 32; ++l)
                lanes.emplace_back([=] {
                    blockIdx = {(unsigned)b, 0, 0};
                    threadIdx = {(unsigned)(w * 32 + l), 0, 0};
                    if (f16)
                        softmax_argmax_f16((const __half*)in, probs, argmax, rows, classes, pin);
                    else
                        softmax_argmax_f32((const float*)in, probs, argmax, rows, classes, pin);
                });
            for (auto& t : lanes) t.join();
        }
}
"""


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """name -> ctypes library of the emulated kernel source."""
    root = tmp_path_factory.mktemp("kernel-emulation")
    (root / "cuda_fp16.h").write_text(_FP16_SHIM)
    libs = {}
    for name, harness in (("preprocess", _PREPROCESS), ("postprocess", _POSTPROCESS)):
        (root / f"{name}.cu").write_text(kernels.load_source(name))
        (root / f"{name}_host.cpp").write_text(_COMMON + harness)
        lib = root / f"lib{name}.so"
        cmd = [CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{root}", "-o", str(lib), str(root / f"{name}_host.cpp")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"host compile of {name}.cu failed:\n{proc.stderr}"
        libs[name] = ctypes.CDLL(str(lib))
    return libs


def emulate_preprocess(lib, launch) -> None:
    a = launch.args
    ints = np.array([int(x) for x in a[1:11]] + [int(a[12])], np.int32)
    ms = np.array([float(x) for x in a[13:19]], np.float32)
    p = ctypes.c_void_p
    lib.run(
        ctypes.c_int(launch.function.endswith("f16")), p(int(a[0])), ints.ctypes.data_as(p), ctypes.c_float(float(a[11])),
        ms.ctypes.data_as(p), p(int(a[19])), ctypes.c_int(int(a[20])),
        *(ctypes.c_int(v) for v in (launch.grid[0], launch.grid[1], launch.block[0], launch.block[1])),
    )


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize("spec_name", list(opencv_specs()))
@pytest.mark.parametrize("hw", [(97, 131), (17, 23), (1080, 1920)])
def test_preprocess_source_matches_reference(emulated, spec_name, hw, out_dtype):
    pre = opencv_specs()[spec_name]
    h, w = hw
    image = np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    check_preprocess(emulated, image, ResizeCrop.from_preprocess(pre, h, w), Normalise.from_preprocess(pre), out_dtype)


def check_preprocess(emulated, image, geom, norm, out_dtype) -> None:
    """Run the emulated kernel into batch slot 1 of 3 (source rows padded) and compare it
    with the reference; slots 0 and 2 must stay NaN and slot 1 must be fully written."""
    h, w, _ = image.shape
    pitch = 3 * w + 5
    src = np.zeros((h, pitch), np.uint8)
    src[:, : 3 * w] = image.reshape(h, 3 * w)
    out = np.full((3, 3, geom.size, geom.size), np.nan, {"float32": np.float32, "float16": np.float16}[out_dtype])
    emulate_preprocess(emulated["preprocess"], preprocess_launch(src.ctypes.data, pitch, geom, norm, out.ctypes.data, 1, out_dtype))
    assert np.isnan(out[0]).all() and np.isnan(out[2]).all(), "wrote outside batch slot 1"
    assert not np.isnan(out[1]).any(), "some output elements were not written"
    expected = preprocess_reference(image, geom, norm, np.float64)
    atol = 0.05 / 255.0 / min(norm.std)
    if out_dtype == "float16":
        np.testing.assert_allclose(out[1].astype(np.float64), expected, rtol=1e-3, atol=atol + 1e-3)
    else:
        np.testing.assert_allclose(out[1], expected, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize("spec_name", list(pil_specs()))
@pytest.mark.parametrize("hw", [(97, 131), (17, 23), (120, 100), (1080, 1920)])
def test_preprocess_source_pil_convention_matches_reference(emulated, spec_name, hw, out_dtype):
    """Up- and downscaling (17x23 and 120x100 -> 384 enlarge, 1080x1920 shrinks 2.8x)."""
    pre = pil_specs()[spec_name]
    h, w = hw
    image = np.random.default_rng(h * 1000 + w + 1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    norm = Normalise.from_preprocess(pre)
    assert norm.convention is Convention.PIL
    check_preprocess(emulated, image, ResizeCrop.from_preprocess(pre, h, w), norm, out_dtype)


@pytest.mark.parametrize("filt", list(Filter), ids=["bilinear", "bicubic", "lanczos3"])
@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_preprocess_source_pil_long_filters(emulated, filt, out_dtype):
    """The shared long-filter case (tests/kernels/cases.py)."""
    check_preprocess(emulated, *pil_long_filter_case(filt), out_dtype)


def emulate_preprocess_batch(lib, launch) -> None:
    a = launch.args
    ints = np.array([int(a[2]), int(a[3]), int(a[4]), int(a[6])], np.int32)
    ms = np.array([float(x) for x in a[7:13]], np.float32)
    p = ctypes.c_void_p
    lib.run_batch(
        ctypes.c_int(launch.function.endswith("f16")), p(int(a[0])), p(int(a[1])), ints.ctypes.data_as(p),
        ctypes.c_float(float(a[5])), ms.ctypes.data_as(p), p(int(a[13])),
        *(ctypes.c_int(v) for v in (*launch.grid, launch.block[0], launch.block[1])),
    )


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize("task", ["gender", "quality"])
def test_batched_preprocess_writes_each_image_from_its_table_row(emulated, task, out_dtype):
    """One launch for four images of different sizes and pitches at scattered offsets of
    one staging buffer (as FrameProducer lays them out): image z lands in batch item z,
    equal to the one-image kernel's reference; the rows past the batch stay untouched."""
    from engine.specs import SpecRegistry

    pre = SpecRegistry.builtin().get(task).preprocess
    norm = Normalise.from_preprocess(pre)
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in ((97, 131), (17, 23), (300, 200), (64, 64))]
    staging, rows, table_at = staged_batch(images, pre, pitch_pad=7, start=4096, reverse=True)
    table = staging[table_at : table_at + len(images) * FRAME_GEOM_DTYPE.itemsize].view(FRAME_GEOM_DTYPE)
    assert table["offset"].tolist() == [r[0] for r in rows] and table["offset"][0] > table["offset"][-1]  # reversed
    out = np.full((6, 3, pre.size, pre.size), np.nan, {"float32": np.float32, "float16": np.float16}[out_dtype])
    launch = preprocess_batch_launch(staging.ctypes.data, staging.ctypes.data + table_at, len(images), pre.size, norm,
                                     out.ctypes.data, out_dtype)
    assert launch.grid[2] == len(images)
    emulate_preprocess_batch(emulated["preprocess"], launch)
    assert np.isnan(out[len(images):]).all(), "wrote past the batch"
    atol = 0.05 / 255.0 / min(norm.std)
    for z, (image, (_, _, geom)) in enumerate(zip(images, rows)):
        assert not np.isnan(out[z]).any(), f"image {z}: some output elements were not written"
        expected = preprocess_reference(image, geom, norm, np.float64)
        if out_dtype == "float16":
            np.testing.assert_allclose(out[z].astype(np.float64), expected, rtol=1e-3, atol=atol + 1e-3)
        else:
            np.testing.assert_allclose(out[z], expected, rtol=1e-5, atol=atol)


def run_postprocess(lib, raw: np.ndarray, probabilities_input: bool = False):
    rows, classes = raw.shape
    probs = np.full((rows, classes), np.nan, np.float32)
    index = np.full(rows, -1, np.int32)
    in_dtype = "float16" if raw.dtype == np.float16 else "float32"
    launch = postprocess_launch(raw.ctypes.data, probs.ctypes.data, index.ctypes.data, rows, classes, in_dtype, probabilities_input)
    a = launch.args
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.run(i(in_dtype == "float16"), p(int(a[0])), p(int(a[1])), p(int(a[2])), i(rows), i(classes), i(int(a[5])), i(launch.grid[0]), i(launch.block[0]))
    return probs, index


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(1, 2), (5, 4), (33, 7), (6, 1031)])
def test_postprocess_source_matches_reference(emulated, shape, dtype):
    raw = (np.random.default_rng(shape[0] * 7919 + shape[1]).standard_normal(shape) * 5).astype(dtype)
    probs, index = run_postprocess(emulated["postprocess"], raw)
    ref_probs, ref_index = postprocess_reference(raw)
    assert not np.isnan(probs).any() and (index >= 0).all()
    np.testing.assert_allclose(probs, ref_probs, rtol=2e-5, atol=1e-7)
    assert (index == ref_index).all()
    p, i = run_postprocess(emulated["postprocess"], ref_probs.astype(dtype), probabilities_input=True)
    rp, ri = postprocess_reference(ref_probs.astype(dtype), probabilities_input=True)
    assert (p == rp).all() and (i == ri).all()


def test_postprocess_source_ties_and_nonfinite(emulated):
    raw = np.array([[1, 3, 3, 0], [2, 2, 2, 2], [0, np.nan, 1, 0], [0, np.inf, 1, 0], [-np.inf, -np.inf, 5, -np.inf]], np.float32)
    probs, index = run_postprocess(emulated["postprocess"], raw)
    assert list(index[[0, 1, 3, 4]]) == [1, 0, 1, 2]
    np.testing.assert_allclose(probs[1], 0.25)
    assert np.isnan(probs[2]).all() and np.isnan(probs[3]).all()
    np.testing.assert_array_equal(probs[4], [0, 0, 1, 0])
