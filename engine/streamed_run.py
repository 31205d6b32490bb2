"""`engine run` through the streamed executor: the loop of the GPU path.

Per batch of files, in order:

1. a reader thread reads the files' bytes one batch ahead (``engine.runner.FileReader``);
2. the *producer* preprocesses them into one view per model, left where the executor's
   device can copy from (on the GPU: DALI's output buffers, ordered on DALI's stream);
3. :meth:`StreamedExecutor.submit_device` queues, per model, a device-to-device copy
   into the slot's own buffer (after DALI's stream), inference and copy-out, and
   returns at once. The host waits for those copies only
   (:class:`~engine.executor.Consumed`), never for inference: after the producer's next
   run where its outputs outlive that run (DALI's dynamic executor keeps an output
   while it is referenced, so the host part of batch k+1's decoding overlaps the GPU
   part of batch k's), before it otherwise (a producer that reuses its buffers);
4. results come back in submission order and become rows.

The loop knows nothing of CUDA: with :class:`engine.gpu.CudaDevice`, TensorRT or
PyTorch backends and DALI on the GPU it is the GPU path; with
:class:`engine.executor.HostDevice`, ONNX Runtime behind
:class:`engine.executor.HostBackend` and :class:`HostProducer` it runs the same code on
a machine without a GPU, which is how it is tested.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from engine.executor import LaneStats, StreamedExecutor
from engine.postprocess import Classified, NonFiniteOutput, classify, naming_files
from engine.preprocess.result import PreprocessResult

if TYPE_CHECKING:
    from engine.models import ResolvedModel
    from engine.preprocess.dali_pipeline import DaliPreprocessor, DeviceBatch

log = logging.getLogger(__name__)

# payload (file bytes, b"" where unreadable) -> one DeviceBatch. A producer whose
# outputs stay valid through its next call, for as long as the DeviceBatch is
# referenced, says so with a true ``outputs_outlive_next_call`` attribute.
Producer = Callable[[Sequence[bytes]], "DeviceBatch"]


class HostProducer:
    """A producer without a GPU: the CPU DALI pipeline, its views exposed as
    :class:`~engine.preprocess.dali_pipeline.DeviceView` over host memory (what
    :class:`~engine.executor.HostDevice` copies from). Each call makes new arrays, kept
    alive by its DeviceBatch, as DALI's dynamic executor keeps its GPU buffers."""

    outputs_outlive_next_call = True  # each call makes new arrays

    def __init__(self, preprocessor: "DaliPreprocessor") -> None:
        if preprocessor.device != "cpu":
            raise ValueError("HostProducer wraps a CPU DaliPreprocessor")
        self._pre = preprocessor

    def __call__(self, payload: Sequence[bytes]) -> "DeviceBatch":
        from engine.preprocess.dali_pipeline import DeviceBatch, DeviceView

        res = self._pre.process(payload)
        views = {}
        for key, array in res.views.items():
            array = np.ascontiguousarray(array)
            views[key] = DeviceView(key, int(array.ctypes.data) if len(array) else 0, array.shape, array.dtype, array)
        return DeviceBatch(
            ok=tuple(res.ok), sizes=tuple(res.sizes), errors=dict(res.errors), views=views, device_id=0, cuda_stream=None
        )


class DaliGpuProducer:
    """DALI on the GPU, its outputs ordered on ``stream`` (a stream of the executor's
    device, e.g. a pycuda ``Stream``, kept referenced here for as long as the producer
    and its outputs are); the executor's slots wait on that stream. The GPU pipeline
    runs DALI's dynamic executor, whose outputs stay valid while referenced.

    :meth:`close` closes the pipeline, then lets go of the stream (DALI's buffers are
    ordered on it): close it before the device, whose context the stream needs to be
    destroyed in (pycuda otherwise skips the destroy once the context is gone)."""

    outputs_outlive_next_call = True

    def __init__(self, preprocessor: "DaliPreprocessor", stream: Any) -> None:
        from engine.gpu import stream_handle

        self._pre = preprocessor
        self.stream = stream
        self._handle = stream_handle(stream)

    def __call__(self, payload: Sequence[bytes]) -> "DeviceBatch":
        if self.stream is None:
            raise RuntimeError("the DALI producer is closed")
        return self._pre.process_device(payload, cuda_stream=self._handle)

    def __enter__(self) -> "DaliGpuProducer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Idempotent."""
        try:
            self._pre.close()
        finally:
            self.stream = None


@dataclass
class _Entry:
    batch: Any  # engine.runner._Batch
    outputs: dict[str, Classified] | None = None


class StreamedInference:
    """Drives ``executor`` (one lane per model, keyed by spec key) from ``producer``; an
    :class:`engine.runner.Inference`.

    :meth:`batches` takes an iterator of read batches (objects with ``paths``,
    ``payload`` and ``read_errors``; the reader's output) and yields ``(batch,
    outputs)`` in input order, ``batch.result`` filled in (ok rows, sizes, errors),
    ``outputs[spec key]`` the classified rows of ``batch.result.ok``."""

    preprocess = None  # the reader thread only reads bytes: DALI runs in batches()

    def __init__(self, models: Sequence["ResolvedModel"], executor: StreamedExecutor, producer: Producer,
                 backend: str = "streamed executor") -> None:
        self._models = list(models)
        self._executor = executor
        self._producer = producer
        self._order: deque[_Entry] = deque()
        self.backend = backend  # what the run summary calls it

    @property
    def stats(self) -> Mapping[str, LaneStats]:
        return self._executor.stats

    def details(self) -> list[str]:
        return stats_lines(self.stats)

    def _classify(self, raw: Mapping[str, np.ndarray]) -> dict[str, Classified]:
        return {m.spec.key: classify(raw[m.spec.key], m.output_kind, m.spec.labels, m.spec.key) for m in self._models}

    def _complete(self, done) -> Exception | None:
        """Classify the completed submissions, in order. A non-finite output stops there
        and comes back (naming its files) rather than raised, so that the caller first
        hands out the batches finished before it: their rows are written, not redone."""
        for c in done:
            try:
                c.tag.outputs = self._classify({m.spec.key: c.output(m.spec.key) for m in self._models})
            except NonFiniteOutput as exc:
                batch = c.tag.batch
                paths = getattr(batch, "paths", None)
                return exc if paths is None else naming_files(exc, paths, batch.result.ok)
        return None

    def _finish(self, done) -> Iterator[tuple[Any, dict[str, Classified]]]:
        """Classify ``done`` and yield every batch ready in order; then raise the error
        that stopped the classification, if any."""
        failed = self._complete(done)
        yield from self._ready()
        if failed is not None:
            raise failed

    def _ready(self) -> Iterator[tuple[Any, dict[str, Classified]]]:
        while self._order and self._order[0].outputs is not None:
            entry = self._order.popleft()
            yield entry.batch, entry.outputs

    def batches(self, read: Iterator[Any]) -> Iterator[tuple[Any, dict[str, Classified]]]:
        """See the class docstring. Close the generator (``contextlib.closing``) before
        closing the producer or the device: that waits for the copies still reading the
        producer's buffers and lets go of them."""
        outlive = bool(getattr(self._producer, "outputs_outlive_next_call", False))
        copying = _Copying()
        try:
            for batch in read:
                if not outlive:  # the producer's next run reuses the buffers the copies read
                    copying.wait()
                produced = self._producer(batch.payload)
                copying.wait()  # the copies of the batch before ran meanwhile
                batch.payload = None
                batch.result = PreprocessResult(
                    ok=list(produced.ok), views={}, sizes=list(produced.sizes), errors=dict(produced.errors)
                )
                entry = _Entry(batch)
                self._order.append(entry)
                if produced.ok:
                    inputs = {m.spec.key: produced.views[m.spec.key] for m in self._models}
                    done, consumed = self._executor.submit_device(inputs, producer=produced.cuda_stream, tag=entry)
                    copying.hold(produced, consumed)
                    inputs = None  # only ``copying`` keeps the batch alive
                else:  # nothing decoded: error rows only, kept in order behind earlier batches
                    done = ()
                    entry.outputs = self._classify(
                        {m.spec.key: np.zeros((0, m.spec.num_classes), np.float32) for m in self._models})
                produced = None
                yield from self._finish(done)
            copying.wait()
            yield from self._finish(self._executor.drain())
        finally:
            copying.abandon()  # ended early (an error, the caller stopped)


class _Copying:
    """The producer's outputs of the last batch submitted, referenced until the
    executor's copies out of them (its :class:`~engine.executor.Consumed`) are done."""

    def __init__(self) -> None:
        self._outputs: Any = None
        self._consumed: Any = None

    def hold(self, outputs: Any, consumed: Any) -> None:
        self._outputs, self._consumed = outputs, consumed

    def wait(self) -> None:
        """Wait for the copies (if any), then let go of the outputs."""
        consumed, self._consumed = self._consumed, None
        if consumed is not None:
            consumed.synchronize()
        self._outputs = None

    def abandon(self) -> None:
        """:meth:`wait`, logging a failure: the first error is the one to report."""
        try:
            self.wait()
        except Exception as exc:
            log.error("while waiting for the executor's copies: %s", exc)
        self._outputs = None


def stats_lines(stats: Mapping[str, LaneStats]) -> list[str]:
    """Per model: batches, host overhead and device time per batch (the executor's own
    accounting; device times come from CUDA events on the GPU)."""
    out = []
    for key, s in stats.items():
        if not s.batches:
            continue
        out.append(
            f"executor {key}: {s.batches} batches ({s.graph_batches} as graphs, {s.padded_batches} padded), "
            f"host {s.host_overhead_ms_per_batch:.2f} ms/batch, device {s.device_ms_per_batch:.2f} ms/batch"
        )
    return out
