"""ONNX Runtime as an executor device backend (IOBinding), on the executor's host device.

Real ONNX Runtime (CPU provider) on small real graphs: outputs through the executor
equal ``OrtBackend.run`` on each batch alone; bindings are made once per (slot, batch
size); ORT writes the output into the slot's own buffer. The CUDA mode cannot run here:
only its refusal without the CUDA execution provider is checked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from builders.onnx_io import inspect_onnx  # noqa: E402
from engine.backends.onnxruntime import OrtBackend, OrtDeviceBackend  # noqa: E402
from engine.errors import EngineError, ModelError  # noqa: E402
from engine.executor import (  # noqa: E402
    DeviceBackend,
    ExecutorConfig,
    HostArray,
    HostBackend,
    HostDevice,
    StreamedExecutor,
)


def tiny_convnet(path: Path, *, size: int = 8, classes: int = 5, batch: int | None = None, seed: int = 0) -> Path:
    """(N, 3, size, size) "input" -> Conv 3x3 (4 channels) -> Relu -> GlobalAveragePool ->
    Flatten -> Gemm -> (N, classes) "output"; ``batch`` pins the batch (None: dynamic)."""
    rng = np.random.default_rng(seed)
    dim0 = batch if batch is not None else "N"
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["relu"]),
            helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["output"], transB=1),
        ],
        "tiny_convnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [dim0, 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [dim0, classes])],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv_w"),
            numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "conv_b"),
            numpy_helper.from_array(rng.standard_normal((classes, 4)).astype(np.float32), "fc_w"),
            numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "fc_b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def batches(sizes, size: int = 8, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, 3, size, size)).astype(np.float32) for n in sizes]


def open_pair(path: Path, **kwargs) -> tuple[OrtBackend, OrtDeviceBackend]:
    info = inspect_onnx(path)  # the declarations come from the graph, as for engine run
    return (OrtBackend(path, info.input, info.output, threads=1),
            OrtDeviceBackend(path, info.input, info.output, threads=1, **kwargs))


class ReadOnlyHostDevice(HostDevice):
    """The executor's host device with every "device" buffer read-only to numpy and
    kept for inspection. Copies (memmove) and ONNX Runtime write through the raw
    address; a write through numpy (``np.copyto`` of a result) fails."""

    def __init__(self) -> None:
        super().__init__()
        self.buffers: list[HostArray] = []

    def device_empty(self, shape, dtype) -> HostArray:
        buf = super().device_empty(shape, dtype)
        buf.array.flags.writeable = False
        self.buffers.append(buf)
        return buf


@pytest.fixture
def tiny(tmp_path) -> Path:
    return tiny_convnet(tmp_path / "tiny.onnx")


@pytest.mark.parametrize("graphs", [True, False], ids=["bound-replay", "plain-enqueue"])
def test_outputs_through_the_executor_equal_ort_run_per_batch(tiny, graphs):
    data = batches([4, 4, 4, 4, 4, 3])  # more batches than slots, a partial last batch
    ref, backend = open_pair(tiny, max_batch=4)
    with ref, backend:
        assert isinstance(backend, DeviceBackend)
        assert backend.inputs[0].device == backend.outputs[0].device == "cpu"
        alone = [ref.run(b) for b in data]
        with StreamedExecutor({"m": backend}, "host", ExecutorConfig(4, graphs=graphs)) as ex:
            assert ex.graph_batch("m") == (4 if graphs else None)
            done = list(ex.run(({"m": b} for b in data), tags=range(len(data))))
    assert [c.tag for c in done] == list(range(len(data)))
    for c, want in zip(done, alone):
        got = c.output("m")
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_two_models_at_once_in_one_executor(tmp_path):
    a_path = tiny_convnet(tmp_path / "a.onnx", size=8, classes=5, seed=0)
    b_path = tiny_convnet(tmp_path / "b.onnx", size=12, classes=3, seed=7)
    a_data, b_data = batches([3, 3, 3, 2], size=8, seed=2), batches([3, 3, 3, 2], size=12, seed=3)
    a_ref, a = open_pair(a_path, max_batch=3)
    b_ref, b = open_pair(b_path, max_batch=3)
    with a_ref, a, b_ref, b:
        want = [(a_ref.run(x), b_ref.run(y)) for x, y in zip(a_data, b_data)]
        with StreamedExecutor({"a": a, "b": b}, "host", ExecutorConfig(3, graphs=False)) as ex:
            done = list(ex.run({"a": x, "b": y} for x, y in zip(a_data, b_data)))
    assert len(done) == len(want)
    for c, (wa, wb) in zip(done, want):
        np.testing.assert_allclose(c.output("a"), wa, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(c.output("b"), wb, rtol=1e-6, atol=1e-6)


def test_a_binding_is_made_once_per_slot_and_batch_size(tiny):
    data = batches([4] * 5 + [3])  # the partial batch (index 5) lands on slot 5 % 3 == 2; a pass is 2 rounds
    ref, backend = open_pair(tiny, max_batch=4)
    with ref, backend:
        with StreamedExecutor({"m": backend}, "host", ExecutorConfig(4, depth=3, graphs=False)) as ex:
            assert backend.bindings_created == 3  # one per slot at the full batch, at bind time
            for _ in range(2):  # the second pass reuses every binding, the partial one too
                got = [c.output("m") for c in ex.run({"m": b} for b in data)]
            assert backend.bindings_created == 4
            assert set(backend.bindings) == {(0, 4), (1, 4), (2, 4), (2, 3)}
            np.testing.assert_allclose(got[-1], ref.run(data[-1]), rtol=1e-6, atol=1e-6)
        assert backend.bindings == {}  # released with the executor's slots

        # With the bound replay ("graph"), a partial batch is padded into the full binding.
        with StreamedExecutor({"m": backend}, "host", ExecutorConfig(4, depth=3, graphs=True)) as ex:
            list(ex.run({"m": b} for b in data))
            assert set(backend.bindings) == {(0, 4), (1, 4), (2, 4)}
    assert backend.bindings_created == 4 + 3


def test_output_is_written_in_place_into_the_slot_buffer(tiny):
    data = batches([4, 4, 4, 4, 2])  # the last (partial) batch runs on slot 4 % 3 == 1
    ref, backend = open_pair(tiny, max_batch=4)
    with ReadOnlyHostDevice() as device, ref, backend:
        # The slot buffers are read-only to numpy: only ORT writing through the bound
        # address can fill them (HostBackend's copy of run()'s result cannot, below).
        with StreamedExecutor({"m": backend}, device, ExecutorConfig(4, depth=3, graphs=False)) as ex:
            got = [c.output("m") for c in ex.run({"m": b} for b in data)]
            outputs = [b for b in device.buffers if b.shape == (4, 5)]  # slot order: 0, 1, 2
            assert len(outputs) == 3
            assert set(backend.bindings) == {(0, 4), (1, 4), (2, 4), (1, 2)}
            for (slot, rows), binding in backend.bindings.items():
                (value,) = binding.get_outputs()
                assert value.data_ptr() == outputs[slot].ptr  # ORT's output is the slot's buffer
                assert value.shape() == [rows, 5]
            # What ORT wrote last into slot 1's buffer is the partial batch's result; the
            # executor copied it out from there.
            np.testing.assert_allclose(outputs[1].array[:2], ref.run(data[-1]), rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(outputs[1].array[:2], got[-1])
        for g, b in zip(got, data):
            np.testing.assert_allclose(g, ref.run(b), rtol=1e-6, atol=1e-6)

        # Control: the numpy adapter, which copies run()'s result into the buffer, fails here.
        with pytest.raises(RuntimeError, match="read-only"):
            with StreamedExecutor({"m": HostBackend(ref)}, device, ExecutorConfig(4, graphs=False)) as ex:
                list(ex.run({"m": b} for b in data))


def test_a_model_pinned_to_a_fixed_batch(tmp_path):
    path = tiny_convnet(tmp_path / "fixed.onnx", batch=4)
    info = inspect_onnx(path)
    assert info.input.fixed_batch == 4
    data = batches([4, 4, 4, 4, 1])
    ref, backend = open_pair(path, max_batch=64)
    with ref, backend:
        assert backend.max_batch == 4
        alone = [ref.run(b) for b in data]  # OrtBackend pads the short batch to 4 itself
        with StreamedExecutor({"m": backend}, "host", ExecutorConfig(4, graphs=False)) as ex:
            got = [c.output("m") for c in ex.run({"m": b} for b in data)]
        assert backend.bindings_created == 3  # every batch ran at 4 rows: no other binding
    for g, a in zip(got, alone):
        np.testing.assert_allclose(g, a, rtol=1e-6, atol=1e-6)


def test_a_bad_model_is_a_one_line_model_error(tmp_path, tiny):
    info = inspect_onnx(tiny)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not an onnx file")
    for path in (garbage, tmp_path / "missing.onnx"):
        with pytest.raises(ModelError) as err:
            OrtDeviceBackend(path, info.input, info.output)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    wrong = type(info.input)("pixels", info.input.shape, info.input.dtype)
    with pytest.raises(ModelError, match="no input named 'pixels'") as err:
        OrtDeviceBackend(tiny, wrong, info.output)
    assert "\n" not in str(err.value)
    with pytest.raises(EngineError, match="device_kind"):
        OrtDeviceBackend(tiny, info.input, info.output, device_kind="gpu")


class _ForeignArray:
    """A device buffer that is not the host device's (it stands for CUDA memory)."""

    def __init__(self, shape, dtype) -> None:
        array = np.zeros(shape, dtype)
        self._array = array
        self.ptr, self.shape, self.dtype, self.nbytes = array.ctypes.data, array.shape, array.dtype, array.nbytes


class ForeignBufferDevice(HostDevice):
    def device_empty(self, shape, dtype):
        self.allocations += 1
        return _ForeignArray(shape, dtype)


def test_host_mode_refuses_buffers_of_another_device(tiny):
    info = inspect_onnx(tiny)
    with ForeignBufferDevice() as device, OrtDeviceBackend(tiny, info.input, info.output, threads=1, max_batch=4) as backend:
        with pytest.raises(ModelError, match="device_kind='host' needs the executor's host device") as err:
            with StreamedExecutor({"m": backend}, device, ExecutorConfig(4)):
                pass
        assert "\n" not in str(err.value) and backend.bindings == {}


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="the CUDA provider is installed")
def test_cuda_mode_without_the_cuda_provider_is_refused_in_one_line(tiny):
    info = inspect_onnx(tiny)
    with pytest.raises(ModelError) as err:
        OrtDeviceBackend(tiny, info.input, info.output, device_kind="cuda")
    message = str(err.value)
    assert "\n" not in message and "CUDAExecutionProvider" in message and "onnxruntime-gpu" in message


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="the CUDA provider is installed")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_a_session_that_fell_back_from_the_provider_asked_for_is_refused(tiny):
    """ONNX Runtime drops a provider it cannot start and carries on with the rest (here the
    CPU build drops CUDA): a backend asked to run on CUDA must not quietly run on the CPU."""
    from engine.backends.onnxruntime import require_provider

    info = inspect_onnx(tiny)
    session = ort.InferenceSession(str(tiny), providers=["CPUExecutionProvider"])
    assert require_provider(session, "CPUExecutionProvider", tiny) is session
    with pytest.raises(ModelError, match=r"could not start the CUDAExecutionProvider .*fell back to CPUExecutionProvider"):
        require_provider(session, "CUDAExecutionProvider", tiny)
    with pytest.raises(ModelError, match="could not start the CUDAExecutionProvider") as err:
        OrtBackend(tiny, info.input, info.output, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert "\n" not in str(err.value)
    with OrtBackend(tiny, info.input, info.output, threads=1) as cpu:  # the default is the CPU, and it runs
        assert cpu.providers == ("CPUExecutionProvider",)


def test_close_is_idempotent_and_a_closed_backend_refuses_work(tiny):
    info = inspect_onnx(tiny)
    with OrtDeviceBackend(tiny, info.input, info.output, threads=1, max_batch=4) as backend:
        pass
    backend.close()  # again: nothing happens
    with pytest.raises(RuntimeError, match="closed"):
        with StreamedExecutor({"m": backend}, "host", ExecutorConfig(4)):
            pass


def test_the_benchmark_executor_entry_runs_the_iobinding_backend(random_models, tmp_path):
    """The real architecture (resnet18, 224, random weights) as the benchmark's
    ``onnxruntime-executor`` entry builds it, through the executor: full and partial
    batch equal ``OrtBackend.run``."""
    from benchmarks.backends import BackendContext, find_backend
    from benchmarks.config import Precision

    model = random_models["gender/alpha"]
    entry = find_backend("onnxruntime-executor")
    context = BackendContext(threads=2, batch_size=2, work_dir=tmp_path)
    data = [np.random.default_rng(k).standard_normal((n, 3, 224, 224)).astype(np.float32) for k, n in enumerate((2, 1))]
    with entry.create(model, Precision.FP32, context) as backend, \
            OrtBackend(model.onnx_path, model.info.input, model.info.output, threads=2) as ref:
        assert isinstance(backend, OrtDeviceBackend) and backend.max_batch == 2
        alone = [ref.run(b) for b in data]
        with StreamedExecutor({"gender": backend}, entry.executor, ExecutorConfig(2)) as ex:
            got = [c.output("gender") for c in ex.run({"gender": b} for b in data)]
    for g, a in zip(got, alone):
        np.testing.assert_allclose(g, a, rtol=1e-4, atol=1e-4)


def test_a_fixed_batch_model_runs_a_longer_batch_in_pieces_with_the_rows_in_order(tmp_path):
    path = tiny_convnet(tmp_path / "fixed.onnx", batch=4)
    info = inspect_onnx(path)
    (x,) = batches([9])  # pieces of 4, 4 and 1 (padded to 4)
    with OrtBackend(path, info.input, info.output, threads=1) as backend:
        got = backend.run(x)
        alone = np.concatenate([backend.run(np.repeat(row[None], 4, axis=0))[:1] for row in x])
    assert got.shape == (9, 5)
    np.testing.assert_allclose(got, alone, rtol=1e-6, atol=1e-6)


def test_onnx_runtime_refuses_an_output_of_other_columns_or_rank_than_declared(tiny):
    from engine.backends.base import TensorDecl

    info = inspect_onnx(tiny)
    x = np.zeros((2, 3, 8, 8), np.float32)
    for shape, expected in (((None, 4), r"\(2, 4\)"), ((None, 5, 1), r"\(2, 5, 1\)")):
        declared = TensorDecl("output", shape, np.dtype(np.float32))
        with OrtBackend(tiny, info.input, declared, threads=1) as backend:
            with pytest.raises(ModelError, match=r"has shape \(2, 5\) for a batch of 2; expected " + expected):
                backend.run(x)


def test_a_closed_onnx_runtime_backend_refuses_work(tiny):
    info = inspect_onnx(tiny)
    with OrtBackend(tiny, info.input, info.output, threads=1) as backend:
        assert backend.run(batches([2])[0]).shape == (2, 5)
    with pytest.raises(RuntimeError, match="closed"):
        backend.run(batches([2])[0])


def test_inputs_and_outputs_pinned_to_different_batches_are_refused(tmp_path):
    from engine.backends.base import TensorDecl

    path = tiny_convnet(tmp_path / "fixed.onnx", batch=4)
    info = inspect_onnx(path)
    other = TensorDecl("output", (2, 5), np.dtype(np.float32))
    with pytest.raises(ModelError, match=r"pinned to different batch sizes \[2, 4\]"):
        OrtDeviceBackend(path, info.input, other, threads=1)


@pytest.mark.gpu
def test_cuda_mode_matches_the_cpu_on_a_gpu(tiny):
    """The CUDA mode on a real GPU (needs pycuda and onnxruntime-gpu; has not run yet)."""
    pytest.importorskip("pycuda")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDAExecutionProvider")
    info = inspect_onnx(tiny)
    data = batches([4, 4, 4, 4, 3])
    with OrtBackend(tiny, info.input, info.output, threads=1) as ref, \
            OrtDeviceBackend(tiny, info.input, info.output, device_kind="cuda", max_batch=4) as backend:
        assert not backend.supports_graphs and backend.inputs[0].device == "cuda"
        with StreamedExecutor({"m": backend}, "cuda", ExecutorConfig(4, depth=3)) as ex:
            assert ex.graph_batch("m") is None
            got = [c.output("m") for c in ex.run({"m": b} for b in data)]
            assert set(backend.bindings) == {(0, 4), (1, 4), (2, 4), (1, 3)}
        for g, b in zip(got, data):
            np.testing.assert_allclose(g, ref.run(b), rtol=1e-3, atol=1e-3)  # TF32 convolutions may be chosen
