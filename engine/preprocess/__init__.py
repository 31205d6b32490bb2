"""Decode each image once and produce every model's view of it.

* :mod:`engine.preprocess.decode`: container sniffing, alpha detection from headers,
  the host (PIL) decoder used for images with alpha and formats DALI does not take.
* :mod:`engine.preprocess.dali_pipeline`: :class:`DaliPreprocessor`, one DALI pipeline
  that decodes once and branches into the views the model specs ask for.
* :mod:`engine.preprocess.reference`: the model cards' own preprocessing (OpenCV, PIL),
  independent of DALI, for parity tests and benchmarks.

Importing this package imports neither DALI nor OpenCV; ``DaliPreprocessor`` is loaded
on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.preprocess.result import PreprocessResult, ViewDecl

if TYPE_CHECKING:
    from engine.preprocess.dali_pipeline import DaliPreprocessor

__all__ = ["DaliPreprocessor", "PreprocessResult", "ViewDecl"]


def __getattr__(name: str) -> Any:
    if name == "DaliPreprocessor":
        from engine.preprocess.dali_pipeline import DaliPreprocessor

        return DaliPreprocessor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
