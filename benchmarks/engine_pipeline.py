"""This engine's side of the benchmark: DALI preprocessing plus one backend per model.

The end-to-end loop has the shape of :func:`engine.runner.run` without the parquet
writer: a reader thread reads the files and runs the DALI pipeline (each image decoded
once, branched into every model's view) one batch ahead, while the calling thread runs
each model's backend and turns outputs into probabilities and labels. The `engine run`
command itself is timed separately (stage ``engine_run``) where its backend is the one
measured, so the figure a user sees is on record too.
"""

from __future__ import annotations

import logging
import queue
import threading
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import numpy as np

from benchmarks.backends import BackendContext, BackendEntry
from benchmarks.config import Precision

if TYPE_CHECKING:
    from engine.backends.base import Backend
    from engine.models import ResolvedModel
    from engine.preprocess import DaliPreprocessor, PreprocessResult

log = logging.getLogger(__name__)

_DONE = object()


@dataclass(frozen=True)
class EngineConfig:
    entry: BackendEntry
    precision: Precision

    @property
    def config_id(self) -> str:
        return self.entry.config_id(self.precision)

    @property
    def device(self) -> str:
        return self.entry.device

    def label(self) -> str:
        return (
            f"engine: DALI ({self.entry.preprocess_device}) decode-once + {self.entry.name} "
            f"on {self.entry.device}, {self.precision.value}"
        )


def handled(result: "PreprocessResult") -> int:
    """Images a preprocessing call dealt with: decoded ones plus those that failed."""
    return len(result.ok) + len(result.errors)


def read_batches(paths: Sequence[Path], batch_size: int) -> Iterator[list[bytes]]:
    for start in range(0, len(paths), batch_size):
        out = []
        for p in paths[start : start + batch_size]:
            try:
                out.append(Path(p).read_bytes())
            except OSError as exc:  # becomes an error row, as in engine run
                log.debug("cannot read %s: %s", p, exc)
                out.append(b"")
        yield out


class EnginePipeline:
    """One engine configuration: a backend per model and a DALI pipeline per view set.

    A context manager; everything it opened is closed on exit.
    """

    def __init__(
        self,
        config: EngineConfig,
        models: Mapping[str, "ResolvedModel"],
        context: BackendContext,
    ) -> None:
        self.config = config
        self.models = dict(models)
        self.context = context
        self._stack = ExitStack()
        self.backends: dict[str, "Backend"] = {}
        self._preprocessors: dict[tuple[str, ...], "DaliPreprocessor"] = {}
        try:
            for key, model in self.models.items():
                backend = config.entry.create(model, config.precision, context)
                self.backends[key] = self._stack.enter_context(backend)
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> "EnginePipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._preprocessors.clear()
        self._stack.close()

    def preprocessor(self, keys: Sequence[str]) -> "DaliPreprocessor":
        from engine.preprocess.dali_pipeline import DaliPreprocessor

        ident = tuple(keys)
        if ident not in self._preprocessors:
            pre = DaliPreprocessor(
                views=[(k, self.models[k].spec.preprocess) for k in keys],
                max_batch=self.context.batch_size,
                num_threads=self.context.threads,
                device=self.config.entry.preprocess_device,
            )
            self._preprocessors[ident] = self._stack.enter_context(pre)
        return self._preprocessors[ident]

    def preprocess(self, paths: Sequence[Path], keys: Sequence[str], limit: int | None = None) -> Iterator["PreprocessResult"]:
        pre = self.preprocessor(keys)
        for i, payload in enumerate(read_batches(paths, self.context.batch_size)):
            if limit is not None and i >= limit:
                return
            yield pre.process(payload)

    def infer(self, key: str, batch: np.ndarray) -> np.ndarray:
        """Probabilities (n, classes) for one preprocessed host batch."""
        from engine.postprocess import classify

        model = self.models[key]
        raw = self.backends[key].run(batch)
        return classify(raw, model.output_kind, model.spec.labels, key).probabilities

    def end_to_end(
        self, paths: Sequence[Path], keys: Sequence[str], limit: int | None = None
    ) -> tuple[int, dict[str, np.ndarray], list[int]]:
        """Files -> probabilities, reader thread one batch ahead of inference.

        Returns (images handled, probabilities per model for the decodable images,
        their indices into ``paths``).
        """
        pre = self.preprocessor(keys)
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def produce() -> None:
            try:
                for i, payload in enumerate(read_batches(paths, self.context.batch_size)):
                    if stop.is_set() or (limit is not None and i >= limit):
                        break
                    _put(q, (i * self.context.batch_size, pre.process(payload)), stop)
                _put(q, _DONE, stop)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                _put(q, exc, stop)

        reader = threading.Thread(target=produce, name="bench-engine-reader", daemon=True)
        reader.start()
        images = 0
        probs: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        ok_indices: list[int] = []
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                offset, result = item
                images += handled(result)
                for key in keys:
                    view = result.views[key]
                    if len(view):
                        probs[key].append(self.infer(key, view))
                ok_indices.extend(offset + i for i in result.ok)
        finally:
            stop.set()
            # No timeout: the reader stops after its current batch, and must not still be
            # using the DALI pipeline when the next pass starts.
            reader.join()
        out = {
            k: np.concatenate(v) if v else np.zeros((0, self.models[k].spec.num_classes), np.float32)
            for k, v in probs.items()
        }
        return images, out, ok_indices


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return
        except queue.Full:
            continue


class StreamedEnginePipeline(EnginePipeline):
    """An entry run by the streamed executor (``entry.executor``: ``"cuda"`` or
    ``"host"``): every model is a lane of one :class:`~engine.executor.StreamedExecutor`.

    ``infer`` (the inference-alone stage) submits one host batch and waits for it: copy
    in, model, copy out, no overlap between batches. ``end_to_end`` is the loop of
    `engine run`'s GPU path (:class:`engine.streamed_run.StreamedInference`): a reader
    thread reads bytes, DALI writes the views where the executor copies from (GPU
    buffers on CUDA), batches overlap. The preprocess stage alone still returns host
    arrays (``DaliPreprocessor.process``), so on the GPU it includes the copy back.
    """

    def __init__(self, config: EngineConfig, models: Mapping[str, "ResolvedModel"], context: BackendContext) -> None:
        from engine.executor import ExecutorConfig, StreamedExecutor, make_device

        self.config = config
        self.models = dict(models)
        self.context = context
        self._stack = ExitStack()
        self.backends = {}
        self._preprocessors = {}
        try:
            self.device = make_device(config.entry.executor)
            self._stack.callback(self.device.close)
            for key, model in self.models.items():
                backend = config.entry.create(model, config.precision, context)
                if hasattr(backend, "__exit__"):
                    backend = self._stack.enter_context(backend)
                self.backends[key] = backend
            self.executor = self._stack.enter_context(
                StreamedExecutor(self.backends, self.device, ExecutorConfig(context.batch_size))
            )
            self._dali_stream = self.device.stream() if config.entry.executor == "cuda" else None
            # Dropped once the DALI pipelines (entered later, so closed earlier) are
            # closed and before the device is: destroyed while its context is current.
            self._stack.callback(setattr, self, "_dali_stream", None)
        except BaseException:
            self._stack.close()
            raise

    def infer(self, key: str, batch: np.ndarray) -> np.ndarray:
        from engine.postprocess import classify

        model = self.models[key]
        done = self.executor.submit({key: batch}) + self.executor.drain()
        (completed,) = done
        return classify(completed.output(key), model.output_kind, model.spec.labels, key).probabilities

    def end_to_end(
        self, paths: Sequence[Path], keys: Sequence[str], limit: int | None = None
    ) -> tuple[int, dict[str, np.ndarray], list[int]]:
        from engine.runner import FileReader
        from engine.streamed_run import DaliGpuProducer, HostProducer, StreamedInference

        pre = self.preprocessor(keys)
        producer = HostProducer(pre) if self._dali_stream is None else DaliGpuProducer(pre, self._dali_stream)
        inference = StreamedInference([self.models[k] for k in keys], self.executor, producer)
        size = self.context.batch_size
        chunks = [list(paths[i : i + size]) for i in range(0, len(paths), size)][:limit]
        reader = FileReader(iter(chunks), None)
        images, offset = 0, 0
        probs: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        ok_indices: list[int] = []
        reader.start()
        try:
            with closing(inference.batches(reader.items())) as results:  # before DALI and the device close
                for batch, outputs in results:
                    images += len(batch.paths)
                    for k in keys:
                        probs[k].append(outputs[k].probabilities)
                    ok_indices.extend(offset + i for i in batch.result.ok)
                    offset += len(batch.paths)
        finally:
            reader.stop()
            reader.join()
        out = {k: np.concatenate(v) for k, v in probs.items()}
        return images, out, ok_indices


def open_pipeline(config: EngineConfig, models: Mapping[str, "ResolvedModel"], context: BackendContext) -> EnginePipeline:
    """The pipeline an entry is measured with."""
    cls = StreamedEnginePipeline if config.entry.executor else EnginePipeline
    return cls(config, models, context)
