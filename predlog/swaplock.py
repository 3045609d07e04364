"""The embedded log's swap lock: a flock on its root directory (the table folders' parent).

Compaction swaps a group's segments for their merged file holding it exclusively (:func:`swapping`);
every read of the segments, and the Parquet sink's "already stored?" check with its write, hold it
shared (:func:`steady`). So no read lists a folder half-way through a swap (rows missed, or a listed
file gone when opened: ``FILE_DOESNT_EXIST``), and no replayed batch is written beside the merged file
that holds it. A swap is a few renames; a read waits that long at most.
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


@contextmanager
def swapping(root: Path) -> Iterator[None]:
    """An exclusive flock on the log's root directory (the table folders' parent) for the time of a swap;
    :class:`TimeoutError` (an ``OSError``) if reads hold it for :data:`SWAP_WAIT_S` seconds."""
    wait_s = SWAP_WAIT_S
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"reads of {root} held it for {wait_s:.0f} s") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


@contextmanager
def steady(root: Path) -> Iterator[None]:
    """A shared flock on the log's root directory for the time of a read, so that no compaction swaps
    segments under it (:func:`swapping`); nothing to hold while the log does not exist."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        fd = -1
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        if fd >= 0:
            os.close(fd)
