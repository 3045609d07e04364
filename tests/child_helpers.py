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


# Installed through PYTHONPATH in a child process: the path finder no longer finds the modules named in
# BLOCKED_IMPORTS (comma-separated top-level names), as in an install without them (``find_spec``
# answers None, an import fails); the blocker's start and each lookup are logged to BLOCKED_IMPORTS_LOG.
BLOCKER = """
import importlib.machinery, os, sys

_BLOCKED = set(os.environ["BLOCKED_IMPORTS"].split(","))
_LOG = os.environ["BLOCKED_IMPORTS_LOG"]


class _Hiding(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            with open(_LOG, "a") as f:
                f.write(name + "\\n")
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [_Hiding if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
with open(_LOG, "a") as f:
    f.write("active\\n")
"""


def hiding_env(env: dict[str, str], where: Path, modules: tuple[str, ...]) -> tuple[dict[str, str], Path]:
    """``env`` for a child process (and its children) in which ``modules`` cannot be imported; and the log
    its blocker writes (first line ``active``, then each hidden module looked up)."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "sitecustomize.py").write_text(BLOCKER)
    log = where / "blocked.txt"
    return {
        **env,
        "PYTHONPATH": os.pathsep.join([str(where), *filter(None, [env.get("PYTHONPATH")])]),
        "BLOCKED_IMPORTS": ",".join(modules),
        "BLOCKED_IMPORTS_LOG": str(log),
    }, log
