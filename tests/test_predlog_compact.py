"""Compaction of embedded segments: fewer files, the same rows exactly once, crash-safe reruns."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import predlog
from predlog import PredictionRecord, PredlogSettings
from predlog.compact import CompactError, compact

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def write_days(
    settings: PredlogSettings,
    days_ago: list[int],
    per_batch: int = 10,
    text: Callable[[int], str] = lambda i: "tyre worn",
) -> int:
    writer = predlog.open_writer(settings)
    n = 0
    for d in days_ago:
        for _ in range(3):  # three batches (files) per day
            writer.submit(
                [
                    PredictionRecord(
                        request_id=f"r{n + i}", item_index=0, model_name="mot-defects", model_version="1",
                        slot="production", text=text(i), ts=NOW - timedelta(days=d, minutes=i),
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


def test_crash_while_moving_segments_is_finished_by_the_next_run(tmp_path, caplog):
    settings = PredlogSettings(dir=tmp_path, flush_interval_s=0.02)
    n = write_days(settings, [4])
    folder = settings.table_dir("predictions")
    work = folder / ".compact-20261124"
    work.mkdir()
    for f in sorted(folder.glob("*.parquet"))[:2]:  # two of three segments moved, then the crash
        f.rename(work / f.name)
    with caplog.at_level(logging.WARNING, logger="predlog"):
        assert stored(settings)["n"] == n - 20  # moved rows are hidden, never doubled
    assert "predictions rows of 20261124 are out of sight" in caplog.text  # and the reader says so
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


def test_a_merge_that_fails_puts_the_day_back(tmp_path, monkeypatch):
    """A failed merge (disk full) once left the day's segments in ``.compact-<day>/``, out of every
    reader's sight until a rerun: now they go back and the error says nothing changed."""
    settings = PredlogSettings(dir=tmp_path, flush_interval_s=0.02)
    n = write_days(settings, [4])
    folder = settings.table_dir("predictions")
    before = sorted(p.name for p in folder.iterdir())
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".parquet.tmp"):  # the merged file's
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CompactError, match="20261124.*nothing was changed"):
        compact(folder, now=NOW)
    assert sorted(p.name for p in folder.iterdir()) == before  # no work folder, no partial file
    assert stored(settings) == {"n": n, "u": n}
    monkeypatch.undo()
    assert compact(folder, now=NOW) == {"20261124": n}  # space is back
    assert stored(settings) == {"n": n, "u": n}


def test_an_interrupted_run_whose_merge_fails_again_puts_the_day_back(tmp_path, monkeypatch):
    settings = PredlogSettings(dir=tmp_path, flush_interval_s=0.02)
    n = write_days(settings, [4])
    folder = settings.table_dir("predictions")
    work = folder / ".compact-20261124"
    work.mkdir()
    for f in sorted(folder.glob("*.parquet"))[:2]:  # a run killed while moving the segments
        f.rename(work / f.name)

    def write_table(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the disk is full (fault injection)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", write_table)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_table)  # the merge streams through a writer
    with pytest.raises(CompactError, match="nothing was changed"):
        compact(folder, now=NOW)
    assert not work.exists() and len(list(folder.glob("*.parquet"))) == 3
    assert stored(settings) == {"n": n, "u": n}


COMPACT_UNDER_RLIMIT = textwrap.dedent(
    """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
    from motlens.cli import main
    raise SystemExit(main(["log", "compact"]))
    """
)


def test_log_compact_on_a_full_disk_changes_nothing_and_says_so(tmp_path):
    settings = PredlogSettings(dir=tmp_path / "predlog", flush_interval_s=0.02)
    n = write_days(settings, [4], text=lambda i: os.urandom(1000).hex())  # rows outweigh each file's metadata
    folder = settings.table_dir("predictions")
    before = sorted(p.name for p in folder.iterdir())
    limit = 3 * max(p.stat().st_size for p in folder.iterdir()) // 2  # each segment fits, their merge does not
    env = {**os.environ, "MOTLENS_HOME": str(tmp_path)}
    env.pop("MOTLENS_CLICKHOUSE_URL", None)
    env.pop("MOTLENS_PREDLOG_DIR", None)
    out = subprocess.run(
        [sys.executable, "-c", COMPACT_UNDER_RLIMIT, str(limit)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing was changed" in lines[0], out.stderr
    assert sorted(p.name for p in folder.iterdir()) == before
    assert stored(settings) == {"n": n, "u": n}


KILLED_COMPACT = textwrap.dedent(
    """
    import os, shutil, signal, sys
    from datetime import datetime
    from pathlib import Path
    from predlog.compact import compact
    folder, step = Path(sys.argv[1]), sys.argv[2]
    calls = {"rename": 0, "replace": 0, "unlink": 0}
    real = {name: getattr(os, name) for name in calls}
    kill_at = {"moving": ("rename", 2), "before_rename": ("replace", 1), "mid_cleanup": ("unlink", 2)}[step]
    def patched(name):
        def call(*args, **kwargs):
            calls[name] += 1
            if (name, calls[name]) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real[name](*args, **kwargs)
        return call
    for name in calls:
        setattr(os, name, patched(name))
    compact(folder, now=datetime.fromisoformat(sys.argv[3]))
    """
)


@pytest.mark.parametrize("step", ["moving", "before_rename", "mid_cleanup"])
def test_a_compaction_killed_at_any_step_is_finished_by_the_next_run(tmp_path, step):
    settings = PredlogSettings(dir=tmp_path, flush_interval_s=0.02)
    n = write_days(settings, [4])
    folder = settings.table_dir("predictions")
    out = subprocess.run(
        [sys.executable, "-c", KILLED_COMPACT, str(folder), step, NOW.isoformat()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    compact(folder, now=NOW)
    assert sorted(p.name[:9] for p in folder.iterdir()) == ["20261124T"]  # one merged file, nothing hidden
    assert stored(settings) == {"n": n, "u": n}


def test_a_folder_that_cannot_be_listed_is_an_error_not_a_silent_success(tmp_path, monkeypatch):
    """`Path.glob` finds nothing in a folder it cannot list: compaction did nothing and exited 0,
    while the readers call the same folder an error."""
    settings = PredlogSettings(dir=tmp_path / "predlog", flush_interval_s=0.02)
    write_days(settings, [4])
    folder = settings.table_dir("predictions")
    real = os.scandir

    def scandir(path="."):  # noqa: ANN001, ANN202 - permission denied on this folder (root ignores chmod)
        if Path(path) == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(CompactError, match="cannot compact .*predictions: Permission denied"):
        compact(folder, now=NOW)


def test_a_second_compaction_of_the_same_folder_is_refused_while_one_runs(tmp_path):
    """Two overlapping runs could put back a day's segments the other one is publishing merged."""
    settings = PredlogSettings(dir=tmp_path / "predlog", flush_interval_s=0.02)
    n = write_days(settings, [4])
    folder = settings.table_dir("predictions")
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running `motlens log compact` holds
        with pytest.raises(CompactError, match="held by another compaction"):
            compact(folder, now=NOW)
    finally:
        os.close(fd)
    assert list(compact(folder, now=NOW).values()) == [n]  # released: the next run goes ahead


def write_batches(
    folder: Path, stamps: list[datetime], rows: int = 5, text: Callable[[int], str] = lambda i: "tyre worn"
) -> int:
    """One batch file per stamp (its rows one second apart from it), as the writer names them."""
    from predlog.schema import records_to_arrow
    from predlog.sinks import ParquetSink

    sink = ParquetSink(folder)
    n = 0
    for stamp in stamps:
        records = [
            PredictionRecord(
                request_id=f"b{stamp:%Y%m%d%H%M%S}-{i}", item_index=0, model_name="mot-defects", model_version="1",
                slot="production", text=text(i), ts=stamp + timedelta(seconds=i),
            )
            for i in range(rows)
        ]  # fmt: skip
        sink.insert(records_to_arrow(records), os.urandom(16).hex())
        n += rows
    return n


def test_closed_hours_of_today_are_merged_the_current_hour_is_left(tmp_path):
    """Only days before yesterday were merged: a predictor's files of today and yesterday (86 400 a day
    at one a second) stayed, and every windowed read of the promotion gates and drift opened them."""
    settings = PredlogSettings(dir=tmp_path)
    folder = settings.table_dir("predictions")
    hour = NOW.replace(minute=0)  # 12:00; NOW is 12:00 too, so hour 11 ended exactly now
    n = write_batches(folder, [hour.replace(hour=9, minute=m) for m in (10, 20, 30)])
    n += write_batches(folder, [hour.replace(hour=10, minute=m) for m in (40, 50)])
    n += write_batches(folder, [hour.replace(hour=11, minute=m) for m in (30, 55)])  # ended, not settled yet
    done = compact(folder, now=NOW + timedelta(minutes=5))
    day = f"{NOW:%Y%m%d}"
    assert done == {f"{day}T09": 15, f"{day}T10": 10}
    names = sorted(p.name for p in folder.glob("*.parquet"))
    assert [name[:15] for name in names] == [f"{day}T090000", f"{day}T100000", f"{day}T113000", f"{day}T115500"]
    assert stored(settings) == {"n": n, "u": n}
    assert compact(folder, now=NOW + timedelta(minutes=5)) == {}  # idempotent
    n += write_batches(folder, [hour.replace(hour=9, minute=55)])  # a late batch (a spool replay) of hour 9
    assert compact(folder, now=NOW + timedelta(minutes=15)) == {f"{day}T09": 20, f"{day}T11": 10}
    assert len(list(folder.glob("*.parquet"))) == 3
    assert stored(settings) == {"n": n, "u": n}
    assert compact(folder, now=NOW + timedelta(days=1, minutes=15)) == {day: n}  # the day, once it is closed
    assert [p.name[:15] for p in folder.glob("*.parquet")] == [f"{day}T000000"]
    assert stored(settings) == {"n": n, "u": n}


def test_a_replayed_batch_whose_hour_was_merged_today_is_not_stored_twice(tmp_path):
    """The writer looked for a replayed batch in merged files only for days before yesterday."""
    from predlog.schema import records_to_arrow
    from predlog.sinks import ParquetSink

    settings = PredlogSettings(dir=tmp_path)
    folder = settings.table_dir("predictions")
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    write_batches(folder, [hour + timedelta(minutes=1)])
    records = [
        PredictionRecord(request_id=f"x{i}", item_index=0, model_name="mot-defects", model_version="1",
                         slot="production", text="tyre worn", ts=hour + timedelta(minutes=2, seconds=i))
        for i in range(4)
    ]  # fmt: skip
    table, token = records_to_arrow(records), os.urandom(16).hex()
    ParquetSink(folder).insert(table, token)  # stored; say close() also spilled it (a stalled write)
    assert sum(compact(folder).values()) == 9
    ParquetSink(folder).insert(table, token)  # the replay on the next start
    assert stored(settings) == {"n": 9, "u": 9}


def test_rows_stay_in_sight_while_their_group_is_merged(tmp_path, monkeypatch):
    """The segments were moved out of sight before the merge, for as long as it took (seconds for a big
    day): a reader in that time, e.g. a promotion gate now that today's hours are merged, missed them."""
    import predlog.compact as compact_module

    settings = PredlogSettings(dir=tmp_path)
    n = write_days(settings, [4])
    folder = settings.table_dir("predictions")
    seen: list[dict] = []
    real = compact_module.batch_tokens

    def batch_tokens(path: Path) -> set[str]:  # called while the merge runs
        if not seen:
            seen.append(stored(settings))
        return real(path)

    monkeypatch.setattr(compact_module, "batch_tokens", batch_tokens)
    assert compact(folder, now=NOW) == {"20261124": n}
    assert seen == [{"n": n, "u": n}]
    assert stored(settings) == {"n": n, "u": n}


def _during_the_swap(monkeypatch, action: Callable[[], object]) -> list:
    """Run ``action`` in a thread once a compaction has moved its first segment out of sight, give it
    half a second (the swap goes on after that, or once it finished); returns [its result or error]."""
    real_rename = Path.rename
    out: list = []
    started: list[threading.Thread] = []

    def run() -> None:
        try:
            out.append(action())
        except Exception as e:  # noqa: BLE001 - the test looks at it
            out.append(e)

    def rename(self: Path, target):  # noqa: ANN001, ANN202 - the real rename, then the action once
        moved = real_rename(self, target)
        if not started and Path(target).parent.name.startswith(".compact-"):
            started.append(threading.Thread(target=run))
            started[0].start()
            started[0].join(0.5)
        return moved

    monkeypatch.setattr(Path, "rename", rename)
    out.append(started)
    return out


def test_a_read_during_the_swap_waits_for_it_and_sees_every_row_once(tmp_path, monkeypatch):
    """A read listed the folder while the swap had moved some segments away: their rows were missing, or
    a listed file was gone when chdb opened it (FILE_DOESNT_EXIST, `motlens log` exiting 2)."""
    settings = PredlogSettings(dir=tmp_path)
    n = write_days(settings, [4])
    folder = settings.table_dir("predictions")
    out = _during_the_swap(monkeypatch, lambda: stored(settings))
    assert compact(folder, now=NOW) == {"20261124": n}
    threads = out.pop(0)
    threads[0].join(60)
    assert out == [{"n": n, "u": n}]


def test_a_windowed_read_during_the_swap_lists_the_days_after_it(tmp_path, monkeypatch):
    """A windowed read listed the folder's days before taking the lock: between a day's files moving away
    and its merged file moving in, it found none of that day and read no file for it (0 rows)."""
    settings = PredlogSettings(dir=tmp_path)
    write_days(settings, [6, 4, 0])  # 11-22 (merged first), 11-24, 11-28
    start = (NOW - timedelta(days=6)).replace(hour=0)
    reader = predlog.open_reader(settings)
    real_replace, out = os.replace, []

    def count() -> None:
        out.append(reader.window_counts(start=start, end=start + timedelta(days=1))["n"])

    def replace(src, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - the merged file moving in
        if Path(src).name.startswith(f".{start:%Y%m%d}") and not out:
            out.append(threading.Thread(target=count))
            out[0].start()
            out[0].join(0.5)  # the read runs now, unless the swap holds it off
        return real_replace(src, dst, *args, **kwargs)

    try:
        before = reader.window_counts(start=start, end=start + timedelta(days=1))["n"]
        monkeypatch.setattr(os, "replace", replace)
        compact(settings.table_dir("predictions"), now=NOW)
        monkeypatch.setattr(os, "replace", real_replace)
        out.pop(0).join(60)
        assert before > 0 and out == [before]
    finally:
        reader.close()


def test_a_replay_during_the_swap_is_not_stored_twice(tmp_path, monkeypatch):
    """The writer's "already stored?" look-up ran while the batch's file was moved away and the merged
    file not yet in place: the replay was written beside the merged file that held it."""
    from predlog.schema import records_to_arrow
    from predlog.sinks import ParquetSink

    settings = PredlogSettings(dir=tmp_path)
    folder = settings.table_dir("predictions")
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    records = [
        PredictionRecord(request_id=f"x{i}", item_index=0, model_name="mot-defects", model_version="1",
                         slot="production", text="tyre worn", ts=hour + timedelta(minutes=1, seconds=i))
        for i in range(4)
    ]  # fmt: skip
    table, token = records_to_arrow(records), os.urandom(16).hex()
    ParquetSink(folder).insert(table, token)  # the first segment of the hour: the swap moves it first
    n = 4 + write_batches(folder, [hour + timedelta(minutes=m) for m in (20, 40)])
    out = _during_the_swap(monkeypatch, lambda: ParquetSink(folder).insert(table, token))
    assert sum(compact(folder).values()) == n
    out.pop(0)[0].join(60)
    assert out == [None]
    assert stored(settings) == {"n": n, "u": n}


def test_a_swap_waits_for_reads_and_gives_up_changing_nothing(tmp_path, monkeypatch):
    """The swap waits for the reads in progress; held past ``SWAP_WAIT_S`` it leaves the group as it was."""
    import predlog.swaplock as swaplock

    settings = PredlogSettings(dir=tmp_path)
    n = write_days(settings, [4])
    folder = settings.table_dir("predictions")
    before = sorted(p.name for p in folder.iterdir())
    monkeypatch.setattr(swaplock, "SWAP_WAIT_S", 0.3)
    with swaplock.steady(settings.root), pytest.raises(CompactError, match="held it for .*nothing was changed"):
        compact(folder, now=NOW, min_files=2)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert stored(settings) == {"n": n, "u": n}
    assert compact(folder, now=NOW) == {"20261124": n}  # released: the next run goes ahead


def test_a_read_held_off_by_a_stuck_swap_gives_up_naming_it(tmp_path, monkeypatch):
    """A compaction stopped in the middle of its swap (a suspended process) held every read for good."""
    import predlog.swaplock as swaplock

    settings = PredlogSettings(dir=tmp_path)
    write_days(settings, [4])
    reader = predlog.open_reader(settings)
    monkeypatch.setattr(swaplock, "STEADY_WAIT_S", 0.3)
    try:
        with swaplock.swapping(settings.root), pytest.raises(TimeoutError, match="a compaction of .* held it"):
            reader.query("SELECT count() AS n FROM predictions")
        assert reader.query("SELECT count() AS n FROM predictions").iloc[0]["n"] == 30  # released: reads again
    finally:
        reader.close()


def test_a_write_held_off_by_a_stuck_swap_goes_to_the_spool_and_is_stored_later(tmp_path, monkeypatch):
    """The sink's write waits for the swap like a read; held past ``STEADY_WAIT_S`` its batch is spooled
    (the writer's thread is not held for good) and stored once the swap is over."""
    import predlog.swaplock as swaplock

    settings = PredlogSettings(dir=tmp_path)
    n = write_days(settings, [4])
    monkeypatch.setattr(swaplock, "STEADY_WAIT_S", 0.3)
    writer = predlog.open_writer(settings)
    try:
        with swaplock.swapping(settings.root):
            writer.submit(
                [
                    PredictionRecord(request_id=f"held{i}", item_index=0, model_name="mot-defects",
                                     model_version="1", slot="production", text="brake worn")
                    for i in range(5)
                ]
            )  # fmt: skip
            assert writer.flush(30)
            assert writer.stats()["spool_rows"] == 5
    finally:
        writer.close(30)  # the swap is over: close replays the spool into the sink
    assert writer.stats()["spool_rows"] == 0
    assert stored(settings) == {"n": n + 5, "u": n + 5}


PEAK_OF_A_COMPACTION = textwrap.dedent(
    """
    import sys
    from datetime import datetime
    from pathlib import Path
    import pyarrow as pa
    import predlog.compact as c
    c.CHUNK_ROWS = int(sys.argv[2])
    done = c.compact(Path(sys.argv[1]), now=datetime.fromisoformat(sys.argv[3]))
    print(sum(done.values()), pa.default_memory_pool().max_memory())
    """
)


def test_compaction_streams_a_day_in_bounded_memory(tmp_path):
    """A day was concatenated into one table and sorted: 4M rows took 2.9 GB, a 30M-row day ~20 GB."""
    settings = PredlogSettings(dir=tmp_path)
    folder = settings.table_dir("predictions")
    day = NOW - timedelta(days=3)
    stamps = [day + timedelta(minutes=m) for m in range(80)]
    n = write_batches(folder, stamps, rows=1000, text=lambda i: os.urandom(300).hex())  # 600 B that do not compress
    held = sum(pq.read_metadata(f).row_group(0).total_byte_size for f in folder.glob("*.parquet"))
    out = subprocess.run(
        [sys.executable, "-c", PEAK_OF_A_COMPACTION, str(folder), "2000", NOW.isoformat()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows, peak = map(int, out.stdout.split())
    assert rows == n
    assert peak < held / 4, (peak, held)  # the old merge held the whole day twice (concatenated, then sorted)
    (merged,) = folder.glob("*.parquet")
    meta = pq.read_metadata(merged)
    assert meta.num_rows == n and max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) <= 3000
    assert stored(settings) == {"n": n, "u": n}


@pytest.mark.parametrize("table", ["drift_reports", "promotion_events"])
def test_audit_tables_are_compacted(tmp_path, table):
    """Audit rows are filed as ``%Y%m%dT%H%M%S%f-<uuid>`` (12 digits after the T): the grouping required a
    ``-`` after 6, so these folders were never compacted."""
    from predlog.sinks import MERGED_FILE

    settings = PredlogSettings(dir=tmp_path / "predlog")
    reader = predlog.open_reader(settings)
    try:
        for i in range(5):
            if table == "drift_reports":
                reader.insert_drift_report(
                    {"model_name": "mot-defects", "model_version": "1", "slot": "production", "run_id": f"r{i}"}
                )
            else:
                reader.insert_promotion_event({"model_name": "mot-defects", "action": "advance", "to_version": f"{i}"})
        folder = settings.table_dir(table)
        assert len(list(folder.glob("*.parquet"))) == 5
        later = datetime.now(UTC) + timedelta(days=2)
        merged = compact(folder, now=later)
        assert sum(merged.values()) == 5, merged
        left = [f.name for f in folder.glob("*.parquet")]
        assert len(left) == 1 and MERGED_FILE.match(left[0]), left
        assert compact(folder, now=later) == {}  # a day's lone merged file stays as it is
        read = reader.drift_reports() if table == "drift_reports" else reader.promotion_events()
        assert len(read) == 5
    finally:
        reader.close()


def _old_audit_rows(settings: PredlogSettings, table: str, n: int = 3) -> None:
    """``n`` audit files of a closed day, named as the log names them (to the microsecond)."""
    import uuid

    from predlog.schema import row_to_arrow
    from predlog.sinks import write_parquet_segment

    row = {"model_name": "mot-defects", "action": "advance", "to_version": "1"}
    for i in range(n):
        stamp = NOW - timedelta(days=3, minutes=i)
        write_parquet_segment(
            settings.table_dir(table), row_to_arrow(table, row), f"{stamp:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex}"
        )


def _cli_log(tmp_path, monkeypatch) -> PredlogSettings:
    """An embedded log under ``MOTLENS_HOME`` (what `motlens log compact` reads) with a closed day of
    predictions and old promotion events."""
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path))
    monkeypatch.delenv("MOTLENS_CLICKHOUSE_URL", raising=False)
    monkeypatch.delenv("MOTLENS_PREDLOG_DIR", raising=False)
    settings = PredlogSettings(flush_interval_s=0.02)
    write_days(settings, [4])
    _old_audit_rows(settings, "promotion_events")
    return settings


def test_log_compact_skips_a_held_folder_and_compacts_the_others(tmp_path, monkeypatch, capsys):
    """A folder held by another compaction (a running predictor's automatic one) exited 2 and stopped the
    loop over the tables: the folders after it were never compacted, though the docs said "skips"."""
    from motlens.cli import main
    from predlog.compact import CompactBusy

    settings = _cli_log(tmp_path, monkeypatch)
    folder = settings.table_dir("predictions")
    before = sorted(p.name for p in folder.iterdir())
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the predictor's compactor holds
        with pytest.raises(CompactBusy, match="another `motlens log compact`, or a running predictor's automatic"):
            compact(folder, now=NOW)
        assert main(["log", "compact"]) == 0
    finally:
        os.close(fd)
    out = capsys.readouterr()
    assert "predictions: skipped" in out.out and "running predictor's automatic compaction" in out.out, out
    assert "promotion_events:" in out.out and "compacted (3 rows)" in out.out, out
    assert sorted(p.name for p in folder.iterdir()) == before
    assert len(list(settings.table_dir("promotion_events").glob("*.parquet"))) == 1


def test_log_compact_tries_every_table_and_exits_2_when_one_fails(tmp_path, monkeypatch, capsys):
    import predlog.compact
    from motlens.cli import main

    _cli_log(tmp_path, monkeypatch)
    real = predlog.compact.compact

    def failing(folder, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if folder.name == "predictions":
            raise CompactError("predictions: compacting 20261124 failed (injected); nothing was changed")
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(predlog.compact, "compact", failing)
    assert main(["log", "compact"]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "motlens log compact: CompactError: predictions: compacting 20261124 failed (injected); nothing was changed"
    ), out.err
    assert "promotion_events:" in out.out and "compacted (3 rows)" in out.out, out
