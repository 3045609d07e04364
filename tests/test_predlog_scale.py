"""The embedded log at scale: windowed reads open only the files of the days they cover, a batch
spanning midnight is filed under each of its days, and a quiet predictor writes few files."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq

import predlog
from predlog import PredictionRecord, PredlogSettings
from predlog.schema import records_to_arrow
from predlog.sinks import ParquetSink, write_parquet_segment

MIDNIGHT = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)  # today, 00:00 UTC


def row(i: int, ts: datetime, version: str = "1") -> PredictionRecord:
    return PredictionRecord(
        request_id=f"r{i}", item_index=0, model_name="mot-defects", model_version=version, slot="production",
        text="Brake pipe corroded", section="1 Brakes", severity="major", ts=ts,
    )  # fmt: skip


def batch_file(folder: Path, records: list[PredictionRecord]) -> Path:
    """A batch file as every version so far names it: ``{first ts}-{token}``, whatever days its rows span."""
    table = records_to_arrow(records)
    first = min(r.ts for r in records)
    return write_parquet_segment(folder, table, f"{first:%Y%m%dT%H%M%S}-{uuid.uuid4().hex}")


def unreadable(folder: Path, day: datetime) -> Path:
    """A segment of ``day`` that no reader can open: a read that opens it fails, so one that succeeds did not."""
    path = folder / f"{day:%Y%m%dT%H%M%S}-{uuid.uuid4().hex}.parquet"
    path.write_bytes(b"not parquet" * 10)
    return path


def test_windowed_reads_open_only_the_days_they_cover(tmp_path):
    """`log stats --since 24h`, the promotion gates' live stats and the drift windows read every file of the
    log through one `*.parquet` glob: 20 000 files took 16.8 s for a 24 h window whatever the window held."""
    settings = PredlogSettings(dir=tmp_path)
    folder = settings.table_dir("predictions")
    batch_file(folder, [row(i, MIDNIGHT - timedelta(days=10, hours=-i)) for i in range(5)])
    batch_file(folder, [row(10 + i, MIDNIGHT + timedelta(minutes=i)) for i in range(7)])
    unreadable(folder, MIDNIGHT - timedelta(days=5))  # outside every window below
    reader = predlog.open_reader(settings)
    try:
        stats = reader.live_stats(since=MIDNIGHT - timedelta(hours=1))
        assert stats["n"].tolist() == [7]
        window = reader.window(start=MIDNIGHT - timedelta(hours=1), end=MIDNIGHT + timedelta(days=1))
        assert sorted(window["request_id"]) == [f"r{10 + i}" for i in range(7)]
        old = reader.window(start=MIDNIGHT - timedelta(days=11), end=MIDNIGHT - timedelta(days=9))
        assert len(old) == 5  # a window ending before the unreadable day does not open it either
    finally:
        reader.close()


def test_a_window_from_midnight_sees_the_rows_a_batch_filed_under_the_day_before_holds(tmp_path):
    """A file is named after its first row: a batch that spans midnight is filed under the first day, so a
    window that starts at midnight must read the day before too (and no more)."""
    settings = PredlogSettings(dir=tmp_path)
    folder = settings.table_dir("predictions")
    spanning = [MIDNIGHT - timedelta(milliseconds=300), MIDNIGHT, MIDNIGHT + timedelta(milliseconds=400)]
    batch_file(folder, [row(i, ts) for i, ts in enumerate(spanning)])  # written by an earlier version
    bad = unreadable(folder, MIDNIGHT - timedelta(days=2))  # the day before that is not read
    reader = predlog.open_reader(settings)
    try:
        assert reader.window(start=MIDNIGHT)["request_id"].tolist() == ["r1", "r2"]
        assert reader.live_stats(since=MIDNIGHT)["n"].tolist() == [2]
        bad.unlink()
        assert reader.window(start=MIDNIGHT - timedelta(seconds=1), end=MIDNIGHT)["request_id"].tolist() == ["r0"]
    finally:
        reader.close()


def test_a_batch_spanning_midnight_is_filed_under_each_of_its_days(tmp_path):
    """So that a file named for day D holds rows of D only (a replay rewrites the same files)."""
    folder = tmp_path / "predictions"
    records = [row(i, MIDNIGHT + timedelta(milliseconds=d)) for i, d in enumerate([-500, -1, 0, 250])]
    table = records_to_arrow(records)
    sink = ParquetSink(folder)
    sink.insert(table, "a" * 32)
    names = sorted(p.name for p in folder.glob("*.parquet"))
    day_before = MIDNIGHT - timedelta(days=1)
    assert names == [f"{day_before:%Y%m%d}T235959-{'a' * 32}.parquet", f"{MIDNIGHT:%Y%m%d}T000000-{'a' * 32}.parquet"]
    assert [pq.read_table(folder / n)["request_id"].to_pylist() for n in names] == [["r0", "r1"], ["r2", "r3"]]
    sink.insert(table, "a" * 32)  # a replay of the same batch: the same two files
    assert sorted(p.name for p in folder.glob("*.parquet")) == names


def test_a_quiet_embedded_predictor_writes_a_file_per_segment_interval_not_per_second(tmp_path, monkeypatch):
    """The embedded writer wrote whatever arrived within flush_interval_s (1 s) to its own file: a predictor
    at a request a second wrote 86 400 files a day. The embedded default is now 10 s; ClickHouse keeps 1 s,
    and a value that is set is used on either backend."""
    monkeypatch.delenv("MOTLENS_PREDLOG_FLUSH_INTERVAL_S", raising=False)
    monkeypatch.delenv("MOTLENS_CLICKHOUSE_URL", raising=False)
    monkeypatch.delenv("MOTLENS_PREDLOG_CLICKHOUSE_URL", raising=False)
    settings = PredlogSettings(dir=tmp_path)
    folder = settings.table_dir("predictions")
    writer = predlog.open_writer(settings)
    try:
        for i in range(3):  # three requests over 1.5 s
            writer.submit([row(i, datetime.now(UTC))])
            time.sleep(0.5)
        assert list(folder.glob("*.parquet")) == []  # the old writer had written one file a second by now
        assert writer.flush(30)
        assert len(list(folder.glob("*.parquet"))) == 1
    finally:
        writer.close(10)
    assert PredlogSettings().flush_interval == 10.0
    assert PredlogSettings(clickhouse_url="chdb://memory").flush_interval == 1.0
    assert PredlogSettings(flush_interval_s=0.05).flush_interval == 0.05


def test_a_long_window_is_globbed_by_month_then_as_every_file(tmp_path):
    """A brace list of many days cost more than reading every file (chdb lists the folder once per
    alternative: 1 500 daily files, a 1 498-day list 3.5 s, every file 0.7 s). Up to ``MAX_GLOB_DAYS``
    days are listed, then up to ``MAX_GLOB_MONTHS`` months, then every file."""
    from predlog.reader import MAX_GLOB_DAYS

    settings = PredlogSettings(dir=tmp_path)
    folder = settings.table_dir("predictions")
    folder.mkdir(parents=True)
    base = datetime(2020, 1, 1, tzinfo=UTC)
    for d in range(1500):  # only names count for the glob
        (folder / f"{base + timedelta(days=d):%Y%m%dT120000}-{uuid.uuid4().hex}.parquet").touch()
    reader = predlog.open_reader(settings)
    try:
        glob = reader.source.days_glob
        start = base + timedelta(days=700)
        week = glob("predictions", start, start + timedelta(days=7))
        assert week.startswith("{20211130,20211201,") and week.count(",") == 8 and week.endswith("}T*.parquet")
        days = glob("predictions", start, start + timedelta(days=MAX_GLOB_DAYS - 2))
        assert days.count(",") == MAX_GLOB_DAYS - 1 and days.endswith("}T*.parquet")  # as many days as allowed
        assert glob("predictions", start, start + timedelta(days=40)) == "{202111,202112,202201}*.parquet"
        assert glob("predictions", start, start + timedelta(days=400)).count(",") == 14  # 15 months
        early = base + timedelta(days=100)
        assert glob("predictions", early, early + timedelta(days=1000)) == "*.parquet"  # 34 months (> 24)
        assert glob("predictions", None, base + timedelta(days=1498)) == "*.parquet"  # every month of the log
    finally:
        reader.close()


def test_a_window_globbed_by_month_reads_its_rows_only(tmp_path):
    settings = PredlogSettings(dir=tmp_path)
    folder = settings.table_dir("predictions")
    base = MIDNIGHT - timedelta(days=120)
    for d in range(120):
        batch_file(folder, [row(d, base + timedelta(days=d, hours=12))])
    start, end = base + timedelta(days=30), base + timedelta(days=80)
    reader = predlog.open_reader(settings)
    try:
        assert reader.source.days_glob("predictions", start, end).endswith("}*.parquet")
        assert reader.window_counts(start=start, end=end)["n"] == 50
        assert len(reader.window(start=start, end=end)) == 50
    finally:
        reader.close()
