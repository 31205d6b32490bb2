"""What every backend declares and offers.

Stages declare their tensors as frozen dataclasses so buffers can be allocated once
from the declarations (house style, DESIGN.md section 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

Device = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class TensorDecl:
    """One input or output of a model: dims are ints, or None where dynamic."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype
    device: Device = "cpu"

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model is pinned to, or None when the batch is dynamic."""
        return self.shape[0] if self.shape else None


@runtime_checkable
class Backend(Protocol):
    """Runs one model. ``run`` takes an NCHW batch in the declared input dtype and
    returns the raw model output (logits or probabilities, per the model's spec)."""

    name: str
    precision: str
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...

    def __enter__(self) -> "Backend": ...

    def __exit__(self, *exc) -> None: ...


def zero_padded(batch: np.ndarray, rows: int) -> np.ndarray:
    """``batch`` with zero rows appended up to ``rows``, for a graph pinned to a batch of
    that size (its output rows past ``len(batch)`` are then dropped); as is when full."""
    if len(batch) >= rows:
        return batch
    return np.concatenate([batch, np.zeros((rows - len(batch), *batch.shape[1:]), batch.dtype)])
