"""The ``engine`` console script. The CLI's imports take a few tenths of a second; a
Ctrl-C, SIGTERM or SIGHUP in that time (or while the arguments are parsed) ends the
command with one line and the usual status, as it does once a command runs, instead of
a traceback or a silent exit."""

from __future__ import annotations

import sys

from engine.signals import interrupted_status, sigterm_as_interrupt


def main(argv: list[str] | None = None) -> int:
    handed_over = False
    try:
        with sigterm_as_interrupt():
            from engine.cli import main as cli_main

            handed_over = True
            return cli_main(argv)
    except KeyboardInterrupt as exc:
        # A running command reports its own interrupt; what reaches here came before it
        # ran, or after it had reported (a second Ctrl-C): nothing more to say then.
        print("engine: interrupted" if handed_over else "engine: interrupted while starting; nothing was done",
              file=sys.stderr)
        return interrupted_status(exc)
