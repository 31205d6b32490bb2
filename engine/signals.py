"""Signals that end a command the way Ctrl-C does. Kept apart from :mod:`engine.cli`
(and light to import) so that the console script can handle them from its first
instant, before the CLI's own imports."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (the terminal closed), raised where Ctrl-C would be."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


def interrupted_status(exc: KeyboardInterrupt) -> int:
    """The shell's exit status for a run ended by ``exc``: 128 + the signal (130 for Ctrl-C,
    143 for SIGTERM, 129 for SIGHUP)."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)


_AS_INTERRUPT = ("SIGTERM", "SIGHUP")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM and SIGHUP are handled like Ctrl-C (a :class:`Terminated`, which is
    a KeyboardInterrupt), so that the caller's interrupt handling keeps what is finished
    (flushed rows, the lock released); :func:`interrupted_status` gives the exit status. A
    signal that is ignored (``nohup``) is left ignored.
    Off the main thread the handlers are left as they are; the ones before are put back
    after (the default where one was set outside Python)."""
    previous = {}
    try:
        for name in _AS_INTERRUPT:
            signum = getattr(signal, name, None)
            # One ignored on purpose (`nohup`, `trap '' HUP`) stays ignored.
            if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, _terminate)
    except ValueError:  # not the main thread (the first call refuses: nothing was set)
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
