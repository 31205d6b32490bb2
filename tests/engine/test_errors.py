"""The user-facing error family: what a missing extra says, and which family a spec
problem belongs to."""

from __future__ import annotations

import errno

import pytest

from engine.errors import DependencyError, EngineError, ModelError, SpecError


def test_a_missing_extra_names_the_package_and_both_ways_to_install_it():
    err = DependencyError("pycuda", "gpu", "The streamed executor")
    assert str(err) == ("The streamed executor needs the 'pycuda' package: install it with "
                        "pip install 'anime-batch-engine[gpu]' (or pip install -e '.[gpu]' from a checkout)")
    assert (err.package, err.extra, err.exit_code) == ("pycuda", "gpu", 2)


def test_a_bad_spec_is_caught_where_model_problems_are():
    """Code that turns a model problem into a fallback (a cached export that is unusable,
    an engine manifest that does not parse) catches ModelError: a spec error is one."""
    with pytest.raises(ModelError):
        raise SpecError("gender/alpha: labels must be at least two")
    assert issubclass(ModelError, EngineError) and not issubclass(DependencyError, ModelError)


def test_only_an_os_error_is_taken_as_a_full_disk():
    from engine.errors import no_room_message

    class LooksLikeOne(Exception):
        errno = errno.ENOSPC

    assert no_room_message(LooksLikeOne("No space left on device")) is None
