"""The embedded log keeps predictions for ``MOTLENS_PREDLOG_TTL_DAYS``, as the server table's TTL does: whole
days past it are deleted by compaction (the writer's own and ``motlens log compact``); audit rows stay."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

from test_predlog_faults import wait_for
from test_predlog_scale import MIDNIGHT, batch_file, row, unreadable

import predlog
from motlens.cli import main
from predlog import PredlogSettings
from predlog.compact import Expired, expire
from predlog.schema import row_to_arrow
from predlog.sinks import write_parquet_segment

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
TTL = 30  # the cutoff is NOW - 30 days = 2026-10-29 12:00: days up to 10-28 have expired whole


def _at(day: str, hour: int = 12) -> datetime:
    return datetime.strptime(day, "%Y-%m-%d").replace(hour=hour, tzinfo=UTC)


def _counts(settings: PredlogSettings) -> dict[str, int]:
    reader = predlog.open_reader(settings)
    try:
        return {
            table: int(reader.query(f"SELECT count() AS n FROM {table}").iloc[0]["n"])
            for table in ("predictions", "drift_reports", "promotion_events")
        }
    finally:
        reader.close()


def _audit_rows(settings: PredlogSettings, ts: datetime) -> None:
    """One drift report and one promotion event, stored at ``ts`` (named as the reader names them)."""
    rows = {
        "drift_reports": {"ts": ts, "model_version": "1", "slot": "production", "drift_detected": False},
        "promotion_events": {"ts": ts, "action": "promote", "to_version": "1"},
    }
    for table, values in rows.items():
        name = f"{ts:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex}"
        write_parquet_segment(settings.table_dir(table), row_to_arrow(table, values), name)


def test_days_past_the_ttl_are_deleted_the_boundary_day_and_audit_rows_kept(tmp_path):
    settings = PredlogSettings(dir=tmp_path)
    folder = settings.table_dir("predictions")
    old = [batch_file(folder, [row(i, _at("2026-10-27", 9 + i))]) for i in range(2)]  # two files, one day
    old.append(batch_file(folder, [row(2, _at("2026-10-28", 23) + timedelta(minutes=59))]))
    kept = [
        batch_file(folder, [row(3, _at("2026-10-29", 0) + timedelta(seconds=1))]),  # past its own TTL; its day is not
        batch_file(folder, [row(4, _at("2026-10-30"))]),
        batch_file(folder, [row(5, NOW - timedelta(hours=1))]),
    ]
    _audit_rows(settings, _at("2025-01-01"))
    assert _counts(settings) == {"predictions": 6, "drift_reports": 1, "promotion_events": 1}
    audit = {t: sorted(settings.table_dir(t).iterdir()) for t in ("drift_reports", "promotion_events")}
    sizes = [f.stat().st_size for f in old]

    gone = [expire(settings.table_dir(t), TTL, now=NOW) for t in ("predictions", "drift_reports", "promotion_events")]

    assert gone == [[Expired("20261027", 2, sizes[0] + sizes[1]), Expired("20261028", 1, sizes[2])], [], []]
    assert not any(f.exists() for f in old) and all(f.exists() for f in kept)
    assert {t: sorted(settings.table_dir(t).iterdir()) for t in audit} == audit
    assert _counts(settings) == {"predictions": 3, "drift_reports": 1, "promotion_events": 1}
    assert sorted(p.name for p in folder.iterdir()) == sorted(f.name for f in kept)  # no work folder left behind
    assert expire(folder, TTL, now=NOW) == []  # idempotent
    assert [g.day for g in expire(folder, TTL, now=NOW + timedelta(days=1))] == ["20261029"]  # its turn, a day on


def test_a_file_written_across_midnight_waits_for_its_rows_of_the_next_day(tmp_path):
    """Older builds named a batch after its first row whatever days it spanned: its day goes only once
    every row in it has expired, never a row early."""
    settings = PredlogSettings(dir=tmp_path)
    folder = settings.table_dir("predictions")
    across = batch_file(folder, [row(0, _at("2026-10-28", 23)), row(1, _at("2026-10-29", 0) + timedelta(minutes=5))])
    now = _at("2026-11-28", 0) + timedelta(minutes=2)  # day 10-28 has expired; 10-29 00:05 has not
    assert expire(folder, TTL, now=now) == [] and across.exists()
    assert [g.day for g in expire(folder, TTL, now=now + timedelta(minutes=5))] == ["20261028"]
    assert not across.exists()


def test_an_interrupted_deletion_is_finished_and_an_unreadable_expired_file_goes_by_its_name(tmp_path):
    settings = PredlogSettings(dir=tmp_path)
    folder = settings.table_dir("predictions")
    kept = batch_file(folder, [row(0, NOW - timedelta(days=1))])
    spent = folder / ".expired-20261001"  # a run killed while deleting its day
    spent.mkdir()
    batch_file(spent, [row(1, _at("2026-10-01"))])
    broken = unreadable(folder, _at("2026-10-02"))
    assert [g.day for g in expire(folder, TTL, now=NOW)] == ["20261002"]
    assert not spent.exists() and not broken.exists() and kept.exists()
    assert _counts(settings)["predictions"] == 1


def test_the_writers_compaction_deletes_expired_days_by_itself(tmp_path, monkeypatch, caplog):
    """The TTL was written into the server's migration only: the embedded log, a single box's default,
    kept every day for ever."""
    monkeypatch.setenv("MOTLENS_PREDLOG_TTL_DAYS", "3")
    settings = PredlogSettings(dir=tmp_path, compact_interval_s=0.2, flush_interval_s=0.05)
    folder = settings.table_dir("predictions")
    old = batch_file(folder, [row(0, MIDNIGHT - timedelta(days=5))])
    recent = batch_file(folder, [row(1, MIDNIGHT - timedelta(days=1))])
    _audit_rows(settings, MIDNIGHT - timedelta(days=30))
    with caplog.at_level(logging.INFO, logger="predlog.autocompact"):
        writer = predlog.open_writer(settings)
        try:
            assert wait_for(lambda: not old.exists(), 10), "the expired day was not deleted"
        finally:
            writer.close(10)
    day = f"{MIDNIGHT - timedelta(days=5):%Y%m%d}"
    assert f"predictions {day} deleted, older than 3 days (1 files, " in caplog.text
    assert recent.exists()
    assert _counts(settings) == {"predictions": 1, "drift_reports": 1, "promotion_events": 1}


def test_log_compact_deletes_expired_days_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path))
    monkeypatch.delenv("MOTLENS_CLICKHOUSE_URL", raising=False)
    monkeypatch.setenv("MOTLENS_PREDLOG_TTL_DAYS", "3")
    settings = PredlogSettings()
    old = batch_file(settings.table_dir("predictions"), [row(0, MIDNIGHT - timedelta(days=5))])
    batch_file(settings.table_dir("predictions"), [row(1, MIDNIGHT - timedelta(days=1))])
    assert main(["log", "compact"]) == 0
    day = f"{MIDNIGHT - timedelta(days=5):%Y%m%d}"
    assert f"predictions: {day} deleted, older than 3 days (1 files, " in capsys.readouterr().out
    assert not old.exists()
    assert _counts(settings)["predictions"] == 1
