"""The one exception family for problems the user can fix.

The CLI catches :class:`EngineError`, prints its message on one line and exits
non-zero. Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class EngineError(Exception):
    """Base class of every user-facing error (bad input, missing model, ...)."""

    exit_code = 2


class InputError(EngineError):
    """The input folder or a file given on the command line is unusable."""


class ModelError(EngineError):
    """A model file, checkpoint or spec is missing, unreadable or inconsistent."""


class SpecError(ModelError):
    """A model spec (built-in or override file) is invalid."""


class DependencyError(EngineError):
    """An optional package needed for the requested action is not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the '{package}' package: install it with "
            f"pip install 'anime-batch-engine[{extra}]' (or pip install -e '.[{extra}]' from a checkout)"
        )
        self.package = package
        self.extra = extra


class OutputError(EngineError):
    """The output file cannot be written, or holds results of another configuration."""


# A write the system refused for want of room: a full disk, a quota, a file-size limit.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def no_room_message(exc: BaseException) -> str | None:
    """One line for an OSError that says there is no room to write (None for any other
    exception, which keeps its traceback). What the commands finish before is kept: the
    results, models and engines are each written to a temp file and renamed when whole,
    and the benchmark's image set is checked against its manifest when reused."""
    if not isinstance(exc, OSError) or exc.errno not in _NO_ROOM:
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}: make room and run the command again"
