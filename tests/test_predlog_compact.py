"""Compaction of embedded segments: fewer files, the same rows exactly once, crash-safe reruns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import predlog
from predlog import PredictionRecord, PredlogSettings
from predlog.compact import compact

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def write_days(settings: PredlogSettings, days_ago: list[int], per_batch: int = 10) -> int:
    writer = predlog.open_writer(settings)
    n = 0
    for d in days_ago:
        for _ in range(3):  # three batches (files) per day
            writer.submit(
                [
                    PredictionRecord(
                        request_id=f"r{n + i}", item_index=0, model_name="mot-defects", model_version="1",
                        slot="production", text="tyre worn", ts=NOW - timedelta(days=d, minutes=i),
                    )
                    for i in range(per_batch)
                ]
            )  # fmt: skip
            n += per_batch
            assert writer.flush(30)
    writer.close(10)
    return n


def stored(settings: PredlogSettings) -> dict:
    reader = predlog.open_reader(settings)
    try:
        return reader.query("SELECT count() AS n, uniqExact(request_id) AS u FROM predictions").iloc[0].to_dict()
    finally:
        reader.close()


def test_closed_days_are_merged_and_rows_kept_once(tmp_path):
    settings = PredlogSettings(dir=tmp_path, flush_interval_s=0.02)
    n = write_days(settings, [3, 2, 0])
    folder = settings.table_dir("predictions")
    assert len(list(folder.glob("*.parquet"))) == 9
    done = compact(folder, now=NOW)
    assert sorted(done.values()) == [30, 30]  # the two closed days; today is left to the writer
    assert len(list(folder.glob("*.parquet"))) == 5
    assert stored(settings) == {"n": n, "u": n}
    assert compact(folder, now=NOW) == {}  # idempotent


def test_crash_while_moving_segments_is_finished_by_the_next_run(tmp_path):
    settings = PredlogSettings(dir=tmp_path, flush_interval_s=0.02)
    n = write_days(settings, [4])
    folder = settings.table_dir("predictions")
    work = folder / ".compact-20261124"
    work.mkdir()
    for f in sorted(folder.glob("*.parquet"))[:2]:  # two of three segments moved, then the crash
        f.rename(work / f.name)
    assert stored(settings)["n"] == n - 20  # moved rows are hidden, never doubled
    assert "20261124" in compact(folder, now=NOW, min_files=1)
    assert not work.exists()
    assert stored(settings) == {"n": n, "u": n}


def test_crash_after_merge_only_cleans_up(tmp_path):
    settings = PredlogSettings(dir=tmp_path, flush_interval_s=0.02)
    n = write_days(settings, [4])
    folder = settings.table_dir("predictions")
    backup = tmp_path / "backup"
    backup.mkdir()
    for f in folder.glob("*.parquet"):
        (backup / f.name).write_bytes(f.read_bytes())
    assert compact(folder, now=NOW) == {"20261124": n}
    work = folder / ".compact-20261124"  # the state after the merge, before the folder was removed
    backup.rename(work)
    assert compact(folder, now=NOW) == {"20261124": 0}
    assert not work.exists()
    assert stored(settings) == {"n": n, "u": n}
