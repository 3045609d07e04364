"""Drain the spools of predictor processes that are gone into ClickHouse (``motlens log replay``).

A predictor that stops while ClickHouse is down leaves its rows in its spool, replayed when a writer
opens that directory again. On a volume several predictors share, each process spools below its own
directory (``MOTLENS_PREDLOG_DIR_PER_HOST``: ``DIR/<pod name>``), and no other pod takes that name:
this job opens each such directory whose lock no process holds with the same writer the predictor
uses (same binding to its sink, same deduplication tokens, same accounting), lets it replay, and
closes it. A directory a running predictor holds is left alone; a container restarting in its pod
waits for the lock meanwhile (``MOTLENS_PREDLOG_LOCK_WAIT_S``). One whose spools ended empty can be
deleted: under its lock it is moved aside, then removed, so a writer opening it meanwhile makes a new one.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from predlog.settings import PredlogSettings
from predlog.spool import EVENTS_SPOOL, SINK_FILE, SpoolBusy, lock_if_free

log = logging.getLogger(__name__)

#: the files a drained predictor directory may still hold, relative to it (anything else, a set-aside
#: ``*.corrupt`` segment, segments held for another sink, another spool's files below it, keeps it)
_BOOKKEEPING = {f"spool/{name}" for name in (".lock", SINK_FILE)} | {
    f"spool/{EVENTS_SPOOL}/{name}" for name in (".lock", SINK_FILE)
}
#: the name prefix of a drained directory moved aside to be deleted (a run cut short leaves it to the next)
REMOVING = ".removing-"
#: the share of a directory's time kept for the writer's close (its last sink attempt, its final counts)
_CLOSE_SHARE = 0.25


@dataclass
class Replayed:
    """What one directory's replay did; ``state``: drained, pending (rows left: the sink is down or
    slow), busy (a running writer holds it), unusable (a spool of it cannot be opened for writing),
    missing, or foreign (no ``spool/`` in it: not one predictor's directory)."""

    path: Path
    state: str
    rows: int = 0
    events: int = 0
    pending: int = 0
    held: int = 0
    removed: bool = False
    reason: str = ""

    def line(self) -> str:
        if self.state == "busy":
            return f"{self.path}: held by a running writer, left alone"
        if self.state == "missing":
            return f"{self.path}: no such directory"
        if self.state == "foreign":
            return (
                f"{self.path}: not a predictor's directory (no spool/ in it); name MOTLENS_PREDLOG_DIR/<host name> "
                "of a predictor with MOTLENS_PREDLOG_DIR_PER_HOST, or its parent with --under"
            )
        text = f"{self.path}: {self.rows} prediction rows and {self.events} audit rows replayed"
        if self.state == "unusable":
            return f"{text}; a spool of it cannot be used ({self.reason}): what it holds is left there"
        if self.pending:
            text += f", {self.pending} rows still spooled (the sink did not take them; kept for the next run)"
        if self.held:
            text += f", {self.held} rows held for another sink (kept)"
        return text + (", directory removed" if self.removed else "")


def spool_dirs(parents: list[Path]) -> list[Path]:
    """The predictor directories below each parent: those with a ``spool/`` folder, by name."""
    found: list[Path] = []
    for parent in parents:
        if not parent.is_dir():
            raise FileNotFoundError(f"--under {parent}: no such directory")
        found += sorted(
            p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "spool").is_dir()
        )
    return found


def replay_dir(settings: PredlogSettings, path: Path, timeout: float, remove_empty: bool) -> Replayed:
    """Open a writer on ``path`` (its spools bound to ``settings``' sink), wait up to ``timeout`` for it to
    replay them, close it; with ``remove_empty``, delete ``path`` when nothing but bookkeeping is left."""
    from predlog import open_writer

    if not path.is_dir():
        return Replayed(path, "missing")
    if not (path / "spool").is_dir():  # a writer would make one, and --remove-empty delete what is below
        return Replayed(path, "foreign")
    here = settings.model_copy(update={"dir": path, "dir_per_host": False, "lock_wait_s": 0.0})
    deadline = time.monotonic() + timeout
    try:
        writer = open_writer(here)
    except SpoolBusy:
        return Replayed(path, "busy")
    unbound = writer.unbound  # read-only, no permission: the writer replays nothing from that spool
    try:
        while unbound is None and time.monotonic() < deadline - timeout * _CLOSE_SHARE:
            stats = writer.stats()
            if stats["spool_rows"] + stats["events"]["spool_rows"] == 0:
                break
            time.sleep(0.2)
    finally:
        writer.close(max(1.0, deadline - time.monotonic()))
    stats = writer.stats()
    pending = stats["spool_rows"] + stats["events"]["spool_rows"]
    done = Replayed(
        path,
        "unusable" if unbound is not None else "pending" if pending else "drained",
        rows=stats["replayed"],
        events=stats["events"]["replayed"],
        pending=pending,
        held=stats["spool_held_rows"] + stats["events"]["spool_held_rows"],
        reason=unbound or "",
    )
    if remove_empty and done.state == "drained":
        done.removed = _remove_if_drained(path / "spool", path)
    return done


def _remove_if_drained(spool: Path, path: Path) -> bool:
    """Delete ``path`` if it holds bookkeeping files only, holding its spool's lock (the file still at
    ``.lock``: another run may have moved the one it opened aside, and a writer made ``path`` again). It
    is first renamed out of the way (``.removing-…``), so a writer that opens ``path`` meanwhile makes a
    new directory (:class:`~predlog.spool.Spool` makes the same check once it has the lock)."""
    lock = lock_if_free(spool)  # not the one another run moved aside first: a new one may be in use
    if lock is None:
        return False
    with lock:
        leftovers = [p for p in path.rglob("*") if p.is_file() and p.relative_to(path).as_posix() not in _BOOKKEEPING]
        if leftovers:
            log.info("predlog: %s kept: %d files besides the spool's bookkeeping", path, len(leftovers))
            return False
        doomed = path.with_name(f"{REMOVING}{path.name}-{uuid.uuid4().hex[:8]}")
        try:
            path.rename(doomed)
        except OSError as e:
            log.warning("predlog: %s kept: cannot move it aside (%s)", path, e)
            return False
    sweep(doomed)
    return True


def sweep(doomed: Path) -> None:
    """Delete a directory moved aside for removal (drained, and no writer's any more)."""
    shutil.rmtree(doomed, ignore_errors=True)
    if doomed.exists():
        log.warning("predlog: cannot delete all of %s; the next run with --remove-empty tries again", doomed)
