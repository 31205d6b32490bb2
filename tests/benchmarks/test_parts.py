"""The suite's parts on their own: image set, config, CLI options, measuring, derived figures."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.config import BenchConfig, Pipeline, Precision, Scenario
from benchmarks.images import CROP_SIDES, MANIFEST_NAME, ImageSetSpec, folder_image_set, generate_image_set
from engine.errors import InputError
from tests.benchmarks.docs import ENGINE, REFERENCE, make_doc

PNG = b"\x89PNG\r\n\x1a\n"
JPEG = b"\xff\xd8\xff"


# -- generated image set ------------------------------------------------------------------


def _sizes(paths):
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append((im.size, im.mode))
    return out


def test_generated_set_is_reproducible_and_seeded(tmp_path):
    spec = ImageSetSpec(frames=2, crops=2, frame_size=(160, 90), seed=7)
    a = generate_image_set(tmp_path / "a", spec)
    b = generate_image_set(tmp_path / "b", spec)
    c = generate_image_set(tmp_path / "c", ImageSetSpec(2, 2, (160, 90), seed=8))
    assert [p.name for p in a.paths] == ["frame_00000.png", "frame_00001.jpg", "crop_00000.png", "crop_00001.jpg"]
    assert [p.read_bytes() for p in a.paths] == [p.read_bytes() for p in b.paths]
    assert all(x.read_bytes() != y.read_bytes() for x, y in zip(a.paths, c.paths))
    # Adding images does not change the earlier ones.
    d = generate_image_set(tmp_path / "d", ImageSetSpec(3, 2, (160, 90), seed=7))
    assert (tmp_path / "d" / "frame_00001.jpg").read_bytes() == a.paths[1].read_bytes()
    assert len(d) == 5


def test_generated_images_look_like_the_workload(tmp_path):
    import numpy as np
    from PIL import Image

    s = generate_image_set(tmp_path, ImageSetSpec(frames=2, crops=4, frame_size=(320, 180), seed=0))
    heads = [p.read_bytes()[:8] for p in s.paths]
    assert [h.startswith(PNG) for h in heads] == [True, False, True, False, True, False]
    assert all(h.startswith(JPEG) for h in heads[1::2])
    sizes = _sizes(s.paths)
    assert sizes[:2] == [((320, 180), "RGB")] * 2
    for (w, h), mode in sizes[2:]:
        assert mode == "RGB" and CROP_SIDES[0] <= min(w, h) <= CROP_SIDES[1] and max(w, h) <= 1.3 * min(w, h) + 1
    assert s.counts == {"frame.png": 1, "frame.jpg": 1, "crop.png": 2, "crop.jpg": 2}
    assert s.total_bytes == sum(p.stat().st_size for p in s.paths)
    # Not noise: large flat-ish regions (cel shading) and many distinct colours (gradients, grain).
    arr = np.asarray(Image.open(s.paths[0]).convert("RGB"), dtype=np.int16)
    steps = np.abs(np.diff(arr, axis=1)).max(axis=2)
    assert np.median(steps) <= 12
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 1000
    assert arr.std() > 20


def test_generated_set_is_reused_and_redrawn_when_it_changed(tmp_path):
    spec = ImageSetSpec(frames=1, crops=1, frame_size=(64, 36), seed=0)
    s = generate_image_set(tmp_path, spec)
    stamps = [p.stat().st_mtime_ns for p in s.paths]
    time.sleep(0.01)
    generate_image_set(tmp_path, spec)
    assert [p.stat().st_mtime_ns for p in s.paths] == stamps  # reused
    s.paths[0].write_bytes(b"tampered")
    generate_image_set(tmp_path, spec)
    assert s.paths[0].read_bytes().startswith(PNG)  # redrawn
    generate_image_set(tmp_path, ImageSetSpec(frames=1, crops=0, frame_size=(64, 36), seed=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame_00000.png", MANIFEST_NAME]  # stale crop removed
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["spec"]["crops"] == 0 and list(manifest["files"]) == ["frame_00000.png"]


def test_user_folder(tmp_path):
    generate_image_set(tmp_path / "imgs" / "sub", ImageSetSpec(frames=0, crops=3, frame_size=(64, 36), seed=0))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    s = folder_image_set(tmp_path / "imgs")
    assert s.source == "folder" and len(s) == 3 and s.spec is None
    assert s.counts == {"png": 2, "jpg": 1}
    assert len(folder_image_set(tmp_path / "imgs", max_images=2)) == 2
    with pytest.raises(InputError, match="does not exist"):
        folder_image_set(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        folder_image_set(tmp_path / "empty")


def test_user_folder_leaves_out_files_that_do_not_decode(tmp_path):
    generate_image_set(tmp_path / "imgs", ImageSetSpec(frames=0, crops=2, frame_size=(64, 36), seed=0))
    good = sorted(p for p in (tmp_path / "imgs").iterdir() if p.suffix in (".png", ".jpg"))
    (tmp_path / "imgs" / "a_text.jpg").write_text("not an image")
    (tmp_path / "imgs" / "b_cut.png").write_bytes(good[0].read_bytes()[:100])
    s = folder_image_set(tmp_path / "imgs")
    assert list(s.paths) == good and len(s) == 2
    assert s.excluded == {"a_text.jpg": "cannot decode: not an image (text)", "b_cut.png": "truncated or corrupt PNG"}
    assert s.describe()["excluded"] == s.excluded and s.counts == {"png": 1, "jpg": 1}
    assert len(folder_image_set(tmp_path / "imgs", max_images=1)) == 1  # counts images that decode
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    with pytest.raises(InputError, match="no image that decodes"):
        folder_image_set(tmp_path / "bad")


def test_image_set_spec_bounds_are_inclusive():
    for size in ((32, 32), (8192, 8192), (32, 8192)):
        ImageSetSpec(frames=1, crops=0, frame_size=size, seed=0)
    ImageSetSpec(frames=100_000, crops=100_000, frame_size=(64, 36), seed=2**63 - 1)
    ImageSetSpec(frames=0, crops=1, frame_size=(64, 36), seed=0)
    for kwargs, message in (
        ({"frame_size": (31, 32)}, "frame size"),
        ({"frame_size": (32, 8193)}, "frame size"),
        ({"crops": 100_001}, "at most 100000"),
        ({"seed": 2**63}, "seed must be"),
        ({"frames": -1, "crops": 2}, "cannot be negative"),
    ):
        settings = {"frames": 1, "crops": 0, "frame_size": (64, 36), "seed": 0, **kwargs}
        with pytest.raises(InputError, match=message):
            ImageSetSpec(**settings)


def test_each_generated_image_has_its_own_generator_seeded_from_seed_kind_and_index(tmp_path):
    """Frame i and crop i are different draws ((seed, 0, i) and (seed, 1, i)), so no two
    images of a set share a generator; a crop draws its size from its generator first."""
    import numpy as np

    from benchmarks.images import ImageKind, _crop_size, draw_image, encode

    s = generate_image_set(tmp_path, ImageSetSpec(frames=1, crops=2, frame_size=(96, 54), seed=11))
    frame_rng = np.random.default_rng([11, 0, 0])
    assert s.paths[0].read_bytes() == encode(draw_image(frame_rng, 96, 54, ImageKind.FRAME), "png")
    crop_rng = np.random.default_rng([11, 1, 1])
    w, h = _crop_size(crop_rng)
    assert s.paths[2].read_bytes() == encode(draw_image(crop_rng, w, h, ImageKind.CROP), "jpg")


def test_user_folder_records_by_path_under_the_root_and_by_size(tmp_path):
    """Counts by lower-case extension; a file left out is named by its path under the
    folder; the listing digest tells apart two folders whose files differ only in size."""
    import shutil

    generate_image_set(tmp_path / "a" / "sub", ImageSetSpec(frames=0, crops=1, frame_size=(64, 36), seed=0))
    (tmp_path / "a" / "sub" / MANIFEST_NAME).unlink()
    shutil.copy(tmp_path / "a" / "sub" / "crop_00000.png", tmp_path / "a" / "LOUD.PNG")
    (tmp_path / "a" / "sub" / "cut.png").write_bytes(PNG)
    s = folder_image_set(tmp_path / "a")
    assert s.counts == {"png": 2}
    assert s.excluded == {"sub/cut.png": "cannot decode: corrupt or unsupported PNG header"}
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert folder_image_set(tmp_path / "b").listing_sha256() == s.listing_sha256()
    with open(tmp_path / "b" / "LOUD.PNG", "ab") as f:
        f.write(b"trailing bytes")  # still decodes
    assert folder_image_set(tmp_path / "b").listing_sha256() != s.listing_sha256()


def test_a_replacement_stopped_half_way_still_owns_the_earlier_sets_files(tmp_path, monkeypatch):
    """Redrawing a set as a smaller one and stopping before the end leaves the earlier
    set's extra files behind: the folder is still the benchmark's, and the next run
    finishes the new set and removes them."""
    import benchmarks.images as images

    root = tmp_path / "images"
    generate_image_set(root, ImageSetSpec(frames=1, crops=2, frame_size=(64, 36), seed=0))

    def stopped(arr, fmt):
        raise KeyboardInterrupt

    smaller = ImageSetSpec(frames=1, crops=0, frame_size=(64, 36), seed=1)
    monkeypatch.setattr(images, "encode", stopped)
    with pytest.raises(KeyboardInterrupt):
        generate_image_set(root, smaller)
    monkeypatch.undo()
    assert (root / "crop_00001.jpg").is_file()
    s = generate_image_set(root, smaller)
    assert sorted(p.name for p in root.iterdir()) == ["frame_00000.png", MANIFEST_NAME] and len(s) == 1


def test_a_folder_put_where_a_generated_image_was_is_the_users(tmp_path):
    root = tmp_path / "images"
    generate_image_set(root, ImageSetSpec(frames=0, crops=1, frame_size=(64, 36), seed=0))
    (root / "crop_00000.png").unlink()
    (root / "crop_00000.png").mkdir()
    (root / "crop_00000.png" / "mine.png").write_bytes(b"user data")
    with pytest.raises(InputError, match=r"did not generate \(crop_00000.png/\)"):
        generate_image_set(root, ImageSetSpec(frames=0, crops=1, frame_size=(64, 36), seed=0))
    assert (root / "crop_00000.png" / "mine.png").read_bytes() == b"user data"


# -- config and CLI options -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch size"),
        ({"repeats": 0}, "repeats"),
        ({"warmup_batches": -1}, "warm-up"),
        ({"frames": 0, "crops": 0}, "at least one"),
        ({"frame_size": (10, 10)}, "frame size"),
        ({"scenarios": ()}, "no scenario"),
        ({"pipelines": ()}, "no pipeline"),
        ({"workers": -1}, "workers"),
        ({"max_images": 0}, "max images"),
    ],
)
def test_config_rejects_bad_settings(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        BenchConfig(out_dir=tmp_path, **kwargs)


def test_config_tasks_follow_scenarios(tmp_path):
    from engine.specs import Task

    assert BenchConfig(out_dir=tmp_path, scenarios=(Scenario.GENDER,)).tasks == (Task.GENDER,)
    assert BenchConfig(out_dir=tmp_path, scenarios=(Scenario.QUALITY, Scenario.GENDER)).tasks == (Task.GENDER, Task.QUALITY)
    assert BenchConfig(out_dir=tmp_path, scenarios=(Scenario.BOTH,)).tasks == (Task.GENDER, Task.QUALITY)


def test_cli_options_map_to_the_config():
    from benchmarks.suite import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args([]))
    assert cfg.scenarios == tuple(Scenario) and cfg.pipelines == tuple(Pipeline)
    assert cfg.backends == () and cfg.precisions == () and cfg.frame_size == (1920, 1080)
    args = parser.parse_args(
        "--scenario gender --scenario both --scenario gender --pipeline engine --precision fp16 "
        "--frame-size 640x360 --batch-size 4 --repeats 5 --no-plot --no-engine-run --cache-dir /c --out /o".split()
    )
    cfg = config_from_args(args)
    assert cfg.scenarios == (Scenario.GENDER, Scenario.BOTH) and cfg.pipelines == (Pipeline.ENGINE,)
    assert cfg.precisions == (Precision.FP16,) and cfg.frame_size == (640, 360)
    assert (cfg.batch_size, cfg.repeats, cfg.plot, cfg.engine_run_check) == (4, 5, False, False)
    assert cfg.cache_dir == Path("/c") and cfg.out_dir == Path("/o")
    with pytest.raises(SystemExit):
        parser.parse_args(["--frame-size", "big"])
    with pytest.raises(SystemExit):  # "" would be the current folder
        parser.parse_args(["--out", ""])


def test_cli_options_fit_a_parser_that_has_the_common_ones():
    from benchmarks.suite import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--spec-file", type=Path)
    add_arguments(parser, include_common=False)
    cfg = config_from_args(parser.parse_args(["--spec-file", "s.toml"]))
    assert cfg.spec_file == Path("s.toml") and cfg.cache_dir is None


def test_unknown_backend_is_a_user_error_before_any_work(tmp_path):
    from benchmarks.suite import run_bench

    with pytest.raises(InputError, match="unknown benchmark backend 'nope'"):
        run_bench(BenchConfig(out_dir=tmp_path / "out", backends=("nope",)))
    assert not (tmp_path / "out").exists()


def test_backends_that_cannot_run_here_are_recorded_as_skipped_not_dropped(tmp_path):
    from benchmarks.suite import _engine_configs, _Recorder

    def configs(**kwargs):
        cfg = BenchConfig(out_dir=tmp_path, **kwargs)
        rec = _Recorder(cfg, device_memory=False)
        return [c.config_id for c in _engine_configs(cfg, "cpu", rec)], rec.skipped

    ids, skipped = configs(backends=("tensorrt", "onnxruntime"))
    assert ids == ["engine/onnxruntime/cpu/fp32"]
    assert skipped == [{"id": "engine/tensorrt/cuda", "reason": "runs on cuda; this run is on cpu"}]
    ids, skipped = configs(backends=("onnxruntime",), precisions=(Precision.FP16,))
    assert ids == [] and skipped[0]["id"] == "engine/onnxruntime/cpu" and "not the precision asked" in skipped[0]["reason"]
    ids, skipped = configs(precisions=(Precision.INT8,))  # the default set: nothing offers it on the CPU
    assert ids == [] and skipped == [{"id": "engine/*/cpu", "reason": "no engine backend on cpu offers int8"}]
    ids, skipped = configs()
    assert "engine/onnxruntime/cpu/fp32" in ids and skipped == []  # a CPU run does not list the GPU backends


def test_a_bench_that_measures_nothing_is_a_user_error(tmp_path):
    from benchmarks.suite import run_bench

    cfg = BenchConfig(out_dir=tmp_path / "out", frames=1, crops=1, frame_size=(64, 36), pipelines=(Pipeline.ENGINE,),
                      precisions=(Precision.INT8,), scenarios=(Scenario.GENDER,), plot=False, cache_dir=tmp_path / "cache")
    with pytest.raises(InputError, match=r"nothing was measured \(engine/\*/cpu: no engine backend on cpu offers int8\)"):
        run_bench(cfg)
    assert not (tmp_path / "out" / "results.json").exists()
    assert not list(tmp_path.rglob("*.onnx"))  # no model was exported for a run that measures nothing


def test_backend_registry():
    from benchmarks.backends import BACKENDS, find_backend

    names = [e.name for e in BACKENDS]
    assert len(names) == len(set(names)) and "onnxruntime" in names
    ort = find_backend("onnxruntime")
    assert ort.device == "cpu" and ort.runner and ort.unavailable_reason() is None
    assert ort.config_id(Precision.FP32) == "engine/onnxruntime/cpu/fp32"
    cuda = find_backend("onnxruntime-cuda")
    assert cuda.device == "cuda" and (cuda.unavailable_reason() is None or "CUDAExecutionProvider" in cuda.unavailable_reason())


def test_registry_references_resolve_and_gpu_entries_say_why_not_here():
    from benchmarks.backends import BACKENDS, _load, find_backend
    from engine.gpu import cuda_absent_reason

    for entry in BACKENDS:  # a typo in "module:function" fails here, not on a GPU runner
        assert callable(_load(entry.factory)) and (entry.available is None or callable(_load(entry.available)))
        assert (entry.executor is not None) >= (entry.run_backend is not None)
    for name, run_backend in (("torch-cuda", "torch"), ("tensorrt", "tensorrt")):
        entry = find_backend(name)
        assert (entry.device, entry.executor, entry.preprocess_device, entry.run_backend) == ("cuda", "cuda", "gpu", run_backend)
        if cuda_absent_reason() is not None:
            assert entry.unavailable_reason().startswith("no GPU: ")
    assert find_backend("onnxruntime-executor").executor == "host"


def test_import_is_light():
    code = (
        "import sys, benchmarks, benchmarks.suite, benchmarks.compare, benchmarks.backends, benchmarks.plot, "
        "benchmarks.torch_reference, benchmarks.engine_pipeline, benchmarks.__main__\n"
        "heavy = ['torch', 'onnxruntime', 'nvidia.dali', 'matplotlib', 'cv2', 'tensorrt', 'pycuda', 'timm']\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "[]"


# -- measuring --------------------------------------------------------------------------------


def test_throughput_statistics():
    from benchmarks.measure import Throughput, time_repeated

    stats = Throughput(images=10, seconds=(1.0, 0.5, 2.0)).as_dict()["images_per_s"]
    assert (stats["median"], stats["min"], stats["max"]) == (10.0, 5.0, 20.0)
    assert stats["spread_pct"] == pytest.approx(150.0)
    calls = []
    tp = time_repeated(lambda: calls.append(1) or 4, 3)
    assert len(calls) == 3 and tp.images == 4 and len(tp.seconds) == 3
    counts = iter([4, 5])
    with pytest.raises(RuntimeError, match="processed 5 images"):
        time_repeated(lambda: next(counts), 2)


def _sampled_until_above(mb: float):
    """A MemorySampler (10 ms interval) kept open until its peak is above ``mb`` or 10 s
    have passed. The tests' children hold 600 MB (written, so resident and private) and
    are looked for 450 MB above the level before them: PSS moves by tens of MB on its own
    (this process's share of its libraries drops while other processes map them too),
    and on a loaded machine a child's pages were once seen counted only in part for the
    first 50 ms."""
    from benchmarks.measure import MemorySampler

    with MemorySampler(interval_s=0.01) as mem:
        deadline = time.monotonic() + 10
        while mem.peak_host_mb <= mb and time.monotonic() < deadline:
            time.sleep(0.02)
    return mem


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process-tree memory is read from /proc")
def test_memory_sampler_counts_child_processes():
    from benchmarks.measure import sample_host_mb

    base = sample_host_mb()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; b = b'x' * (600 * 2**20); print('ok', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ok"
        mem = _sampled_until_above(base + 450)
        assert mem.peak_host_mb > base + 450
        assert mem.peak_device_mb is None and mem.metric in ("pss_tree", "rss_tree")
        mem.close()  # idempotent
    finally:
        child.kill()
        child.wait()


def test_throughput_mean_and_sample_stdev():
    import statistics

    from benchmarks.measure import Throughput

    stats = Throughput(images=12, seconds=(1.0, 2.0, 4.0)).as_dict()["images_per_s"]  # 12, 6 and 3 images/s
    assert (stats["median"], stats["min"], stats["max"]) == (6.0, 3.0, 12.0)
    assert stats["mean"] == pytest.approx(7.0)
    assert stats["stdev"] == pytest.approx(statistics.stdev([12.0, 6.0, 3.0]))  # the sample stdev, sqrt(21)
    assert stats["stdev"] == pytest.approx(21 ** 0.5)
    assert stats["spread_pct"] == pytest.approx(150.0)


def test_time_repeated_times_each_repetition_on_its_own(monkeypatch):
    from benchmarks import measure

    clock = [1000.0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])
    steps = iter([1.0, 2.0, 4.0])

    def once() -> int:
        clock[0] += next(steps)  # this repetition's duration
        return 8

    tp = measure.time_repeated(once, 3)
    assert tp.seconds == (1.0, 2.0, 4.0)  # not cumulative
    assert tp.rates == [8.0, 4.0, 2.0]


def _samples(values):
    """A stand-in for a memory reading: ``values`` in turn, then the last one again."""
    it = iter(values)
    last = [values[-1]]

    def read(*_):
        last[0] = next(it, last[0])
        return last[0]

    return read


def test_memory_sampler_keeps_the_peak_and_samples_on_close(monkeypatch):
    from benchmarks import measure

    # interval far beyond the test: the samples are the one on opening and the one on closing
    monkeypatch.setattr(measure, "sample_host_mb", _samples([500.0, 100.0]))
    with measure.MemorySampler(interval_s=3600) as mem:
        pass
    assert mem.peak_host_mb == 500.0  # the highest sample, not the last one
    monkeypatch.setattr(measure, "sample_host_mb", _samples([100.0, 700.0]))
    with measure.MemorySampler(interval_s=3600) as mem:
        pass
    assert mem.peak_host_mb == 700.0  # the level when the stage ends counts too


def test_device_memory_is_the_peak_above_the_base_it_is_given(monkeypatch):
    from benchmarks import measure

    mib = 2**20

    readings = [[1500 * mib, 1200 * mib], [1000 * mib, 1500 * mib, 1200 * mib]]

    class FakeNvml:
        def __init__(self):
            self.used_bytes = _samples(readings.pop(0))

        def close(self):
            pass

    monkeypatch.setattr(measure, "_Nvml", FakeNvml)
    monkeypatch.setattr(measure, "sample_host_mb", lambda: 10.0)
    with measure.MemorySampler(interval_s=3600, device=True, device_base_bytes=1000 * mib) as mem:
        pass
    assert mem.peak_device_mb == pytest.approx(500.0)  # peak 1500 MiB above the given 1000 MiB
    with measure.MemorySampler(interval_s=3600, device=True) as mem:  # base: the level on opening
        pass
    assert mem.peak_device_mb == pytest.approx(500.0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process-tree memory is read from /proc")
def test_memory_sampler_counts_grandchild_processes():
    from benchmarks.measure import sample_host_mb

    base = sample_host_mb()
    grandchild = "import sys; b = b'x' * (600 * 2**20); print('ok', flush=True); sys.stdin.read()"
    child = subprocess.Popen(  # a worker that starts workers of its own: its grandchild holds the memory
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ok"
        assert _sampled_until_above(base + 450).peak_host_mb > base + 450
    finally:
        child.stdin.close()  # the grandchild reads end of file and exits, then the child
        child.wait(timeout=30)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process-tree memory is read from /proc")
def test_memory_shared_with_a_forked_worker_counts_once():
    import os

    from benchmarks.measure import host_memory_metric, sample_host_mb

    if host_memory_metric() != "pss_tree":
        pytest.skip("no PSS on this kernel: RSS counts shared pages in every process")
    buffer = bytearray(200 * 2**20)  # written (zeroed): resident, and shared with a forked worker
    before = sample_host_mb()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: waits, touching nothing, until the test closes the pipe
        os.close(write_end)
        os.read(read_end, 1)
        os._exit(0)
    os.close(read_end)
    try:
        time.sleep(0.2)
        after = sample_host_mb()
    finally:
        os.close(write_end)
        os.waitpid(pid, 0)
    assert len(buffer) and after - before < 100  # RSS would count the 200 MiB (and the rest) twice


# -- derived figures --------------------------------------------------------------------------


def test_speedups_and_headline_pair_same_device_figures():
    from benchmarks.derive import compute_headline, compute_speedups

    doc = make_doc(
        {
            (ENGINE, "end_to_end", "gender", None): 40.0,
            (ENGINE, "engine_run", "gender", None): 30.0,
            (REFERENCE, "end_to_end", "gender", None): 10.0,
            ("engine/onnxruntime-cuda/cuda/fp16", "end_to_end", "gender", None): 400.0,
        }
    )
    speedups = compute_speedups(doc["configs"], doc["results"])
    ratios = {(s["config"], s["stage"]): s["ratio"] for s in speedups}
    assert ratios == {(ENGINE, "end_to_end"): pytest.approx(4.0), (ENGINE, "engine_run"): pytest.approx(3.0)}
    (headline,) = compute_headline(doc["configs"], doc["results"])  # no CUDA reference: no CUDA headline
    assert headline["engine_config"] == ENGINE and headline["ratio"] == pytest.approx(4.0)


def test_the_headline_takes_the_fastest_end_to_end_figures():
    from benchmarks.derive import compute_headline

    doc = make_doc(
        {
            (ENGINE, "end_to_end", "gender", None): 40.0,
            (ENGINE, "engine_run", "gender", None): 90.0,  # `engine run` itself: not a pipeline figure
            ("engine/onnxruntime-executor/cpu/fp32", "end_to_end", "gender", None): 60.0,
            (REFERENCE, "end_to_end", "gender", None): 10.0,
            ("reference/torch/cpu/fp16", "end_to_end", "gender", None): 20.0,
        }
    )
    for r in doc["results"]:  # a skewed spread: the mean is not the median
        r["images_per_s"]["mean"] = r["images_per_s"]["median"] * (1.5 if r["config"].startswith("reference") else 1.0)
    (headline,) = compute_headline(doc["configs"], doc["results"])
    assert headline["engine_config"] == "engine/onnxruntime-executor/cpu/fp32"
    assert headline["reference_config"] == "reference/torch/cpu/fp16"
    assert headline["engine_images_per_s"] == pytest.approx(60.0)
    assert headline["reference_images_per_s"] == pytest.approx(20.0)
    assert headline["ratio"] == pytest.approx(3.0)


def test_agreement_pairs_images_by_index_against_the_fp32_reference():
    import numpy as np

    from benchmarks.derive import compute_agreement

    configs = make_doc(
        {
            ("engine/tensorrt/cuda/fp16", "end_to_end", "gender", None): 1.0,
            ("reference/torch/cuda/fp32", "end_to_end", "gender", None): 1.0,
            ("reference/torch/cuda/fp16", "end_to_end", "gender", None): 1.0,
            ("reference/torch/cpu/fp32", "end_to_end", "gender", None): 1.0,
        }
    )["configs"]
    # image 1 failed on the engine side, image 2 on the reference side: images 0, 3 and 4 are compared
    engine = {"gender/alpha": np.array([[0.9, 0.1], [0.5, 0.5], [0.6, 0.4], [0.2, 0.8]])}
    reference = {"gender/alpha": np.array([[0.8, 0.2], [0.0, 1.0], [0.4, 0.6], [0.3, 0.7]]), "other/x": np.ones((4, 2))}
    outputs = {
        ("engine/tensorrt/cuda/fp16", "gender"): (engine, [0, 2, 3, 4]),
        ("reference/torch/cuda/fp32", "gender"): (reference, [0, 1, 3, 4]),
        ("reference/torch/cuda/fp16", "gender"): (reference, [0, 1, 3, 4]),
        ("reference/torch/cpu/fp32", "gender"): (reference, [0, 1, 3, 4]),
    }
    (agree,) = compute_agreement(configs, outputs)  # the fp32 reference on the same device only
    assert (agree["config"], agree["reference"], agree["model"]) == (
        "engine/tensorrt/cuda/fp16", "reference/torch/cuda/fp32", "gender/alpha")
    assert agree["images"] == 3
    assert agree["argmax_agreement"] == pytest.approx(2 / 3)  # image 3: class 0 against class 1
    assert agree["max_abs_dp"] == pytest.approx(0.2)


def test_stored_results_follow_the_schema():
    """RESULTS.md's JSON files stay readable by the current schema and compare."""
    from benchmarks.compare import compare
    from benchmarks.suite import load_results

    stored = sorted((Path(__file__).parents[2] / "benchmarks" / "results").glob("*.json"))
    assert stored, "benchmarks/results/ holds the measured figures"
    docs = [load_results(p) for p in stored]
    for doc in docs:
        assert all(m["weights"] == "random" for m in doc["models"])
    # Runs of the same scenarios and configurations (repeated measurements) compare
    # without a missing figure; other files are other experiments.
    def what(doc):
        return tuple(doc["settings"]["scenarios"]), tuple(sorted(c["id"] for c in doc["configs"]))

    pairs = [(a, b) for i, a in enumerate(docs) for b in docs[i + 1 :] if what(a) == what(b)]
    assert pairs, "the stored results include a repeated run"
    for a, b in pairs:
        result = compare(a, b, ignore_machine=True)
        assert result.findings and not [f for f in result.findings if f.verdict.value == "missing"]


def test_prepared_precision_path_of_the_ort_factories(tmp_path, random_models):
    """FP16 goes through builders.precision (as the CUDA entry does) and still runs; here
    on the CPU provider, since no GPU is at hand."""
    import numpy as np

    from benchmarks.backends import BackendContext, ort_cpu_factory

    model = random_models["gender/alpha"]
    context = BackendContext(threads=1, batch_size=2, work_dir=tmp_path)
    with ort_cpu_factory(model, Precision.FP16, context) as backend:
        out = backend.run(np.zeros((2, 3, 224, 224), np.float32))
    assert out.shape == (2, 2) and np.isfinite(out).all()
    assert list((tmp_path / "prepared").glob("*.fp16.*.onnx"))
    with pytest.raises(InputError, match="calibration images"):
        ort_cpu_factory(model, Precision.INT8, context)


@pytest.mark.parametrize("intruder", ["holiday.jpg", "crop_00000.png", "extra/"])
def test_a_folder_holding_other_files_is_never_written_into(tmp_path, intruder):
    """The generated set's folder is cleaned of what is not part of the set; so it must
    hold nothing but an earlier set. A user's file (even one named like a generated
    image) or subfolder stops the run with one line and is left as it was."""
    root = tmp_path / "images"
    root.mkdir()
    target = root / intruder.rstrip("/")
    if intruder.endswith("/"):
        target.mkdir()
        (target / "mine.png").write_bytes(b"user data")
    else:
        target.write_bytes(b"user data")
    spec = ImageSetSpec(frames=0, crops=1, frame_size=(64, 36), seed=0)
    with pytest.raises(InputError, match=r"holds files the benchmark did not generate \(" + intruder.rstrip("/")):
        generate_image_set(root, spec)
    kept = target / "mine.png" if intruder.endswith("/") else target
    assert kept.read_bytes() == b"user data"
    code = subprocess.run([sys.executable, "-m", "benchmarks", "images", "--out", str(root), "--frames", "0",
                           "--crops", "1"], capture_output=True, text=True, check=False)
    assert code.returncode == 2 and code.stderr.count("\n") == 1 and "did not generate" in code.stderr
    assert kept.read_bytes() == b"user data"


def test_an_earlier_generated_set_is_replaced_file_by_file(tmp_path):
    root = tmp_path / "images"
    generate_image_set(root, ImageSetSpec(frames=1, crops=2, frame_size=(64, 36), seed=0))
    (root / MANIFEST_NAME).write_text("[]")  # not a manifest this suite wrote: the folder is not ours
    with pytest.raises(InputError, match="did not generate"):
        generate_image_set(root, ImageSetSpec(frames=1, crops=0, frame_size=(64, 36), seed=0))


@pytest.mark.parametrize("kwargs, message", [
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"frames": 10**9}, "at most 100000 generated frames"),
    ({"max_images": 5}, "--max-images limits a folder given with --images"),
])
def test_more_bad_settings_are_one_line_errors(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        BenchConfig(out_dir=tmp_path, **kwargs)


def test_an_interrupted_bench_says_so_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import benchmarks.suite as suite

    def interrupted(cfg, **_):
        raise KeyboardInterrupt

    monkeypatch.setattr(suite, "run_bench", interrupted)
    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    assert suite.main(parser.parse_args(["--out", str(tmp_path / "r"), "--frames", "1", "--crops", "0"])) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("benchmark interrupted: this run wrote no ")
    assert "earlier run" not in err  # there is none
    assert not (tmp_path / "r" / "results.json").exists()


def test_an_out_folder_below_a_file_names_the_file(tmp_path):
    from benchmarks.suite import run_bench

    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match=r"--out .*afile/sub: .*afile is a file; the suite writes a folder"):
        run_bench(BenchConfig(out_dir=tmp_path / "afile" / "sub", frames=1, crops=0))


def test_an_unknown_variant_is_refused_even_for_a_model_no_scenario_runs(tmp_path):
    from benchmarks.suite import run_bench
    from engine.errors import SpecError

    with pytest.raises(SpecError, match="unknown quality variant 'bogus'"):
        run_bench(BenchConfig(out_dir=tmp_path / "o", frames=1, crops=0, scenarios=(Scenario.GENDER,),
                              quality_variant="bogus"))
    assert not (tmp_path / "o" / "images").exists()


def test_a_generation_stopped_half_way_leaves_a_folder_the_next_run_takes(tmp_path, monkeypatch):
    import benchmarks.images as images

    root = tmp_path / "images"
    spec = ImageSetSpec(frames=2, crops=1, frame_size=(64, 36), seed=0)
    real, calls = images.encode, []

    def stopping(arr, fmt):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(fmt)
        return real(arr, fmt)

    monkeypatch.setattr(images, "encode", stopping)
    with pytest.raises(KeyboardInterrupt):
        generate_image_set(root, spec)
    assert (root / "frame_00000.png").is_file()
    monkeypatch.setattr(images, "encode", real)
    s = generate_image_set(root, spec)  # its own half-made set: taken over, completed
    assert sorted(p.name for p in root.iterdir()) == sorted([p.name for p in s.paths] + [MANIFEST_NAME])
    assert "complete" not in json.loads((root / MANIFEST_NAME).read_text())


@pytest.mark.parametrize("manifest", ['{"files": {"mydata.bin": "x"}}', '{"notes": "my own manifest"}'])
def test_a_manifest_the_benchmark_did_not_write_is_a_users_file(tmp_path, manifest):
    root = tmp_path / "images"
    root.mkdir()
    (root / MANIFEST_NAME).write_text(manifest)
    if "mydata" in manifest:
        (root / "mydata.bin").write_bytes(b"user data")
    with pytest.raises(InputError, match="did not generate"):
        generate_image_set(root, ImageSetSpec(frames=1, crops=0, frame_size=(64, 36), seed=0))
    assert (root / MANIFEST_NAME).read_text() == manifest
    assert "mydata" not in manifest or (root / "mydata.bin").read_bytes() == b"user data"


def test_the_spec_digest_names_the_work_not_the_notes(tmp_path):
    import dataclasses

    from benchmarks.suite import _model_record
    from engine.specs import SpecRegistry

    spec = SpecRegistry.builtin().get("quality", "head_crop")
    digest = _model_record(spec, None)["spec_sha256"]
    assert _model_record(dataclasses.replace(spec, notes="x", unconfirmed=frozenset()), None)["spec_sha256"] == digest
    other = dataclasses.replace(spec, preprocess=dataclasses.replace(spec.preprocess, size=320))
    assert _model_record(other, None)["spec_sha256"] != digest


def test_a_manifest_write_that_was_killed_does_not_lock_the_folder(tmp_path):
    root = tmp_path / "images"
    spec = ImageSetSpec(frames=1, crops=0, frame_size=(64, 36), seed=0)
    generate_image_set(root, spec)
    (root / f".{MANIFEST_NAME}.k1ll3d.tmp").write_text("{")  # SIGKILL during the atomic write
    generate_image_set(root, ImageSetSpec(frames=1, crops=1, frame_size=(64, 36), seed=0))
    assert sorted(p.name for p in root.iterdir()) == ["crop_00000.png", "frame_00000.png", MANIFEST_NAME]


def test_generator_options_with_a_folder_are_refused_not_ignored(tmp_path):
    from benchmarks.suite import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(InputError, match=r"--frames, --seed shape\(s\) the generated image set; --images"):
        config_from_args(parser.parse_args(["--out", str(tmp_path), "--images", str(tmp_path), "--frames", "5",
                                            "--seed", "1"]))
    cfg = config_from_args(parser.parse_args(["--out", str(tmp_path)]))
    assert (cfg.frames, cfg.crops, cfg.frame_size, cfg.seed) == (32, 32, (1920, 1080), 0)  # the defaults
    assert config_from_args(parser.parse_args(["--out", str(tmp_path), "--images", str(tmp_path)])).images == tmp_path


# -- the suite's bookkeeping ------------------------------------------------------------------


def test_rounds_are_pooled_into_one_figure(tmp_path):
    from benchmarks.suite import _Recorder
    from tests.benchmarks.docs import result

    rec = _Recorder(BenchConfig(out_dir=tmp_path, repeats=3, rounds=2), device_memory=False)
    first = result(ENGINE, "end_to_end", "gender", None, 40.0, peak_host_mb=900.0)
    second = result(ENGINE, "end_to_end", "gender", None, 20.0, peak_host_mb=700.0)
    first.update(peak_host_delta_mb=100.0, peak_device_mb=500.0)
    second.update(peak_host_delta_mb=250.0, peak_device_mb=300.0)
    other = result(REFERENCE, "end_to_end", "gender", None, 10.0)
    rec.results = [first, other, second]
    rec.merge_rounds()
    merged, kept = rec.results
    assert kept == other
    assert merged["seconds"] == pytest.approx(first["seconds"] + second["seconds"], rel=1e-4)
    rates = sorted(16 / s for s in first["seconds"] + second["seconds"])  # 19.6, 20, 20.2, 39.2, 40, 40.4
    stats = merged["images_per_s"]
    assert stats["median"] == pytest.approx((rates[2] + rates[3]) / 2, rel=1e-4)
    assert (stats["min"], stats["max"]) == pytest.approx((rates[0], rates[-1]), rel=1e-4)
    # memory: the highest of the rounds, each figure on its own
    assert (merged["peak_host_mb"], merged["peak_host_delta_mb"], merged["peak_device_mb"]) == (900.0, 250.0, 500.0)


def test_a_stage_is_warmed_up_once_untimed_and_its_memory_counted_from_the_opening(tmp_path, monkeypatch):
    from benchmarks import measure, suite
    from benchmarks.config import Stage

    monkeypatch.setattr(suite, "sample_host_mb", _samples([400.0, 850.0]))  # opening, then any later reading
    monkeypatch.setattr(measure, "sample_host_mb", lambda: 900.0)  # the stage's samples
    clock = [0.0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])
    calls = []
    steps = iter([1.0, 2.0, 4.0])

    def warmup():
        calls.append("warmup")
        clock[0] += 100.0  # slow first batches: allocations, kernel selection

    def once() -> int:
        calls.append("once")
        clock[0] += next(steps)
        return 8

    rec = suite._Recorder(BenchConfig(out_dir=tmp_path, repeats=3, warmup_batches=1), device_memory=False)
    rec.opening(ENGINE)
    record = rec.stage(ENGINE, Stage.PREPROCESS, Scenario.GENDER, None, once, warmup)
    assert calls == ["warmup", "once", "once", "once"]
    assert record["seconds"] == [1.0, 2.0, 4.0]  # the warm-up is not timed
    assert record["images"] == 8 and record["images_per_s"]["median"] == 4.0 and record["images_per_s"]["max"] == 8.0
    assert record["peak_host_mb"] == 900.0 and record["peak_host_delta_mb"] == 500.0  # above the opening level
    calls.clear()
    steps = iter([1.0])
    cold = suite._Recorder(BenchConfig(out_dir=tmp_path, repeats=1, warmup_batches=0), device_memory=False)
    cold.stage(ENGINE, Stage.PREPROCESS, Scenario.GENDER, None, once, warmup)
    assert calls == ["once"]  # --warmup-batches 0: no warm-up


def test_rounds_alternate_the_order_of_the_configurations(tmp_path, monkeypatch):
    from benchmarks import suite

    order = []

    def units(rec, cfg, device, specs, paths, torch_models):
        return [(cid, lambda cid=cid: order.append(cid)) for cid in ("reference/a", "reference/b")]

    monkeypatch.setattr(suite, "_reference_units", units)
    cfg = BenchConfig(out_dir=tmp_path / "out", frames=0, crops=1, frame_size=(64, 36), pipelines=(Pipeline.REFERENCE,),
                      scenarios=(Scenario.GENDER,), device="cpu", rounds=3, plot=False)
    with pytest.raises(InputError, match="nothing was measured"):  # the stand-ins record no figure
        suite.run_bench(cfg)
    assert order == ["reference/a", "reference/b", "reference/b", "reference/a", "reference/a", "reference/b"]


# -- the engine pipeline's loop ---------------------------------------------------------------


def test_read_batches_keeps_an_unreadable_file_in_its_place(tmp_path):
    from benchmarks.engine_pipeline import read_batches

    paths = [tmp_path / f"{i}.bin" for i in range(5)]
    for i, p in enumerate(paths):
        if i != 1:
            p.write_bytes(bytes([i]))
    (tmp_path / "3.bin").unlink()
    (tmp_path / "3.bin").mkdir()  # a folder where a file was listed: unreadable too
    assert list(read_batches(paths, 2)) == [[b"\x00", b""], [b"\x02", b""], [b"\x04"]]


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-executor"])
def test_engine_end_to_end_counts_every_file_and_indexes_the_good_ones(tmp_path, backend):
    """Five files in batches of two, one missing and one that does not decode: all five
    are handled, and the probabilities of the three good ones come back with their own
    indices: the softmax of what ONNX Runtime itself gives for those images' views."""
    import numpy as np
    import onnxruntime as ort

    from engine.postprocess import softmax

    from benchmarks.backends import BackendContext, find_backend
    from benchmarks.engine_pipeline import EngineConfig, handled, open_pipeline
    from engine.models import ModelSource, resolve_model
    from engine.specs import SpecRegistry
    from tests.model_fixtures import make_tiny_classifier

    spec = ImageSetSpec(frames=0, crops=3, frame_size=(64, 36), seed=0)
    good = list(generate_image_set(tmp_path / "imgs", spec).paths)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    paths = [good[0], tmp_path / "missing.png", good[1], tmp_path / "bad.jpg", good[2]]
    tiny = make_tiny_classifier(tmp_path / "tiny.onnx", size=224, classes=2, metadata={"engine.output_kind": "logits"})
    model = resolve_model(SpecRegistry.builtin().get("gender", "alpha"), ModelSource(onnx=tiny), tmp_path / "cache")
    context = BackendContext(threads=1, batch_size=2, work_dir=tmp_path / "work")
    config = EngineConfig(find_backend(backend), Precision.FP32)
    with open_pipeline(config, {"gender/alpha": model}, context) as pipe:
        results = list(pipe.preprocess(paths, ["gender/alpha"]))
        assert [handled(r) for r in results] == [2, 2, 1]
        assert len(list(pipe.preprocess(paths, ["gender/alpha"], limit=1))) == 1
        images, probs, ok = pipe.end_to_end(paths, ["gender/alpha"])
        assert (images, ok) == (5, [0, 2, 4])
        views = np.concatenate([r.views["gender/alpha"] for r in results])
        expected = softmax(ort.InferenceSession(str(tiny), providers=["CPUExecutionProvider"]).run(None, {"input": views})[0])
        assert probs["gender/alpha"].shape == (3, 2)
        np.testing.assert_allclose(probs["gender/alpha"], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pipe.infer("gender/alpha", views[:2]), expected[:2], rtol=1e-5, atol=1e-6)
        assert pipe.end_to_end(paths, ["gender/alpha"], limit=1)[0] == 2


def test_registry_configurations_per_device_and_precision():
    """Which configurations the suite can measure: a backend or precision dropped from
    (or added to) the registry changes the results' config list, so it is pinned here."""
    from benchmarks.backends import BACKENDS

    table = {e.name: (e.device, e.precisions, e.runner, e.executor, e.preprocess_device) for e in BACKENDS}
    assert table == {
        "onnxruntime": ("cpu", (Precision.FP32,), True, None, "cpu"),
        "onnxruntime-cuda": ("cuda", (Precision.FP32, Precision.FP16), False, None, "cpu"),
        "onnxruntime-executor": ("cpu", (Precision.FP32,), False, "host", "cpu"),
        "torch-cuda": ("cuda", (Precision.FP32, Precision.FP16), True, "cuda", "gpu"),
        "tensorrt": ("cuda", (Precision.FP16, Precision.INT8, Precision.FP32), True, "cuda", "gpu"),
    }


def test_find_backend_takes_the_exact_name_only():
    from benchmarks.backends import find_backend

    assert find_backend("onnxruntime").name == "onnxruntime"
    with pytest.raises(InputError, match=r"unknown benchmark backend 'onnx'.*known: onnxruntime, onnxruntime-cuda"):
        find_backend("onnx")


def test_ort_cuda_is_unavailable_exactly_when_onnxruntime_lacks_its_provider():
    import onnxruntime as ort

    from benchmarks.backends import ort_cuda_unavailable

    reason = ort_cuda_unavailable()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert reason is None
    else:
        assert reason is not None and "CUDAExecutionProvider" in reason


def test_the_ort_factories_prepare_the_graph_the_way_onnx_runtime_runs_it(monkeypatch, tmp_path):
    """What ``_prepared_onnx`` asks builders.precision for: FP32 as it is; FP16 without
    the calibration set (it is INT8's); INT8 with it, FP32 in its unquantised layers,
    calibrating at most 8 images at a time, with the model's own output kind and hash."""
    from types import SimpleNamespace

    import builders.precision

    from benchmarks.backends import BackendContext, _prepared_onnx
    from engine.specs import OutputKind, SpecRegistry

    calls = []

    def prepare(onnx, spec, precision, calib, out_dir, **kwargs):
        calls.append((precision, calib, out_dir, kwargs))
        return SimpleNamespace(path=tmp_path / f"prepared.{precision}.onnx")

    monkeypatch.setattr(builders.precision, "prepare", prepare)
    spec = SpecRegistry.builtin().get("gender", "alpha")
    model = SimpleNamespace(onnx_path=tmp_path / "m.onnx", spec=spec, output_kind=OutputKind.LOGITS, source_sha256="ab" * 32)
    images = (tmp_path / "a.png", tmp_path / "b.png")
    context = BackendContext(threads=1, batch_size=32, work_dir=tmp_path / "work", calibration_images=images)
    assert _prepared_onnx(model, Precision.FP32, context) == model.onnx_path and calls == []
    assert _prepared_onnx(model, Precision.FP16, context) == tmp_path / "prepared.fp16.onnx"
    assert _prepared_onnx(model, Precision.INT8, context) == tmp_path / "prepared.int8.onnx"
    expected = {"fp16_in_int8": False, "batch_size": 8, "output_kind": OutputKind.LOGITS, "source_sha256": "ab" * 32}
    assert calls == [("fp16", None, tmp_path / "work" / "prepared", expected),
                     ("int8", images, tmp_path / "work" / "prepared", expected)]
    _prepared_onnx(model, Precision.INT8, BackendContext(threads=1, batch_size=3, work_dir=tmp_path, calibration_images=images))
    assert calls[-1][3]["batch_size"] == 3


def test_the_cpu_factory_runs_on_the_threads_it_is_given(tmp_path):
    from benchmarks.backends import BackendContext, ort_cpu_factory
    from engine.models import ModelSource, resolve_model
    from engine.specs import SpecRegistry
    from tests.model_fixtures import make_tiny_classifier

    tiny = make_tiny_classifier(tmp_path / "tiny.onnx", size=224, classes=2, metadata={"engine.output_kind": "logits"})
    model = resolve_model(SpecRegistry.builtin().get("gender", "alpha"), ModelSource(onnx=tiny), tmp_path / "cache")
    with ort_cpu_factory(model, Precision.FP32, BackendContext(threads=3, batch_size=2, work_dir=tmp_path)) as backend:
        assert backend._session.get_session_options().intra_op_num_threads == 3


def test_report_lines_and_summary_show_every_part_of_the_document():
    from benchmarks.report import headline_lines, markdown_summary

    doc = make_doc(gpu="NVIDIA H200")
    doc["machine"]["load_average"] = [1.25, 1.0, 1.0]
    doc["headline"] = [{"scenario": "gender", "device": "cuda", "engine_images_per_s": 400.0, "engine_config": ENGINE,
                        "reference_images_per_s": 100.0, "reference_config": REFERENCE, "ratio": 4.0}]
    doc["skipped"] = [{"id": "engine/tensorrt/cuda/int8", "reason": "no calibration images"}]
    doc["speedups"] = [{"config": ENGINE, "reference": REFERENCE, "stage": "engine_run", "scenario": "gender", "model": None, "ratio": 2.5},
                       {"config": ENGINE, "reference": REFERENCE, "stage": "inference", "scenario": None, "model": "gender/alpha", "ratio": 3.0}]
    doc["agreement"] = [{"config": ENGINE, "reference": REFERENCE, "scenario": "gender", "model": "gender/alpha", "images": 16,
                         "argmax_agreement": 0.9375, "max_abs_dp": 0.00125}]
    doc["notes"] = ["a note for the reader"]
    doc["outputs"]["plot"] = "/tmp/x/plot.png"
    lines = headline_lines(doc)
    assert lines[0] == "device: NVIDIA H200 (driver 1.0), host Test CPU, 2 usable cores, load 1.2 at start"
    assert f"  gender end to end on cuda: engine 400.00 images/s ({ENGINE}) vs reference 100.00 ({REFERENCE}): x4.00" in lines
    assert "skipped engine/tensorrt/cuda/int8: no calibration images" in lines
    assert lines[-1] == "results: /tmp/x/results.json, plot: /tmp/x/plot.png"
    doc["outputs"]["plot"] = None
    assert headline_lines(doc)[-1] == "results: /tmp/x/results.json (no plot: test)"
    md = markdown_summary(doc)
    assert md.startswith("### 2026-01-01 - NVIDIA H200 (driver 1.0), host Test CPU")
    assert f"| gender | cuda | 400.00 ({ENGINE}) | 100.00 ({REFERENCE}) | **x4.00** |" in md
    r = next(r for r in doc["results"] if r["config"] == ENGINE and r["stage"] == "inference")
    s = r["images_per_s"]
    assert f"| {ENGINE} | inference | gender/alpha | {s['median']:.2f} | {s['min']:.2f}-{s['max']:.2f} |" in md
    assert f"| {ENGINE} | {REFERENCE} | engine_run vs the reference's end_to_end | gender | x2.50 |" in md
    assert f"| {ENGINE} | {REFERENCE} | inference | gender/alpha | x3.00 |" in md
    assert f"| {ENGINE} | {REFERENCE} | gender | gender/alpha | 16 | 93.8% | 1.25e-03 |" in md
    assert "- skipped engine/tensorrt/cuda/int8: no calibration images" in md and "- a note for the reader" in md
    doc["machine"]["gpu"] = None
    assert headline_lines(doc)[0].startswith("device: CPU only: Test CPU")


@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": 1025}, "batch size"), ({"rounds": 21}, "rounds"), ({"threads": 0}, "threads"),
    ({"threads": 1025}, "threads"), ({"device": "gpu"}, "device must be auto, cpu or cuda"),
])
def test_config_bounds_are_enforced_at_both_ends(tmp_path, kwargs, message):
    from benchmarks.config import BenchConfig
    from engine.errors import InputError

    with pytest.raises(InputError, match=message):
        BenchConfig(out_dir=tmp_path, **kwargs)
    edge = {"batch_size": 1024, "rounds": 20, "threads": 1024 if kwargs.get("threads") == 1025 else 1, "device": "cuda"}
    key = next(iter(kwargs))
    assert getattr(BenchConfig(out_dir=tmp_path, **{key: edge[key]}), key) == edge[key]


def test_config_effective_threads_and_workers(tmp_path):
    import os

    from benchmarks.config import BenchConfig

    cpus = len(os.sched_getaffinity(0))
    assert BenchConfig(out_dir=tmp_path, threads=3).effective_threads == 3
    assert BenchConfig(out_dir=tmp_path).effective_threads == cpus
    assert BenchConfig(out_dir=tmp_path, workers=0).effective_workers == 0
    assert BenchConfig(out_dir=tmp_path).effective_workers == min(16, cpus)
