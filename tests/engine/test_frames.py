"""engine.frames: classifying frames handed in as arrays.

* the CPU path against ONNX Runtime run by the test on the kernel reference's views,
  frame by frame (mixed sizes, grey, RGBA per alpha mode, BGR, strided);
* against `engine run` on the same images saved as PNG (DALI's resize there, the
  kernel's here: a measured bound, printed);
* the streamed loop (FrameProducer + StreamedExecutor on the host device) against the
  plain CPU path, partial batches and batches of one included;
* bad frames: InputError naming the frame once the frames before it are done (in the
  error's ``partial``), or error rows with ``on_error="row"``; iter_classify batch by
  batch, a failing source, one call at a time;
* the GPU path (``gpu`` marker, PyTorch backend) against the CPU path: NOT RUN YET.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import subprocess
import sys
import time

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine.frames as frames_mod
from engine.backends.onnxruntime import OrtBackend
from engine.errors import EngineError, InputError
from engine.executor import HostDevice
from engine.frames import FrameClassifier, FrameProducer, FrameView, ReferenceLauncher, frame_batches, reference_view
from engine.postprocess import classify
from engine.specs import AlphaMode, SpecRegistry
from kernels.reference import Normalise, ResizeCrop, preprocess_reference

GENDER, QUALITY = "gender/alpha", "quality/baseline"
SIZES = [(48, 64), (100, 37), (224, 300), (31, 31), (80, 120), (60, 50), (70, 70)]


def _picture(h: int, w: int, channels: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise (a resize of pure noise says little about a real one)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 255 // (w + h)], -1)
    img = np.clip(base + rng.integers(-25, 25, base.shape), 0, 255).astype(np.uint8)
    if channels == 1:
        return np.ascontiguousarray(img[..., 1])
    if channels == 4:
        alpha = np.clip((xx * 511 // max(w - 1, 1)) - 128 + rng.integers(-10, 10, (h, w)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.dstack([img, alpha]))
    return img


def _mixed_frames(seed: int = 0) -> list[np.ndarray]:
    out = [_picture(h, w, 3, seed + i) for i, (h, w) in enumerate(SIZES)]
    out.append(_picture(50, 80, 1, seed + 20))  # grey
    out.append(_picture(60, 66, 4, seed + 21))  # RGBA
    return out


def _with_alpha(model, mode: AlphaMode):
    pre = dataclasses.replace(model.spec.preprocess, alpha=mode)
    return dataclasses.replace(model, spec=dataclasses.replace(model.spec, preprocess=pre))


def _rgb_in_test(frame: np.ndarray, order: str, alpha: AlphaMode) -> np.ndarray:
    """The RGB image the model should see, worked out here (not with engine code)."""
    if frame.ndim == 2:
        return np.repeat(frame[:, :, None], 3, axis=2)
    colour = frame[:, :, :3]
    if order == "bgr":
        colour = colour[:, :, ::-1]
    if frame.shape[2] == 3 or alpha is AlphaMode.DROP:
        return np.ascontiguousarray(colour)
    a = frame[:, :, 3:].astype(np.float32) / np.float32(255)
    bg = np.float32(255 if alpha is AlphaMode.WHITE else 0)
    return np.clip(np.rint(colour.astype(np.float32) * a + bg * (np.float32(1) - a)), 0, 255).astype(np.uint8)


def _expected_one_by_one(model, frames, order: str):
    """ONNX Runtime on each frame's reference view, one frame at a time."""
    pre = model.spec.preprocess
    norm = Normalise.from_preprocess(pre)
    probs, labels = [], []
    with OrtBackend(model.onnx_path, model.info.input, model.info.output, threads=2) as ort:
        for f in frames:
            rgb = _rgb_in_test(f, order, pre.alpha)
            x = preprocess_reference(rgb, ResizeCrop.from_preprocess(pre, *rgb.shape[:2]), norm)
            c = classify(ort.run(x[None]), model.output_kind, model.spec.labels, model.spec.key)
            probs.append(c.probabilities[0])
            labels.append(c.labels[0])
    return np.stack(probs), labels


def _classify(models, frames, **kw):
    with FrameClassifier(models, threads=2, **kw) as fc:
        return fc.classify(frames)


# --------------------------------------------------------------------------- CPU path vs reference


@pytest.mark.parametrize("order", ["rgb", "bgr"])
@pytest.mark.parametrize("alpha", [AlphaMode.DROP, AlphaMode.WHITE, AlphaMode.BLACK])
def test_cpu_path_equals_onnxruntime_on_reference_views_per_frame(random_models, model_cache_dir, order, alpha):
    model = _with_alpha(random_models[GENDER], alpha)
    frames = _mixed_frames()
    if order == "bgr":  # the same pictures handed in as BGR(A): the results must not change
        frames = [f if f.ndim == 2 else np.ascontiguousarray(np.concatenate([f[..., 2::-1], f[..., 3:]], axis=2))
                  for f in frames]
    res = _classify([model], frames, batch_size=4, channel_order=order, cache_dir=model_cache_dir)
    want, labels = _expected_one_by_one(model, frames, order)
    got = res[GENDER]
    assert len(res) == len(frames) and got.probabilities.shape == (len(frames), 2)
    assert got.probabilities.dtype == np.float32
    assert res.sizes.tolist() == [list(f.shape[:2]) for f in frames]
    diff = np.abs(got.probabilities - want).max()
    print(f"{order} {alpha.value}: batched vs one by one, max |dp| {diff:.2e}")
    np.testing.assert_allclose(got.probabilities, want, atol=1e-6, rtol=0)
    assert list(got.labels) == labels
    assert got.index.tolist() == [model.spec.labels.index(label) for label in labels]


def test_alpha_modes_and_channel_order_change_the_view():
    """The properties above are not vacuous: compositing and the swap reach the view."""
    rgba = _picture(40, 52, 4, 3)

    class _M:  # what FrameView.of reads of a ResolvedModel
        def __init__(self, pre):
            self.spec = type("S", (), {"preprocess": pre, "key": "m"})()

    from engine.specs import SpecRegistry

    pre = SpecRegistry.builtin().get("gender").preprocess
    views = {mode: FrameView.of(_M(dataclasses.replace(pre, alpha=mode)), "rgb") for mode in AlphaMode}
    out = {}
    for mode, view in views.items():
        (chunk,) = frame_batches([rgba], [view], 4)
        out[mode] = reference_view(chunk.frames[0], 0, view)
    assert np.abs(out[AlphaMode.WHITE] - out[AlphaMode.BLACK]).max() > 0.5
    assert np.abs(out[AlphaMode.DROP] - out[AlphaMode.BLACK]).max() > 0.5
    bgr_view = FrameView.of(_M(pre), "bgr")
    (chunk,) = frame_batches([rgba[..., :3]], [bgr_view], 4)
    swapped = reference_view(chunk.frames[0], 0, bgr_view)
    np.testing.assert_allclose(swapped, out[AlphaMode.DROP][::-1], atol=1e-6)


def test_strided_frames_give_the_results_of_their_contiguous_copies(random_models, model_cache_dir):
    model = random_models[GENDER]
    big = _picture(120, 160, 4, 7)
    strided = [big[::2, ::3, :3], big[10:90, 20:100, :3], np.asfortranarray(big[..., :3]), big[:, ::2, 1], big[::-1, :, :]]
    assert not any(f.flags.c_contiguous for f in strided)
    a = _classify([model], strided, batch_size=8, cache_dir=model_cache_dir)
    b = _classify([model], [np.ascontiguousarray(f) for f in strided], batch_size=8, cache_dir=model_cache_dir)
    np.testing.assert_array_equal(a[GENDER].probabilities, b[GENDER].probabilities)


def test_composite_is_the_dali_graphs_alpha_rule_on_every_value_pair():
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    from engine.preprocess.dali_pipeline import _composite
    from engine.preprocess.decode import composite

    v, a = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    rgba = np.stack([v, 255 - v, v, a], -1)
    for mode in (AlphaMode.WHITE, AlphaMode.BLACK):
        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipe():
            x = fn.external_source(source=lambda: [rgba], dtype=types.UINT8, ndim=3, layout="HWC", batch=True)
            return _composite(x, mode)

        p = pipe()
        p.build()
        dali = np.array(p.run()[0].as_array()[0])
        np.testing.assert_array_equal(composite(rgba[..., :3], rgba[..., 3], mode), dali)
    assert composite(rgba[..., :3], rgba[..., 3], AlphaMode.DROP) is not None


# --------------------------------------------------------------------------- vs engine run


def _engine_run(folder, out, cache, tasks, batch_size=4):
    import polars as pl

    from engine.models import ModelSource
    from engine.runner import ModelChoice, RunConfig, run

    source = ModelSource(random_weights=True, download=False)
    config = RunConfig(input=folder, out=out, models=tuple(ModelChoice(t, None, source) for t in tasks),
                       cache_dir=cache, batch_size=batch_size, device="cpu", progress=False, threads=2)
    summary = run(config)
    return pl.read_parquet(out).sort("path"), summary


def _compare_with_run(res, run_df, names):
    """Row i of ``res`` is the file names[i]; same columns (frame for path), labels may
    differ only where the probabilities are near a tie."""
    df = res.to_polars()
    assert df.columns[0] == "frame" and run_df.columns[0] == "path"
    assert df.columns[1:] == run_df.columns[1:]
    assert df.dtypes[1:] == run_df.dtypes[1:]
    assert [Path(p).name for p in run_df["path"]] == names  # sorted by path: the frames' order
    assert df["frame"].to_list() == list(range(len(names)))
    assert df["error"].null_count() == len(df) and run_df["error"].null_count() == len(df)
    assert df.select("width", "height").equals(run_df.select("width", "height"))
    for c in [c for c in df.columns if c.endswith(("_model", "_weights"))]:
        assert df[c].to_list() == run_df[c].to_list()
    probs = [c for c in df.columns if "_p_" in c]
    diff = np.abs(df.select(probs).to_numpy() - run_df.select(probs).to_numpy())
    return df, run_df, diff


def test_gender_frames_match_engine_run_rows_on_the_same_pngs(tmp_path, random_models, model_cache_dir, capsys):
    from engine.specs import Task

    model = random_models[GENDER]
    frames = _mixed_frames(5) + [_picture(360, 640, 3, 40), _picture(720, 1280, 3, 41)]
    folder = tmp_path / "in"
    folder.mkdir()
    names = []
    for i, f in enumerate(frames):
        names.append(f"f{i:02d}.png")
        Image.fromarray(f).save(folder / names[-1])  # lossless: the run decodes these exact pixels
    res = _classify([model], frames, batch_size=4, cache_dir=model_cache_dir)
    run_df, _ = _engine_run(folder, tmp_path / "run.parquet", model_cache_dir, [Task.GENDER])
    df, run_df, diff = _compare_with_run(res, run_df, names)
    # Where it comes from: the views themselves (DALI's Lanczos3 vs the kernel's OpenCV
    # Lanczos4), in grey levels (this spec has mean 0, std 1).
    from engine.preprocess import DaliPreprocessor

    view = FrameView.of(model, "rgb")
    with DaliPreprocessor(views=[(GENDER, model.spec.preprocess)], max_batch=len(frames), num_threads=2) as pre:
        dali = pre.process([(folder / n).read_bytes() for n in names]).views[GENDER]
    (chunk,) = frame_batches(frames, [view], len(frames))
    grey = 255 * np.abs(np.stack([reference_view(f, 0, view) for f in chunk.frames]) - dali)
    with capsys.disabled():
        print(f"\n[frames vs engine run, {GENDER}] max |dp| {diff.max():.5f}, mean {diff.mean():.5f} over {len(frames)} "
              f"frames; views differ by {grey.mean():.3f} grey levels on average, {grey.max():.2f} at most")
    assert diff.max() < 0.005
    assert grey.mean() < 1.5 and grey.max() < 16
    # The bound is not vacuous: the random model's outputs move by much more across frames.
    assert np.ptp(df["gender_p_male"].to_numpy()) > 4 * diff.max()


def test_both_models_match_the_reference_and_engine_run(tmp_path, random_models, model_cache_dir, capsys):
    """The 384 caformer once, on three small frames (RGB, grey, RGBA: composited on
    white for quality, alpha dropped for gender), against both references."""
    from engine.specs import Task

    models = [random_models[GENDER], random_models[QUALITY]]
    frames = [_picture(90, 120, 3, 50), _picture(64, 48, 1, 51), _picture(72, 72, 4, 52)]
    folder = tmp_path / "in"
    folder.mkdir()
    names = [f"f{i}.png" for i in range(len(frames))]
    for n, f in zip(names, frames):
        Image.fromarray(f).save(folder / n)
    res = _classify(models, frames, batch_size=2, cache_dir=model_cache_dir)
    for m in models:
        want, labels = _expected_one_by_one(m, frames, "rgb")
        np.testing.assert_allclose(res[m.spec.key].probabilities, want, atol=1e-5, rtol=0)
        assert list(res[m.spec.key].labels) == labels
    run_df, _ = _engine_run(folder, tmp_path / "run.parquet", model_cache_dir, [Task.GENDER, Task.QUALITY], 2)
    _, _, diff = _compare_with_run(res, run_df, names)
    with capsys.disabled():
        print(f"\n[frames vs engine run, both models] max |dp| {diff.max():.5f}, mean {diff.mean():.5f}")
    assert diff.max() < 0.005


# --------------------------------------------------------------------------- streamed on the host device


@pytest.mark.parametrize("batch_size,n", [(3, 10), (1, 3), (4, 4)])
def test_streamed_host_path_equals_the_plain_cpu_path(random_models, model_cache_dir, batch_size, n):
    """10 frames in batches of 3: a partial last batch of 1, padded through the lanes'
    captured "graph"; batches of one; one exact full batch."""
    model = random_models[GENDER]
    frames = (_mixed_frames(9) * 2)[:n]
    plain = _classify([model], frames, batch_size=batch_size, cache_dir=model_cache_dir)
    with FrameClassifier([model], batch_size=batch_size, streamed=True, threads=2, cache_dir=model_cache_dir) as fc:
        streamed = fc.classify(frames)
        stats = fc.executor.stats[GENDER]
        assert stats.batches == -(-n // batch_size) and stats.images == n
        assert fc.producer_stats.frames == n
    np.testing.assert_allclose(streamed[GENDER].probabilities, plain[GENDER].probabilities, atol=1e-5, rtol=0)
    assert streamed[GENDER].labels == plain[GENDER].labels
    np.testing.assert_array_equal(streamed.sizes, plain.sizes)


def test_streamed_path_reuses_its_buffers_and_survives_a_bad_frame(random_models, model_cache_dir):
    model = random_models[GENDER]
    frames = _mixed_frames(11)
    with FrameClassifier([model], batch_size=4, streamed=True, threads=2, cache_dir=model_cache_dir) as fc:
        first = fc.classify(frames)
        allocations = fc.executor.allocations
        staging = fc.producer_stats.staging_allocations
        with pytest.raises(InputError, match=r"^frame 5: "):
            fc.classify(frames[:5] + [frames[0].astype(np.float32)] + frames[6:])
        again = fc.classify(frames)
        assert fc.executor.allocations == allocations  # nothing allocated per batch
        assert fc.producer_stats.staging_allocations == staging
    np.testing.assert_array_equal(again[GENDER].probabilities, first[GENDER].probabilities)


def test_producer_on_the_host_device_writes_the_reference_views_and_grows_staging_only_when_needed():
    from engine.specs import SpecRegistry

    reg = SpecRegistry.builtin()
    models = [type("M", (), {"spec": reg.get(t)})() for t in ("gender", "quality")]
    views = [FrameView.of(m, "rgb") for m in models]
    small = [_picture(40, 30, 3, 1), _picture(20, 20, 4, 2), _picture(33, 17, 1, 3)]
    big = [_picture(200, 150, 3, 4)]
    with HostDevice() as dev:
        producer = FrameProducer(dev, [(views[0], np.float32), (views[1], np.float16)], 4, ReferenceLauncher())
        base = dev.allocations
        for batch_frames, allocations in ((small, 1), (small[:1], 1), (big, 2), (small, 2)):
            (chunk,) = frame_batches(batch_frames, views, 4)
            batch = chunk.frames
            produced = producer(batch)
            dev.synchronize_stream(producer.stream)
            assert producer.stats.staging_allocations == allocations
            assert dev.allocations == base + 2 * allocations  # a pinned and a device buffer each time
            assert produced.ok == tuple(range(len(batch))) and produced.cuda_stream is producer.stream
            assert produced.sizes == tuple(f.shape[:2] for f in batch_frames)
            for v, view in enumerate(views):
                dv = produced.views[view.key]
                assert dv.shape == (len(batch), 3, view.preprocess.size, view.preprocess.size)
                got = dv.tensors.array[: len(batch)]
                want = np.stack([reference_view(f, v, view, dv.dtype) for f in batch])
                np.testing.assert_array_equal(got, want)
                with pytest.raises(TypeError, match="copies out of DALI's outputs"):
                    dv.to_numpy()  # the producer's own buffer, not a TensorListGPU
        assert producer.stats.staging_bytes >= 200 * 150 * 3
        producer.close()
        producer.close()
        assert producer.stream is None  # let go while the device is open
        with pytest.raises(RuntimeError):
            producer(batch)


def _gender_view():
    return FrameView.of(type("M", (), {"spec": SpecRegistry.builtin().get("gender")})(), "rgb")


def test_producer_aligns_every_frame_and_geometry_table_in_staging():
    """Each frame's pixels and each view's geometry table (8-byte fields, read as structs
    by the kernel) start at a multiple of STAGING_ALIGN from the staging buffer's start,
    whatever the frames' sizes."""
    from kernels.launch import FRAME_GEOM_DTYPE

    class Recording(ReferenceLauncher):
        def __init__(self) -> None:
            self.launches = []

        def __call__(self, launch, stream, *, src, norm, out):
            self.launches.append((launch, src))
            super().__call__(launch, stream, src=src, norm=norm, out=out)

    reg = SpecRegistry.builtin()
    views = [FrameView.of(type("M", (), {"spec": reg.get(t)})(), "rgb") for t in ("gender", "quality")]
    frames = [_picture(13, 7, 3, 1), _picture(9, 11, 4, 2), _picture(5, 3, 1, 3)]  # no size a multiple of 256
    launcher = Recording()
    with HostDevice() as dev:
        producer = FrameProducer(dev, [(views[0], np.float32), (views[1], np.float32)], 4, launcher)
        (chunk,) = frame_batches(frames, views, 4)
        producer(chunk.frames)
        dev.synchronize_stream(producer.stream)
        assert len(launcher.launches) == 2
        for launch, src in launcher.launches:
            table_at = int(launch.args[1]) - src.ptr
            assert int(launch.args[0]) == src.ptr and table_at % frames_mod.STAGING_ALIGN == 0
            table = src.array[table_at: table_at + len(frames) * FRAME_GEOM_DTYPE.itemsize].view(FRAME_GEOM_DTYPE)
            assert len(set(table["offset"].tolist())) >= 3  # the frames' own pixels, and a composite
            assert (table["offset"] % frames_mod.STAGING_ALIGN == 0).all()
        producer.close()


def test_producer_staging_grows_by_a_factor_and_exactly_when_a_batch_needs_more():
    """A batch needing a little more than the staging holds reallocates it (never writes
    past it), at least STAGING_GROWTH times larger, so slowly growing frames do not
    reallocate every batch."""
    view = _gender_view()
    with HostDevice() as dev:
        producer = FrameProducer(dev, [(view, np.float32)], 1, ReferenceLauncher())
        need = []
        for width in (16, 17, 22):  # 16 rows of 3 * width bytes: 1 KiB, then just over, then 1280 bytes
            frame = _picture(16, width, 3, width)
            (chunk,) = frame_batches([frame], [view], 1)
            produced = producer(chunk.frames)
            dev.synchronize_stream(producer.stream)
            need.append(producer.stats.staging_bytes)
            got = produced.views[view.key].tensors.array[0]
            np.testing.assert_array_equal(got, reference_view(chunk.frames[0], 0, view))
        # 768 + a 40-byte table -> 1024; 816 + 40 -> 1280 > 1024: grown to 1.5 x 1024; 1056 + 40 -> 1536 fits
        assert need == [1024, 1536, 1536] and producer.stats.staging_allocations == 2
        producer.close()


def test_closing_the_producer_waits_for_its_queued_work():
    class Slow(ReferenceLauncher):
        def __call__(self, launch, stream, **kw):
            stream.submit(lambda: time.sleep(0.2))  # the kernel of a big batch, still running
            super().__call__(launch, stream, **kw)

    view = _gender_view()
    frame = _picture(40, 30, 3, 5)
    with HostDevice() as dev:
        producer = FrameProducer(dev, [(view, np.float32)], 2, Slow())
        (chunk,) = frame_batches([frame], [view], 2)
        out = producer(chunk.frames).views[view.key].tensors.array
        producer.close()  # its buffers go now: the work reading and writing them is done
        np.testing.assert_array_equal(out[0], reference_view(chunk.frames[0], 0, view))


def test_producer_refuses_a_dtype_the_kernel_cannot_write():
    from engine.specs import SpecRegistry

    view = FrameView.of(type("M", (), {"spec": SpecRegistry.builtin().get("gender")})(), "rgb")
    with HostDevice() as dev, pytest.raises(EngineError, match="float32 or float16"):
        FrameProducer(dev, [(view, np.int8)], 2, ReferenceLauncher())


# --------------------------------------------------------------------------- bad frames and options


BAD_FRAMES = [
    (np.zeros((8, 8, 3), np.float32), "float32 array of shape (8, 8, 3): the pixels must be uint8 (0-255)"),
    (np.zeros((8, 8, 3), np.uint16), "uint16 array of shape (8, 8, 3): the pixels must be uint8"),
    ([[0, 1], [2, 3]], "expected a numpy array, got list"),
    (None, "expected a numpy array, got NoneType"),
    (np.zeros((8, 8, 2), np.uint8), "shape (8, 8, 2): expected (H, W, 3) RGB, (H, W) grey or (H, W, 4) RGBA"),
    (np.zeros((8, 8, 1), np.uint8), "uint8 array of shape (8, 8, 1): expected"),
    (np.zeros((2, 8, 8, 3), np.uint8), "shape (2, 8, 8, 3): expected"),
    (np.zeros(8, np.uint8), "shape (8,): expected"),
    (np.zeros((0, 8, 3), np.uint8), "uint8 array of shape (0, 8, 3) has no pixels"),
    (np.zeros((8, 0), np.uint8), "shape (8, 0) has no pixels"),
]


@pytest.mark.parametrize("bad,message", BAD_FRAMES)
def test_a_bad_frame_raises_input_error_naming_it_with_the_frames_before_it_done(random_models, model_cache_dir,
                                                                                 monkeypatch, bad, message):
    model = random_models[GENDER]
    calls = []
    real = frames_mod.preprocess_reference
    monkeypatch.setattr(frames_mod, "preprocess_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    good = [_picture(20, 30, 3, i) for i in range(5)]
    with FrameClassifier([model], batch_size=3, threads=2, cache_dir=model_cache_dir) as fc:
        with pytest.raises(InputError, match=rf"^frame 4: .*{re.escape(message)}") as info:
            fc.classify(good[:4] + [bad] + good[4:])
        assert "\n" not in str(info.value)
        assert len(calls) == 4  # frames 0-3 (the first batch, and frame 3 ahead of the bad one); nothing after
        partial = info.value.partial
        assert len(partial) == 4 and partial.first == 0 and not partial.errors
        expected = fc.classify(good[:4])
        np.testing.assert_allclose(partial[GENDER].probabilities, expected[GENDER].probabilities, atol=1e-6, rtol=0)
        assert partial[GENDER].labels == expected[GENDER].labels
        assert len(fc.classify(good)) == 5  # still usable


def _check_error_rows(res, frames, bad_at, clean, model):
    """``res``: ``frames`` classified with on_error="row"; ``clean``: the good frames alone."""
    n = len(frames)
    assert len(res) == n and res.first == 0
    assert sorted(res.errors) == bad_at
    for i in bad_at:
        assert not re.match(r"frame \d", res.errors[i]) and "\n" not in res.errors[i]
    assert res.ok.tolist() == [i not in bad_at for i in range(n)]
    good = np.flatnonzero(res.ok)
    c = res[GENDER]
    np.testing.assert_allclose(c.probabilities[good], clean[GENDER].probabilities, atol=1e-6, rtol=0)
    assert [c.labels[i] for i in good] == list(clean[GENDER].labels)
    assert np.isnan(c.probabilities[bad_at]).all() and (c.index[bad_at] == -1).all()
    assert all(c.labels[i] is None for i in bad_at)
    assert (res.sizes[bad_at] == -1).all() and (res.sizes[good] == clean.sizes).all()
    df = res.to_polars()
    assert df["frame"].to_list() == list(range(n))
    assert df["error"].is_not_null().to_list() == [i in bad_at for i in range(n)]
    assert df["error"][bad_at[0]] == res.errors[bad_at[0]]
    assert df["gender_label"].is_null().to_list() == [i in bad_at for i in range(n)]
    assert df["height"].drop_nulls().to_list() == clean.sizes[:, 0].tolist()
    assert df["gender_model"].drop_nulls().to_list() == [model.spec.key] * len(good)


@pytest.mark.parametrize("streamed", [False, True], ids=["cpu", "streamed"])
def test_on_error_row_keeps_bad_frames_as_error_rows_and_classifies_the_rest(random_models, model_cache_dir, streamed):
    """Bad frames first, in the middle, at the end, and a whole batch of them (frames 6-8
    with batch size 3): every good frame gets the result it gets alone."""
    model = random_models[GENDER]
    good = _mixed_frames(40)[:6]
    bads = [b for b, _ in BAD_FRAMES]
    frames = [bads[0], good[0], good[1], good[2], bads[1], good[3], bads[2], bads[3], bads[4], good[4], good[5], bads[5]]
    bad_at = [0, 4, 6, 7, 8, 11]
    with FrameClassifier([model], batch_size=3, streamed=streamed, threads=2, cache_dir=model_cache_dir) as fc:
        res = fc.classify(frames, on_error="row")
        clean = fc.classify(good)
        if streamed:
            assert fc.producer_stats.frames == 2 * len(good)  # refused frames are never staged
        again = fc.classify(frames, on_error="row")  # nothing left half-done
    _check_error_rows(res, frames, bad_at, clean, model)
    np.testing.assert_array_equal(again[GENDER].probabilities, res[GENDER].probabilities)
    assert BAD_FRAMES[1][1] in res.errors[4]


@pytest.mark.parametrize("streamed", [False, True], ids=["cpu", "streamed"])
def test_iter_classify_yields_each_batch_and_a_failing_source_loses_nothing(random_models, model_cache_dir, streamed):
    model = random_models[GENDER]
    frames = _mixed_frames(50)  # 9 frames
    with FrameClassifier([model], batch_size=4, streamed=streamed, threads=2, cache_dir=model_cache_dir) as fc:
        whole = fc.classify(frames)
        parts = list(fc.iter_classify(frames))
        assert [(p.first, len(p)) for p in parts] == [(0, 4), (4, 4), (8, 1)]
        joined = frames_mod.FrameResults.concat(fc.models, parts)
        np.testing.assert_allclose(joined[GENDER].probabilities, whole[GENDER].probabilities, atol=1e-6, rtol=0)
        assert parts[1].to_polars()["frame"].to_list() == [4, 5, 6, 7]

        def decoder():  # a video decoder that fails after 6 frames
            yield from frames[:6]
            raise OSError("decoder: corrupt packet")

        got = []
        with pytest.raises(OSError, match="corrupt packet"):
            for part in fc.iter_classify(decoder()):
                got.append(part)
        assert [(p.first, len(p)) for p in got] == [(0, 4), (4, 2)]  # the 2 frames it gave after batch 1 too
        with pytest.raises(OSError, match="corrupt packet") as info:
            fc.classify(decoder())
        assert len(info.value.partial) == 6
        np.testing.assert_allclose(info.value.partial[GENDER].probabilities, whole[GENDER].probabilities[:6],
                                   atol=1e-6, rtol=0)
        assert len(fc.classify(frames)) == 9

        def interrupted():  # Ctrl-C while a decoder reads its 34th frame
            yield from itertools.chain(frames, frames, frames, frames[:6])
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt) as stopped:
            fc.classify(interrupted())
        # prompt: the frame waiting for batch 9 is dropped, and so are the batches still in
        # the streamed executor's ring (3 deep: batch k is handed out once k + 3 is queued)
        kept = stopped.value.partial
        assert kept.first == 0 and len(kept) % 4 == 0
        assert (20 <= len(kept) <= 32) if streamed else len(kept) == 32
        expected = np.concatenate([whole[GENDER].probabilities] * 4)[:len(kept)]
        np.testing.assert_allclose(kept[GENDER].probabilities, expected, atol=1e-6, rtol=0)
        assert len(fc.classify(frames)) == 9  # and the classifier goes on
        with pytest.raises(EngineError, match="on_error must be one of raise, row"):
            fc.classify(frames, on_error="skip")


@pytest.mark.parametrize("streamed", [False, True], ids=["cpu", "streamed"])
def test_one_call_at_a_time_and_an_abandoned_iterator_frees_the_classifier(random_models, model_cache_dir, streamed):
    model = random_models[GENDER]
    frames = _mixed_frames(60)
    with FrameClassifier([model], batch_size=2, streamed=streamed, threads=2, cache_dir=model_cache_dir) as fc:
        whole = fc.classify(frames)
        it = fc.iter_classify(frames)
        next(it)
        with pytest.raises(RuntimeError, match="already classifying"):
            fc.classify(frames)
        it.close()  # abandoned mid-run: queued batches are finished and dropped
        again = fc.classify(frames)
    np.testing.assert_array_equal(again[GENDER].probabilities, whole[GENDER].probabilities)


def test_an_abandoned_streamed_iterator_leaves_nothing_queued(random_models, model_cache_dir):
    """Closing iter_classify mid-run finishes and drops the batches still in flight: none
    is handed to the next call as one of its own."""
    model = random_models[GENDER]
    frames = _mixed_frames(61)  # 9 frames: 5 batches of 2, up to 3 in flight
    with FrameClassifier([model], batch_size=2, streamed=True, threads=2, cache_dir=model_cache_dir) as fc:
        it = fc.iter_classify(frames)
        assert len(next(it)) == 2
        it.close()
        assert fc.executor.drain() == []


@pytest.mark.parametrize("streamed", [False, True], ids=["cpu", "streamed"])
def test_closing_the_classifier_ends_a_live_iterator_first(random_models, model_cache_dir, streamed):
    model = random_models[GENDER]
    frames = _mixed_frames(12)
    fc = FrameClassifier([model], batch_size=2, streamed=streamed, threads=2, cache_dir=model_cache_dir)
    started, untouched = fc.iter_classify(frames), fc.iter_classify(frames)
    first = next(started)
    fc.close()  # with batches of `started` still queued on the streamed path
    for it in (started, untouched):
        with pytest.raises(RuntimeError, match="closed: this iterator ended with it"):
            next(it)
    assert len(first) == 2


def test_one_frame_passed_as_frames_is_refused_not_split_into_rows(random_models, model_cache_dir):
    with FrameClassifier([random_models[GENDER]], threads=2, cache_dir=model_cache_dir) as fc:
        for one in (np.zeros((5, 40, 3), np.uint8), np.zeros((5, 40), np.uint8), np.zeros((5, 40, 4), np.uint8),
                    np.zeros((5, 40, 2), np.uint8)):
            with pytest.raises(InputError, match=r"pass \[frame\] for a single frame"):
                fc.classify(one)
        assert len(fc.classify(np.zeros((2, 5, 40, 3), np.uint8))) == 2  # a stack of frames
        assert len(fc.classify(np.zeros((4, 30, 40), np.uint8))) == 4  # a stack of grey frames
        assert len(fc.classify([np.zeros((5, 40, 3), np.uint8)])) == 1


def test_frame_batches_on_error_modes():
    view = FrameView.of(type("M", (), {"spec": SpecRegistry.builtin().get("gender")})(), "rgb")
    ok, bad = np.zeros((10, 10, 3), np.uint8), np.zeros((10, 10, 3), np.float32)
    frames = [ok, ok, ok, bad, ok, ok, bad]
    rows = list(frame_batches(frames, [view], 3, on_error="row"))
    assert [(c.start, c.count, [f.index for f in c.frames], sorted(c.errors)) for c in rows] == [
        (0, 3, [0, 1, 2], []), (3, 3, [4, 5], [3]), (6, 1, [], [6])]
    assert rows[1].errors[3].startswith("float32 array of shape (10, 10, 3)")
    got = []
    with pytest.raises(InputError, match=r"^frame 3: float32"):
        for c in frame_batches(frames, [view], 3):
            got.append(c)
    assert [(c.start, c.count) for c in got] == [(0, 3)]  # frame 3 opens its batch: nothing before it there
    got = []
    with pytest.raises(InputError, match=r"^frame 3: "):
        for c in frame_batches(frames, [view], 4):
            got.append(c)
    assert [(c.start, c.count, len(c.frames), dict(c.errors)) for c in got] == [(0, 3, 3, {})]  # its batch's head
    with pytest.raises(EngineError, match="on_error"):
        list(frame_batches(frames, [view], 3, on_error="skip"))


def test_bgr_classifier_names_bgr_in_its_shape_message(random_models, model_cache_dir):
    with FrameClassifier([random_models[GENDER]], channel_order="bgr", threads=2, cache_dir=model_cache_dir) as fc:
        with pytest.raises(InputError, match=r"^frame 0: .*" + re.escape("(H, W, 3) BGR, (H, W) grey or (H, W, 4) BGRA")):
            fc.classify([np.zeros((4, 4, 5), np.uint8)])


@pytest.mark.parametrize("kwargs,message", [
    ({"device": "tpu"}, "device must be"),
    ({"batch_size": 0}, "batch size"),
    ({"batch_size": True}, "batch size"),
    ({"batch_size": 2.0}, "batch size"),
    ({"precision": "fp8"}, "precision"),
    ({"channel_order": "rgba"}, "channel_order"),
    ({"threads": 1.5}, "threads must be a whole number"),
    ({"threads": 0}, "threads must be a whole number"),
    ({"threads": -1}, "threads must be a whole number"),
])
def test_bad_options_are_refused_in_one_line(random_models, model_cache_dir, kwargs, message):
    with pytest.raises(EngineError, match=message):
        FrameClassifier([random_models[GENDER]], cache_dir=model_cache_dir, **kwargs)


def test_a_numpy_integer_batch_size_is_an_integer(random_models, model_cache_dir):
    with FrameClassifier([random_models[GENDER]], batch_size=np.int64(3), threads=2, cache_dir=model_cache_dir) as fc:
        assert fc.batch_size == 3 and type(fc.batch_size) is int


def test_one_model_per_task_and_at_least_one(random_models):
    with pytest.raises(EngineError, match="at least one model"):
        FrameClassifier([])
    with pytest.raises(EngineError, match="one model per task"):
        FrameClassifier([random_models[GENDER], random_models[GENDER]])


def test_empty_input_close_and_reuse(random_models, model_cache_dir):
    model = random_models[GENDER]
    fc = FrameClassifier([model], threads=2, cache_dir=model_cache_dir)
    res = fc.classify(iter(()))
    assert len(res) == 0 and res[GENDER].probabilities.shape == (0, 2) and res.sizes.shape == (0, 2)
    assert res.to_polars().height == 0
    fc.close()
    fc.close()
    with pytest.raises(RuntimeError, match="closed"):
        fc.classify([_picture(8, 8, 3, 0)])


def test_the_gpu_side_imports_neither_polars_nor_cuda_packages_until_it_opens():
    """Importing engine.frames loads no polars/pycuda/torch/tensorrt/DALI; asking for the GPU
    path with polars made unimportable gets as far as the GPU check (this machine has no
    GPU) and says why, in one line."""
    code = (
        "import sys\n"
        "sys.modules['polars'] = None\n"
        "import engine.frames as f\n"
        "heavy = [m for m in ('polars', 'pycuda', 'torch', 'tensorrt', 'nvidia.dali') if sys.modules.get(m)]\n"
        "assert not heavy, heavy\n"
        "import engine.streamed_run, engine.preprocess.dali_pipeline, engine.gpu_path, engine.gpu, builders.manifest\n"
        "heavy = [m for m in ('polars', 'pycuda', 'torch', 'tensorrt', 'nvidia.dali') if sys.modules.get(m)]\n"
        "assert not heavy, heavy\n"
        "from engine.specs import SpecRegistry\n"
        "m = type('M', (), {'spec': SpecRegistry.builtin().get('gender'), 'is_random': True})()\n"
        "try:\n"
        "    f.FrameClassifier([m], device='gpu', gpu_backend='torch')\n"
        "except f.EngineError as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from engine.gpu import cuda_absent_reason

    if cuda_absent_reason() is not None:
        assert "REFUSED FrameClassifier(device='gpu'): no GPU" in proc.stdout


def test_the_cpu_paths_run_without_polars_and_dali(random_models, model_cache_dir, tmp_path):
    """The frames API needs neither polars (only FrameResults.to_polars does) nor DALI;
    the GPU check kit's core tier runs it where neither is installed."""
    model = random_models[GENDER]
    frames = _mixed_frames()[-4:]  # two sizes of RGB, grey, RGBA
    want = {s: _classify([model], frames, batch_size=2, streamed=s, cache_dir=model_cache_dir)[GENDER].probabilities
            for s in (False, True)}
    np.savez(tmp_path / "frames.npz", *frames)
    code = (
        "import sys, json\n"
        "sys.modules['polars'] = None\n"
        "sys.modules['nvidia.dali'] = None\n"
        "import numpy as np\n"
        "from pathlib import Path\n"
        "from engine.frames import FrameClassifier\n"
        "from engine.models import ModelSource, resolve_model\n"
        "from engine.specs import SpecRegistry\n"
        "onnx, cache, saved = Path(sys.argv[1]), Path(sys.argv[2]), np.load(sys.argv[3])\n"
        "frames = [saved[f'arr_{i}'] for i in range(len(saved.files))]\n"
        "m = resolve_model(SpecRegistry.builtin().get('gender'), ModelSource(onnx=onnx), cache)\n"
        "out = {}\n"
        "for streamed in (False, True):\n"
        "    with FrameClassifier([m], threads=2, batch_size=2, streamed=streamed, cache_dir=cache) as fc:\n"
        "        out[str(streamed)] = fc.classify(frames)['gender'].probabilities.tolist()\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(model.onnx_path), str(model_cache_dir),
                           str(tmp_path / "frames.npz")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for streamed in (False, True):
        np.testing.assert_allclose(np.array(got[str(streamed)], np.float32), want[streamed], atol=1e-6, rtol=0)


def test_the_frames_gpu_path_does_not_ask_for_dali(monkeypatch):
    """`engine run`'s GPU path decodes with DALI; the frames API's does not (its kernel
    preprocesses arrays), so a missing DALI is no reason to refuse it. The device check
    is passed over here (no GPU) to reach the package check."""
    import engine.gpu
    import engine.gpu_path as gp

    monkeypatch.setattr(engine.gpu, "cuda_absent_reason", lambda device_id=0: None)
    monkeypatch.setattr(gp, "_missing_module", lambda module: True)
    assert "(nvidia-dali, pycuda)" in gp.gpu_problem("torch")
    assert "(pycuda)" in gp.gpu_problem("torch", dali=False)
    m = type("M", (), {"spec": SpecRegistry.builtin().get("gender"), "is_random": True})()
    with pytest.raises(EngineError, match=r"not installed \(pycuda\)"):
        FrameClassifier([m], device="gpu", gpu_backend="torch")


# --------------------------------------------------------------------------- GPU (not run yet)


@pytest.mark.gpu
@pytest.mark.parametrize("precision,bound", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_gpu_path_with_the_torch_backend_matches_the_cpu_path(random_models, model_cache_dir, precision, bound, capsys):
    """FrameProducer with the CUDA kernel, StreamedExecutor on CudaDevice, PyTorch on the
    slot streams; a partial last batch. The kernel's own error against the reference is
    bounded in tests/kernels/test_gpu_kernels.py; this bound covers that and PyTorch vs
    ONNX Runtime (fp32) or fp16 autocast (fp16) through random-weight models."""
    pytest.importorskip("pycuda")
    pytest.importorskip("torch")
    models = [random_models[GENDER], random_models[QUALITY]]
    frames = _mixed_frames(30)[:5] + [_picture(360, 640, 3, 31)]
    cpu = _classify(models, frames, batch_size=4, cache_dir=model_cache_dir)
    with FrameClassifier(models, device="gpu", gpu_backend="torch", precision=precision, batch_size=4,
                         cache_dir=model_cache_dir) as fc:
        gpu = fc.classify(frames)
        staging = fc.producer_stats.staging_allocations
        again = fc.classify(frames)
        assert fc.producer_stats.staging_allocations == staging  # sized by the largest batch, once
        # Error rows, one batch of nothing but bad frames (nothing staged or launched for it).
        bad = np.zeros((8, 8, 3), np.float32)
        rows = fc.classify(frames[:4] + [bad] * 4 + frames[4:], on_error="row")
    assert sorted(rows.errors) == [4, 5, 6, 7]
    for m in models:
        key = m.spec.key
        diff = np.abs(gpu[key].probabilities - cpu[key].probabilities).max()
        with capsys.disabled():
            print(f"\n[GPU frames ({precision}) vs CPU frames, {key}] max |dp| {diff:.2e}")
        assert diff < bound
        np.testing.assert_allclose(again[key].probabilities, gpu[key].probabilities, atol=1e-6, rtol=0)
        np.testing.assert_allclose(rows[key].probabilities[rows.ok], gpu[key].probabilities, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(gpu.sizes, cpu.sizes)


def test_batches_close_early_at_the_byte_budget_and_a_huge_frame_goes_alone():
    view = FrameView.of(type("M", (), {"spec": SpecRegistry.builtin().get("gender")})(), "rgb")
    small = [np.zeros((10, 10, 3), np.uint8) for _ in range(5)]  # 300 bytes each
    huge = np.zeros((40, 40, 3), np.uint8)  # 4800 bytes
    frames = small[:3] + [huge] + small[3:]
    batches = list(frame_batches(frames, [view], 4, max_bytes=700))
    assert [[f.index for f in b.frames] for b in batches] == [[0, 1], [2], [3], [4, 5]]
    assert [(b.start, b.count) for b in batches] == [(0, 2), (2, 1), (3, 1), (4, 2)]
    # Without a budget in reach, only the batch size splits.
    assert [b.count for b in frame_batches(frames, [view], 4, max_bytes=10**9)] == [4, 2]


def test_a_later_batchs_error_rows_sit_within_that_batch(random_models, model_cache_dir):
    """iter_classify with on_error="row": a part starting at frame 3 masks, writes and
    joins its own bad frame at its row (1), not at the frame's input index (4)."""
    model = random_models[GENDER]
    good = [_picture(30, 40, 3, i) for i in range(5)]
    frames = good[:4] + [np.zeros((8, 8, 3), np.float32)] + good[4:]
    with FrameClassifier([model], batch_size=3, threads=2, cache_dir=model_cache_dir) as fc:
        parts = list(fc.iter_classify(frames, on_error="row"))
    assert [(p.first, len(p)) for p in parts] == [(0, 3), (3, 3)]
    second = parts[1]
    assert sorted(second.errors) == [4] and second.ok.tolist() == [True, False, True]
    assert np.isnan(second[GENDER].probabilities[1]).all() and second[GENDER].labels[1] is None
    df = second.to_polars()
    assert df["frame"].to_list() == [3, 4, 5]
    assert df["error"].is_not_null().to_list() == [False, True, False]
    assert df["gender_label"].is_null().to_list() == [False, True, False]
    tail = frames_mod.FrameResults.concat(fc.models, parts[1:])
    assert tail.first == 3 and len(tail) == 3 and tail.ok.tolist() == [True, False, True]


def test_a_batch_may_hold_exactly_its_byte_budget():
    frames = [np.zeros((10, 10, 3), np.uint8) for _ in range(4)]  # 300 bytes each
    assert [b.count for b in frame_batches(frames, [_gender_view()], 4, max_bytes=600)] == [2, 2]
    assert [b.count for b in frame_batches(frames, [_gender_view()], 4, max_bytes=599)] == [1, 1, 1, 1]


@pytest.mark.parametrize("streamed", [False, True], ids=["cpu", "streamed"])
def test_a_decoder_that_refills_one_buffer_gets_each_frames_own_results(random_models, model_cache_dir, streamed):
    """OpenCV's read into a preallocated image, a ring of buffers: the frame a decoder
    handed out is overwritten by its next one, before the batch holding it runs."""
    model = random_models[GENDER]
    frames = [_picture(50, 60, 3, seed) for seed in range(6)]
    buffer = np.empty_like(frames[0])

    def decoder():
        for f in frames:
            buffer[...] = f
            yield buffer

    with FrameClassifier([model], batch_size=3, streamed=streamed, threads=2, cache_dir=model_cache_dir) as fc:
        want = fc.classify(frames)[GENDER].probabilities
        got = fc.classify(decoder())[GENDER].probabilities
    assert np.ptp(want[:, 0]) > 1e-3  # the frames tell apart
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_a_full_batch_is_handed_on_before_the_next_frame_is_pulled():
    """A live source may not have its next frame yet: a full batch must not wait for it."""
    view = FrameView.of(type("M", (), {"spec": SpecRegistry.builtin().get("gender")})(), "rgb")
    log = []

    def camera():
        for k in range(5):
            log.append(f"pull {k}")
            yield np.full((8, 8, 3), k, np.uint8)

    for batch in frame_batches(camera(), [view], 2):
        log.append(f"batch {[f.index for f in batch.frames]}")
    assert log == ["pull 0", "pull 1", "batch [0, 1]", "pull 2", "pull 3", "batch [2, 3]", "pull 4", "batch [4]"]


def test_a_very_tall_frame_costs_memory_for_its_crop_not_its_height(random_models, model_cache_dir):
    """The CPU side's OpenCV-convention reference (the gender view) resized every source
    row before cropping: a 200000 x 1 frame took 9 GB and 40 s."""
    import resource

    model = random_models[GENDER]
    tall = np.zeros((200_000, 1, 3), np.uint8)
    tall[:300] = 200
    with FrameClassifier([model], batch_size=2, threads=2, cache_dir=model_cache_dir) as fc:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res = fc.classify([tall, _picture(40, 30, 3, 1)])
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert np.isfinite(res[GENDER].probabilities).all()
    assert grown_mb < 1024, f"peak memory grew by {grown_mb:.0f} MB"


def test_results_by_task_name_and_a_missing_key_names_the_keys(random_models, model_cache_dir):
    from PIL import Image

    model = random_models[GENDER]
    with FrameClassifier([model], batch_size=2, channel_order="BGR", threads=2, cache_dir=model_cache_dir) as fc:
        assert fc.channel_order == "bgr"
        res = fc.classify([_picture(30, 40, 3, 1)])
        with pytest.raises(InputError, match=r"got Image \(np.asarray\(image\) converts a PIL image"):
            fc.classify([Image.new("RGB", (8, 8))])
    assert res["gender"] is res[GENDER]
    with pytest.raises(KeyError, match="no results for 'quality'; the keys are 'gender/alpha'"):
        res["quality"]
