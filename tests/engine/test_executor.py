"""The streamed executor on a real GPU (pycuda device, PyTorch CUDA backend).

Auto-skipped without a GPU (``gpu`` marker) or without pycuda/torch. Models are
random-weight ResNet-18s at small image sizes (real architecture, fast). The reference
is the same module run eagerly on each batch alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.executor import DeviceView, ExecutorConfig, StreamedExecutor, measure_overlap

pytestmark = pytest.mark.gpu

pytest.importorskip("pycuda")
torch = pytest.importorskip("torch")

FP32_TOL = {"rtol": 1e-4, "atol": 1e-5}  # cuDNN may pick other kernels for other batch sizes
FP16_TOL = {"rtol": 1e-2, "atol": 1e-2}


@pytest.fixture(autouse=True, scope="module")
def _fp32_convolutions_in_fp32():
    """torch runs FP32 convolutions in TF32 on Ampere and newer by default
    (``torch.backends.cudnn.allow_tf32`` is True): ~1e-3 off an FP32 result on these
    logits, ten times FP32_TOL, and a padded batch (the graph's 8 rows) may get other
    cuDNN kernels than its rows eagerly. The FP32 comparisons here compare FP32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def resnet(classes: int, seed: int):
    from builders.export import build_random_model
    from engine.specs import Architecture

    return build_random_model(Architecture.RESNET18, classes, seed)


def backend(classes=2, seed=0, size=64, precision="fp32", max_batch=16):
    from engine.backends.torch_cuda import TorchCudaBackend

    return TorchCudaBackend(resnet(classes, seed), (3, size, size), precision=precision, max_batch=max_batch)


def data(n_batches, rows, last=None, size=64, seed=1):
    rng = np.random.default_rng(seed)
    sizes = [rows] * n_batches
    if last is not None:
        sizes[-1] = last
    return [rng.standard_normal((n, 3, size, size)).astype(np.float32) for n in sizes]


def alone(b, batch: np.ndarray) -> np.ndarray:
    """The backend's module on one batch, eagerly, on torch's own stream."""
    with torch.inference_mode():
        out = b._forward(torch.from_numpy(batch).cuda())
        return out.float().cpu().numpy()


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_outputs_equal_each_batch_alone(precision, graphs):
    b = backend(precision=precision)
    batches = data(9, 8, last=5)
    with StreamedExecutor({"m": b}, "cuda", ExecutorConfig(8, graphs=graphs)) as ex:
        assert (ex.graph_batch("m") is not None) == graphs
        got = list(ex.run({"m": x} for x in batches))
        stats = ex.stats["m"]
    assert [c.seq for c in got] == list(range(9))
    assert got[-1].output("m").shape == (5, 2)
    tol = FP32_TOL if precision == "fp32" else FP16_TOL
    for c, x in zip(got, batches):
        np.testing.assert_allclose(c.output("m"), alone(b, x), **tol)
    assert stats.images == 8 * 8 + 5
    if graphs:
        assert stats.graph_batches == 9 and stats.padded_batches == 1


def test_graph_path_equals_plain_path():
    b = backend(seed=3)
    batches = data(6, 8, last=3, seed=4)
    outs = {}
    for graphs in (False, True):
        with StreamedExecutor({"m": b}, "cuda", ExecutorConfig(8, graphs=graphs)) as ex:
            outs[graphs] = [c.output("m") for c in ex.run({"m": x} for x in batches)]
    for x, y in zip(outs[False][:-1], outs[True][:-1]):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)  # same batch size, same kernels
    np.testing.assert_allclose(outs[False][-1], outs[True][-1], **FP32_TOL)  # 3 rows vs 3 padded to 8


def test_two_models_concurrently():
    g, q = backend(classes=2, seed=0, size=64), backend(classes=4, seed=1, size=96)
    xg, xq = data(7, 8, last=2, size=64, seed=5), data(7, 8, last=2, size=96, seed=6)
    with StreamedExecutor({"gender": g, "quality": q}, "cuda", ExecutorConfig(8)) as ex:
        got = list(ex.run({"gender": a, "quality": c} for a, c in zip(xg, xq)))
    assert len(got) == 7
    for c, a, d in zip(got, xg, xq):
        np.testing.assert_allclose(c.output("gender"), alone(g, a), **FP32_TOL)
        np.testing.assert_allclose(c.output("quality"), alone(q, d), **FP32_TOL)


def test_no_allocation_in_steady_state():
    import pycuda.driver as cuda

    b = backend()
    with StreamedExecutor({"m": b}, "cuda", ExecutorConfig(8, depth=4)) as ex:
        # per slot: pinned out, device in, device out; a slot's pinned input buffer
        # comes with its first host submission
        assert ex.allocations == 4 * 3
        for _ in ex.run({"m": x} for x in data(20, 8, last=1)):
            pass
        after_warm = ex.allocations
        assert after_warm == 4 * 4
        for _ in ex.run({"m": x} for x in data(20, 8, last=3)):
            pass
        assert ex.allocations == after_warm
        free_before = cuda.mem_get_info()[0]
        for _ in ex.run({"m": x} for x in data(20, 8)):
            pass
        free_after = cuda.mem_get_info()[0]
    assert free_after >= free_before - (1 << 20), "device memory grew in the steady state"


def test_device_input_waits_for_the_producer_stream():
    """submit_device from a torch tensor written on another stream (as DALI's outputs are)."""
    b = backend(seed=7)
    batches = data(5, 8, last=4, seed=8)
    producer = torch.cuda.Stream()
    staging = torch.empty((8, 3, 64, 64), device="cuda")
    with StreamedExecutor({"m": b}, "cuda", ExecutorConfig(8)) as ex:
        got = []
        for x in batches:
            with torch.cuda.stream(producer):
                torch.cuda._sleep(2_000_000)  # a slow producer: the copy must wait for it
                staging[: len(x)].copy_(torch.from_numpy(x).pin_memory(), non_blocking=True)
            view = DeviceView(staging.data_ptr(), tuple(x.shape), np.dtype(np.float32))
            done, consumed = ex.submit_device({"m": view}, producer=producer.cuda_stream)
            got += done
            consumed.synchronize()  # only now may the producer overwrite `staging`
        got += ex.drain()
    for c, x in zip(got, batches):
        np.testing.assert_allclose(c.output("m"), alone(b, x), **FP32_TOL)


def test_close_is_idempotent_and_releases_the_context():
    import pycuda.driver as cuda

    ex = StreamedExecutor({"m": backend()}, "cuda", ExecutorConfig(4))
    with ex:
        list(ex.run({"m": x} for x in data(2, 4)))
    ex.close()
    assert cuda.Context.get_current() is None


def test_measure_overlap_runs_and_reports(capsys):
    g, q = backend(classes=2, size=224, max_batch=32), backend(classes=4, size=384, max_batch=32)
    rng = np.random.default_rng(0)
    batches = [
        {"gender": rng.standard_normal((32, 3, 224, 224)).astype(np.float32),
         "quality": rng.standard_normal((32, 3, 384, 384)).astype(np.float32)}
        for _ in range(8)
    ]
    with StreamedExecutor({"gender": g, "quality": q}, "cuda", ExecutorConfig(32)) as ex:
        report = measure_overlap(ex, batches)
        stats = ex.stats
    with capsys.disabled():
        print("\noverlap:", report.as_dict())
        for k, s in stats.items():
            print(k, "host overhead ms/batch", round(s.host_overhead_ms_per_batch, 3),
                  "device ms/batch", round(s.device_ms_per_batch, 3))
    assert report.efficiency > 0
