"""Typed settings of a benchmark run and the names the results use."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal

from engine.errors import InputError
from engine.specs import Task


class Pipeline(str, Enum):
    REFERENCE = "reference"  # PyTorch as the model cards use the models
    ENGINE = "engine"  # this project


class Scenario(str, Enum):
    """Which classifiers an end-to-end run feeds."""

    GENDER = "gender"
    QUALITY = "quality"
    BOTH = "both"

    @property
    def tasks(self) -> tuple[Task, ...]:
        if self is Scenario.BOTH:
            return (Task.GENDER, Task.QUALITY)
        return (Task(self.value),)


class Stage(str, Enum):
    PREPROCESS = "preprocess"  # file read + decode + resize/crop/normalise, no model
    INFERENCE = "inference"  # one model on preprocessed host batches (host in, host out)
    END_TO_END = "end_to_end"  # files -> probabilities and labels
    ENGINE_RUN = "engine_run"  # `engine run` itself (engine.runner.run, parquet written)


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


DeviceChoice = Literal["auto", "cpu", "cuda"]
Device = Literal["cpu", "cuda"]

DEFAULT_FRAME_SIZE = (1920, 1080)


@dataclass(frozen=True)
class BenchConfig:
    """Everything a run depends on; recorded verbatim in the JSON under ``settings``.

    Images: a generated set (``frames`` 16:9 frames of ``frame_size`` plus ``crops``
    small head crops, half PNG and half JPEG, reproducible from ``seed``), or the user's
    folder ``images`` (at most ``max_images`` of it, in discovery order).

    Empty ``backends`` / ``precisions`` mean every one available on this machine.
    """

    out_dir: Path
    images: Path | None = None
    max_images: int | None = None
    frames: int = 32
    crops: int = 32
    frame_size: tuple[int, int] = DEFAULT_FRAME_SIZE
    seed: int = 0
    scenarios: tuple[Scenario, ...] = (Scenario.GENDER, Scenario.QUALITY, Scenario.BOTH)
    pipelines: tuple[Pipeline, ...] = (Pipeline.REFERENCE, Pipeline.ENGINE)
    backends: tuple[str, ...] = ()
    precisions: tuple[Precision, ...] = ()
    device: DeviceChoice = "auto"
    gender_variant: str | None = None
    quality_variant: str | None = None
    batch_size: int = 16
    repeats: int = 3
    rounds: int = 1  # every configuration measured this many times, alternating order, timings pooled
    warmup_batches: int = 2
    workers: int | None = None  # DataLoader workers of the reference; default one per core, at most 16
    threads: int | None = None  # intra-op / decode threads; default all cores
    cache_dir: Path | None = None
    spec_file: Path | None = None
    engine_run_check: bool = True  # also time `engine run` itself where its backend is measured
    plot: bool = True

    def __post_init__(self) -> None:
        if self.images is None:  # the generated set's counts, size and seed
            from benchmarks.images import ImageSetSpec

            ImageSetSpec(self.frames, self.crops, self.frame_size, self.seed)
        if self.max_images is not None and self.max_images < 1:
            raise InputError(f"max images must be at least 1, got {self.max_images}")
        if self.max_images is not None and self.images is None:
            raise InputError("--max-images limits a folder given with --images; the generated set's size is "
                             "--frames and --crops")
        if not 1 <= self.batch_size <= 1024:
            raise InputError(f"batch size must be between 1 and 1024, got {self.batch_size}")
        if not 1 <= self.repeats <= 100:
            raise InputError(f"repeats must be between 1 and 100, got {self.repeats}")
        if not 1 <= self.rounds <= 20:
            raise InputError(f"rounds must be between 1 and 20, got {self.rounds}")
        if not 0 <= self.warmup_batches <= 100:
            raise InputError(f"warm-up batches must be between 0 and 100, got {self.warmup_batches}")
        if self.workers is not None and not 0 <= self.workers <= 64:
            raise InputError(f"workers must be between 0 and 64, got {self.workers}")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise InputError(f"threads must be between 1 and 1024, got {self.threads}")
        if not self.scenarios:
            raise InputError("no scenario selected")
        if not self.pipelines:
            raise InputError("no pipeline selected")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def effective_threads(self) -> int:
        return self.threads or _usable_cpus()

    @property
    def effective_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        # The reference at its best: one loader process per core, as the engine's decoder
        # gets every core too.
        return min(16, _usable_cpus())

    @property
    def tasks(self) -> tuple[Task, ...]:
        """The models the selected scenarios need, in a fixed order."""
        needed = {t for s in self.scenarios for t in s.tasks}
        return tuple(t for t in Task if t in needed)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
