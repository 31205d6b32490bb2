"""Fixtures shared by the engine tests."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


def _png(color, size=(48, 36)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(sum(color))
    arr = np.clip(np.array(color) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def mixed_folder(tmp_path):
    """Batches of 3 in discovery order: [good, good, good], [bad, bad, bad] (nothing to
    infer: error rows only, kept in order), [good] (a partial batch)."""
    root = tmp_path / "in"
    root.mkdir()
    (root / "a1.png").write_bytes(_png((200, 30, 30)))
    (root / "a2.png").write_bytes(_png((30, 200, 30), (20, 64)))
    Image.new("RGB", (70, 50), (90, 90, 220)).save(root / "a3.jpg", quality=90)
    (root / "b1.png").write_bytes(b"")
    (root / "b2.jpg").write_bytes(b"not an image")
    (root / "b3.png").write_bytes(_png((1, 2, 3))[:60])
    (root / "c1.png").write_bytes(_png((240, 240, 10), (64, 64)))
    return root
