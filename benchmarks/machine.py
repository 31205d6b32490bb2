"""What the figures were measured on: machine, CPU, GPU and driver, package versions."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGES = (
    "anime-batch-engine",
    "numpy",
    "torch",
    "torchvision",
    "timm",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "nvidia-dali-cuda130",
    "nvidia-dali-cuda120",
    "tensorrt",
    "tensorrt-cu13",
    "pycuda",
    "polars",
    "pillow",
    "opencv-python-headless",
    "opencv-python",
    "matplotlib",
)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError as exc:
        log.debug("no /proc/cpuinfo: %s", exc)
    return platform.processor() or platform.machine()


def memory_total_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError) as exc:
        log.debug("no /proc/meminfo: %s", exc)
    return None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_info() -> dict | None:
    """Name, driver, memory and compute capability of GPU 0 from nvidia-smi, or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = "name,driver_version,memory.total,compute_cap"
    try:
        out = subprocess.run(
            [smi, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed (%s): GPU not recorded", exc)
        return None
    lines = [line for line in out.splitlines() if line.strip()]
    if not lines:
        return None
    fields = [f.strip() for f in lines[0].split(",")]
    info: dict = {"name": fields[0], "driver": fields[1] if len(fields) > 1 else None, "count": len(lines)}
    try:
        info["memory_mb"] = float(fields[2])
    except (IndexError, ValueError):
        info["memory_mb"] = None
    info["compute_capability"] = fields[3] if len(fields) > 3 else None
    info["cuda_runtime"] = _torch_cuda_version()
    return info


def _torch_cuda_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def machine_info() -> dict:
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count() or 1,
        "usable_cpus": usable_cpus(),
        "memory_total_mb": memory_total_mb(),
        "gpu": gpu_info(),
        "load_average": load_average(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages when the run started: on a shared machine a load
    above the core count means the figures were taken under contention."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def git_commit(repo: Path | None = None) -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        out = subprocess.run(
            [git, "rev-parse", "HEAD"],
            cwd=repo or Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("git rev-parse failed: %s", exc)
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cuda_device_present() -> bool:
    """Whether the CUDA driver sees a device (ctypes; imports no GPU library)."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    if lib.cuInit(0) != 0:
        return False
    count = ctypes.c_int(0)
    return lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
