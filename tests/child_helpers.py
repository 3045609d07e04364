"""Python run in a child process that SIGKILLs itself, or holds at a chosen point (fault injection)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Prepended to a child's code. ``kill_after_replace(suffix, n)``: the ``n``-th ``os.replace`` onto a
#: path ending in ``suffix`` (``Path.replace`` goes through it) SIGKILLs the process once done.
#: ``hold()``: print ``held`` and wait until the parent closes stdin.
PRELUDE = """
import os, signal, sys
_real_replace, _moved = os.replace, []
def kill_after_replace(suffix, n):
    def replace(src, dst, **kw):
        out = _real_replace(src, dst, **kw)
        if os.fspath(dst).endswith(suffix):
            _moved.append(dst)
            if len(_moved) == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return out
    os.replace = replace
def hold():
    print("held", flush=True)
    sys.stdin.read()
"""


def _argv(code: str, args: tuple[object, ...]) -> list[str]:
    return [sys.executable, "-c", PRELUDE + code, *map(str, args)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join((str(ROOT), str(ROOT / "tests")))}


def run_killed(code: str, *args: object) -> None:
    """Run ``code`` with ``args`` as ``sys.argv[1:]``; it must end by SIGKILL."""
    proc = subprocess.run(_argv(code, args), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@contextmanager
def held(code: str, *args: object) -> Iterator[None]:
    """Run ``code`` until it calls ``hold()``; the body runs while it waits there, then it must finish cleanly."""
    proc = subprocess.Popen(
        _argv(code, args), env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line == "held\n", (line, proc.stderr.read() if proc.stderr else "")
        yield
    finally:
        _, err = proc.communicate(timeout=300)  # closes its stdin: hold() returns
    assert proc.returncode == 0, err[-2000:]
