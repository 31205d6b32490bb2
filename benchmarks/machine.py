"""What the figures were measured on: machine, CPU, GPU and driver, package versions."""

from __future__ import annotations

import ctypes
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


def cuda_pci_bus_id(ordinal: int = 0) -> str | None:
    """PCI bus id (``0000:3b:00.0``) of CUDA device ``ordinal`` as this process numbers
    devices (after ``CUDA_VISIBLE_DEVICES``), through the driver API with ctypes; None
    without a driver or device. nvidia-smi and NVML number GPUs their own way and
    ignore ``CUDA_VISIBLE_DEVICES``: the bus id is what both agree on."""
    lib = _cuda_driver()
    if lib is None:
        return None
    dev = ctypes.c_int(0)
    if lib.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(ordinal)) != 0:
        return None
    buf = ctypes.create_string_buffer(32)
    if lib.cuDeviceGetPCIBusId(buf, ctypes.c_int(len(buf)), dev) != 0:
        return None
    return buf.value.decode("ascii", "replace") or None


def same_pci_bus(a: str, b: str) -> bool:
    """Whether two PCI bus ids name the same device: nvidia-smi writes
    ``00000000:3B:00.0``, CUDA ``0000:3b:00.0``; the domain may be left out."""

    def key(bus_id: str) -> tuple[int, ...] | None:
        parts = bus_id.strip().lower().replace(".", ":").split(":")
        if len(parts) == 3:
            parts = ["0"] + parts
        try:
            return tuple(int(p, 16) for p in parts) if len(parts) == 4 else None
        except ValueError:
            return None

    ka, kb = key(a), key(b)
    return ka is not None and ka == kb


def parse_gpu_query(out: str, bus_id: str | None) -> dict | None:
    """The GPU of an nvidia-smi ``--query-gpu=pci.bus_id,name,driver_version,
    memory.total,compute_cap`` answer: the one on ``bus_id`` (CUDA device 0, the one
    the suite measures) when given and listed, else the first listed."""
    rows = [[f.strip() for f in line.split(",")] for line in out.splitlines() if line.strip()]
    if not rows:
        return None
    chosen, selected_by = rows[0], "first_listed"
    if bus_id is not None:
        for row in rows:
            if same_pci_bus(row[0], bus_id):
                chosen, selected_by = row, "cuda_device_0"
                break
        else:
            log.warning("CUDA device 0 (%s) not among nvidia-smi's GPUs: recording the first", bus_id)
    fields = chosen[1:]
    info: dict = {
        "name": fields[0] if fields else "unknown",
        "driver": fields[1] if len(fields) > 1 else None,
        "count": len(rows),
        "pci_bus_id": chosen[0] or None,
        "selected_by": selected_by,
    }
    try:
        info["memory_mb"] = float(fields[2])
    except (IndexError, ValueError):
        info["memory_mb"] = None
    info["compute_capability"] = fields[3] if len(fields) > 3 else None
    return info


def gpu_info() -> dict | None:
    """Name, driver, memory and compute capability of the GPU the suite measures (CUDA
    device 0, matched by PCI bus id) from nvidia-smi, or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = "pci.bus_id,name,driver_version,memory.total,compute_cap"
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
    info = parse_gpu_query(out, cuda_pci_bus_id(0))
    if info is not None:
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
    lib = _cuda_driver()
    count = ctypes.c_int(0)
    return lib is not None and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def _cuda_driver() -> ctypes.CDLL | None:
    """The CUDA driver library, initialised, or None without a usable driver."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    return lib if lib.cuInit(0) == 0 else None
