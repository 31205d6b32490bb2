"""Device backends and the pycuda device on a real GPU (auto-skipped without one).

TensorRT tests run only where ``tensorrt`` is importable (not in this workplace's GPU
machines; see DEVICE.md); nothing here fakes TensorRT or CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.executor import ExecutorConfig, StreamedExecutor

pytestmark = pytest.mark.gpu

pytest.importorskip("pycuda")


@pytest.fixture
def device():
    from engine.gpu import CudaDevice

    with CudaDevice(0) as dev:
        yield dev


def _context_stack() -> list[int]:
    """This thread's CUDA context stack, bottom first (popped to read, pushed back)."""
    import ctypes

    from engine.gpu import driver

    drv, popped = driver(), []
    while True:
        current = ctypes.c_void_p()
        drv.call("cuCtxGetCurrent", ctypes.byref(current))
        if not current.value:
            break
        out = ctypes.c_void_p()
        drv.call("cuCtxPopCurrent_v2", ctypes.byref(out))
        popped.append(out.value)
    for handle in reversed(popped):
        drv.call("cuCtxPushCurrent_v2", ctypes.c_void_p(handle))
    return popped[::-1]


@pytest.mark.parametrize("first", ["nothing", "torch", "pycuda", "ours"])
def test_closing_leaves_the_threads_context_stack_as_it_was(first):
    import threading

    import pycuda.driver as cuda

    from engine.gpu import CudaDevice

    torch_first = first == "torch"
    seen: dict = {}

    def body():  # a fresh thread: its stack starts empty
        own = outer = None
        try:
            if torch_first:  # PyTorch makes the primary context current first
                torch = pytest.importorskip("torch")
                torch.zeros(1, device="cuda").sum().item()
            elif first == "pycuda":  # a context of the user's, made by pycuda (as pycuda.autoinit does)
                cuda.init()
                own = cuda.Device(0).make_context()
            elif first == "ours":  # one CudaDevice inside another
                outer = CudaDevice(0)
            before = _context_stack()
            inside = []
            for _ in range(3):
                with CudaDevice(0) as dev:
                    inside.append(_context_stack())
                    dev.device_empty((4,), np.float32)
            seen.update(before=before, inside=inside, after=_context_stack())
            if torch_first:
                seen["torch_after"] = torch.ones(3, device="cuda").sum().item()
            if outer is not None:  # the outer one still works
                outer.device_empty((4,), np.float32)
        except BaseException as exc:  # re-raised on the test's thread
            seen["error"] = exc
        finally:
            # a thread that ends with pycuda's own context list not empty aborts the
            # interpreter: always unwind it, then read the stack once more
            try:
                if outer is not None:
                    outer.close()
                if own is not None:
                    own.pop()
                    own.detach()
                seen["at_end"] = _context_stack()
            except BaseException as exc:
                seen.setdefault("error", exc)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in seen:
        raise seen["error"]
    assert seen["after"] == seen["before"]
    under_pycuda = first in ("pycuda", "ours")
    # pycuda keeps only its topmost context on the driver's stack: one it made current
    # before ours is taken off while ours is current, and put back when ours closes
    below = seen["before"][:-1] if under_pycuda else seen["before"]
    assert all(stack[:-1] == below and stack[-1] for stack in seen["inside"])
    if first == "pycuda":
        assert all(stack[-1] != seen["before"][-1] for stack in seen["inside"])  # ours, not the user's
    if torch_first:
        assert len(seen["before"]) == 1 and seen["torch_after"] == 3.0
    if under_pycuda:
        assert len(seen["before"]) == 1 and seen["at_end"] == []


def test_cuda_device_copies_and_counts_allocations(device):
    s = device.stream()
    host = device.host_empty((4, 5), np.float32)
    host[:] = np.arange(20, dtype=np.float32).reshape(4, 5)
    d = device.device_empty((4, 5), np.float32)
    back = device.host_empty((4, 5), np.float32)
    back[:] = -1
    device.h2d(d, host[:3], s)
    device.d2h(back[:3], d, s)
    done = device.event()
    device.record(done, s)
    device.synchronize(done)
    np.testing.assert_array_equal(back[:3], host[:3])
    assert (back[3] == -1).all()
    assert device.allocations == 3
    device.free(d)


def test_driver_graph_replays_captured_copy(device):
    from engine.gpu import capture_graph

    s = device.stream()
    src, dst = device.device_empty((16,), np.float32), device.device_empty((16,), np.float32)
    host, back = device.host_empty((16,), np.float32), device.host_empty((16,), np.float32)
    graph = capture_graph(s, lambda: device.d2d(dst.ptr, src.ptr, 64, s))
    try:
        host[:] = np.arange(16)
        device.h2d(src, host, s)
        graph.launch(s)  # the copy runs only now, on the same addresses
        device.d2h(back, dst, s)
        device.synchronize_stream(s)
        np.testing.assert_array_equal(back, host)
    finally:
        graph.close()
        graph.close()  # idempotent


def test_wait_producer_orders_after_a_torch_stream(device):
    torch = pytest.importorskip("torch")
    s = device.stream()
    producer = torch.cuda.Stream()
    src = torch.zeros(1 << 20, device="cuda")
    dst = device.device_empty((1 << 20,), np.float32)
    back = device.host_empty((1 << 20,), np.float32)
    # torch's streams are non-blocking: without this wait, the zeros queued on the
    # default stream could land after the fill (then the test fails, not the code).
    producer.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(producer):
        torch.cuda._sleep(5_000_000)
        src.fill_(3.0)
    device.wait_producer(s, producer.cuda_stream)
    device.d2d(dst.ptr, src.data_ptr(), src.numel() * 4, s)
    device.d2h(back, dst, s)
    device.synchronize_stream(s)
    assert (back == 3.0).all()


def test_torch_backend_on_slot_buffers_equals_eager():
    torch = pytest.importorskip("torch")
    from builders.export import build_random_model
    from engine.backends.torch_cuda import TorchCudaBackend
    from engine.specs import Architecture

    b = TorchCudaBackend(build_random_model(Architecture.RESNET18, 2, 0), (3, 64, 64), max_batch=8)
    x = np.random.default_rng(0).standard_normal((6, 3, 64, 64)).astype(np.float32)
    with StreamedExecutor({"m": b}, "cuda", ExecutorConfig(8, graphs=False)) as ex:
        (c,) = list(ex.run([{"m": x}]))
    with torch.inference_mode():
        ref = b._forward(torch.from_numpy(x).cuda()).cpu().numpy()
    np.testing.assert_allclose(c.output("m"), ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- TensorRT


@pytest.fixture(scope="module")
def trt_engine(tmp_path_factory, random_models):
    trt = pytest.importorskip("tensorrt")
    from builders.precision import prepare
    from builders.trt_build import BatchProfile, build_engine, detect_target, plan_manifest

    model = random_models["gender/alpha"]
    cache = tmp_path_factory.mktemp("trt")
    prepared = prepare(model.onnx_path, model.spec, "fp32", None, cache / "prepared", output_kind=model.output_kind)
    profile = BatchProfile(1, 8, 8)
    artifact = build_engine(prepared, model.spec, cache, profile)
    wanted = plan_manifest(prepared, model.spec, profile, detect_target(trt))
    return model, artifact, wanted


@pytest.mark.parametrize("graphs,pad_partial", [(False, True), (True, True), (True, False)])
def test_tensorrt_executor_matches_onnxruntime(trt_engine, graphs, pad_partial):
    """One context per slot, each on its own optimisation profile; with graphs and no
    padding, the partial batch runs at the graph's size (no profile is left for a second
    context) and still gives its rows' results."""
    from engine.backends.onnxruntime import OrtBackend
    from engine.backends.tensorrt import TensorRTBackend

    model, artifact, wanted = trt_engine
    x = [np.random.default_rng(k).standard_normal((n, 3, 224, 224)).astype(np.float32) for k, n in enumerate([8, 8, 8, 3, 8, 5])]
    with OrtBackend(model.onnx_path, model.info.input, model.info.output) as ort_backend:
        ref = [ort_backend.run(b) for b in x]
    with TensorRTBackend(artifact.path, wanted) as trt_backend:
        assert trt_backend.max_batch == 8
        config = ExecutorConfig(8, graphs=graphs, pad_partial=pad_partial)
        with StreamedExecutor({"m": trt_backend}, "cuda", config) as ex:
            assert (ex.graph_batch("m") is not None) == graphs
            assert sorted(trt_backend.profiles.held.values()) == list(range(config.depth))
            got = [c.output("m") for c in ex.run({"m": b} for b in x)]
        assert trt_backend.profiles.held == {}  # handed back as the slots were released
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-3)  # TF32 tactics may be chosen


def test_tensorrt_profile_above_one_and_dynamic_image_size(random_models, tmp_path):
    """An engine whose profile starts at 4, built from an ONNX whose height and width are
    dynamic (as a user's file may be): the backend reads the image size from the
    profiles, and short batches are padded up to 4 (TensorRT refuses smaller shapes)."""
    trt = pytest.importorskip("tensorrt")
    import onnx

    from builders.precision import prepare
    from builders.trt_build import BatchProfile, build_engine, detect_target, plan_manifest
    from engine.backends.onnxruntime import OrtBackend
    from engine.backends.tensorrt import TensorRTBackend

    model = random_models["gender/alpha"]
    graph = onnx.load(str(model.onnx_path))
    for dim, name in zip(graph.graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width")):
        dim.ClearField("dim_value")
        dim.dim_param = name
    dynamic = tmp_path / "dynamic-hw.onnx"
    onnx.save(graph, str(dynamic))
    prepared = prepare(dynamic, model.spec, "fp32", None, tmp_path / "prepared", output_kind=model.output_kind)
    profile = BatchProfile(4, 8, 8)
    artifact = build_engine(prepared, model.spec, tmp_path / "engines", profile)
    wanted = plan_manifest(prepared, model.spec, profile, detect_target(trt))
    x = [np.random.default_rng(k).standard_normal((n, 3, 224, 224)).astype(np.float32) for k, n in enumerate([8, 3, 8, 1])]
    with OrtBackend(model.onnx_path, model.info.input, model.info.output) as ort_backend:
        ref = [ort_backend.run(b) for b in x]
    with TensorRTBackend(artifact.path, wanted) as trt_backend:
        assert trt_backend.inputs[0].shape == (None, 3, 224, 224)
        assert (trt_backend.min_batch, trt_backend.max_batch) == (4, 8)
        with StreamedExecutor({"m": trt_backend}, "cuda", ExecutorConfig(8, graphs=False)) as ex:
            got = [c.output("m") for c in ex.run({"m": b} for b in x)]
            assert ex.stats["m"].padded_batches == 2
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-3)


def test_tensorrt_engine_of_one_batch_size_runs_larger_batches_in_pieces(random_models, tmp_path):
    """A model that runs a fixed batch (here: a dynamic-batch ONNX built with the profile
    1,1,1 `engine build` gives a model the batching check pinned): the backend declares
    the batch fixed, still sets it on each context, and the executor feeds it batch-8
    submissions one row at a time, graphs included."""
    trt = pytest.importorskip("tensorrt")

    from builders.precision import prepare
    from builders.trt_build import BatchProfile, build_engine, detect_target, plan_manifest
    from engine.backends.onnxruntime import OrtBackend
    from engine.backends.tensorrt import TensorRTBackend

    model = random_models["gender/alpha"]
    prepared = prepare(model.onnx_path, model.spec, "fp32", None, tmp_path / "prepared", output_kind=model.output_kind)
    profile = BatchProfile(1, 1, 1)
    artifact = build_engine(prepared, model.spec, tmp_path / "engines", profile)
    wanted = plan_manifest(prepared, model.spec, profile, detect_target(trt))
    x = [np.random.default_rng(k).standard_normal((n, 3, 224, 224)).astype(np.float32) for k, n in enumerate([8, 3, 8])]
    with OrtBackend(model.onnx_path, model.info.input, model.info.output) as ort_backend:
        ref = [ort_backend.run(b) for b in x]
    with TensorRTBackend(artifact.path, wanted) as trt_backend:
        assert trt_backend.inputs[0].shape == (1, 3, 224, 224) and trt_backend.max_batch == 1
        with StreamedExecutor({"m": trt_backend}, "cuda", ExecutorConfig(8)) as ex:
            got = [c.output("m") for c in ex.run({"m": b} for b in x)]
            assert ex.stats["m"].batches == 19
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-3)


def test_tensorrt_static_engine_serves_a_ring_deeper_than_its_profiles(random_models, tmp_path):
    """An ONNX whose every input shape is fixed (batch 2 here) builds without profiles,
    and its contexts all run on the implicit profile 0: a ring of 4 slots on an engine
    built for one context neither takes profiles nor switches them; batch-8 submissions
    run in pieces of 2, graphs included."""
    trt = pytest.importorskip("tensorrt")
    import onnx

    from builders.precision import prepare
    from builders.trt_build import BuildOptions, build_engine, detect_target, engine_profile, plan_manifest
    from engine.backends.onnxruntime import OrtBackend
    from engine.backends.tensorrt import TensorRTBackend

    model = random_models["gender/alpha"]
    graph = onnx.load(str(model.onnx_path))
    for value in (graph.graph.input[0], graph.graph.output[0]):
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = 2
    static = tmp_path / "static-b2.onnx"
    onnx.save(graph, str(static))
    prepared = prepare(static, model.spec, "fp32", None, tmp_path / "prepared", output_kind=model.output_kind)
    profile, options = engine_profile(model.spec, 2), BuildOptions(contexts=1)
    artifact = build_engine(prepared, model.spec, tmp_path / "engines", profile, options)
    wanted = plan_manifest(prepared, model.spec, profile, detect_target(trt), options)
    x = [np.random.default_rng(k).standard_normal((n, 3, 224, 224)).astype(np.float32) for k, n in enumerate([8, 3, 8])]
    with OrtBackend(model.onnx_path, model.info.input, model.info.output) as ort_backend:
        ref = [ort_backend.run(b) for b in x]
    with TensorRTBackend(artifact.path, wanted) as trt_backend:
        assert trt_backend.inputs[0].shape == (2, 3, 224, 224)
        with StreamedExecutor({"m": trt_backend}, "cuda", ExecutorConfig(8, depth=4)) as ex:
            assert trt_backend.profiles.held == {}
            got = [c.output("m") for c in ex.run({"m": b} for b in x)]
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-3)


def test_a_device_left_open_is_closed_at_exit_instead_of_aborting_the_process(tmp_path):
    """pycuda aborts at exit when its context stack is not empty; a program that forgets
    to close the device (or a FrameClassifier on the GPU) gets a warning instead."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import numpy as np\nfrom engine.gpu import CudaDevice\n"
            "dev = CudaDevice(0)\nbuf = dev.device_empty((1024,), np.float32)\ns = dev.stream()\n")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "closing a CUDA device left open at exit" in done.stderr
    assert "context stack was not empty" not in done.stderr
