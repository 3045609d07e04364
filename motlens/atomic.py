"""Atomic file replacement: readers see the old content or the new, never half of it."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

#: what :func:`_create_temp` puts between the prefix and the suffix (older writes used mkstemp's)
_RANDOM = "[a-z0-9_]{8}"
TEMP_SUFFIX = ".tmp"


def atomic_write(path: Path, text: str | bytes) -> None:
    """Write ``text`` (UTF-8; bytes as they are) via a temp file ``.NAME.XXXXXXXX.tmp`` in the same
    directory + fsync + rename. An existing file keeps its mode; a new one gets what the umask gives (as
    ``open`` would, not mkstemp's 0600). A process killed before the rename leaves that temp file
    behind: see :func:`remove_stale_temps`."""
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text if isinstance(text, bytes) else text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _create_temp(path: Path) -> tuple[int, str]:
    """A new, exclusively created temp file beside ``path``, mode 0o666 less the umask."""
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temp files that interrupted :func:`atomic_write` calls of ``path`` left; returns them.

    Only for a caller that no other process can be writing ``path`` beside (it holds the lock that
    serialises its writers): a running write's temp file looks the same."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_RANDOM}{re.escape(TEMP_SUFFIX)}")
    stale = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
