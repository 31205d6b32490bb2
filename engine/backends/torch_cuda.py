"""The PyTorch reference on CUDA as an executor :class:`~engine.executor.DeviceBackend`.

Runs a torch module (FP32, or FP16 autocast; channels_last) on the executor's slot
stream (``torch.cuda.ExternalStream``), reading and writing tensors made over the
slot's own device buffers (``__cuda_array_interface__``, no copies). It is how the
executor is exercised on a GPU without TensorRT. The executor's buffers live in the
primary context (:class:`engine.gpu.CudaContext`), the one PyTorch uses.

CUDA graphs: ``torch.cuda.CUDAGraph`` captured on the slot's stream, one private
memory pool per graph (slots run concurrently, so graphs must not share scratch memory).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np

from engine.backends.base import TensorDecl
from engine.errors import DependencyError, ModelError

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16"]


def _torch():
    try:
        import torch
    except ImportError:
        raise DependencyError("torch", "torch", "The PyTorch CUDA backend") from None
    return torch


class _CudaArray:
    """A ``__cuda_array_interface__`` (v2, no stream: the executor orders the work)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.__cuda_array_interface__ = {
            "shape": tuple(int(d) for d in shape),
            "typestr": np.dtype(dtype).str,
            "data": (int(ptr), False),
            "version": 2,
        }


def tensor_over(buffer, torch, device: Any = "cuda") -> Any:
    """A torch CUDA tensor viewing an executor device buffer (``.ptr``, ``.shape``,
    ``.dtype``) on ``device`` (the buffer's GPU: torch copies to any other device, so
    the result is checked to be a view)."""
    tensor = torch.as_tensor(_CudaArray(buffer.ptr, buffer.shape, buffer.dtype), device=device)
    if tensor.data_ptr() != int(buffer.ptr):
        raise ModelError(f"torch made a copy of the executor buffer on {device} instead of a view (wrong device?)")
    return tensor


class TorchCudaBackend:
    """``module``: a torch module taking one NCHW image batch, returning (N, classes).
    ``input_shape``: (C, H, W); the output width is found by running the module once."""

    name = "torch-cuda"
    supports_graphs = True

    def __init__(
        self,
        module,
        input_shape: tuple[int, int, int],
        *,
        precision: Precision = "fp32",
        channels_last: bool = True,
        max_batch: int = 256,
        input_name: str = "input",
        output_name: str = "output",
        device: int = 0,
    ) -> None:
        torch = _torch()
        if precision not in ("fp32", "fp16"):
            raise ModelError(f"torch backend precision must be fp32 or fp16, got {precision!r}")
        if not torch.cuda.is_available():
            raise ModelError("the PyTorch CUDA backend needs a CUDA device; torch sees none")
        self._torch = torch
        self.precision = precision
        self.channels_last = channels_last
        self.device = torch.device("cuda", device)
        self.module = module.eval().to(self.device)
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.max_batch = max_batch
        with torch.inference_mode():
            probe = self._forward(torch.zeros((1, *input_shape), device=self.device))
        torch.cuda.synchronize(self.device)  # set-up only
        if probe.dim() != 2:
            raise ModelError(f"the module returns shape {tuple(probe.shape)}, expected (N, classes)")
        self.inputs = (TensorDecl(input_name, (None, *input_shape), np.dtype(np.float32), "cuda"),)
        self.outputs = (TensorDecl(output_name, (None, int(probe.shape[1])), np.dtype(np.float32), "cuda"),)
        self._bound: dict[int, tuple[Any, Any, Any]] = {}  # slot -> (input, output, ExternalStream)

    def __enter__(self) -> "TorchCudaBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _forward(self, x):
        torch = self._torch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "fp16":
            with torch.autocast("cuda", dtype=torch.float16):
                return self.module(x)
        return self.module(x)

    def bind(self, slot) -> None:
        torch = self._torch
        x = tensor_over(slot.device_inputs[self.inputs[0].name], torch, self.device)
        y = tensor_over(slot.device_outputs[self.outputs[0].name], torch, self.device)
        stream = torch.cuda.ExternalStream(int(slot.stream.handle), device=self.device)
        self._bound[slot.index] = (x, y, stream)

    def _run(self, slot_index: int, batch_size: int) -> None:
        torch = self._torch
        x, y, _ = self._bound[slot_index]
        with torch.inference_mode():
            out = self._forward(x[:batch_size])
            y[:batch_size].copy_(out)

    def enqueue(self, slot, batch_size: int, stream) -> None:
        torch = self._torch
        with torch.cuda.stream(self._bound[slot.index][2]):
            self._run(slot.index, batch_size)

    def capture(self, slot, batch_size: int, stream):
        torch = self._torch
        ext = self._bound[slot.index][2]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(ext):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self._run(slot.index, batch_size)
            finally:
                graph.capture_end()
        return _TorchGraph(graph, ext)

    def release(self, slot) -> None:
        self._bound.pop(slot.index, None)

    def close(self) -> None:
        self._bound.clear()


class _TorchGraph:
    """A captured forward; replayed on the slot's stream it was captured on."""

    def __init__(self, graph, stream) -> None:
        self._graph = graph
        self._stream = stream  # torch ExternalStream over the slot's stream

    def launch(self, stream) -> None:
        import torch

        if int(stream.handle) != self._stream.cuda_stream:
            raise RuntimeError("a slot's graph must be replayed on that slot's stream")
        with torch.cuda.stream(self._stream):  # replay() launches on torch's current stream
            self._graph.replay()

    def close(self) -> None:
        if self._graph is not None:
            self._graph.reset()
            self._graph = None
