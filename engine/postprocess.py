"""Raw model outputs -> probabilities and labels (the CPU postprocess).

The GPU path has a fused softmax/argmax kernel (kernels/) with this module as its
NumPy reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import ModelError
from engine.specs import OutputKind

# How far a row of "probabilities" may be from summing to one before we refuse it.
PROBABILITY_SUM_TOLERANCE = 1e-3


def softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float32, copy=False)
    x = x - x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)
    return x


@dataclass(frozen=True)
class Classified:
    probabilities: np.ndarray  # (n, classes) float32
    index: np.ndarray  # (n,) int64 argmax
    labels: tuple[str, ...]  # label of each row

    def __len__(self) -> int:
        return len(self.index)


def classify(raw: np.ndarray, output: OutputKind, labels: tuple[str, ...], model: str) -> Classified:
    """Turn one model's raw output into probabilities and labels.

    A model declared to output probabilities whose rows are not probability vectors is
    refused with a message that says how to fix the spec, rather than silently
    re-normalised: that mismatch means the spec is wrong for this file.
    """
    if raw.ndim != 2 or raw.shape[1] != len(labels):
        raise ModelError(
            f"{model}: output shape {tuple(raw.shape)} does not match {len(labels)} labels {list(labels)}"
        )
    if not np.isfinite(raw).all():
        raise ModelError(f"{model}: output contains NaN or infinity (broken model or wrong precision)")
    if output is OutputKind.LOGITS:
        probs = softmax(raw)
    else:
        probs = raw.astype(np.float32, copy=False)
        sums = probs.sum(axis=1)
        if (probs < -1e-6).any() or (np.abs(sums - 1.0) > PROBABILITY_SUM_TOLERANCE).any():
            raise ModelError(
                f"{model}: the spec says the model outputs probabilities, but its rows sum to "
                f"{float(sums.min()):.3g}..{float(sums.max()):.3g}; if this ONNX outputs logits, "
                f"set output = \"logits\" for it in a spec file (--spec-file)"
            )
    index = probs.argmax(axis=1)
    return Classified(probs, index, tuple(labels[i] for i in index))
