"""Shared test configuration.

* ``gpu`` marker: such tests are skipped, with the reason printed, where no NVIDIA GPU
  is visible (no ``nvidia-smi``-visible device through the CUDA driver).
* Model fixtures (random-weight exports of the real architectures, cached for the whole
  session) live in ``tests/model_fixtures.py``.
"""

from __future__ import annotations

import ctypes
import functools

import pytest

pytest_plugins = ["tests.model_fixtures"]


@functools.lru_cache(maxsize=1)
def gpu_absent_reason() -> str | None:
    """Why GPU tests cannot run here, or None when a CUDA device is usable."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 not found)"
    if lib.cuInit(0) != 0:
        return "CUDA driver present but cuInit failed (no usable GPU)"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return "no CUDA device visible"
    return None


def pytest_collection_modifyitems(config, items):
    reason = gpu_absent_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"gpu test: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
