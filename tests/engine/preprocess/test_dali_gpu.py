"""The DALI GPU pipeline (device="gpu"): the same specs and semantics as the CPU one.

Tests marked ``gpu`` run only where a CUDA device is usable (see tests/conftest.py);
they have NOT run yet when this file was written (no GPU on the machine that wrote
it). Their bounds on GPU vs CPU differences are first guesses, to be replaced by the
measured figures (run ``pytest -s -m gpu`` to print the table):

* PNG, BMP, WebP and the host route decode identically on both devices (DALI's mixed
  decoder decodes them on the host), so only the resize/normalise arithmetic on the
  GPU differs: expected well under one pixel unit;
* JPEG: nvJPEG (CUDA or hardware decoder) vs libjpeg-turbo differ in IDCT, a few units
  at edges; chroma is upsampled as libjpeg-turbo does (``jpeg_fancy_upsampling``, the
  pipeline's default). The table also prints nvJPEG's own upsampling, for the record.

The tests without the marker run everywhere: the GPU graph passes DALI's own
Python-side graph checks (device placement, CPU-only argument inputs), bad arguments
are refused, FP16 output on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

from tests.conftest import gpu_absent_reason
from engine.errors import EngineError, InputError
from engine.preprocess import DaliPreprocessor
from engine.specs import AlphaMode, ChannelOrder, SpecRegistry, Task
from tests.engine.preprocess import encode, photo, with_alpha
from tests.engine.preprocess.test_parity import FILES, corpus, to_pixels

REGISTRY = SpecRegistry.builtin()
GENDER = REGISTRY.get(Task.GENDER)
QUALITY = REGISTRY.get(Task.QUALITY)
SPECS = {GENDER.key: GENDER, QUALITY.key: QUALITY}
BOTH = [(GENDER.key, GENDER.preprocess), (QUALITY.key, QUALITY.preprocess)]

# First-guess bounds (pixel units, 0..255), per view; see the module docstring.
JPEG_MEAN, JPEG_MAX = 1.5, 48.0
LOSSLESS_MEAN, LOSSLESS_MAX = 0.05, 2.0


def _is_jpeg(name: str) -> bool:
    return name.endswith(".jpg")


# -- everywhere ---------------------------------------------------------------------------


@pytest.mark.parametrize("fused_crop", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_gpu_graph_passes_dalis_graph_checks(fused_crop, dtype):
    """Tracing the GPU graph runs DALI's Python-side checks (an argument input on the
    GPU, a GPU->CPU edge without the dynamic executor, ... raise here). Building it
    needs a GPU; tracing does not. ``_build_graph`` is DALI's internal tracing step."""
    from engine.preprocess.dali_pipeline import define_pipeline

    views = BOTH + [("black_bgr", dataclasses.replace(QUALITY.preprocess, alpha=AlphaMode.BLACK,
                                                      channel_order=ChannelOrder.BGR))]
    pipe = define_pipeline(views, 4, 2, fused_crop, device="gpu", device_id=0, output_dtype=dtype)
    pipe._build_graph()
    assert [o.device for o in pipe._graph_outputs] == ["cpu", "gpu", "gpu", "gpu"]


def test_gpu_without_a_gpu_is_a_clear_engine_error():
    reason = gpu_absent_reason()
    if reason is None:
        pytest.skip("a GPU is present")
    with pytest.raises(EngineError, match="needs a usable NVIDIA GPU"):
        DaliPreprocessor(BOTH, max_batch=2, device="gpu")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"device": "cuda"}, "'cpu' or 'gpu'"),
        ({"device": "cpu", "device_id": 0}, "device_id is for device='gpu'"),
        ({"device": "gpu", "device_id": -1}, "device_id"),
        ({"output_dtype": np.float64}, "float32 or float16"),
        ({"output_dtype": "bogus"}, "float32 or float16"),
        ({"hw_decoder_load": 1.5}, r"\[0, 1\]"),
    ],
)
def test_bad_device_arguments(kwargs, match):
    with pytest.raises(EngineError, match=match):
        DaliPreprocessor(BOTH, max_batch=2, **kwargs)


def test_dense_pointer_checks_count_dtype_and_shape_on_real_tensor_lists():
    """What process_device hands the executor: sample 0's address, once count, dtype and
    shape match (real DALI TensorLists, on the host here; the same accessors on the GPU)."""
    from nvidia.dali.backend import TensorListCPU

    from engine.preprocess.dali_pipeline import _dense_pointer

    batch = np.arange(2 * 3 * 4 * 4, dtype=np.float16).reshape(2, 3, 4, 4)
    tensors = TensorListCPU(batch)
    base = _dense_pointer(tensors, (2, 3, 4, 4), np.dtype(np.float16), "v")
    assert base == int(tensors[0].data_ptr()) and int(tensors[1].data_ptr()) == base + 3 * 4 * 4 * 2
    with pytest.raises(EngineError, match="DALI returned 2 samples for a batch of 3"):
        _dense_pointer(tensors, (3, 3, 4, 4), np.dtype(np.float16), "v")
    with pytest.raises(EngineError, match="DALI returned DALIDataType.FLOAT16 samples, expected DALIDataType.FLOAT"):
        _dense_pointer(tensors, (2, 3, 4, 4), np.dtype(np.float32), "v")
    with pytest.raises(EngineError, match=r"sample 0 has shape \(3, 4, 4\), expected \(3, 8, 2\)"):
        _dense_pointer(tensors, (2, 3, 8, 2), np.dtype(np.float16), "v")


def test_process_device_needs_the_gpu_pipeline():
    with DaliPreprocessor(BOTH[:1], max_batch=1) as pre:
        with pytest.raises(EngineError, match="device='gpu'"):
            pre.process_device([encode(photo("chelsea"), "PNG")])


def _assert_fp16_rounds_fp32(half: np.ndarray, full: np.ndarray) -> None:
    assert half.dtype == np.float16 and full.dtype == np.float32
    # Within one FP16 ulp of the FP32 value (half an ulp is the rounding itself).
    ulp = np.spacing(np.abs(full).astype(np.float16)).astype(np.float32)
    assert (np.abs(half.astype(np.float32) - full) <= ulp).all()


def test_fp16_output_on_the_cpu_is_fp32_rounded():
    files = [corpus()[n] for n in ("chelsea.png", "coffee.jpg", "chelsea_rgba.png", "head_crop.png")]
    with DaliPreprocessor(BOTH, max_batch=4, output_dtype=np.float16) as pre:
        assert {d.dtype for d in pre.declarations()} == {np.dtype(np.float16)}
        half = pre.process(files)
    with DaliPreprocessor(BOTH, max_batch=4) as pre:
        full = pre.process(files)
    for key in full.views:
        _assert_fp16_rounds_fp32(half.views[key], full.views[key])


# -- on a GPU -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_both():
    with DaliPreprocessor(BOTH, max_batch=8, num_threads=2, device="gpu", device_id=0) as pre:
        yield pre


@functools.lru_cache(maxsize=2)
def gpu_vs_cpu(fancy: bool = True) -> dict[tuple[str, str], tuple[float, float]]:
    """(view key, file) -> (mean |diff|, max |diff|) in pixel units, GPU vs CPU pipeline
    (``fancy``: the GPU pipeline's jpeg_fancy_upsampling)."""
    files = corpus()
    payload = [files[n] for n in FILES]
    with DaliPreprocessor(BOTH, max_batch=8, num_threads=2) as pre:
        cpu = pre.process(payload)
    with DaliPreprocessor(BOTH, max_batch=8, num_threads=2, device="gpu", device_id=0,
                          jpeg_fancy_upsampling=fancy) as pre:
        gpu = pre.process(payload)
    assert cpu.errors == {} and gpu.errors == {}, (cpu.errors, gpu.errors)
    assert gpu.ok == cpu.ok == list(range(len(FILES)))
    assert gpu.sizes == cpu.sizes
    out = {}
    for key, spec in SPECS.items():
        assert gpu.views[key].dtype == np.float32 and gpu.views[key].shape == cpu.views[key].shape
        for j, name in enumerate(FILES):
            diff = np.abs(to_pixels(gpu.views[key][j], spec) - to_pixels(cpu.views[key][j], spec))
            out[(key, name)] = (float(diff.mean()), float(diff.max()))
    return out


@pytest.mark.gpu
def test_print_gpu_vs_cpu_table():
    lines = []
    for fancy in (True, False):
        figures = gpu_vs_cpu(fancy)
        lines.append(f"jpeg_fancy_upsampling={fancy}")
        lines.append(f"{'file':20s}" + "".join(f"{key + ' gpu vs cpu':>34s}" for key in SPECS))
        for name in FILES:
            if fancy or _is_jpeg(name):
                lines.append(f"{name:20s}" + "".join(f"{figures[(k, name)][0]:26.3f} / {figures[(k, name)][1]:5.1f}"
                                                     for k in SPECS))
    print("\n" + "\n".join(lines))


@pytest.mark.gpu
@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("key", list(SPECS))
def test_gpu_matches_cpu_pipeline(key, name):
    mean, worst = gpu_vs_cpu()[(key, name)]
    if _is_jpeg(name):
        assert mean <= JPEG_MEAN and worst <= JPEG_MAX, (key, name, mean, worst)
    else:
        assert mean <= LOSSLESS_MEAN and worst <= LOSSLESS_MAX, (key, name, mean, worst)


@pytest.mark.gpu
def test_gpu_declarations(gpu_both):
    assert [(d.key, d.shape, d.dtype, d.device) for d in gpu_both.declarations()] == [
        (GENDER.key, (3, 224, 224), np.dtype(np.float32), "gpu"),
        (QUALITY.key, (3, 384, 384), np.dtype(np.float32), "gpu"),
    ]
    assert gpu_both.device == "gpu" and gpu_both.device_id == 0


@pytest.mark.gpu
def test_gpu_fp16_is_fp32_rounded():
    files = [corpus()[n] for n in FILES]
    with DaliPreprocessor(BOTH, max_batch=8, device="gpu", output_dtype=np.float16) as pre:
        half = pre.process(files)
    with DaliPreprocessor(BOTH, max_batch=8, device="gpu", output_dtype=np.float32) as pre:
        full = pre.process(files)
    assert half.ok == full.ok
    for key in full.views:
        _assert_fp16_rounds_fp32(half.views[key], full.views[key])


def _bad_batch():
    from tests.engine.preprocess.test_dali_pipeline import _png_with_bad_idat_crc

    return [
        encode(photo("chelsea"), "PNG"),
        encode(photo("coffee"), "JPEG")[:4000],  # truncated JPEG
        b"path,label\nframe_001.png,ok\n",
        b"",
        encode(photo("astronaut"), "GIF"),
        encode(photo("rocket"), "JPEG"),
        _png_with_bad_idat_crc(photo("camera")),
        encode(np.dstack([photo("coffee"), np.full((400, 600), 90, np.uint8)]), "PNG"),
        b"\xff\xd8\xff\xe0" + bytes(200),
    ]


# The CPU pipeline's outcome for _bad_batch (tests/engine/preprocess/test_dali_pipeline.py).
# Whether nvJPEG rejects the truncated JPEG as libjpeg-turbo does is what item 1 checks.
BAD_OK = [0, 4, 5, 6, 7]
BAD_ERRORS = {
    1: "truncated or corrupt JPEG",
    2: "cannot decode: not an image (text)",
    3: "empty file (0 bytes)",
    8: "cannot decode: corrupt or unsupported JPEG header",
}


@pytest.mark.gpu
def test_gpu_bad_files_are_isolated_as_on_the_cpu():
    """hw_decoder_load=0: every JPEG takes nvJPEG's CUDA decoder whatever the batch, so
    a row can be compared bit for bit with the same file run alone."""
    items = _bad_batch()
    with DaliPreprocessor(BOTH, max_batch=len(items), device="gpu", hw_decoder_load=0.0) as pre:
        result = pre.process(items)
        assert result.ok == BAD_OK
        assert result.errors == BAD_ERRORS
        for j, index in enumerate(result.ok):
            alone = pre.process([items[index]])
            for key in result.views:
                assert np.array_equal(result.views[key][j], alone.views[key][0]), (index, key)
        # device mode: the same rows, the same errors
        batch = pre.process_device(items)
        assert list(batch.ok) == BAD_OK and dict(batch.errors) == BAD_ERRORS
        again = batch.to_result()
        for key in result.views:
            assert np.array_equal(again.views[key], result.views[key]), key


@pytest.mark.gpu
def test_gpu_host_route_alpha_and_gif(gpu_both):
    colour = (200, 30, 60)
    for alpha in (0, 128, 255):
        img = np.zeros((40, 60, 4), np.uint8)
        img[..., :3] = colour
        img[..., 3] = alpha
        result = gpu_both.process([encode(img, "PNG"), encode(img, "WEBP", lossless=True, exact=True)])
        assert result.ok == [0, 1]
        on_white = [round((c * alpha + 255 * (255 - alpha)) / 255) for c in colour]
        for j in range(2):
            gender = to_pixels(result.views[GENDER.key][j], GENDER)
            quality = to_pixels(result.views[QUALITY.key][j], QUALITY)
            assert np.allclose(gender, np.asarray(colour)[:, None, None], atol=1e-3), alpha
            assert np.allclose(quality, np.asarray(on_white)[:, None, None], atol=1e-3), alpha
    # an opaque image through either route gives the same views
    rgb = photo("chelsea")
    via_dali = gpu_both.process([encode(rgb, "PNG")])
    via_host = gpu_both.process([encode(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "PNG")])
    for key in via_dali.views:
        assert np.array_equal(via_dali.views[key], via_host.views[key]), key
    # a GIF and an RGBA image on the CPU and the GPU pipeline
    files = [encode(photo("chelsea"), "GIF"), encode(with_alpha(photo("chelsea")), "PNG")]
    with DaliPreprocessor(BOTH, max_batch=2) as cpu:
        want = cpu.process(files)
    got = gpu_both.process(files)
    assert got.ok == want.ok == [0, 1]
    for key, spec in SPECS.items():
        diff = np.abs(to_pixels(got.views[key], spec) - to_pixels(want.views[key], spec))
        assert diff.mean() <= LOSSLESS_MEAN and diff.max() <= LOSSLESS_MAX, (key, diff.mean(), diff.max())


@pytest.mark.gpu
def test_process_device_hands_out_contiguous_gpu_buffers(gpu_both):
    torch = pytest.importorskip("torch")
    files = [corpus()[n] for n in ("chelsea.png", "coffee.jpg", "chelsea_rgba.png", "frame_1080p.jpg")]
    want = gpu_both.process(files)
    stream = torch.cuda.Stream()
    batch = gpu_both.process_device(files, cuda_stream=stream.cuda_stream)
    assert list(batch.ok) == [0, 1, 2, 3] and batch.cuda_stream == stream.cuda_stream
    assert list(batch.sizes) == want.sizes
    for key, view in batch.views.items():
        assert view.shape == want.views[key].shape and view.dtype == np.float32 and view.ptr != 0
        dst = torch.empty(view.shape, dtype=torch.float32, device="cuda")
        with torch.cuda.stream(stream):
            view.copy_to(dst.data_ptr(), stream.cuda_stream)
        stream.synchronize()
        assert np.array_equal(dst.cpu().numpy(), want.views[key]), key
        assert np.array_equal(view.to_numpy(), want.views[key]), key


@pytest.mark.gpu
def test_process_device_limits_and_empty(gpu_both):
    with pytest.raises(InputError, match="at most max_batch"):
        gpu_both.process_device([b"x"] * 9)
    empty = gpu_both.process_device([b""])
    assert empty.ok == () and empty.errors == {0: "empty file (0 bytes)"}
    assert empty.views[GENDER.key].shape == (0, 3, 224, 224) and empty.views[GENDER.key].ptr == 0
