"""Shared test configuration.

* ``gpu`` marker: such tests are skipped, with the reason printed, where no NVIDIA GPU
  is visible (no ``nvidia-smi``-visible device through the CUDA driver).
* Model fixtures (random-weight exports of the real architectures, cached for the whole
  session) live in ``tests/model_fixtures.py``.
"""

from __future__ import annotations

import functools

import pytest

from engine.gpu import cuda_absent_reason

pytest_plugins = ["tests.model_fixtures"]


@functools.lru_cache(maxsize=1)
def gpu_absent_reason() -> str | None:
    """Why GPU tests cannot run here, or None when CUDA device 0 is usable."""
    return cuda_absent_reason(0)


def pytest_collection_modifyitems(config, items):
    reason = gpu_absent_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"gpu test: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
