"""Calibration images: choosing them, preprocessing them, feeding them to the quantiser.

INT8 activation scales are only as good as the images they are measured on, and those
images must reach the network exactly as they will in production: decoded and resized,
cropped and normalised by the model's own preprocessing pipeline (the DALI pipeline of
:mod:`engine.preprocess`, driven by the model's :class:`~engine.specs.Preprocess`).
The same tensors are then used to check every prepared ONNX against FP32.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Sequence, overload

import numpy as np

from engine.backends.base import zero_padded
from engine.discovery import IMAGE_SUFFIXES, iter_images  # what `engine run` reads (GIF, TIFF: host decoder)
from engine.errors import DependencyError, InputError
from engine.specs import ModelSpec

logger = logging.getLogger(__name__)


# MinMax calibration is settled by a few dozen varied images; more mostly costs time
# (CAFormer-S36 at 384 runs at roughly 1 image/s on a small CPU).
DEFAULT_CALIBRATION_IMAGES = 64
DEFAULT_CALIBRATION_BATCH = 8

# Turns a list of encoded images into (ok indices, (len(ok), 3, S, S) float32, {index:
# reason} for the others). The default is the model's DALI pipeline; front ends with
# their own decoder may pass theirs (it must implement the same spec.preprocess).
PreprocessFn = Callable[[Sequence[bytes]], tuple[list[int], np.ndarray, dict[int, str]]]


def find_calibration_images(folder: Path, limit: int = DEFAULT_CALIBRATION_IMAGES) -> list[Path]:
    """Up to ``limit`` images from ``folder`` (recursively), spread evenly over the sorted
    listing so that a folder of episodes contributes frames from all of them. Deterministic."""
    folder = Path(folder)
    if limit < 1:
        raise InputError(f"calibration image count must be at least 1, got {limit}")
    if not folder.is_dir():
        raise InputError(f"calibration folder {folder} does not exist or is not a folder")
    # As `engine run` finds them (symlinked folders followed, loops skipped), in path
    # order; a file reached by several paths counts once (it would weigh more).
    found, seen = [], set()
    for p in sorted(iter_images(folder)):
        try:
            st = p.stat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            found.append(p)
    if not found:
        raise InputError(f"calibration folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if len(found) <= limit:
        return found
    picks = np.linspace(0, len(found) - 1, num=limit).round().astype(int)
    return [found[i] for i in sorted(set(picks.tolist()))]


class CalibrationImages(Sequence[Path]):
    """The calibration images of one run or build: a sequence of paths whose content
    hash (:func:`calibration_set_sha256`) is read once, on first use, and then shared
    by everything that names the set by it (the run record, each model's prepared
    graph), so that all of them name the same reading."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = tuple(Path(p) for p in paths)

    @classmethod
    def find(cls, folder: Path, limit: int | None = None) -> "CalibrationImages":
        """:func:`find_calibration_images` (``limit`` None: its default)."""
        return cls(find_calibration_images(folder) if limit is None else find_calibration_images(folder, limit))

    @cached_property
    def sha256(self) -> str:
        return calibration_set_sha256(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, index: int) -> Path: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Path]: ...

    def __getitem__(self, index):
        return self.paths[index]

    def __repr__(self) -> str:
        return f"CalibrationImages({len(self.paths)} images)"


def calibration_set_sha256(paths: Sequence[Path]) -> str:
    """Hash of the calibration set's contents (order-independent; names do not matter)."""
    digests = []
    for path in paths:
        try:
            digests.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
        except OSError as exc:
            raise InputError(f"cannot read calibration image {path}: {exc.strerror or exc}") from None
    return _set_digest(digests)


def _set_digest(file_digests: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(file_digests)).encode()).hexdigest()


@dataclass(frozen=True)
class CalibrationSet:
    """Preprocessed calibration tensors for one model."""

    tensors: np.ndarray  # (n, 3, S, S) float32, exactly what the network sees
    paths: tuple[Path, ...]  # the images that made it through, in tensor order
    skipped: tuple[str, ...]  # "path: reason" for images that could not be used
    sha256: str  # calibration_set_sha256 of ``paths``

    def __len__(self) -> int:
        return int(self.tensors.shape[0])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self), batch_size):
            yield self.tensors[start : start + batch_size]


def dali_preprocess_fn(spec: ModelSpec, max_batch: int, num_threads: int = 2) -> Callable[[], object]:
    """Factory for the model's own DALI preprocessing pipeline on the CPU.

    Returns a zero-argument callable that opens the pipeline (a context manager with
    ``process(list[bytes]) -> PreprocessResult``).
    """
    try:
        from engine.preprocess import DaliPreprocessor
    except ImportError as exc:
        raise DependencyError(
            "nvidia-dali-cuda130", "gpu", f"preprocessing calibration images ({exc})"
        ) from None

    def open_pipeline():
        return DaliPreprocessor(
            views=[(spec.key, spec.preprocess)], max_batch=max_batch, num_threads=num_threads, device="cpu"
        )

    return open_pipeline


def load_calibration_set(
    paths: Sequence[Path],
    spec: ModelSpec,
    *,
    batch_size: int = DEFAULT_CALIBRATION_BATCH,
    preprocess: PreprocessFn | None = None,
) -> CalibrationSet:
    """Read and preprocess ``paths`` through the model's pipeline.

    Images that cannot be decoded are skipped with a warning; if none is left an
    :class:`InputError` is raised. ``preprocess`` replaces the DALI pipeline (used by
    front ends with their own decoder; the result must match ``spec.preprocess``).
    """
    if not paths:
        raise InputError("no calibration images given")
    started = time.perf_counter()
    logger.info("preprocessing %d calibration images for %s", len(paths), spec.key)
    size = spec.preprocess.size
    chunks: list[np.ndarray] = []
    kept: list[Path] = []
    kept_digests: list[str] = []  # of the bytes that made the tensors, not of a later reading
    skipped: list[str] = []

    def consume(chunk_paths: list[Path], run: PreprocessFn) -> None:
        blobs, readable = [], []
        for path in chunk_paths:
            try:
                blobs.append(Path(path).read_bytes())
                readable.append(path)
            except OSError as exc:
                skipped.append(f"{path}: {exc.strerror or exc}")
        if not blobs:
            return
        ok, tensors, errors = run(blobs)
        ok_set = set(ok)
        for i, path in enumerate(readable):
            if i not in ok_set:
                skipped.append(f"{path}: {errors.get(i, 'could not be decoded')}")
        if len(ok):
            tensors = np.asarray(tensors, dtype=np.float32)
            if tensors.shape != (len(ok), 3, size, size):
                raise InputError(
                    f"preprocessing returned shape {tensors.shape}, expected {(len(ok), 3, size, size)}"
                )
            chunks.append(tensors)
            kept.extend(readable[i] for i in ok)
            kept_digests.extend(hashlib.sha256(blobs[i]).hexdigest() for i in ok)

    chunked = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    if preprocess is not None:
        for chunk in chunked:
            consume(chunk, preprocess)
    else:
        opener = dali_preprocess_fn(spec, max_batch=batch_size)
        with opener() as pipeline:

            def run(blobs: Sequence[bytes]) -> tuple[list[int], np.ndarray, dict[int, str]]:
                result = pipeline.process(list(blobs))
                return list(result.ok), result.views[spec.key], dict(result.errors)

            for chunk in chunked:
                consume(chunk, run)

    for line in skipped:
        logger.warning("calibration image skipped: %s", line)
    if not kept:
        raise InputError(f"none of the {len(paths)} calibration images could be used")
    tensors = np.concatenate(chunks, axis=0)
    if not np.isfinite(tensors).all():
        raise InputError("preprocessed calibration images contain NaN or Inf")
    logger.info(
        "preprocessed %d calibration images (%d skipped) in %.1f s",
        len(kept),
        len(skipped),
        time.perf_counter() - started,
    )
    sha256 = _set_digest(kept_digests)
    if isinstance(paths, CalibrationImages) and len(kept) == len(paths) and sha256 != paths.sha256:
        # The run record and the other models name the set by paths.sha256: these
        # tensors would be a set nothing names.
        raise InputError(
            f"the calibration images changed while they were being read (under {_common_folder(kept)}); "
            "run again once nothing writes to that folder"
        )
    return CalibrationSet(tensors=tensors, paths=tuple(kept), skipped=tuple(skipped), sha256=sha256)


def _common_folder(paths: Sequence[Path]) -> str:
    try:
        return os.path.commonpath([str(Path(p).parent) for p in paths])
    except ValueError:  # mixed absolute and relative paths
        return str(Path(paths[0]).parent)


def ort_data_reader(calib: CalibrationSet, input_name: str, batch_size: int, *, dtype=np.float32, pad: bool = False):
    """An ``onnxruntime.quantization.CalibrationDataReader`` over the calibration tensors,
    as ``dtype``; with ``pad`` a short last batch is zero-padded to ``batch_size`` (a
    graph pinned to that batch)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calib.batches(batch_size))

        def get_next(self):
            batch = next(self._it, None)
            if batch is None:
                return None
            batch = np.ascontiguousarray(batch, dtype=dtype)
            return {input_name: zero_padded(batch, batch_size) if pad else batch}

        def __len__(self) -> int:
            return (len(calib) + batch_size - 1) // batch_size

    return _Reader()
