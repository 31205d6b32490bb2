"""The one exception family for problems the user can fix.

The CLI catches :class:`EngineError`, prints its message on one line and exits
non-zero. Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


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
