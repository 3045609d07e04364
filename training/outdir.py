"""One writer at a time per output directory, removal of the staging a killed writer left, and
refusal of a directory holding someone else's files.

``motlens data synth`` and ``motlens data load --out`` write into hidden staging directories and
move the result into place at the end. A writer killed by SIGKILL (or a power cut) leaves its
staging behind; the next writer removes it, but only while holding the directory's lock, so it
never removes the staging of a run that is still writing. Each writer leaves a mark in its
directory and replaces only the files it lists; a directory holding files but no mark is refused
(:func:`refuse_foreign`), never emptied.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".motlens-write.lock"


class OutputBusy(RuntimeError):
    """Another process holds the write lock of the output directory."""


class ForeignOutput(ValueError):
    """An output directory holding files its writer did not write: refused, never emptied."""


def refuse_foreign(out_dir: Path, marks: tuple[str, ...], what: str) -> None:
    """Raise :class:`ForeignOutput` when ``out_dir`` holds a visible file or directory (a name not
    starting with ``.``) but none of ``marks``, the files only its writer writes there: it is not ``what``."""
    if not out_dir.is_dir() or any((out_dir / mark).exists() for mark in marks):
        return
    names = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))
    if names:
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        raise ForeignOutput(
            f"{out_dir} holds {names[0]}{more} but no {marks[0]}, so it is not {what}: "
            "refused rather than overwritten; give an empty or new directory"
        )


def written(path: Path) -> set[str]:
    """The file names in the JSON list at ``path``, a writer's record of what it wrote beside it (plain
    names only; none when the record is absent or unreadable)."""
    try:
        names = {Path(str(name)).name for name in json.loads(path.read_text())}
    except (OSError, ValueError, TypeError):
        return set()
    return names - {"", ".."}


@contextmanager
def exclusive(out_dir: Path, stale: str, where: Path | None = None) -> Iterator[None]:
    """Hold ``out_dir``'s write lock (creating ``out_dir``), after removing the directories matching
    the glob ``stale`` in ``where`` (default ``out_dir``) that killed writers left.

    The lock is an ``flock`` on ``out_dir/.motlens-write.lock``: the kernel drops it when its holder
    dies, and the file is removed when it is released. Raises :class:`OutputBusy` at once when
    another process holds it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    fd = _lock(path)
    try:
        for old in sorted((where or out_dir).glob(stale)):
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)  # what stays is hidden: never read with the data
        yield
    finally:
        path.unlink(missing_ok=True)  # still held: a waiting writer re-checks and opens a new file
        os.close(fd)


def _lock(path: Path) -> int:
    """An open, flock-ed descriptor of ``path``; retried when the file was removed by a releasing
    holder between this open and the lock (that file locks nothing any more)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, path):
                return fd
        except BlockingIOError:
            os.close(fd)
            raise OutputBusy(
                f"another process is writing {path.parent} (it holds {path.name}); wait for it to end"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)
