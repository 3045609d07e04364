"""SIGTERM as an exception where the work is: a stopped command unwinds as on Ctrl-C and exits 143.

A pod deleted or a systemd unit stopped sends SIGTERM; its default action kills the process on the spot,
leaving temporary files and a half-registered version behind. Steps that must finish once begun (a
registration) hold it back (:func:`sigterm_held`) and say afterwards that it came."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

#: the exit status of a command stopped by SIGTERM (128 + 15, as the shell reports one killed by it)
EXIT_TERMINATED = 143


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread wherever it was (a BaseException, as KeyboardInterrupt,
    so that no ``except Exception`` swallows it); its text, if any, says what was finished first."""


@dataclass
class Hold:
    """A block that SIGTERM does not interrupt; ``pending``: it came meanwhile."""

    pending: bool = False


_holds: list[Hold] = []


def _terminated(signum: int, frame: object) -> None:
    if _holds:
        _holds[-1].pending = True
        return
    raise Terminated


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (the previous handler is put back after it).
    Off the main thread, which may not set handlers, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def sigterm_held() -> Iterator[Hold]:
    """Within :func:`sigterm_unwinds`, SIGTERM is only recorded in the block (``Hold.pending``): the caller
    raises :class:`Terminated` after it, saying what it finished. Elsewhere (SIGTERM's default action)
    it changes nothing."""
    hold = Hold()
    _holds.append(hold)
    try:
        yield hold
    finally:
        _holds.remove(hold)
