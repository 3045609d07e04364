"""The embedded log compacts itself: a background thread beside the predictor's writer merges each
closed hour's and day's segments (:func:`predlog.compact.compact`) soon after start (``FIRST_RUN_S``),
then every ``compact_interval_s``, so a box that nobody schedules ``motlens log compact`` on does not
pile up one file per batch, even when its predictor restarts more often than the interval. Each run first
deletes the ``predictions`` days past ``ttl_days`` (:func:`predlog.compact.expire`), so the log does not
grow without bound either."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from predlog.compact import CompactBusy, CompactError, compact, expire

log = logging.getLogger(__name__)

#: niceness of the compaction thread (Linux: per thread), so serving threads come first
NICE = 10
#: seconds from start to the first run (or the interval, if shorter): a restart must not put it off
FIRST_RUN_S = 60.0


class AutoCompactor:
    """Runs :meth:`run_once` ``min(FIRST_RUN_S, interval_s)`` seconds after start, then every ``interval_s``
    seconds, until :meth:`close`. ``ttl_days``: how long predictions are kept (default
    ``MOTLENS_PREDLOG_TTL_DAYS``)."""

    def __init__(self, folders: list[Path], interval_s: float, ttl_days: int) -> None:
        self.folders = folders
        self.interval_s = interval_s
        self.ttl_days = ttl_days
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="predlog-compact", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        except (OSError, AttributeError):  # not Linux, or not allowed: run at the process's priority
            pass
        wait = min(FIRST_RUN_S, self.interval_s)
        while not self._stop.wait(wait):
            self.run_once()
            wait = self.interval_s

    def run_once(self) -> None:
        """Expire and compact every folder once; a failure is logged and left to the next run (never raised)."""
        for folder in self.folders:
            if self._stop.is_set() or not folder.is_dir():
                continue
            try:
                for day in expire(folder, self.ttl_days):
                    log.info(
                        "predlog: %s %s deleted, older than %d days (%d files, %d bytes)",
                        folder.name, day.day, self.ttl_days, day.files, day.bytes,
                    )  # fmt: skip
                for key, rows in compact(folder).items():
                    log.info("predlog: %s %s compacted (%d rows)", folder.name, key, rows)
            except CompactBusy as e:  # a manual `motlens log compact` holds the folder: it does the work
                log.info("predlog: automatic compaction skipped this time: %s", e)
            except CompactError as e:  # a merge failed (its segments put back), or a day's deletion (retried)
                log.warning("predlog: automatic compaction failed this time: %s", e)
            except Exception:  # noqa: BLE001 - the thread must outlive any one failure
                log.exception("predlog: automatic compaction of %s failed; retried in %.0f s", folder, self.interval_s)

    def stop(self) -> None:
        """Ask the thread to stop after the folder in progress (if any); returns at once."""
        self._stop.set()

    def close(self, timeout: float | None = None) -> None:
        """Stop after the run in progress (if any) finishes its current folder, waiting up to ``timeout``."""
        self.stop()
        self._thread.join(timeout)
