"""The predictor's writer keeps the embedded log compacted by itself, and connects (migrating) at start."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

import pytest
from test_predlog_faults import stall_inserts, stopped, wait_for
from test_predlog_scale import MIDNIGHT, batch_file, row

import predlog
from predlog import PredlogSettings
from predlog.compact import _exclusive


def _old_hour_files(settings: PredlogSettings, n: int = 6) -> list:
    """``n`` batch files of a closed hour two days ago."""
    folder = settings.table_dir("predictions")
    hour = MIDNIGHT - timedelta(days=2, hours=-5)
    return [batch_file(folder, [row(i, hour + timedelta(minutes=i))]) for i in range(n)]


def test_the_writer_compacts_the_embedded_log_by_itself(tmp_path):
    """Compaction was a verb nobody scheduled: a quiet box still wrote a file per batch, forever."""
    settings = PredlogSettings(dir=tmp_path, compact_interval_s=0.2, flush_interval_s=0.05)
    files = _old_hour_files(settings)
    writer = predlog.open_writer(settings)
    try:
        assert writer.compactor is not None
        assert wait_for(lambda: not any(f.exists() for f in files)), "the closed hour's batch files were not merged"
    finally:
        writer.close(10)
    assert not writer.compactor._thread.is_alive()
    left = sorted(p.name for p in settings.table_dir("predictions").glob("*.parquet"))
    assert len(left) == 1 and "-c" in left[0]  # one merged file for the day
    reader = predlog.open_reader(settings)
    try:
        assert reader.counts()["n"].sum() == 6
    finally:
        reader.close()


def test_a_compaction_that_cannot_run_now_is_retried_and_the_writer_goes_on(tmp_path, caplog):
    settings = PredlogSettings(dir=tmp_path, compact_interval_s=0.2, flush_interval_s=0.05)
    files = _old_hour_files(settings)
    folder = settings.table_dir("predictions")
    with caplog.at_level("INFO", logger="predlog.autocompact"), _exclusive(folder):  # a manual run holds it
        writer = predlog.open_writer(settings)
        assert wait_for(lambda: "automatic compaction skipped" in caplog.text)
        skipped = [r for r in caplog.records if "automatic compaction skipped" in r.getMessage()]
        assert {r.levelname for r in skipped} == {"INFO"}  # expected while a manual run holds it: no warning
        writer.submit([row(100, MIDNIGHT + timedelta(hours=1))])
        assert writer.flush(10) and all(f.exists() for f in files)
    try:
        assert wait_for(lambda: not any(f.exists() for f in files))  # the next run, once the folder is free
    finally:
        writer.close(10)
    assert writer.stats()["written"] == 1


@pytest.mark.parametrize("kw", [{"compact_interval_s": 0}, {"clickhouse_url": "chdb://memory"}])
def test_no_compactor_when_switched_off_or_on_a_server(tmp_path, kw):
    if "clickhouse_url" in kw:
        kw = {**kw, "database": f"ac_{uuid.uuid4().hex[:10]}"}
    writer = predlog.open_writer(PredlogSettings(dir=tmp_path, **kw))
    try:
        assert writer.compactor is None
    finally:
        writer.close(10)


def test_a_new_server_database_has_its_tables_before_the_first_batch(tmp_path):
    """The writer migrated at its first batch only, and readers never migrate: the drift job and the
    promotion gates of a new deployment failed with "behind this release" until traffic arrived."""
    from predlog.migrate import SchemaError

    settings = PredlogSettings(dir=tmp_path, clickhouse_url="chdb://memory", database=f"ac_{uuid.uuid4().hex[:10]}")
    writer = predlog.open_writer(settings)
    try:

        def readable() -> bool:
            try:
                predlog.open_reader(settings).close()
            except SchemaError:
                return False
            return True

        assert wait_for(readable, 15)
        assert writer.stats()["written"] == 0
    finally:
        writer.close(10)


def test_the_first_compaction_runs_soon_after_start_not_an_interval_later(tmp_path, monkeypatch):
    """The first run came one full interval (an hour) after start: a predictor restarted more often never
    compacted. It now comes after ``min(FIRST_RUN_S, interval)``, then every interval."""
    import predlog.autocompact

    monkeypatch.setattr(predlog.autocompact, "FIRST_RUN_S", 0.2, raising=False)
    settings = PredlogSettings(dir=tmp_path, compact_interval_s=3600, flush_interval_s=0.05)
    files = _old_hour_files(settings)
    runs = []
    real = predlog.autocompact.AutoCompactor.run_once
    monkeypatch.setattr(predlog.autocompact.AutoCompactor, "run_once", lambda self: runs.append(1) or real(self))
    writer = predlog.open_writer(settings)
    try:
        assert wait_for(lambda: not any(f.exists() for f in files), 10), "no compaction soon after start"
        time.sleep(0.5)
        assert len(runs) == 1  # the next one an interval later
    finally:
        writer.close(10)


def test_close_spools_the_queue_before_it_waits_for_a_busy_compaction(tmp_path, monkeypatch):
    """close(timeout) gave the compactor the whole timeout before the writer got its own: a slow merge
    beside a stalled write kept the queued rows out of the spool for twice the pod's grace period."""
    from test_predlog_faults import rows

    from predlog import autocompact

    merging, merged = threading.Event(), threading.Event()

    def slow_compact(folder, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - a big day being merged
        merging.set()
        merged.wait(60)
        return {}

    monkeypatch.setattr(autocompact, "compact", slow_compact)
    entered, release = stall_inserts(monkeypatch)
    settings = PredlogSettings(dir=tmp_path, compact_interval_s=0.05, flush_interval_s=0.05, batch_rows=50)
    settings.table_dir("predictions").mkdir(parents=True)  # a log with files to merge
    writer = predlog.open_writer(settings)
    seen: list[tuple[int, float | None]] = []
    waits = writer.compactor.close

    def close(timeout=None):  # noqa: ANN001, ANN202 - the real close, noting what was spooled when it began
        seen.append((writer.stats()["spool_rows"], timeout))
        waits(timeout)

    writer.compactor.close = close
    try:
        writer.submit(rows(200))
        assert entered.wait(30) and merging.wait(30)
        writer.close(timeout=0.5)
        assert seen and seen[0][0] == 200, seen  # every row in the spool before the compaction was waited for
        assert seen[0][1] is not None and seen[0][1] <= 0.5  # with what was left of the timeout, not all of it
    finally:
        merged.set()
        release.set()
    assert wait_for(lambda: stopped(writer) and not writer.compactor._thread.is_alive(), 60)
