"""Atomic file replacement: readers see the old content or the new, never half of it."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

#: what mkstemp puts between the prefix and the suffix (``tempfile._RandomNameSequence``)
_RANDOM = "[a-z0-9_]{8}"
TEMP_SUFFIX = ".tmp"


def atomic_write(path: Path, text: str) -> None:
    """Write via a temp file ``.NAME.XXXXXXXX.tmp`` in the same directory + fsync + rename (keeps an
    existing file's mode). A process killed before the rename leaves that temp file behind: see
    :func:`remove_stale_temps`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temp files that interrupted :func:`atomic_write` calls of ``path`` left; returns them.

    Only for a caller that no other process can be writing ``path`` beside (it holds the lock that
    serialises its writers): a running write's temp file looks the same."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_RANDOM}{re.escape(TEMP_SUFFIX)}")
    stale = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
