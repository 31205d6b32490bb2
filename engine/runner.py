"""`engine run`: files -> decode/preprocess -> both models -> labels -> parquet.

The path is chosen by :func:`engine.gpu_path.plan_path` (``--device auto|cpu|gpu``).
Both paths share discovery, resume, the reader thread, rows and the writer; they differ
in the *inference* object that turns read batches into classified rows:

* CPU: the reader thread also runs the DALI pipeline (CPU) for batch k+1 while the
  main thread runs ONNX Runtime on batch k (:class:`CpuInference`);
* GPU: the reader thread only reads bytes; DALI on the GPU and the streamed executor
  run from the main thread (:class:`engine.streamed_run.StreamedInference`).

Rows go to the :class:`~engine.writer.ResultWriter` as each batch finishes.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import stat
import sys
import threading
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection, Iterator, Protocol, Sequence

import numpy as np
import polars as pl

from engine.backends.onnxruntime import calibration_images, open_cpu_backend
from engine.discovery import iter_images
from engine.errors import EngineError, InputError
from engine.models import ModelChoice, ResolvedModel, WeightsKind, resolve_model  # ModelChoice: re-exported
from engine.postprocess import Classified, NonFiniteOutput, classify, naming_files
from engine.specs import SpecRegistry, spec_work_sha256
from engine.writer import ResultWriter, check_output_name, check_output_target

if TYPE_CHECKING:
    from builders.calibration import CalibrationImages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    input: Path
    out: Path
    models: tuple[ModelChoice, ...]
    cache_dir: Path
    spec_file: Path | None = None
    batch_size: int = 16
    threads: int | None = None
    precision: str | None = None  # None: fp16 on the GPU path, fp32 on the CPU path
    overwrite: bool = False
    flush_every: int = 512
    calib_dir: Path | None = None
    calib_count: int | None = None  # images taken from calib_dir (None: builders' default, 64)
    progress: bool = True
    device: str = "auto"  # auto | cpu | gpu
    gpu_backend: str = "tensorrt"  # tensorrt | torch (PyTorch on CUDA; checkpoints or random weights)

    def __post_init__(self) -> None:
        if self.precision not in (None, "fp32", "fp16", "int8"):
            raise InputError(f"precision must be fp32, fp16 or int8, got {self.precision!r}")
        if not 1 <= self.batch_size <= 4096:
            raise InputError(f"batch size must be between 1 and 4096, got {self.batch_size}")
        if self.flush_every < 1:
            raise InputError(f"--flush-every must be at least 1, got {self.flush_every}")
        check_output_name(self.out)  # before any model work (the writer opens after it)
        if self.calib_count is not None and self.calib_count < 1:
            raise InputError(f"--calib-count must be at least 1, got {self.calib_count}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be at least 1, got {self.threads}")
        if not self.models:
            raise InputError("no model selected")
        tasks = [m.task for m in self.models]
        if len(set(tasks)) != len(tasks):
            raise InputError("each task can be run with one variant at a time")


@dataclass
class RunSummary:
    out: Path
    images: int = 0
    errors: int = 0
    skipped: int = 0  # found and already classified by an earlier run
    retried: int = 0  # error rows of an earlier run, tried again
    gone: int = 0  # rows of an earlier run whose file was not found this time (kept)
    input: Path | None = None
    elapsed_s: float = 0.0
    backend: str = ""
    precision: str = ""
    path: str = ""
    models: list[str] = field(default_factory=list)
    random_weights: bool = False
    details: list[str] = field(default_factory=list)  # e.g. the executor's per-model accounting

    @property
    def images_per_s(self) -> float:
        return self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def lines(self) -> list[str]:
        out = [
            f"wrote {self.out}",
            f"images: {self.images} ({self.errors} errors), {self.skipped} already done from an earlier run"
            + (f", {self.retried} that failed then tried again" if self.retried else ""),
        ]
        if self.gone:
            out.append(f"kept: {self.gone} rows of an earlier run whose files were not found under "
                       f"{self.input} this time (--overwrite drops them)")
        if not (self.images or self.skipped):
            out.append(f"WARNING: no images found under {self.input}")
        out += [
            f"speed: {self.images_per_s:.1f} images/s over {self.elapsed_s:.1f} s",
            f"path: {self.path}",
            f"backend: {self.backend}, precision: {self.precision}",
        ]
        out += [f"model: {m}" for m in self.models]
        out += self.details
        if self.random_weights:
            out.append("WARNING: random weights were used: these labels are meaningless (smoke run only)")
        return out


def display_path(path: Path) -> str:
    """The path as stored in the output: absolute, symlinks kept, always valid UTF-8, and
    one string per file: a byte that is not UTF-8 is written ``\\xNN`` and a backslash
    doubled, so that a name holding the text ``\\xff`` is not taken for one holding
    the byte."""
    raw = os.fsencode(os.path.abspath(path))
    return raw.replace(b"\\", b"\\\\").decode("utf-8", errors="backslashreplace")


def result_schema(models: Sequence[ResolvedModel]) -> dict[str, pl.DataType]:
    schema: dict[str, pl.DataType] = {
        "path": pl.String,
        "error": pl.String,
        "width": pl.Int32,
        "height": pl.Int32,
    }
    for m in models:
        t = m.spec.task.value
        schema[f"{t}_label"] = pl.String
        for label in m.spec.labels:
            schema[f"{t}_p_{label}"] = pl.Float32
    for m in models:
        t = m.spec.task.value
        schema[f"{t}_model"] = pl.String
        schema[f"{t}_weights"] = pl.String
    return schema


# 3: paths escaped one to one (display_path). A record-2 output is the same run when no
# path in it holds a backslash (the only names whose form changed); see ResultWriter.
RECORD_FORMAT = 3


def older_config_record(record: dict[str, object]) -> dict[str, object]:
    """``record`` as the engine wrote it before paths were escaped one to one."""
    return {**record, "record": 2}


def run_config_record(models: Sequence[ResolvedModel], precision: str,
                      calibration: "CalibrationImages | None" = None) -> dict[str, object]:
    """What produced the rows; an output is only resumed under the same record. Models
    are named by content (sha256 of the ONNX run), not by path: a file replaced in place
    is another model, the same file reached by another path is not. An int8 run also
    records its calibration set, which decides the int8 graph's scales."""
    return {
        "record": RECORD_FORMAT,
        "precision": precision,
        "calibration_sha256": calibration.sha256 if precision == "int8" and calibration is not None else None,
        "models": [
            {
                "spec": m.spec.key,
                # preprocessing, labels or output kind changed by a spec file: another config
                "spec_sha256": spec_work_sha256(m.spec),
                "weights": m.weights.value,
                "onnx_sha256": m.source_sha256,  # the graph with its external data, if any
            }
            for m in models
        ],
    }


# --threads above this many per CPU core is lowered to it (with a warning).
MAX_THREADS_PER_CORE = 4

# A file larger than this is refused rather than read whole into memory.
MAX_FILE_BYTES = 1 << 30


def read_file(path: Path) -> tuple[bytes, str | None]:
    """The file's bytes, or (b"", cause) for something that cannot be a readable image
    file: missing, a broken link, a FIFO or device (reading it could block forever),
    unreadable, or absurdly large."""
    try:
        st = path.stat()
    except OSError as exc:
        return b"", f"cannot read: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return b"", "cannot read: not a regular file"
    if st.st_size > MAX_FILE_BYTES:
        return b"", f"cannot read: file too large ({st.st_size} bytes, limit {MAX_FILE_BYTES})"
    try:
        with open(path, "rb") as f:
            return f.read(), None
    except OSError as exc:
        return b"", f"cannot read: {exc.strerror or exc}"


@dataclass
class _Batch:
    """One batch of files as the reader hands it on: the bytes (``payload``, b"" where
    ``read_errors`` has the cause), and once preprocessed ``result`` (a
    :class:`~engine.preprocess.PreprocessResult`; its views may be empty when they
    live on the GPU), at which point ``payload`` is dropped."""

    paths: list[str]
    payload: list[bytes] | None
    read_errors: dict[int, str]
    result: object = None


_DONE = object()


class FileReader(threading.Thread):
    """Reads files, and preprocesses them when given ``preprocess`` (payload ->
    PreprocessResult), one batch ahead of inference."""

    def __init__(self, batches: Iterator[list[Path]], preprocess: Callable[[list[bytes]], object] | None,
                 depth: int = 2) -> None:
        super().__init__(name="engine-reader", daemon=True)
        self._batches = batches
        self._preprocess = preprocess
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            for paths in self._batches:
                if self._halt.is_set():
                    return
                payload, read_errors = [], {}
                for i, p in enumerate(paths):
                    data, cause = read_file(p)
                    payload.append(data)
                    if cause is not None:
                        read_errors[i] = cause
                batch = _Batch([display_path(p) for p in paths], payload, read_errors)
                if self._preprocess is not None:
                    batch.result, batch.payload = self._preprocess(payload), None
                self._put(batch)
            self._put(_DONE)
        except BaseException as exc:  # hand any failure to the consumer, which re-raises it
            self._put(exc)

    def _put(self, item) -> None:
        while not self._halt.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def items(self) -> Iterator[_Batch]:
        """The batches in order, from the calling thread; re-raises the reader's error."""
        while True:
            item = self.queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def _batches(paths: Iterator[Path], size: int) -> Iterator[list[Path]]:
    while True:
        chunk = list(itertools.islice(paths, size))
        if not chunk:
            return
        yield chunk


def _rows(batch: _Batch, models: Sequence[ResolvedModel], outputs: dict[str, object], schema) -> pl.DataFrame:
    res = batch.result
    n = len(batch.paths)
    cols: dict[str, list] = {name: [None] * n for name in schema}
    cols["path"] = list(batch.paths)
    errors = dict(res.errors)
    errors.update(batch.read_errors)  # a read failure is the real cause, not the empty bytes
    for i, msg in errors.items():
        cols["error"][i] = msg
    for j, i in enumerate(res.ok):
        if i in batch.read_errors:
            continue
        h, w = res.sizes[j]
        cols["height"][i], cols["width"][i] = int(h), int(w)
    for m in models:
        t = m.spec.task.value
        c = outputs[m.spec.key]
        for j, i in enumerate(res.ok):
            if i in batch.read_errors:
                continue
            cols[f"{t}_label"][i] = c.labels[j]
            for k, label in enumerate(m.spec.labels):
                cols[f"{t}_p_{label}"][i] = float(c.probabilities[j, k])
            cols[f"{t}_model"][i] = m.spec.key
            cols[f"{t}_weights"][i] = m.weights.value
    return pl.DataFrame(cols, schema=schema)


class TotalCounter:
    """Counts the images still to do under ``root`` (those not in ``done``) on a daemon
    thread; :meth:`apply` gives a progress bar its total once the count is known. A
    failure to count only leaves the bar without a total (logged, never raised: the run
    itself walks the same folder and reports its own errors)."""

    def __init__(self, root: Path, done: Collection[str]) -> None:
        self.total: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._count, args=(root, done), name="count-images", daemon=True)
        self._thread.start()

    def _count(self, root: Path, done: Collection[str]) -> None:
        n = 0
        try:
            for p in iter_images(root):
                if self._stop.is_set():
                    return
                if display_path(p) not in done:
                    n += 1
        except (OSError, EngineError) as exc:
            log.warning("could not count the images for the progress bar: %s", exc)
            return
        self.total = n

    def apply(self, bar) -> None:
        if self.total is not None and bar.total is None:
            bar.total = max(self.total, bar.n)
            bar.refresh()

    def stop(self) -> None:
        self._stop.set()


def _progress(enabled: bool):
    """The run's bar; its total is set later by :class:`TotalCounter`."""
    from tqdm import tqdm

    return tqdm(total=None, unit="img", desc="classifying", disable=not enabled, file=sys.stderr, smoothing=0.1)


class Inference(Protocol):
    """Turns read batches into classified rows, in order. ``preprocess`` (or None) is
    run by the reader thread on each batch's bytes; ``batches`` yields ``(batch,
    outputs)`` with ``batch.result`` set and ``outputs[spec key]`` for its ok rows."""

    backend: str
    preprocess: Callable[[list[bytes]], object] | None

    def batches(self, read: Iterator[_Batch]) -> Iterator[tuple[_Batch, dict[str, Classified]]]: ...

    def details(self) -> list[str]: ...


class CpuInference:
    """DALI on the CPU in the reader thread, ONNX Runtime per model on the main thread."""

    def __init__(self, models: Sequence[ResolvedModel], config: RunConfig, precision: str, threads: int,
                 stack: ExitStack, calibration: "CalibrationImages | None" = None) -> None:
        from engine.preprocess.dali_pipeline import DaliPreprocessor

        self._models = list(models)
        self._backends = {
            m.spec.key: stack.enter_context(
                open_cpu_backend(m, precision, threads=threads, cache_dir=config.cache_dir, calibration=calibration)
            )
            for m in models
        }
        self.backend = "onnxruntime " + "/".join(next(iter(self._backends.values())).providers)
        pre = stack.enter_context(
            DaliPreprocessor(
                views=[(m.spec.key, m.spec.preprocess) for m in models],
                max_batch=config.batch_size,
                num_threads=threads,
                device="cpu",
            )
        )
        self.preprocess = pre.process

    def batches(self, read: Iterator[_Batch]) -> Iterator[tuple[_Batch, dict[str, Classified]]]:
        for item in read:
            outputs = {}
            for m in self._models:
                view = item.result.views[m.spec.key]
                raw = self._backends[m.spec.key].run(view) if len(view) else np.zeros((0, m.spec.num_classes))
                try:
                    outputs[m.spec.key] = classify(raw, m.output_kind, m.spec.labels, m.spec.key)
                except NonFiniteOutput as exc:
                    raise naming_files(exc, item.paths, item.result.ok) from None
            yield item, outputs

    def details(self) -> list[str]:
        return []


def resolve_models(config: RunConfig) -> list[ResolvedModel]:
    registry = SpecRegistry.load(config.spec_file)
    return [resolve_model(registry.get(c.task, c.variant), c.source, config.cache_dir) for c in config.models]


def run(config: RunConfig, announce: Callable[[str], None] | None = None) -> RunSummary:
    """Classify every image under ``config.input`` into ``config.out``; ``announce`` is
    told which path was taken (and why) before the first image."""
    from engine.gpu_path import open_gpu_inference, plan_path

    # Fail fast on a missing input or an output that cannot be written, before any model work.
    discovered = iter_images(config.input)
    check_output_target(config.out)
    models = resolve_models(config)
    plan = plan_path(config, models)
    if announce is not None:
        announce(plan.describe())
    if config.calib_dir is not None and plan.precision == "fp32":
        log.warning("--calib is only used at fp16 (to check agreement with fp32) and int8 (to calibrate); "
                    "this fp32 run ignores it")
    elif config.calib_dir is not None and plan.precision == "fp16" and plan.device == "gpu":
        log.warning("--calib: this GPU fp16 run takes engines `engine build` made (its --calib checked them); "
                    "it ignores --calib")
    cores = os.cpu_count() or 1
    threads = config.threads or cores
    if threads > MAX_THREADS_PER_CORE * cores:
        # Each pool (DALI's, ONNX Runtime's) would start that many threads, which then
        # compete for the cores: 64 on 2 cores ran 18 times slower, 1000 did not finish.
        log.warning("--threads %d is more than %d times the %d CPU cores here; using %d (the default, every core, "
                    "is usually fastest)", threads, MAX_THREADS_PER_CORE, cores, MAX_THREADS_PER_CORE * cores)
        threads = MAX_THREADS_PER_CORE * cores
    # Found once; its hash is read once and names the set in the run record and in each
    # model's prepared graph alike. Used by int8 (the record; on the CPU, the calibration)
    # and by the CPU path's fp16 agreement check; a GPU fp16 run takes built engines.
    uses_calibration = plan.precision == "int8" or (plan.precision == "fp16" and plan.device == "cpu")
    calibration = calibration_images(config.calib_dir, config.calib_count) if uses_calibration else None

    def open_inference(stack: ExitStack) -> Inference:
        if plan.device == "gpu":
            return open_gpu_inference(plan, models, config, threads, stack)
        return CpuInference(models, config, plan.precision, threads, stack, calibration)

    return execute(config, discovered, models, plan.precision, plan.describe(), open_inference, calibration)


def execute(
    config: RunConfig,
    discovered: Iterator[Path],
    models: Sequence[ResolvedModel],
    precision: str,
    path: str,
    open_inference: Callable[[ExitStack], Inference],
    calibration: "CalibrationImages | None" = None,
) -> RunSummary:
    """The rows loop shared by every path: resume filter, reader thread, the given
    inference, rows, writer, progress and summary."""
    schema = result_schema(models)
    summary = RunSummary(out=config.out, precision=precision, path=path, input=config.input)
    summary.models = [f"{m.spec.key} [{m.weights.value}: {m.weights_detail}] {m.onnx_path}" for m in models]
    summary.random_weights = any(m.weights is WeightsKind.RANDOM for m in models)

    with ExitStack() as stack:
        record = run_config_record(models, precision, calibration)
        writer = stack.enter_context(
            ResultWriter(config.out, schema, record, overwrite=config.overwrite, part_rows=config.flush_every,
                         older_config=older_config_record(record))
        )
        inference = open_inference(stack)
        summary.backend = inference.backend

        out_names, out_real = {Path(config.out).name, writer.out.name}, os.path.realpath(writer.out)

        def todo() -> Iterator[Path]:
            for p in discovered:
                if p.name in out_names and os.path.realpath(p) == out_real:  # --out itself, or a link to it
                    log.info("%s is this run's output: not an input", p)  # an --out named like an image
                    continue
                shown = display_path(p)
                if shown in writer.done:
                    summary.skipped += 1  # counted as found: rows of files gone since are not
                    continue
                if shown in writer.failed:
                    summary.retried += 1
                yield p

        reader = FileReader(_batches(todo(), config.batch_size), inference.preprocess)
        bar = stack.enter_context(_progress(config.progress))
        # The bar's total comes from a second walk of the folder on a thread of its own,
        # so the first images are classified at once, not after the whole tree is listed.
        counter = TotalCounter(config.input, writer.done) if config.progress else None
        start = time.perf_counter()
        reader.start()
        try:
            # closed before the stack closes what it runs on (DALI, the device)
            for item, outputs in stack.enter_context(closing(inference.batches(reader.items()))):
                df = _rows(item, models, outputs, schema)
                writer.add(df)
                summary.images += df.height
                summary.errors += df["error"].is_not_null().sum()
                bar.update(df.height)
                if counter is not None:
                    counter.apply(bar)
        finally:
            if counter is not None:
                counter.stop()
            reader.stop()
            reader.join(timeout=5)
            summary.elapsed_s = time.perf_counter() - start
        summary.details = inference.details()
        # every file found was matched against the earlier rows: the rest are of files gone
        summary.gone = len(writer.done) - summary.skipped + len(writer.failed) - summary.retried
    return summary
