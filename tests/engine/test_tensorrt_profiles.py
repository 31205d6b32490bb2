"""engine.backends.tensorrt's pure Python parts: ProfilePool, the bookkeeping of which
optimisation profile each execution context holds, and how an input's shape is read
from its profiles (the TensorRT calls around them run only in the ``gpu`` tests of
tests/engine/test_gpu_backends.py)."""

from __future__ import annotations

import pytest

from builders.trt_build import DEFAULT_CONTEXTS
from engine.backends.tensorrt import ProfilePool, _pinned_by_profiles
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


def _ranges(*profiles):
    """Per profile, [min, opt, max] as TensorRT's get_tensor_profile_shape returns them."""
    return [[tuple(lo), tuple(lo), tuple(hi)] for lo, hi in profiles]


def test_an_input_with_dynamic_height_and_width_takes_them_from_its_profiles():
    # an ONNX with dynamic H/W: the engine reports -1 there, `engine build` pinned them
    ranges = _ranges(((1, 3, 384, 384), (64, 3, 384, 384)), ((1, 3, 384, 384), (64, 3, 384, 384)))
    assert _pinned_by_profiles("input", (None, 3, None, None), ranges, "q.plan") == (None, 3, 384, 384)
    fixed = (None, 3, 224, 224)
    assert _pinned_by_profiles("input", fixed, [], "g.plan") == fixed  # nothing to read
    assert _pinned_by_profiles("input", (), [], "g.plan") == ()


@pytest.mark.parametrize("ranges", [
    _ranges(((1, 3, 224, 224), (8, 3, 448, 448))),  # a range of image sizes
    _ranges(((1, 3, 224, 224), (8, 3, 224, 224)), ((1, 3, 256, 256), (8, 3, 256, 256))),  # profiles disagree
])
def test_an_input_whose_profiles_do_not_fix_the_image_size_is_refused(ranges):
    with pytest.raises(ModelError, match="do not fix the dimensions after the batch"):
        _pinned_by_profiles("input", (None, 3, None, None), ranges, "x.plan")


def test_a_batch_every_profile_fixes_is_read_as_the_models_fixed_batch():
    """`engine build` gives a model that runs a fixed batch the profile f,f,f on a graph
    that may still declare the batch dynamic; the backend must declare it fixed (the
    executor then feeds it pieces of f rows) and not as a range 1..1."""
    one = _ranges(((1, 3, 224, 224), (1, 3, 224, 224)), ((1, 3, 224, 224), (1, 3, 224, 224)))
    assert _pinned_by_profiles("input", (None, 3, 224, 224), one, "g.plan") == (1, 3, 224, 224)
    assert _pinned_by_profiles("input", (None, 3, None, None), one, "g.plan") == (1, 3, 224, 224)
    ranged = _ranges(((1, 3, 224, 224), (8, 3, 224, 224)))
    assert _pinned_by_profiles("input", (None, 3, 224, 224), ranged, "g.plan") == (None, 3, 224, 224)
    disagree = _ranges(((2, 3, 224, 224), (2, 3, 224, 224)), ((4, 3, 224, 224), (4, 3, 224, 224)))
    assert _pinned_by_profiles("input", (None, 3, 224, 224), disagree, "g.plan") == (None, 3, 224, 224)


def test_a_model_that_runs_a_fixed_batch_gets_an_engine_of_that_batch_only():
    from builders.trt_build import BatchProfile, default_profile, engine_profile
    from engine.specs import SpecRegistry

    spec = SpecRegistry.builtin().get("gender")
    assert engine_profile(spec, None) == default_profile(spec)
    assert engine_profile(spec, None, BatchProfile(1, 8, 16)) == BatchProfile(1, 8, 16)
    assert engine_profile(spec, 1) == BatchProfile(1, 1, 1)
    assert engine_profile(spec, 4, BatchProfile(4, 4, 4)) == BatchProfile(4, 4, 4)
    with pytest.raises(ModelError, match=r"runs a fixed batch of 1, so its engine's batch profile is 1,1,1, "
                                         r"not 1,8,16; drop --gender-profile"):
        engine_profile(spec, 1, BatchProfile(1, 8, 16))
