"""engine.backends.tensorrt.ProfilePool: the bookkeeping of which optimisation profile
each execution context holds (pure Python; the TensorRT calls around it run only in the
``gpu`` tests of tests/engine/test_gpu_backends.py)."""

from __future__ import annotations

import pytest

from builders.trt_build import DEFAULT_CONTEXTS
from engine.backends.tensorrt import ProfilePool
from engine.errors import ModelError
from engine.executor import MIN_DEPTH


def test_each_context_gets_its_own_profile_lowest_first_and_gives_it_back():
    pool = ProfilePool(3)
    assert [pool.take(k) for k in (0, 1, 2)] == [0, 1, 2]
    assert pool.held == {0: 0, 1: 1, 2: 2} and pool.free == 0
    with pytest.raises(ModelError, match=r"3 optimisation profile\(s\), one per execution context .*engine build --contexts N"):
        pool.take(("eager", 0))
    pool.give(1)
    pool.give(1)  # a second give is a no-op
    assert pool.free == 1 and pool.take(("eager", 0)) == 1
    pool.give(0)
    pool.give(2)
    assert pool.take("x") == 0  # the lowest free profile first
    with pytest.raises(ValueError, match="already holds profile 0"):
        pool.take("x")


def test_engines_are_built_with_a_profile_per_slot_of_the_executor_ring():
    assert DEFAULT_CONTEXTS == MIN_DEPTH
