"""Fuzzing the decode path: random bytes and mutated real images never crash it.

Every input must come back either as a result (with finite values) or as an error with
a one-line cause, and the good images of the same batch must be unaffected. Bounded:
a fixed number of examples (60; ENGINE_FUZZ_EXAMPLES=N for a longer campaign), no deadline.
"""

from __future__ import annotations

import functools
import io
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.specs import SpecRegistry

SPECS = [SpecRegistry.builtin().get("gender"), SpecRegistry.builtin().get("quality")]
VIEWS = [(s.key, s.preprocess) for s in SPECS]


@functools.lru_cache(maxsize=1)
def seeds() -> tuple[bytes, ...]:
    rng = np.random.default_rng(11)
    base = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 255, (33, 21, 4), dtype=np.uint8), "RGBA")
    out = []
    for img, fmt in [(base, "JPEG"), (base, "PNG"), (base, "WEBP"), (base, "BMP"), (rgba, "PNG"), (base.convert("P"), "GIF")]:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out.append(buf.getvalue())
    return tuple(out)


@pytest.fixture(scope="module")
def pre():
    from engine.preprocess import DaliPreprocessor

    with DaliPreprocessor(VIEWS, max_batch=4, num_threads=2) as p:
        yield p


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "zero"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            data = data[: max(pos, 1)]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif data:
            end = min(len(data), pos + draw(st.integers(1, 64)))
            data[pos:end] = bytes(end - pos)
    return bytes(data)


inputs = st.one_of(st.binary(max_size=2048), mutated())


def _check(pre, batch: list[bytes]) -> None:
    good = seeds()[0]
    items = [good, *batch, good]
    res = pre.process(items)
    assert sorted(res.ok + list(res.errors)) == list(range(len(items)))  # every input accounted for
    assert set(res.ok).isdisjoint(res.errors)
    assert 0 in res.ok and len(items) - 1 in res.ok  # the good neighbours survive
    for key, view in res.views.items():
        assert view.shape[0] == len(res.ok) and np.isfinite(view).all()
    for msg in res.errors.values():
        assert msg and "\n" not in msg
    alone = pre.process([good])
    for key in res.views:
        np.testing.assert_array_equal(res.views[key][0], alone.views[key][0])


@settings(
    max_examples=int(os.environ.get("ENGINE_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(inputs, min_size=1, max_size=3))
def test_random_and_mutated_inputs_never_crash(pre, batch):
    _check(pre, batch)


def test_bmp_with_zero_width_is_an_error_not_a_crash(pre):
    """Found by the fuzzer: DALI decodes such a BMP as 0 pixels wide and its geometry
    then divides by zero (a ValueError, not the usual RuntimeError)."""
    bmp = bytearray(seeds()[3])
    assert bmp[:2] == b"BM"
    bmp[18:22] = bytes(4)  # BITMAPINFOHEADER width = 0
    _check(pre, [bytes(bmp)])
