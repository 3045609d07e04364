"""SIGTERM as an exception where the work is: a stopped command unwinds as on Ctrl-C and exits 143.

A pod deleted or a systemd unit stopped sends SIGTERM; its default action kills the process on the spot,
leaving temporary files and a half-registered version behind."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: the exit status of a command stopped by SIGTERM (128 + 15, as the shell reports one killed by it)
EXIT_TERMINATED = 143


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread wherever it was (a BaseException, as KeyboardInterrupt,
    so that no ``except Exception`` swallows it)."""


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (the previous handler is put back after it).
    Off the main thread, which may not set handlers, it does nothing."""

    def terminated(signum: int, frame: object) -> None:
        raise Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
