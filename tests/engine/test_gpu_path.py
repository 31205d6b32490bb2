"""`engine run` path choice (--device auto|cpu|gpu), the `engine build` command it
prints for missing engines, the run-time engine lookup, and the streamed loop of the
GPU path run for real on the executor's host device (ONNX Runtime behind HostBackend,
DALI on the CPU) against the CPU path's rows.

What needs a GPU (the same loop on CudaDevice with DALI on the GPU and TensorRT or
PyTorch) is in test_gpu_backends.py / the gpu_check kit under the ``gpu`` marker."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from builders.manifest import BuildTarget, EngineCache, Manifest, ShapeRange, onnx_sha256
from builders.onnx_io import inspect_onnx
from builders.trt_build import DEFAULT_CONTEXTS
from engine.cli import main
from engine.errors import EngineError
from engine.executor import MIN_DEPTH, ExecutorConfig, HostBackend, StreamedExecutor
from engine.gpu import cuda_absent_reason
from engine.gpu_path import build_command, find_engines, plan_path, torch_backend_problem
from engine.models import ModelSource
from engine.runner import ModelChoice, RunConfig, execute, resolve_models, run
from engine.specs import SpecRegistry, Task
from engine.streamed_run import HostProducer, StreamedInference

no_gpu = pytest.mark.skipif(cuda_absent_reason() is None, reason="checks the behaviour on a machine without a GPU")

GENDER_KEY = "gender/alpha"
H100 = BuildTarget("NVIDIA H100 80GB HBM3", "9.0", "11.4.0.1")


def _config(tmp_path: Path, *, tasks=(Task.GENDER, Task.QUALITY), source=None, **changes) -> RunConfig:
    source = source or ModelSource(random_weights=True, download=False)
    base = RunConfig(
        input=tmp_path, out=tmp_path / "out.parquet", models=tuple(ModelChoice(t, None, source) for t in tasks),
        cache_dir=tmp_path / "cache", progress=False,
    )
    return dataclasses.replace(base, **changes)


# --------------------------------------------------------------------------- choice


@no_gpu
def test_auto_takes_the_cpu_path_and_says_why(tmp_path):
    plan = plan_path(_config(tmp_path), [])
    assert plan.device == "cpu" and plan.precision == "fp32"
    assert "no GPU: no NVIDIA driver" in plan.reason
    assert plan.describe().startswith("CPU path (DALI on the CPU, ONNX Runtime, fp32)")
    assert plan_path(_config(tmp_path, precision="int8"), []).precision == "int8"


@no_gpu
def test_device_gpu_refuses_in_one_line(tmp_path):
    for backend in ("tensorrt", "torch"):
        with pytest.raises(EngineError, match=r"^--device gpu: no GPU: no NVIDIA driver") as info:
            plan_path(_config(tmp_path, device="gpu", gpu_backend=backend), [])
        assert "\n" not in str(info.value)


def test_device_cpu_never_looks_and_bad_values_are_refused(tmp_path):
    plan = plan_path(_config(tmp_path, device="cpu"), [])
    assert (plan.device, plan.reason, plan.precision) == ("cpu", "--device cpu", "fp32")
    with pytest.raises(EngineError, match="--device must be one of auto, cpu, gpu"):
        plan_path(_config(tmp_path, device="tpu"), [])
    with pytest.raises(EngineError, match="--gpu-backend must be one of tensorrt, torch"):
        plan_path(_config(tmp_path, gpu_backend="onnx"), [])


def test_torch_backend_needs_pytorch_weights_and_fp32_or_fp16(tmp_path, random_models):
    gender = random_models["gender/alpha"]
    random = ModelChoice(Task.GENDER, None, ModelSource(random_weights=True))
    published = ModelChoice(Task.GENDER, None, ModelSource())
    assert torch_backend_problem([gender], [random], "fp16") is None
    assert "runs fp32 or fp16, not int8" in torch_backend_problem([gender], [random], "int8")
    assert "needs --gender-checkpoint or --random-weights" in torch_backend_problem([gender], [published], "fp32")


@no_gpu
def test_cli_prints_the_path_and_refuses_device_gpu(tmp_path, capsys, random_models, model_cache_dir):
    random_models["gender/alpha"]
    img = tmp_path / "in" / "a.png"
    img.parent.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(img)
    common = ["run", str(img.parent), "--only", "gender", "--random-weights", "--no-download",
              "--cache-dir", str(model_cache_dir), "--no-progress", "--out", str(tmp_path / "o.parquet")]
    assert main(common + ["--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "engine: error: --device gpu: no GPU" in err and not (tmp_path / "o.parquet").exists()
    assert main(common) == 0
    captured = capsys.readouterr()
    assert "engine: CPU path (DALI on the CPU, ONNX Runtime, fp32): the GPU path is not available: no GPU" in captured.err
    assert "path: CPU path" in captured.out
    assert pl.read_parquet(tmp_path / "o.parquet").height == 1


# --------------------------------------------------------------------------- engines


def test_build_command_reproduces_the_run_models(tmp_path):
    ckpt, onnx_file = tmp_path / "q.safetensors", tmp_path / "my gender.onnx"
    config = _config(
        tmp_path,
        source=ModelSource(),
        models=(ModelChoice(Task.GENDER, "alpha", ModelSource(onnx=onnx_file, download=False)),
                ModelChoice(Task.QUALITY, "head_crop", ModelSource(checkpoint=ckpt))),
        batch_size=512,
        spec_file=tmp_path / "specs.toml",
        calib_dir=tmp_path / "frames",
    )
    registry = SpecRegistry.builtin()
    specs = [registry.get(c.task, c.variant) for c in config.models]
    both = shlex.split(build_command(config, list(zip(config.models, specs)), "int8"))
    assert both[:4] == ["engine", "build", "--precision", "int8"] and "--only" not in both
    pairs = {both[i]: both[i + 1] for i in range(4, len(both) - 1) if both[i].startswith("--") and not both[i + 1].startswith("--")}
    assert pairs["--gender-variant"] == "alpha" and pairs["--gender-onnx"] == str(onnx_file)
    assert pairs["--quality-variant"] == "head_crop" and pairs["--quality-checkpoint"] == str(ckpt)
    # batch 512 is outside both default profiles (resnet18 1..256, caformer 1..64)
    assert pairs["--gender-profile"] == "1,512,512" and pairs["--quality-profile"] == "1,512,512"
    assert pairs["--calib"] == str(tmp_path / "frames") and pairs["--spec-file"] == str(tmp_path / "specs.toml")
    assert pairs["--cache-dir"] == str(tmp_path / "cache") and "--no-download" in both

    one = shlex.split(build_command(dataclasses.replace(config, batch_size=32), [(config.models[1], specs[1])], "fp16"))
    assert one[one.index("--only") + 1] == "quality" and "--gender-onnx" not in one
    assert "--quality-profile" not in one and "--calib" not in one and "--random-weights" not in one
    random = _config(tmp_path).models
    assert "--random-weights" in build_command(_config(tmp_path), list(zip(random, specs)), "fp16")


def _tiny_onnx(path: Path, size: int, classes: int) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("Slice", ["flat", "s", "e", "a"], ["output"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", classes])],
        [helper.make_tensor("s", TensorProto.INT64, [1], [0]), helper.make_tensor("e", TensorProto.INT64, [1], [classes]),
         helper.make_tensor("a", TensorProto.INT64, [1], [1])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _store_engine(cache_dir: Path, model: str, source: Path, precision: str, target: BuildTarget, size: int,
                  contexts: int = DEFAULT_CONTEXTS):
    shape = (3, size, size)
    manifest = Manifest(
        model=model, onnx_sha256="c" * 64, precision=precision,
        profile=(ShapeRange("input", (1, *shape), (32, *shape), (64, *shape)),),
        target=target, builder_optimization_level=3, workspace_bytes=4 << 30, contexts=contexts,
        source_onnx_sha256=onnx_sha256(source), built_at="2026-11-25T00:00:00+00:00",
    )
    # Bytes standing in for a serialised engine: this tests the cache bookkeeping only.
    return EngineCache(cache_dir / "engines").store(b"not-an-engine:" + model.encode(), manifest)


def test_find_engines_for_a_run_or_the_command_that_builds_them(tmp_path):
    registry = SpecRegistry.builtin()
    config = _config(tmp_path, source=ModelSource(download=False))
    g_onnx, q_onnx = _tiny_onnx(tmp_path / "g.onnx", 224, 2), _tiny_onnx(tmp_path / "q.onnx", 384, 4)

    class _Resolved:  # what find_engines reads of a ResolvedModel
        def __init__(self, spec, path):
            self.spec, self.onnx_path, self.source_sha256 = spec, path, onnx_sha256(path)
            self.info = inspect_onnx(path)

    models = [_Resolved(registry.get(Task.GENDER), g_onnx), _Resolved(registry.get(Task.QUALITY), q_onnx)]
    g_key, q_key = models[0].spec.key, models[1].spec.key

    found, problem = find_engines(models, config.models, config, "fp16", H100)
    assert found == {} and problem.startswith(f"no TensorRT engine for {g_key}, {q_key} at fp16 for NVIDIA H100")
    assert "build it with: engine build --precision fp16 --no-download --cache-dir" in problem

    g_entry = _store_engine(config.cache_dir, g_key, g_onnx, "fp16", H100, 224)
    found, problem = find_engines(models, config.models, config, "fp16", H100)
    assert list(found) == [g_key] and found[g_key].engine_path == g_entry.engine_path
    assert f"no TensorRT engine for {q_key} at fp16" in problem and "--only quality" in problem

    # An engine of the quality model built from another ONNX is passed over, with the reason.
    _store_engine(config.cache_dir, q_key, g_onnx, "fp16", H100, 384)
    _, problem = find_engines(models, config.models, config, "fp16", H100)
    assert "passed over:" in problem and "built from another ONNX" in problem
    # So is one with fewer optimisation profiles than the executor's ring has slots.
    _store_engine(config.cache_dir, q_key, q_onnx, "fp16", H100, 384, contexts=MIN_DEPTH - 1)
    _, problem = find_engines(models, config.models, config, "fp16", H100)
    assert f"built for {MIN_DEPTH - 1} concurrent execution context(s)" in problem and f"needs {MIN_DEPTH}" in problem

    q_entry = _store_engine(config.cache_dir, q_key, q_onnx, "fp16", H100, 384)
    found, problem = find_engines(models, config.models, config, "fp16", H100)
    assert problem is None and found[q_key].engine_path == q_entry.engine_path
    # ...but not at another precision, nor on another GPU.
    assert find_engines(models, config.models, config, "int8", H100)[1] is not None
    other = BuildTarget("NVIDIA A100-SXM4-80GB", "8.0", "11.4.0.1")
    _, problem = find_engines(models, config.models, config, "fp16", other)
    assert "GPU: engine built on 'NVIDIA H100 80GB HBM3', this is 'NVIDIA A100-SXM4-80GB'" in problem


def test_plan_path_takes_the_gpu_path_when_nothing_is_missing(tmp_path, monkeypatch):
    import engine.gpu_path as gp

    monkeypatch.setattr(gp, "gpu_prerequisites", lambda *a, **k: ({"gender/alpha": "its engine"}, None))
    auto = plan_path(_config(tmp_path), [])
    assert (auto.device, auto.precision, auto.gpu_backend) == ("gpu", "fp16", "tensorrt")
    assert auto.engines == {"gender/alpha": "its engine"}
    assert auto.reason == "a GPU, the GPU packages and the engines are here"
    asked = plan_path(_config(tmp_path, device="gpu", precision="int8", gpu_backend="torch"), [])
    assert (asked.device, asked.reason, asked.precision, asked.gpu_backend) == ("gpu", "--device gpu", "int8", "torch")
    assert asked.describe().startswith("GPU path (DALI on the GPU, streamed executor, PyTorch on CUDA, int8)")


def test_gpu_prerequisites_check_the_torch_weights_and_add_the_callers_hint(monkeypatch):
    from types import SimpleNamespace

    import engine.gpu_path as gp
    from engine.gpu_path import gpu_prerequisites

    monkeypatch.setattr(gp, "gpu_problem", lambda backend, device_id=0, *, dali=True: None)
    model = SimpleNamespace(spec=SpecRegistry.builtin().get(Task.GENDER))
    published = ModelChoice(Task.GENDER, None, ModelSource())
    random = ModelChoice(Task.GENDER, None, ModelSource(random_weights=True))

    def no_engines(target):
        raise AssertionError("the torch backend looks for no engine")

    engines, problem = gpu_prerequisites([model], [published], "fp16", "torch", no_engines, " (pass --weights)")
    assert engines == {} and "needs --gender-checkpoint or --random-weights" in problem
    assert problem.endswith("TensorRT runs ONNX (pass --weights)")
    assert gpu_prerequisites([model], [random], "fp16", "torch", no_engines) == ({}, None)


def test_gpu_problem_says_when_torch_sees_no_cuda_device(monkeypatch):
    torch = pytest.importorskip("torch")
    import engine.gpu
    import engine.gpu_path as gp

    monkeypatch.setattr(engine.gpu, "cuda_absent_reason", lambda device_id=0: None)
    monkeypatch.setattr(gp, "_missing_module", lambda module: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gp.gpu_problem("torch") == "PyTorch sees no CUDA device (a CPU-only torch build?)"
    assert gp.gpu_problem("tensorrt") is None  # TensorRT's path does not ask torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gp.gpu_problem("torch") is None


def test_view_dtype_is_the_one_input_dtype_every_model_takes():
    from types import SimpleNamespace

    from engine.backends.base import TensorDecl
    from engine.gpu_path import view_dtype

    def backend(dtype):
        return SimpleNamespace(inputs=(TensorDecl("input", (None, 3, 8, 8), np.dtype(dtype)),))

    assert view_dtype({"a": backend(np.float16), "b": backend(np.float16)}) == np.float16
    assert view_dtype({"a": backend(np.float32)}) == np.float32
    with pytest.raises(EngineError, match="different input dtypes"):
        view_dtype({"a": backend(np.float32), "b": backend(np.float16)})
    with pytest.raises(EngineError, match="take int8 input; DALI writes float32 or float16"):
        view_dtype({"a": backend(np.int8)})


def test_build_command_profile_bounds_calibration_and_random_weights(tmp_path):
    registry = SpecRegistry.builtin()
    config = _config(tmp_path, tasks=(Task.GENDER,))
    gender = registry.get(Task.GENDER)
    from builders.trt_build import default_profile

    top = default_profile(gender).max  # resnet18: 1..256
    for batch, asked in ((top, False), (top + 1, True), (1, False)):
        run = dataclasses.replace(config, batch_size=batch)
        cmd = shlex.split(build_command(run, [(config.models[0], gender)], "fp16"))
        assert ("--gender-profile" in cmd) == asked, batch
    int8 = shlex.split(build_command(dataclasses.replace(config, calib_count=16), [(config.models[0], gender)], "int8"))
    assert int8[int8.index("--calib") + 1] == "DIR_OF_TYPICAL_FRAMES" and int8[int8.index("--calib-count") + 1] == "16"
    # one model on random weights, the other from its checkpoint: the build needs --random-weights
    mixed = (ModelChoice(Task.GENDER, None, ModelSource(random_weights=True)),
             ModelChoice(Task.QUALITY, None, ModelSource(checkpoint=tmp_path / "q.safetensors")))
    specs = [registry.get(c.task) for c in mixed]
    cmd = shlex.split(build_command(dataclasses.replace(config, models=mixed), list(zip(mixed, specs)), "fp16"))
    assert "--random-weights" in cmd and "--no-download" not in cmd


def test_a_fixed_batch_model_passes_over_an_engine_of_other_batch_sizes(tmp_path):
    from types import SimpleNamespace

    from engine.gpu_path import lookup_engines

    onnx = _tiny_onnx(tmp_path / "g.onnx", 224, 2)
    spec = SpecRegistry.builtin().get(Task.GENDER)

    def model(fixed):
        return SimpleNamespace(spec=spec, source_sha256=onnx_sha256(onnx),
                               info=SimpleNamespace(input=SimpleNamespace(fixed_batch=fixed)))

    _store_engine(tmp_path, spec.key, onnx, "fp16", H100, 224)  # batch profile 1..64
    found, problem = lookup_engines([model(None)], "fp16", H100, tmp_path, 16)
    assert problem is None and list(found) == [spec.key]
    found, problem = lookup_engines([model(1)], "fp16", H100, tmp_path, 16)
    assert found == {} and "is not the fixed batch 1" in problem


def test_every_missing_models_passed_over_engines_are_named(tmp_path):
    from types import SimpleNamespace

    from engine.gpu_path import lookup_engines

    registry = SpecRegistry.builtin()
    g_onnx, q_onnx = _tiny_onnx(tmp_path / "g.onnx", 224, 2), _tiny_onnx(tmp_path / "q.onnx", 384, 4)
    models = [SimpleNamespace(spec=registry.get(t), source_sha256=onnx_sha256(o),
                              info=SimpleNamespace(input=SimpleNamespace(fixed_batch=None)))
              for t, o in ((Task.GENDER, g_onnx), (Task.QUALITY, q_onnx))]
    g = _store_engine(tmp_path, models[0].spec.key, q_onnx, "fp16", H100, 224)  # each from the other's ONNX
    q = _store_engine(tmp_path, models[1].spec.key, g_onnx, "fp16", H100, 384)
    _, problem = lookup_engines(models, "fp16", H100, tmp_path, 16)
    assert f"{g.engine_path.name}: built from another ONNX" in problem
    assert f"{q.engine_path.name}: built from another ONNX" in problem


# --------------------------------------------------------------------------- the streamed loop


def _streamed_host(models, config):
    """The GPU path's inference on the host device: the same StreamedInference loop,
    HostDevice + ONNX Runtime behind HostBackend + DALI on the CPU."""
    from engine.backends.onnxruntime import OrtBackend
    from engine.preprocess.dali_pipeline import DaliPreprocessor

    def open_inference(stack):
        backends = {
            m.spec.key: HostBackend(stack.enter_context(OrtBackend(m.onnx_path, m.info.input, m.info.output, threads=1)))
            for m in models
        }
        pre = stack.enter_context(DaliPreprocessor([(m.spec.key, m.spec.preprocess) for m in models],
                                                   max_batch=config.batch_size, num_threads=1))
        executor = stack.enter_context(StreamedExecutor(backends, "host", ExecutorConfig(config.batch_size)))
        return StreamedInference(models, executor, HostProducer(pre), backend="host executor")

    return open_inference


def test_streamed_loop_gives_the_cpu_path_rows(mixed_folder, tmp_path, random_models, model_cache_dir):
    from engine.discovery import iter_images

    for key in random_models:
        random_models[key]
    config = _config(mixed_folder, cache_dir=model_cache_dir, batch_size=3, device="cpu",
                     out=tmp_path / "cpu.parquet")
    cpu = run(config)
    streamed_config = dataclasses.replace(config, out=tmp_path / "streamed.parquet")
    models = resolve_models(streamed_config)
    summary = execute(streamed_config, iter_images(mixed_folder), models, "fp32", "test: streamed on host",
                      _streamed_host(models, streamed_config))
    assert (summary.images, summary.errors) == (cpu.images, cpu.errors) == (7, 3)
    # Two batches went through each model's lanes (the all-bad one did not), the last
    # one partial and padded through the captured "graph".
    assert len(summary.details) == 2 and all("2 batches (2 as graphs, 1 padded)" in d for d in summary.details)

    a, b = pl.read_parquet(config.out), pl.read_parquet(streamed_config.out)
    assert a["path"].to_list() == b["path"].to_list()  # same order: error-only batch kept in place
    assert [Path(p).name for p in a["path"]] == ["a1.png", "a2.png", "a3.jpg", "b1.png", "b2.jpg", "b3.png", "c1.png"]
    assert a["error"].to_list() == b["error"].to_list()
    assert a.select("width", "height").equals(b.select("width", "height"))
    probs = [c for c in a.columns if "_p_" in c]
    np.testing.assert_allclose(b.select(probs).to_numpy(), a.select(probs).to_numpy(), atol=1e-5, equal_nan=True)
    assert a["gender_label"].to_list() == b["gender_label"].to_list()
    assert a["quality_label"].to_list() == b["quality_label"].to_list()


@pytest.mark.parametrize("outlive", [True, False, None])
def test_streamed_loop_waits_for_the_copies_after_the_next_run_only_where_outputs_outlive_it(outlive, monkeypatch):
    """With DALI's dynamic executor (outputs valid while referenced) the producer runs on
    batch k+1 before the host waits for the copies out of batch k, so DALI's host work
    overlaps the GPU's; a producer that reuses its buffers is waited for first, and so is
    one that does not say (None: a plain function, without outputs_outlive_next_call)."""
    import engine.executor as executor_module
    from types import SimpleNamespace

    from engine.specs import OutputKind
    from tests.engine.test_executor_cpu import NumpyModel

    log: list[str] = []
    real_sync = executor_module.Consumed.synchronize
    monkeypatch.setattr(executor_module.Consumed, "synchronize", lambda self: (log.append("wait"), real_sync(self)))

    def produce(payload):
        log.append(f"produce {len(log)}")
        return _host_batch({"gender/alpha": np.random.default_rng(len(log)).standard_normal(
            (len(payload), 3, 8, 8)).astype(np.float32)})

    class Producer:
        outputs_outlive_next_call = outlive
        __call__ = staticmethod(produce)

    model = SimpleNamespace(spec=SpecRegistry.builtin().get(Task.GENDER), output_kind=OutputKind.LOGITS)
    read = [SimpleNamespace(payload=[b"x"] * 2) for _ in range(3)]
    with StreamedExecutor({"gender/alpha": HostBackend(NumpyModel(size=8, classes=2))}, "host",
                          ExecutorConfig(2)) as executor:
        producer = produce if outlive is None else Producer()
        got = list(StreamedInference([model], executor, producer).batches(iter(read)))
    assert len(got) == 3 and all(len(outputs["gender/alpha"].labels) == 2 for _, outputs in got)
    steps = [s.split()[0] for s in log]
    if outlive:
        assert steps == ["produce", "produce", "wait", "produce", "wait", "wait"]
    else:
        assert steps == ["produce", "wait", "produce", "wait", "produce", "wait"]


def test_a_submission_failing_part_way_waits_for_the_copies_it_queued(monkeypatch):
    """Model a's copy out of the producer's buffer is queued behind the producer's
    stream (DALI still working) when model b fails to queue: the error reaches the
    loop only once that copy is done, so the buffers the loop then drops are no longer
    read."""
    import threading
    from types import SimpleNamespace

    from engine.executor import HostStream
    from engine.specs import OutputKind
    from tests.engine.test_executor_cpu import NumpyModel

    registry = SpecRegistry.builtin()
    g, q = registry.get(Task.GENDER), registry.get(Task.QUALITY)

    class Refuses(HostBackend):
        armed = False

        def enqueue(self, slot, batch_size, stream):
            if self.armed:
                raise RuntimeError("enqueue failed")
            super().enqueue(slot, batch_size, stream)

    gate = threading.Event()
    producer_stream = HostStream("producer")

    def produce(payload):
        producer_stream.submit(gate.wait)  # the producer's device work, still running
        return _host_batch({key: np.full((2, 3, 8, 8), 7.0, np.float32) for key in (g.key, q.key)},
                           stream=producer_stream)

    b = Refuses(NumpyModel(size=8, classes=q.num_classes, seed=1))
    models = [SimpleNamespace(spec=g, output_kind=OutputKind.LOGITS), SimpleNamespace(spec=q, output_kind=OutputKind.LOGITS)]
    opener = threading.Timer(0.3, gate.set)
    try:
        with StreamedExecutor({g.key: HostBackend(NumpyModel(size=8, classes=g.num_classes)), q.key: b}, "host",
                              ExecutorConfig(2, graphs=False)) as executor:
            b.armed = True
            loop = StreamedInference(models, executor, produce).batches(iter([SimpleNamespace(payload=[b"x"] * 2)]))
            opener.start()
            with pytest.raises(RuntimeError, match="enqueue failed"):
                next(loop)
            copied = executor._lanes[g.key].slots[0].device_inputs["input"].array
            assert gate.is_set() and (copied[:2] == 7.0).all()
    finally:
        gate.set()
        opener.cancel()
        producer_stream.close()


def _gender_model():
    from types import SimpleNamespace

    from engine.specs import OutputKind

    return SimpleNamespace(spec=SpecRegistry.builtin().get(Task.GENDER), output_kind=OutputKind.LOGITS)


def _host_batch(views, ok=None, errors=None, stream=None):
    """A producer's DeviceBatch over host arrays (the host device copies from a view's
    address): ``views`` maps model keys to (rows, 3, 8, 8) arrays of the decoded items
    ``ok`` (default: one per row), ``errors`` the causes of the others."""
    from engine.preprocess.dali_pipeline import DeviceBatch, DeviceView

    ok = tuple(range(len(next(iter(views.values()))))) if ok is None else tuple(ok)
    device_views = {key: DeviceView(key, int(a.ctypes.data) if a.size else 0, a.shape, a.dtype, a)
                    for key, a in views.items()}
    return DeviceBatch(ok=ok, sizes=((8, 8),) * len(ok), errors=errors or {}, views=device_views, device_id=0,
                       cuda_stream=stream)


def test_a_non_finite_output_in_the_streamed_loop_names_the_file_of_its_row():
    """Row r of a batch's outputs is file paths[ok[r]]: with the second file unreadable,
    the model's NaN on row 1 is the third file's, and the error names that file."""
    from types import SimpleNamespace

    from engine.errors import ModelError
    from tests.engine.test_executor_cpu import NumpyModel

    class NanOnMarked(NumpyModel):
        def run(self, batch):
            out = super().run(batch)
            out[batch[:, 0, 0, 0] > 100] = np.nan
            return out

    def produce(payload):
        ok = tuple(i for i, p in enumerate(payload) if p)
        array = np.zeros((len(ok), 3, 8, 8), np.float32)
        for row, i in enumerate(ok):
            array[row, 0, 0, 0] = 1000.0 if payload[i] == b"nan" else 1.0
        errors = {i: "cannot decode" for i in range(len(payload)) if i not in ok}
        return _host_batch({GENDER_KEY: array}, ok, errors)

    read = [SimpleNamespace(paths=["x.png", "y.png", "z.png"], payload=[b"x", b"y", b"z"]),
            SimpleNamespace(paths=["a.png", "b.png", "c.png"], payload=[b"x", b"", b"nan"])]
    with StreamedExecutor({GENDER_KEY: HostBackend(NanOnMarked(size=8, classes=2))}, "host",
                          ExecutorConfig(3, graphs=False)) as executor:
        handed_out = []
        with pytest.raises(ModelError, match="NaN or infinity for 1 of 2") as info:
            for batch, _ in StreamedInference([_gender_model()], executor, produce).batches(iter(read)):
                handed_out.append(batch.paths)
    # the batch finished before the bad one is handed out first (its rows get written)
    assert handed_out == [["x.png", "y.png", "z.png"]]
    message = str(info.value)
    assert "c.png" in message and "a.png" not in message and "b.png" not in message
    assert [b.payload for b in read] == [None, None]  # the files' bytes are let go of once produced


def test_an_error_mid_loop_waits_for_the_copies_of_the_batch_before_it():
    """With a producer whose outputs outlive its next call, batch 2 is produced before the
    host waits for batch 1's copies; if producing batch 2 fails, the loop still waits
    for those copies (queued behind the producer's busy stream) before the error goes
    on, so the producer's buffers may be dropped at once."""
    import threading
    from types import SimpleNamespace

    from engine.executor import HostStream
    from tests.engine.test_executor_cpu import NumpyModel

    gate = threading.Event()
    producer_stream = HostStream("producer")

    class Producer:
        outputs_outlive_next_call = True
        calls = 0

        def __call__(self, payload):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("decoder failed")
            producer_stream.submit(gate.wait)  # the producer's device work, still running
            return _host_batch({GENDER_KEY: np.full((2, 3, 8, 8), 7.0, np.float32)}, stream=producer_stream)

    opener = threading.Timer(0.3, gate.set)
    gate_when_raised = []
    try:
        with StreamedExecutor({GENDER_KEY: HostBackend(NumpyModel(size=8, classes=2))}, "host",
                              ExecutorConfig(2, graphs=False)) as executor:
            loop = StreamedInference([_gender_model()], executor, Producer()).batches(
                iter([SimpleNamespace(payload=[b"x"] * 2) for _ in range(2)]))
            opener.start()
            with pytest.raises(RuntimeError, match="decoder failed"):
                try:
                    next(loop)
                finally:
                    gate_when_raised.append(gate.is_set())
    finally:
        gate.set()
        opener.cancel()
        producer_stream.close()
    assert gate_when_raised == [True]


def test_the_streamed_loop_keeps_every_batch_one_submission_completes():
    """A model pinned to batch 1 runs each batch in pieces of one row, a slot each: the
    4th batch (3 rows) hands back the three 1-row batches before it in one call, and
    every one of them gets its own outputs, in order."""
    from types import SimpleNamespace

    from engine.postprocess import classify
    from tests.engine.test_executor_cpu import NumpyModel

    rng = np.random.default_rng(21)
    made = []

    def produce(payload):
        array = rng.standard_normal((len(payload), 3, 8, 8)).astype(np.float32)
        made.append(array)
        return _host_batch({GENDER_KEY: array})

    model = _gender_model()
    read = [SimpleNamespace(payload=[b"x"] * n) for n in (1, 1, 1, 3)]
    with StreamedExecutor({GENDER_KEY: HostBackend(NumpyModel(size=8, classes=2, fixed_batch=1))}, "host",
                          ExecutorConfig(3, graphs=False)) as executor:
        got = list(StreamedInference([model], executor, produce).batches(iter(read)))
    assert [batch for batch, _ in got] == read
    for (_, outputs), x in zip(got, made):
        want = classify(NumpyModel(size=8, classes=2).run(x), model.output_kind, model.spec.labels, GENDER_KEY)
        np.testing.assert_array_equal(outputs[GENDER_KEY].probabilities, want.probabilities)


def test_stats_lines_report_each_model_that_ran_and_none_that_did_not():
    from engine.executor import LaneStats
    from engine.streamed_run import stats_lines

    ran = LaneStats(batches=4, images=10, padded_batches=1, graph_batches=3, host_fill_s=0.002, host_enqueue_s=0.002,
                    h2d_ms=4.0, compute_ms=8.0, d2h_ms=4.0)
    assert stats_lines({GENDER_KEY: ran, "quality/baseline": LaneStats()}) == [
        f"executor {GENDER_KEY}: 4 batches (3 as graphs, 1 padded), host 1.00 ms/batch, device 4.00 ms/batch"]


def test_stream_handle_takes_every_stream_form_dali_takes():
    import ctypes
    from types import SimpleNamespace

    from engine.gpu import stream_handle

    class Protocol:
        def __cuda_stream__(self):
            return (0, 0x7004)

    assert stream_handle(0x7001) == 0x7001 and stream_handle(np.uint64(0x7002)) == 0x7002
    assert stream_handle(ctypes.c_void_p(0x7003)) == 0x7003 and stream_handle(ctypes.c_void_p()) == 0
    assert stream_handle(Protocol()) == 0x7004
    assert stream_handle(SimpleNamespace(handle=0x7005)) == 0x7005  # pycuda
    assert stream_handle(SimpleNamespace(cuda_stream=0x7006)) == 0x7006  # torch
    assert stream_handle(SimpleNamespace(ptr=0x7007)) == 0x7007  # cupy
    for bad in (True, "0x7008", SimpleNamespace()):
        with pytest.raises(TypeError, match="not a CUDA stream"):
            stream_handle(bad)


def test_build_command_leaves_out_what_the_run_did_not_set(tmp_path):
    registry = SpecRegistry.builtin()
    config = _config(tmp_path, tasks=(Task.GENDER,), calib_dir=tmp_path / "frames")
    missing = [(config.models[0], registry.get(Task.GENDER))]
    cmd = shlex.split(build_command(config, missing, "int8"))
    assert cmd[cmd.index("--calib") + 1] == str(tmp_path / "frames")
    assert "--calib-count" not in cmd and "--spec-file" not in cmd and "None" not in cmd
    assert cmd[-2:] == ["--cache-dir", str(tmp_path / "cache")]


@no_gpu
def test_gpu_prerequisites_give_tensorrts_reason_without_tensorrt_or_a_gpu(monkeypatch):
    """Past the device and package checks, the TensorRT backend's problem is the short
    reason TensorRT or the GPU is unusable (what the caller puts after "--device gpu:"),
    not the build step's long message; no engine is looked for."""
    import engine.gpu_path as gp
    from builders.trt_build import tensorrt_unavailable_reason

    monkeypatch.setattr(gp, "gpu_problem", lambda backend, device_id=0, *, dali=True: None)

    def no_engines(target):
        raise AssertionError("no engine is looked for without a usable TensorRT")

    reason = tensorrt_unavailable_reason()
    assert reason is not None
    assert gp.gpu_prerequisites([], [], "fp16", "tensorrt", no_engines) == ({}, reason)


def test_device_cpu_keeps_the_precision_asked_for(tmp_path):
    plan = plan_path(_config(tmp_path, device="cpu", precision="int8"), [])
    assert (plan.device, plan.precision) == ("cpu", "int8")


def test_gpu_problem_names_a_missing_tensorrt_for_the_tensorrt_backend(monkeypatch):
    import engine.gpu
    import engine.gpu_path as gp

    monkeypatch.setattr(engine.gpu, "cuda_absent_reason", lambda device_id=0: None)
    monkeypatch.setattr(gp, "_missing_module", lambda module: module == "tensorrt")
    assert gp.gpu_problem("tensorrt").startswith("the GPU packages are not installed (tensorrt): pip install")


def test_host_producer_exposes_each_view_as_contiguous_host_memory():
    """HostDevice copies ``nbytes`` from a view's ``ptr``: a strided array from the
    preprocessor must first be made contiguous, or the rows copied are the wrong ones."""
    import ctypes
    from types import SimpleNamespace

    from engine.preprocess.result import PreprocessResult

    base = np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
    strided = base.transpose(0, 1, 3, 2)  # not C-contiguous
    pre = SimpleNamespace(device="cpu", process=lambda payload: PreprocessResult(
        ok=[0, 2], views={GENDER_KEY: strided}, sizes=[(8, 8), (9, 9)], errors={1: "cannot decode"}))
    batch = HostProducer(pre)([b"a", b"", b"c"])
    view = batch.views[GENDER_KEY]
    got = np.frombuffer(ctypes.string_at(view.ptr, view.nbytes), np.float32).reshape(view.shape)
    np.testing.assert_array_equal(got, strided)
    assert (batch.ok, batch.sizes, batch.errors, batch.cuda_stream) == ((0, 2), ((8, 8), (9, 9)), {1: "cannot decode"}, None)
    with pytest.raises(ValueError, match="CPU DaliPreprocessor"):
        HostProducer(SimpleNamespace(device="gpu"))


def test_dali_gpu_producer_refuses_work_once_closed_and_lets_go_of_its_stream_even_if_closing_fails():
    """The wrapper only (a stand-in preprocessor and an integer stream handle); DALI on
    the GPU itself is checked by the gpu-marked tests."""
    from types import SimpleNamespace

    from engine.streamed_run import DaliGpuProducer

    calls = []

    def close():
        calls.append("close")
        raise RuntimeError("close failed")

    pre = SimpleNamespace(process_device=lambda payload, cuda_stream: calls.append((list(payload), cuda_stream)),
                          close=close)
    producer = DaliGpuProducer(pre, 1234)
    producer([b"x"])
    assert calls == [([b"x"], 1234)]
    with pytest.raises(RuntimeError, match="close failed"):
        producer.close()
    assert producer.stream is None
    with pytest.raises(RuntimeError, match="closed"):
        producer([b"y"])
    assert calls == [([b"x"], 1234), "close"]


def _failing_third_producer(log):
    """A producer of gender batches whose outputs outlive its next call; it logs its
    calls and fails on the third."""

    def produce(payload):
        log.append("produce")
        if log.count("produce") == 3:
            raise RuntimeError("decoder failed")
        return _host_batch({GENDER_KEY: np.ones((len(payload), 3, 8, 8), np.float32)})

    return type("Producer", (), {"outputs_outlive_next_call": True, "__call__": staticmethod(produce)})()


def test_a_failed_wait_while_ending_early_is_logged_and_the_first_error_goes_on(monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    import engine.executor as executor_module
    from tests.engine.test_executor_cpu import NumpyModel

    log: list[str] = []
    real_sync = executor_module.Consumed.synchronize

    def synchronize(self):
        real_sync(self)
        if log.count("produce") == 3:  # only the wait after the producer failed
            raise RuntimeError("copy failed")

    monkeypatch.setattr(executor_module.Consumed, "synchronize", synchronize)
    with StreamedExecutor({GENDER_KEY: HostBackend(NumpyModel(size=8, classes=2))}, "host", ExecutorConfig(2)) as ex:
        loop = StreamedInference([_gender_model()], ex, _failing_third_producer(log)).batches(
            iter([SimpleNamespace(payload=[b"x"] * 2) for _ in range(3)]))
        with caplog.at_level(logging.ERROR, logger="engine.streamed_run"):
            with pytest.raises(RuntimeError, match="decoder failed"):
                list(loop)
    assert any("copy failed" in r.getMessage() for r in caplog.records)


def test_a_batch_with_nothing_decoded_keeps_its_place_with_empty_outputs_of_the_models_width():
    from types import SimpleNamespace

    from tests.engine.test_executor_cpu import NumpyModel

    def produce(payload):
        ok = tuple(i for i, p in enumerate(payload) if p)
        errors = {i: "cannot decode" for i, p in enumerate(payload) if not p}
        return _host_batch({GENDER_KEY: np.ones((len(ok), 3, 8, 8), np.float32)}, ok, errors)

    read = [SimpleNamespace(payload=p) for p in ([b"x", b"y"], [b"", b""], [b"z"])]
    with StreamedExecutor({GENDER_KEY: HostBackend(NumpyModel(size=8, classes=2))}, "host", ExecutorConfig(2)) as ex:
        got = list(StreamedInference([_gender_model()], ex, produce).batches(iter(read)))
    assert [batch for batch, _ in got] == read
    assert [outputs[GENDER_KEY].probabilities.shape for _, outputs in got] == [(2, 2), (0, 2), (1, 2)]
    assert got[1][0].result.errors == {0: "cannot decode", 1: "cannot decode"} and got[1][0].result.ok == []


def test_stream_handle_takes_the_default_stream_whose_handle_is_zero():
    from types import SimpleNamespace

    from engine.gpu import stream_handle

    # torch.cuda.default_stream().cuda_stream is 0 (the legacy default stream)
    assert stream_handle(SimpleNamespace(cuda_stream=0)) == 0
    assert stream_handle(SimpleNamespace(handle=0, ptr=0x7009)) == 0


def test_without_a_driver_the_reason_says_so():
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        pass
    else:
        pytest.skip("libcuda.so.1 loads here: this test is for machines without the NVIDIA driver")
    for device_id in (0, 3):
        assert cuda_absent_reason(device_id) == "no NVIDIA driver (libcuda.so.1 not found)"


def test_a_preprocess_result_without_failures_has_an_empty_error_map_of_its_own():
    from engine.preprocess.result import PreprocessResult

    first = PreprocessResult(ok=[0], views={}, sizes=[(8, 8)])
    second = PreprocessResult(ok=[0], views={}, sizes=[(8, 8)])
    assert first.errors == {} and first.errors is not second.errors
