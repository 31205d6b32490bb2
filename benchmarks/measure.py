"""Timing statistics and peak-memory sampling.

Host memory is sampled, not read from ``ru_maxrss``: the process-wide maximum cannot be
reset between configurations, and the reference's DataLoader workers are separate
processes. A sampler thread sums the proportional set size (PSS, from
``/proc/<pid>/smaps_rollup``) of this process and all its descendants, so pages that
forked workers share with the parent are counted once; where PSS is unavailable it
falls back to RSS (and says so), and off Linux to this process's ``ru_maxrss``.

Device memory (where a GPU exists) is sampled through NVML, loaded with ctypes on first
use: the device-wide used memory, of the GPU that is CUDA device 0 (found by PCI bus
id), above what was used when sampling started. It sees
every allocator (PyTorch's caching allocator, ONNX Runtime's arena, TensorRT), which
``torch.cuda.max_memory_allocated`` does not.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks.machine import cuda_pci_bus_id

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class Throughput:
    """Repeated timings of one stage: per-repetition seconds and images/s statistics."""

    images: int
    seconds: tuple[float, ...]

    @property
    def rates(self) -> list[float]:
        return [self.images / s if s > 0 else math.inf for s in self.seconds]

    def as_dict(self) -> dict:
        rates = self.rates
        median = statistics.median(rates)
        return {
            "seconds": [round(s, 6) for s in self.seconds],
            "images_per_s": {
                "median": median,
                "mean": statistics.fmean(rates),
                "min": min(rates),
                "max": max(rates),
                "stdev": statistics.stdev(rates) if len(rates) > 1 else 0.0,
                # (max - min) / median: the whole spread of the repetitions, in percent
                "spread_pct": 100.0 * (max(rates) - min(rates)) / median if median > 0 else 0.0,
            },
        }


def time_repeated(fn: Callable[[], int], repeats: int) -> Throughput:
    """Call ``fn`` ``repeats`` times; ``fn`` returns the number of images it processed
    (the same every time)."""
    seconds = []
    images = None
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn()
        seconds.append(time.perf_counter() - start)
        if images is not None and n != images:
            raise RuntimeError(f"a repetition processed {n} images, an earlier one {images}")
        images = n
    return Throughput(images or 0, tuple(seconds))


# ----------------------------------------------------------------------------- host memory


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        out.extend(int(c) for c in text.split())
    return out


def _process_tree(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(_children(p))
    return seen


def _pss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE // 1024
    except (OSError, ValueError, IndexError):
        return None


def host_memory_metric() -> str:
    """Which figure :class:`MemorySampler` reports on this machine."""
    if sys.platform.startswith("linux"):
        return "pss_tree" if _pss_kb(os.getpid()) is not None else "rss_tree"
    return "ru_maxrss_self"


def sample_host_mb() -> float:
    """Current memory of this process and its descendants, MiB (metric: see above)."""
    metric = host_memory_metric()
    if metric == "ru_maxrss_self":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
    read = _pss_kb if metric == "pss_tree" else _rss_kb
    total = 0
    for pid in _process_tree(os.getpid()):
        kb = read(pid)
        if kb is not None:  # a worker may exit between listing and reading
            total += kb
    return total / 1024


# ----------------------------------------------------------------------------- device memory


class _Nvml:
    """The few NVML calls needed, through ctypes (no Python NVML package required)."""

    class _Memory(ctypes.Structure):
        _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

    def __init__(self) -> None:
        self._lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self._lib.nvmlInit_v2() != 0:
            raise OSError("nvmlInit failed")
        self._handle = ctypes.c_void_p()
        # NVML numbers GPUs its own way and ignores CUDA_VISIBLE_DEVICES: find CUDA
        # device 0 (the one measured) by its PCI bus id; NVML index 0 only without one
        bus_id = cuda_pci_bus_id(0)
        if bus_id is not None:
            rc = self._lib.nvmlDeviceGetHandleByPciBusId_v2(bus_id.encode(), ctypes.byref(self._handle))
            if rc == 0:
                return
            log.warning("NVML has no GPU on bus %s (error %d): measuring NVML device 0", bus_id, rc)
        if self._lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self._handle)) != 0:
            self._lib.nvmlShutdown()
            raise OSError("no NVML device 0")

    def used_bytes(self) -> int:
        mem = self._Memory()
        if self._lib.nvmlDeviceGetMemoryInfo(self._handle, ctypes.byref(mem)) != 0:
            raise OSError("nvmlDeviceGetMemoryInfo failed")
        return int(mem.used)

    def close(self) -> None:
        self._lib.nvmlShutdown()


def device_used_bytes() -> int | None:
    """Device-wide used memory of CUDA device 0 now, or None where NVML is unavailable."""
    try:
        nvml = _Nvml()
    except OSError as exc:
        log.info("NVML unavailable (%s)", exc)
        return None
    try:
        return nvml.used_bytes()
    finally:
        nvml.close()


class MemorySampler:
    """Samples host (and, with ``device=True``, GPU) memory in a thread while open.

    ``peak_host_mb`` is the highest sample; ``peak_device_mb`` the highest device-wide
    used memory above ``device_base_bytes`` (by default the level when sampling
    starts; the suite passes the level before any model was loaded, so weights, engines
    and allocator caches count), or None without a GPU.
    """

    def __init__(self, interval_s: float = 0.05, device: bool = False, device_base_bytes: int | None = None) -> None:
        self.interval_s = interval_s
        self.metric = host_memory_metric()
        self.peak_host_mb = 0.0
        self.peak_device_mb: float | None = None
        self._nvml: _Nvml | None = None
        self._device_base = 0
        if device:
            try:
                self._nvml = _Nvml()
                self._device_base = self._nvml.used_bytes() if device_base_bytes is None else device_base_bytes
                self.peak_device_mb = 0.0
            except OSError as exc:
                log.warning("device memory not measured: NVML unavailable (%s)", exc)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak_host_mb = max(self.peak_host_mb, sample_host_mb())
        if self._nvml is not None:
            used = (self._nvml.used_bytes() - self._device_base) / (1024 * 1024)
            self.peak_device_mb = max(self.peak_device_mb or 0.0, used)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "MemorySampler":
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="bench-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._sample()
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None
