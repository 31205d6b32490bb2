"""Raw model outputs -> probabilities and labels, on the host for every path.

kernels/postprocess.cu holds a fused softmax/argmax kernel with this module as its NumPy
reference; neither path uses it (for 2-4 classes the logits are as small as its output).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from engine.errors import ModelError
from engine.specs import OutputKind

log = logging.getLogger(__name__)

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


_warned_softmaxed: set[str] = set()


def _warn_if_already_probabilities(raw: np.ndarray, model: str) -> None:
    """A model declared to output logits whose rows are all probability vectors most
    likely ends in a softmax already: a second one flattens its probabilities. Said once
    per model and process; the output is still treated as declared."""
    if model in _warned_softmaxed or len(raw) < 2:
        return
    if (raw >= 0).all() and (raw <= 1).all() and np.allclose(raw.sum(axis=1), 1.0, atol=PROBABILITY_SUM_TOLERANCE):
        _warned_softmaxed.add(model)
        log.warning("%s: declared to output logits, but every row is already a probability vector: if the ONNX "
                    "ends in a softmax, declare output = \"probabilities\" (spec file, or the ONNX's "
                    "engine.output_kind metadata), or its probabilities are softmaxed twice", model)


class NonFiniteOutput(ModelError):
    """A model gave NaN or infinity; ``rows`` are the batch rows it did so for."""

    def __init__(self, model: str, rows: Sequence[int], total: int) -> None:
        self.rows = tuple(int(r) for r in rows)
        super().__init__(f"{model}: output contains NaN or infinity for {len(self.rows)} of {total} image(s) of a "
                         f"batch (broken model or wrong precision)")


def naming_files(exc: NonFiniteOutput, paths: Sequence[str], ok: Sequence[int]) -> ModelError:
    """``exc`` with the files of its rows named, so that the user can find them: row
    ``r`` of the batch is ``paths[ok[r]]`` (a batch's files, and the ones that decoded)."""
    files = [paths[ok[r]] for r in exc.rows]
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    return ModelError(f"{exc}: {shown}; remove them (or try fp32) and run again: finished rows are kept")


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
    finite = np.isfinite(raw).all(axis=1)
    if not finite.all():
        raise NonFiniteOutput(model, np.flatnonzero(~finite), len(raw))
    if output is OutputKind.LOGITS:
        _warn_if_already_probabilities(raw, model)
        probs = softmax(raw)
    else:
        probs = raw.astype(np.float32, copy=False)
        sums = probs.sum(axis=1)
        negative = (probs < -1e-6).any()
        if negative or (np.abs(sums - 1.0) > PROBABILITY_SUM_TOLERANCE).any():
            what = (f"it gives negative values (down to {float(probs.min()):.3g})" if negative else
                    f"its rows sum to {float(sums.min()):.3g}..{float(sums.max()):.3g}")
            raise ModelError(
                f"{model}: the model is declared to output probabilities, but {what}; if this ONNX outputs "
                f"logits, say so: output = \"logits\" for it in a spec file (--spec-file), or "
                f"engine.output_kind = \"logits\" in the ONNX's metadata, which wins over the spec"
            )
    index = probs.argmax(axis=1)
    return Classified(probs, index, tuple(labels[i] for i in index))
