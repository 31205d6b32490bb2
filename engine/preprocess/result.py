"""What a preprocessing stage declares and returns (no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ViewDecl:
    """One model's input view as a stage produces it, per image: ``shape`` is (C, H, W)."""

    key: str  # the model spec's key, e.g. "gender/alpha"
    shape: tuple[int, int, int]
    dtype: np.dtype
    device: str  # "cpu" (host memory) or "gpu"


@dataclass
class PreprocessResult:
    """The views of one call to ``process``.

    ``ok`` holds the indices (into the input list) of the images that made it, in
    input order; row ``j`` of every ``views[key]`` and ``sizes[j]`` belong to input
    ``ok[j]``. ``sizes`` are the original (height, width). Every other index has a
    one-line cause in ``errors``.
    """

    ok: list[int]
    views: dict[str, np.ndarray]
    sizes: list[tuple[int, int]]
    errors: dict[int, str] = field(default_factory=dict)
