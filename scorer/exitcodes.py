"""The exit codes of every fxscore command, and which one wins when several apply.

    0    success
    1    fatal error (model, input or output unusable; disk full; ...)
    2    usage error (bad option or argument)
    3    finished, but some files could not be read (see the error column)
    4    a leak was found (`audit --fail-on-leak`)
    5    nothing to score: no candidate files at all, or all of them excluded
    130  interrupted by Ctrl-C (SIGINT); what was written is kept and resumable
    143  terminated by SIGTERM (batch-system time limit, `kill`); kept and resumable

When several apply, the first in PRECEDENCE wins: usage, fatal, interrupted, leak, some files
failed, nothing to score, success.
"""
from __future__ import annotations

import signal

OK = 0
FATAL = 1
USAGE = 2
SOME_FAILED = 3
LEAK = 4
NOTHING_TO_SCORE = 5
INTERRUPTED = 128 + signal.SIGINT  # 130, what shells report for Ctrl-C
TERMINATED = 128 + signal.SIGTERM  # 143

PRECEDENCE = (USAGE, FATAL, INTERRUPTED, TERMINATED, LEAK, SOME_FAILED, NOTHING_TO_SCORE, OK)


def worst(*codes: int) -> int:
    """The code that wins among `codes` (OK when none is given); unknown codes rank first."""
    rank = {code: i for i, code in enumerate(PRECEDENCE)}
    return min(codes, key=lambda c: rank.get(c, -1), default=OK)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every command's clean-up runs the same way."""


def interrupt_code(exc: BaseException) -> int:
    """TERMINATED for a Terminated, INTERRUPTED for any other KeyboardInterrupt."""
    return TERMINATED if isinstance(exc, Terminated) else INTERRUPTED
