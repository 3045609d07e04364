"""The embedded log's swap lock: a flock on its root directory (the table folders' parent).

Compaction swaps a group's segments for their merged file holding it exclusively (:func:`swapping`);
every read of the segments, and the Parquet sink's "already stored?" check with its write, hold it
shared (:func:`steady`). So no read lists a folder half-way through a swap (rows missed, or a listed
file gone when opened: ``FILE_DOESNT_EXIST``), and no replayed batch is written beside the merged file
that holds it. A swap is a few renames; a read waits that long, and gives up after :data:`STEADY_WAIT_S`
(a compaction stopped in the middle of its swap, e.g. a suspended process, holds reads no longer).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: how long a swap waits for the reads that hold the lock; then it gives up (the merge changes nothing
#: and is retried at the next run)
SWAP_WAIT_S = 30.0
#: how long a read (or the sink's write) waits for a swap; then :class:`TimeoutError` (the sink's batch
#: goes to the spool, a read fails naming the lock)
STEADY_WAIT_S = 120.0


def _lock(fd: int, op: int, wait_s: float, holder: str, root: Path) -> None:
    """``flock(fd, op)``, polled until ``wait_s`` has passed; then :class:`TimeoutError` naming who held it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{holder} of {root} held it for {wait_s:.0f} s") from None
            time.sleep(0.01)


@contextmanager
def swapping(root: Path) -> Iterator[None]:
    """An exclusive flock on the log's root directory (the table folders' parent) for the time of a swap;
    :class:`TimeoutError` (an ``OSError``) if reads hold it for :data:`SWAP_WAIT_S` seconds."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _lock(fd, fcntl.LOCK_EX, SWAP_WAIT_S, "reads", root)
        yield
    finally:
        os.close(fd)


@contextmanager
def steady(root: Path) -> Iterator[None]:
    """A shared flock on the log's root directory for the time of a read, so that no compaction swaps
    segments under it (:func:`swapping`); nothing to hold while the log does not exist.
    :class:`TimeoutError` (an ``OSError``) if a swap holds it for :data:`STEADY_WAIT_S` seconds."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        fd = -1
    try:
        if fd >= 0:
            _lock(fd, fcntl.LOCK_SH, STEADY_WAIT_S, "a compaction", root)
        yield
    finally:
        if fd >= 0:
            os.close(fd)
