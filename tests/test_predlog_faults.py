"""Fault tests with real failing sinks: outage, unreachable server, crash between insert and spool
removal, close/SIGTERM mid-stream, spool full, queue full, unencodable rows."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import migrated_reader
from prometheus_client import REGISTRY

import predlog
from predlog import PredictionRecord, PredlogSettings
from predlog.schema import records_to_arrow, row_to_arrow
from predlog.sinks import ClickHouseSink, ParquetSink
from predlog.spool import EVENTS_SPOOL, SINK_FILE, Segment, SegmentDamaged, Spool


def rows(n: int, start: int = 0) -> list[PredictionRecord]:
    return [
        PredictionRecord(
            request_id=f"r{i}",
            item_index=0,
            model_name="mot-defects",
            model_version="7",
            slot="production",
            text=f"brake pipe corroded {i}",
            section="1 Brakes",
            severity="major",
            embedding=[0.01 * (i % 50)] * 384 if i % 10 == 0 else None,
        )
        for i in range(start, start + n)
    ]


def same_server_back(settings: PredlogSettings) -> None:
    """Bind the spool (and the audit rows' spool in it) to ``settings``' server: a closed port or a hung
    server stood in for it while it was down, and a spool is bound to its sink's URL (docs/predlog.md)."""
    for folder in (settings.spool_dir, settings.spool_dir / EVENTS_SPOOL):
        if folder.exists():
            (folder / SINK_FILE).write_text(settings.sink.to_json())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stopped(writer) -> bool:
    """Both of the writer's threads have ended (the last one released the spool's lock)."""
    return not (writer._thread.is_alive() or writer._sender.is_alive())


def wait_for(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.fixture()
def chdb_settings(tmp_path):
    settings = PredlogSettings(
        clickhouse_url="chdb://memory",
        database=f"f_{uuid.uuid4().hex[:10]}",
        dir=tmp_path / "predlog",
        batch_rows=50,
        flush_interval_s=0.02,
        retry_initial_s=0.05,
        retry_max_s=0.2,
    )
    reader = migrated_reader(settings)  # creates the tables
    yield settings, reader
    reader.client.command(f"DROP DATABASE IF EXISTS {settings.database}")
    reader.close()


def stored(reader, settings) -> tuple[int, int]:
    """(rows, distinct (request_id, item_index)) in the table."""
    r = reader.client.query(
        f"SELECT count(), uniqExact(request_id, item_index) FROM {settings.database}.predictions"
    ).result_rows[0]
    return int(r[0]), int(r[1])


def test_sink_outage_no_submit_errors_and_every_row_once(chdb_settings):
    settings, reader = chdb_settings
    db = settings.database
    writer = predlog.open_writer(settings)
    writer.submit(rows(200))
    assert writer.flush(30)
    reader.client.command(f"RENAME TABLE {db}.predictions TO {db}.predictions_away")  # inserts now fail
    for i in range(10):
        writer.submit(rows(50, 200 + 50 * i))
    assert writer.flush(30)
    down = writer.stats()
    assert not down["sink_ok"] and down["spilled"] >= 450 and down["spool_rows"] >= 450
    reader.client.command(f"RENAME TABLE {db}.predictions_away TO {db}.predictions")
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(30)
    final = writer.stats()
    assert final["written"] == 700 and final["replayed"] >= 450 and final["dropped"] == 0
    assert stored(reader, settings) == (700, 700)


def test_unreachable_server_spools_then_next_start_replays(chdb_settings):
    settings, reader = chdb_settings
    down = settings.model_copy(update={"clickhouse_url": f"http://127.0.0.1:{closed_port()}", "connect_timeout_s": 1})
    writer = predlog.open_writer(down)
    for i in range(6):
        writer.submit(rows(50, 50 * i))
    assert writer.flush(30)
    writer.close(10)
    s = writer.stats()
    assert s["written"] == 0 and s["spilled"] == 300 and s["spool_rows"] == 300 and s["dropped"] == 0

    same_server_back(settings)
    writer = predlog.open_writer(settings)  # the server is "back": same spool, working sink
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(10)
    assert writer.stats()["replayed"] == 300
    assert stored(reader, settings) == (300, 300)


def test_crash_between_insert_and_spool_removal_is_deduplicated(chdb_settings):
    settings, reader = chdb_settings
    table = records_to_arrow(rows(80))
    spool = Spool(settings.spool_dir, settings.spool_max_bytes, sink=settings.sink)
    seg, _ = spool.append(table, uuid.uuid4().hex)
    sink = ClickHouseSink(settings)
    sink.insert(Spool.read(seg), seg.token)  # stored, then the process "died" before removing the segment
    spool.close()
    assert stored(reader, settings) == (80, 80)
    writer = predlog.open_writer(settings)
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(10)
    assert writer.stats()["replayed"] == 80
    assert stored(reader, settings) == (80, 80)


def test_parquet_replay_of_an_already_written_segment_is_idempotent(tmp_path):
    settings = PredlogSettings(dir=tmp_path, flush_interval_s=0.02)
    table = records_to_arrow(rows(40))
    spool = Spool(settings.spool_dir, settings.spool_max_bytes, sink=settings.sink)
    seg, _ = spool.append(table, uuid.uuid4().hex)
    spool.close()
    ParquetSink(settings.table_dir("predictions")).insert(Spool.read(seg), seg.token)
    writer = predlog.open_writer(settings)
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(10)
    reader = predlog.open_reader(settings)
    df = reader.query("SELECT count() AS n, uniqExact(request_id) AS u FROM predictions")
    reader.close()
    assert df.to_dict("records") == [{"n": 40, "u": 40}]


def test_close_mid_stream_during_outage_loses_nothing(chdb_settings):
    settings, reader = chdb_settings
    db = settings.database
    writer = predlog.open_writer(settings)
    writer.submit(rows(100))
    assert writer.flush(30)
    reader.client.command(f"RENAME TABLE {db}.predictions TO {db}.predictions_away")
    sent = 100
    for i in range(40):
        writer.submit(rows(25, sent))
        sent += 25
        if i == 20:
            time.sleep(0.05)
    writer.close(10)  # what SIGTERM does
    s = writer.stats()
    assert s["dropped"] == 0 and s["written"] + s["spool_rows"] == sent
    reader.client.command(f"RENAME TABLE {db}.predictions_away TO {db}.predictions")
    writer = predlog.open_writer(settings)
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(10)
    assert stored(reader, settings) == (sent, sent)


class SilentServer:
    """A ClickHouse stand-in that accepts connections and never answers until released; then it
    closes them and stops listening (every later connect is refused)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.released = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self.released.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted.append(conn)
        self.sock.close()
        for conn in self.accepted:
            conn.close()

    def release(self) -> None:
        self.released.set()
        self._thread.join(10)


def test_close_while_the_sink_hangs_keeps_the_queue_in_the_spool(chdb_settings):
    """close() gives up on a hung insert after its timeout: the queued rows go to the spool (none
    dropped), and the next writer stores every row exactly once."""
    settings, reader = chdb_settings
    server = SilentServer()
    hung = settings.model_copy(
        update={"clickhouse_url": f"http://127.0.0.1:{server.port}", "send_receive_timeout_s": 300}
    )
    writer = predlog.open_writer(hung)
    try:
        writer.submit(rows(500))  # the writer takes one batch of 50 and hangs inserting it
        assert wait_for(lambda: server.accepted, 30)
        writer.close(timeout=0.5)
        s = writer.stats()
        assert s["queue_depth"] == 0 and s["dropped"] == 0 and s["written"] == 0, s
        assert s["spool_rows"] + s["written"] == 500, s
    finally:
        server.release()  # the hung insert fails, the leftover writer thread ends
    assert wait_for(lambda: stopped(writer), 60)
    # the leftover thread released the spool's lock as it ended: a writer in this process can take it
    same_server_back(settings)
    writer = predlog.open_writer(settings)  # the server is back: same spool, working sink
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(10)
    assert writer.stats()["replayed"] == 500 and writer.stats()["dropped"] == 0
    assert stored(reader, settings) == (500, 500)


def test_a_hung_clickhouse_holds_no_batch_in_memory(chdb_settings):
    """A ClickHouse that accepts connections and never answers: the writer's one thread waited on the
    connect, then on each insert, up to ``send_receive_timeout_s`` while the batches piled up in memory
    (lost on SIGKILL; with a small queue dropped as queue_full while the spool had room). Each batch is
    now in the fsync'd spool within a flush interval, in order, and stored once when the server is back."""
    settings, reader = chdb_settings
    server = SilentServer()
    hung = settings.model_copy(
        update={
            "clickhouse_url": f"http://127.0.0.1:{server.port}", "connect_timeout_s": 1, "send_receive_timeout_s": 60,
            "batch_rows": 10, "queue_rows": 30,
        }
    )  # fmt: skip
    writer = predlog.open_writer(hung)
    try:
        assert wait_for(lambda: server.accepted, 30)  # the writer's connect waits for an answer
        started = time.monotonic()
        for i in range(12):
            writer.submit(rows(10, 10 * i))
            assert wait_for(lambda: writer.stats()["queue_depth"] == 0, 10), writer.stats()
        s = writer.stats()
        assert s["spool_rows"] == 120 and s["dropped"] == 0 and s["written"] == 0, s
        on_disk = sorted(hung.spool_dir.glob("*.arrow"))
        assert sum(int(p.name.split("-")[1]) for p in on_disk) == 120  # what a SIGKILL now would leave
        first = [pa.ipc.open_file(pa.memory_map(str(p))).read_all()["request_id"][0].as_py() for p in on_disk]
        assert first == [f"r{10 * i}" for i in range(12)]  # in the order submitted
        assert time.monotonic() - started < 60  # all while the first call to the server still hangs
        writer.close(timeout=0.5)
    finally:
        server.release()
    assert wait_for(lambda: stopped(writer), 60)
    same_server_back(settings)
    writer = predlog.open_writer(settings)
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(10)
    assert writer.stats()["replayed"] == 120 and stored(reader, settings) == (120, 120)


def test_close_while_a_spooled_batch_is_being_inserted_spools_it_once(chdb_settings, monkeypatch):
    """The batch taken off the queue stayed close()'s to spill after its write-ahead copy was in the
    spool: an insert hanging past close()'s timeout left it spooled twice (spool_rows doubled)."""
    settings, reader = chdb_settings
    insert = ClickHouseSink.insert
    entered, release = stall_inserts(monkeypatch, ClickHouseSink)  # a server that stalls mid-insert
    writer = predlog.open_writer(settings)
    writer.submit(rows(50))
    assert entered.wait(30)
    writer.close(timeout=0.5)
    s = writer.stats()
    assert s["spool_rows"] == 50 and len(list(settings.spool_dir.glob("*.arrow"))) == 1, s
    release.set()
    assert wait_for(lambda: stopped(writer), 60)
    monkeypatch.setattr(ClickHouseSink, "insert", insert)
    writer = predlog.open_writer(settings)
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(10)
    assert stored(reader, settings) == (50, 50)


def test_the_segment_being_inserted_is_not_evicted_for_a_new_one(chdb_settings, monkeypatch):
    """The sink's calls run beside the spooling now, so the spool can fill while an insert is in flight:
    ``drop_oldest`` must not delete the segment being inserted (its rows would be both stored and counted as
    dropped); it deletes the next oldest, and the rows kept plus the rows counted as dropped are the rows
    submitted."""
    settings, reader = chdb_settings
    entered, release = stall_inserts(monkeypatch, ClickHouseSink)  # a server that stalls mid-insert
    full = settings.model_copy(update={"spool_max_bytes": int(_segment_bytes(50) * 3.5)})
    writer = predlog.open_writer(full)
    writer.submit(rows(50))
    assert entered.wait(30)  # the first batch's insert hangs
    for i in range(1, 6):
        writer.submit(rows(50, 50 * i))
        assert wait_for(lambda n=50 * (i + 1): writer.stats()["spool_rows"] + writer.stats()["dropped"] == n)
    release.set()
    s = _drained(writer)
    assert s["dropped_by_reason"] == {"spool_full": 150} and s["written"] == 150, s
    assert stored(reader, settings) == (150, 150)
    ids = reader.client.query(f"SELECT request_id FROM {settings.database}.predictions").result_rows
    assert {int(rid[1:]) // 50 for (rid,) in ids} == {0, 4, 5}  # the one in flight, then the newest


def test_close_while_the_embedded_store_hangs_keeps_the_batch_being_written(tmp_path, monkeypatch):
    """The embedded (Parquet) sink has no write-ahead copy: a batch whose write hangs past close()'s
    timeout goes to the spool with the queue, and the next writer stores every row once (the write
    that finishes late and the replay name the same file)."""
    settings = PredlogSettings(dir=tmp_path / "predlog", batch_rows=50, flush_interval_s=0.05)
    insert = ParquetSink.insert
    entered, release = stall_inserts(monkeypatch)
    writer = predlog.open_writer(settings)
    writer.submit(rows(200))
    assert entered.wait(30)  # the first batch of 50 is being written
    writer.close(timeout=0.5)
    s = writer.stats()
    assert s["queue_depth"] == 0 and s["dropped"] == 0 and s["spool_rows"] == 200, s
    release.set()  # the stalled write completes after all: its file and the spooled copy share a name
    assert wait_for(lambda: stopped(writer), 60)  # and released the spool's lock
    monkeypatch.setattr(ParquetSink, "insert", insert)
    assert _replayed(settings) == (200, 200)


def stall_inserts(monkeypatch, sink: type = ParquetSink) -> tuple[threading.Event, threading.Event]:  # noqa: ANN001
    """Batch writes to ``sink`` that stall (a disk or server that hangs; fault injection): each sets the
    first event and waits for the second, then writes."""
    entered, release = threading.Event(), threading.Event()
    insert = sink.insert

    def hung(self, table, token):  # noqa: ANN001, ANN202
        entered.set()
        assert release.wait(60)
        insert(self, table, token)

    monkeypatch.setattr(sink, "insert", hung)
    return entered, release


def _replayed(settings: PredlogSettings) -> tuple[int, int]:
    """(rows, distinct (request_id, item_index)) of the embedded log once a new writer replayed the spool."""
    writer = predlog.open_writer(settings)
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(10)
    reader = predlog.open_reader(settings)
    try:
        got = reader.query("SELECT count() AS n, uniqExact(request_id, item_index) AS u FROM predictions", {})
    finally:
        reader.close()
    return int(got["n"].iloc[0]), int(got["u"].iloc[0])


SIGTERM_CHILD = textwrap.dedent(
    """
    import json, signal, sys, time
    import predlog
    from predlog import PredictionRecord
    w = predlog.open_writer()
    sent = 0
    def stop(*_):
        w.close(20)
        print(json.dumps({"sent": sent, **{k: v for k, v in w.stats().items() if k != "dropped_by_reason"}}))
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while True:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # submit and count as one step
        w.submit([PredictionRecord(request_id=f"r{sent + j}", item_index=0, model_name="mot-defects",
                  model_version="7", slot="canary", text="tyre worn") for j in range(20)])
        sent += 20
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        time.sleep(0.001)
    """
)


def test_close_while_the_writer_encodes_a_batch_keeps_that_batch(tmp_path, monkeypatch):
    """A batch the thread had taken off the queue but not yet encoded was in neither the queue nor
    ``_unspooled``: close() timing out then spilled the rest, and that batch was lost uncounted
    when the process ended."""
    from predlog.writer import PredictionLogWriter

    settings = PredlogSettings(dir=tmp_path / "predlog", batch_rows=10, flush_interval_s=0.05, compact_interval_s=0)
    entered, release = threading.Event(), threading.Event()
    encode = PredictionLogWriter._encode

    def stalled(self, batch):  # noqa: ANN001, ANN202 - the writer thread stalls encoding (fault injection)
        if threading.current_thread().name == "predlog-writer" and not entered.is_set():
            entered.set()
            assert release.wait(60)
        return encode(self, batch)

    monkeypatch.setattr(PredictionLogWriter, "_encode", stalled)
    writer = predlog.open_writer(settings)
    writer.submit(rows(50))
    assert entered.wait(30)
    writer.close(timeout=0.5)
    s = writer.stats()
    assert s["dropped"] == 0 and s["spool_rows"] == 50, s
    release.set()  # the stalled thread goes on: the batch is no longer its to store
    assert wait_for(lambda: stopped(writer), 60)
    assert _replayed(settings) == (50, 50)


def test_sigterm_mid_stream_loses_nothing(tmp_path):
    """SIGTERM while rows stream in: every submitted row is stored once (the embedded sink leaves the
    spool empty)."""
    settings = PredlogSettings(dir=tmp_path / "predlog")
    env = {**os.environ, "MOTLENS_HOME": str(tmp_path), "MOTLENS_PREDLOG_FLUSH_INTERVAL_S": "0.05"}
    env.pop("MOTLENS_CLICKHOUSE_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_CHILD], env=env, stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        batches = ((settings.table_dir("predictions"), "*.parquet"), (settings.spool_dir, "*.arrow"))
        # mid-stream: the writer has stored (or spooled) at least one batch and rows keep coming
        assert wait_for(lambda: any(any(d.glob(pattern)) for d, pattern in batches if d.exists()), 60)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    report = json.loads(out.strip().splitlines()[-1])
    assert report["sent"] > 0 and report["dropped"] == 0
    assert report["spool_rows"] == 0 and report["written"] == report["sent"], report
    reader = predlog.open_reader(settings)
    df = reader.query("SELECT count() AS n, uniqExact(request_id) AS u FROM predictions")
    reader.close()
    assert df.to_dict("records") == [{"n": report["sent"], "u": report["sent"]}]


def _segment_bytes(n: int) -> int:
    sink = pa.BufferOutputStream()
    table = records_to_arrow(rows(n))
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().size


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
def test_spool_full_policy_and_metric(tmp_path, policy):
    before = REGISTRY.get_sample_value("motlens_predlog_rows_dropped_total", {"reason": "spool_full"}) or 0.0
    settings = PredlogSettings(
        clickhouse_url=f"http://127.0.0.1:{closed_port()}",
        connect_timeout_s=1,
        dir=tmp_path,
        batch_rows=50,
        flush_interval_s=0.02,
        retry_initial_s=60,
        spool_max_bytes=int(_segment_bytes(50) * 3.5),
        spool_full_policy=policy,
    )
    writer = predlog.open_writer(settings)
    for i in range(6):
        writer.submit(rows(50, 50 * i))
        assert writer.flush(30)
    writer.close(5)
    s = writer.stats()
    assert s["spool_segments"] == 3 and s["dropped_by_reason"] == {"spool_full": 150}
    after = REGISTRY.get_sample_value("motlens_predlog_rows_dropped_total", {"reason": "spool_full"})
    assert after - before == 150
    spool = Spool(settings.spool_dir, 10**9)
    kept = [Spool.read(seg)["request_id"][0].as_py() for seg in spool.segments()]
    spool.close()
    assert kept == (["r150", "r200", "r250"] if policy == "drop_oldest" else ["r0", "r50", "r100"])


def test_queue_full_is_counted_and_never_raises(tmp_path):
    settings = PredlogSettings(dir=tmp_path, queue_rows=100, batch_rows=10_000, flush_interval_s=30)
    writer = predlog.open_writer(settings)
    writer.submit(rows(250))
    assert writer.stats()["dropped_by_reason"] == {"queue_full": 150}
    writer.close(10)
    writer.submit(rows(5))  # after close: counted, not raised
    s = writer.stats()
    assert s["written"] == 100 and s["dropped_by_reason"] == {"queue_full": 150, "closed": 5}


def test_unencodable_rows_are_dropped_alone(tmp_path):
    settings = PredlogSettings(dir=tmp_path, flush_interval_s=0.02)
    bad = rows(3, 1000)
    bad[0].embedding = [float("nan")] * 384
    bad[1].item_index = "first"  # type: ignore[assignment]
    writer = predlog.open_writer(settings)
    writer.submit(rows(10) + bad)
    writer.close(10)
    s = writer.stats()
    assert s["written"] == 11 and s["dropped_by_reason"] == {"invalid": 2}


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
def test_a_batch_the_spool_refuses_still_reaches_a_healthy_sink(chdb_settings, policy):
    """The write-ahead copy is a safety net, not a gate: with a spool too small for any batch (or a
    full disk) every batch was dropped although ClickHouse was up."""
    settings, reader = chdb_settings
    settings = settings.model_copy(update={"spool_max_bytes": 1024, "spool_full_policy": policy})
    writer = predlog.open_writer(settings)
    for i in range(5):
        writer.submit(rows(50, 50 * i))
        assert writer.flush(30)
    writer.close(30)
    s = writer.stats()
    assert s["written"] == 250 and s["dropped"] == 0, s
    assert stored(reader, settings) == (250, 250)


def test_a_corrupt_segment_leaves_the_spool_byte_count(tmp_path):
    spool = Spool(tmp_path / "spool", 10**9)
    from predlog.schema import records_to_arrow

    seg, _ = spool.append(records_to_arrow(rows(20)), "t1")
    assert seg is not None and spool.bytes > 0
    seg.path.write_bytes(b"not arrow")
    aside = spool.set_aside(seg)
    assert spool.bytes == 0 and spool.segments() == [] and aside.read_bytes() == b"not arrow"
    spool.close()


def test_parquet_replay_after_its_day_was_compacted_is_still_idempotent(tmp_path):
    """A crash between the Parquet write and the spool removal, then `motlens log compact`, then a
    restart: the replay once wrote the batch a second time (the merged file has another name)."""
    from predlog.compact import compact

    settings = PredlogSettings(dir=tmp_path, flush_interval_s=0.02)
    old = datetime.now(UTC) - timedelta(days=3)
    batch = [dataclasses.replace(r, ts=old) for r in rows(40)]
    other = [dataclasses.replace(r, ts=old, request_id=f"x{r.request_id}") for r in rows(20)]
    folder = settings.table_dir("predictions")
    ParquetSink(folder).insert(records_to_arrow(other), uuid.uuid4().hex)  # a second file: the day compacts
    spool = Spool(settings.spool_dir, settings.spool_max_bytes, sink=settings.sink)
    seg, _ = spool.append(records_to_arrow(batch), uuid.uuid4().hex)
    spool.close()
    ParquetSink(folder).insert(Spool.read(seg), seg.token)  # stored; the crash leaves the segment
    assert sum(compact(folder).values()) == 60
    writer = predlog.open_writer(settings)  # replays the segment
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(10)
    reader = predlog.open_reader(settings)
    df = reader.query("SELECT count() AS n, uniqExact(request_id) AS u FROM predictions")
    reader.close()
    assert df.to_dict("records") == [{"n": 60, "u": 60}]
    assert sum(compact(folder).values()) == 0  # nothing new to merge: the replay wrote no file


KILLED_BEFORE_RENAME = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import predlog
    from predlog import PredictionRecord, PredlogSettings
    root, url, suffix = Path(sys.argv[1]), sys.argv[2] or None, sys.argv[3]
    rename = os.replace
    def replace(src, dst):
        if str(dst).endswith(suffix):
            os.kill(os.getpid(), signal.SIGKILL)  # the file is written and fsync'd, not yet renamed
        return rename(src, dst)
    os.replace = replace
    w = predlog.open_writer(PredlogSettings(clickhouse_url=url, dir=root, flush_interval_s=0.05, connect_timeout_s=1))
    w.submit([PredictionRecord(request_id=f"r{i}", item_index=0, model_name="mot-defects", model_version="7",
                               slot="production", text=f"brake pipe corroded {i}") for i in range(50)])
    w.flush(30)
    """
)


def kill_before_rename(root: Path, url: str, suffix: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_BEFORE_RENAME, str(root), url, suffix],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_a_parquet_segment_killed_before_its_rename_is_published_by_the_next_writer(tmp_path):
    """The embedded writer killed between fsync and rename left a complete ``.<name>.parquet.tmp``
    that nothing ever published: its rows were lost although they were on disk."""
    settings = PredlogSettings(dir=tmp_path / "predlog", flush_interval_s=0.02)
    kill_before_rename(settings.root, "", ".parquet")
    folder = settings.table_dir("predictions")
    (left,) = folder.glob(".*.parquet.tmp")
    # a batch killed mid-write (a partial file), one whose file was stored after all, one of compaction's
    partial = folder / f".20261101T000000-{'a' * 32}.parquet.tmp"
    partial.write_bytes(left.read_bytes()[:200])
    stored_copy = folder / f"20261102T000000-{'b' * 32}.parquet"
    stored_copy.write_bytes(left.read_bytes())
    twice = folder / f".{stored_copy.name}.tmp"
    twice.write_bytes(left.read_bytes())
    merging = folder / f".20261103T000000-c{'d' * 32}.parquet.tmp"
    merging.write_bytes(b"being written by motlens log compact")
    for _ in range(2):  # idempotent
        predlog.open_writer(settings).close(10)
        assert sorted(p.name for p in folder.glob(".*")) == [merging.name]
        assert (folder / left.name[1:].removesuffix(".tmp")).exists()
    reader = predlog.open_reader(settings)
    try:
        got = reader.query("SELECT count() AS n, uniqExact(request_id) AS u FROM predictions").to_dict("records")
    finally:
        reader.close()
    assert got == [{"n": 100, "u": 50}]  # the published batch, and the file that stood there already


def test_a_spool_segment_killed_before_its_rename_is_replayed(chdb_settings):
    """The write-ahead copy killed between fsync and rename was deleted as stale on the next start,
    and with it the only copy of the batch."""
    settings, reader = chdb_settings
    kill_before_rename(settings.root, f"http://127.0.0.1:{closed_port()}", ".arrow")
    same_server_back(settings)
    (left,) = settings.spool_dir.glob("*.arrow.tmp")
    (settings.spool_dir / f"{0:016d}-9-{'e' * 32}.arrow.tmp").write_bytes(left.read_bytes()[:100])  # partial
    writer = predlog.open_writer(settings)
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(10)
    assert writer.stats()["replayed"] == 50
    assert stored(reader, settings) == (50, 50)
    assert not list(settings.spool_dir.glob("*.tmp"))
    assert (settings.spool_dir / f"{0:016d}-9-{'e' * 32}.corrupt").exists()  # the partial one, set aside


def _zero_filled_segment(n: int) -> bytes:
    """An Arrow IPC segment of ``n`` rows with one block zeroed (written, never synced, then a power
    cut): it still opens and reads ``n`` rows, but its data is damaged."""
    table = records_to_arrow(rows(n))
    out = pa.BufferOutputStream()
    with pa.ipc.new_file(out, table.schema) as w:
        w.write_table(table)
    data = bytearray(out.getvalue().to_pybytes())
    data[1984 : 1984 + 512] = bytes(512)
    assert pa.ipc.open_file(pa.py_buffer(bytes(data))).read_all().num_rows == n  # it looks whole
    return bytes(data)


@pytest.mark.parametrize("left_as", ["tmp", "segment"])
def test_a_damaged_spool_segment_is_set_aside_not_kept_at_the_head(tmp_path, left_as):
    """A segment with a zeroed block read back with the row count in its name: it was kept as the
    spool's head, every replay failed on it, and the log stalled behind it (embedded store)."""
    settings = PredlogSettings(dir=tmp_path / "predlog", batch_rows=50, flush_interval_s=0.05,
                               retry_initial_s=0.05, retry_max_s=0.1)  # fmt: skip
    settings.spool_dir.mkdir(parents=True)
    (settings.spool_dir / SINK_FILE).write_text(settings.sink.to_json())  # this writer's spool
    name = f"{0:016d}-10-{'a' * 32}.arrow" + (".tmp" if left_as == "tmp" else "")
    (settings.spool_dir / name).write_bytes(_zero_filled_segment(10))
    writer = predlog.open_writer(settings)
    writer.submit(rows(40, start=100))
    assert writer.flush(30)
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(10)
    s = writer.stats()
    assert s["written"] == 40 and s["spool_segments"] == 0, s
    assert (settings.spool_dir / f"{0:016d}-10-{'a' * 32}.corrupt").exists()
    if left_as == "segment":  # a named segment is counted when it is set aside; a .tmp never was a row
        assert s["dropped_by_reason"] == {"invalid": 10}, s


def _silently_damaged(seg: Segment) -> tuple[bytes, bytes]:
    """(the segment's bytes, the same with a 4 KiB block of zeros that Arrow's full validation accepts
    with the right row count and changed values)."""
    from predlog.spool import _decode

    data = seg.path.read_bytes()
    table = Spool.read(seg)
    for off in range(0, len(data), 4096):
        damaged = bytearray(data)
        damaged[off : off + 4096] = bytes(len(damaged[off : off + 4096]))
        try:
            got = _decode(pa.py_buffer(bytes(damaged)), None)  # the check a segment without a checksum gets
        except Exception:  # noqa: BLE001, S112 - refused by Arrow: not the case sought
            continue
        if got.num_rows == table.num_rows and not got.equals(table):
            return data, bytes(damaged)
    raise AssertionError("no silently damaging block found")


def test_a_block_of_zeros_anywhere_in_a_segment_is_never_read_as_whole(tmp_path):
    """A block of zeros (written, never synced, then a power cut) that Arrow still reads with the right
    row count was replayed as whole: in a review 70 of 83 block positions decoded, 40 with changed
    values (NUL text). A segment now carries its checksum: any damage is refused."""
    spool = Spool(tmp_path / "spool", 10**9)
    table = records_to_arrow(rows(2000))
    seg, _ = spool.append(table, uuid.uuid4().hex)
    spool.close()
    assert seg is not None and seg.digest is not None and seg.path.name.endswith(f"-{seg.digest}.arrow")
    data = seg.path.read_bytes()
    damaged_blocks = 0
    for off in range(0, len(data), 4096):
        damaged = bytearray(data)
        damaged[off : off + 4096] = bytes(len(damaged[off : off + 4096]))
        if damaged == data:
            continue  # the block was zeros already (padding)
        damaged_blocks += 1
        seg.path.write_bytes(bytes(damaged))
        with pytest.raises(SegmentDamaged):
            Spool.read(seg)
    assert damaged_blocks > 20
    seg.path.write_bytes(data)
    assert Spool.read(seg).equals(table)


@pytest.mark.parametrize("left_as", ["tmp", "segment"])
def test_a_segment_damaged_where_arrow_cannot_see_it_is_set_aside(tmp_path, left_as):
    """The writer's replay (and its recovery of a ``.tmp`` segment) checks the checksum: a block of zeros
    that Arrow's validation accepts is set aside as ``.corrupt``, never stored."""
    settings = PredlogSettings(dir=tmp_path / "predlog", batch_rows=50, flush_interval_s=0.05,
                               retry_initial_s=0.05, retry_max_s=0.1, compact_interval_s=0)  # fmt: skip
    spool = Spool(settings.spool_dir, settings.spool_max_bytes, sink=settings.sink)
    seg, _ = spool.append(records_to_arrow(rows(2000)), uuid.uuid4().hex)
    spool.close()
    _, damaged = _silently_damaged(seg)
    seg.path.unlink()
    seg.path.with_name(seg.path.name + (".tmp" if left_as == "tmp" else "")).write_bytes(damaged)
    writer = predlog.open_writer(settings)
    writer.submit(rows(40, start=1000))
    assert writer.flush(30)
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(10)
    s = writer.stats()
    assert s["written"] == 40 and s["replayed"] == 0, s
    assert seg.path.with_suffix(".corrupt").exists() and _embedded_rows(settings) == 40
    if left_as == "segment":
        assert s["dropped_by_reason"] == {"invalid": 2000}, s


def test_a_segment_spooled_before_checksums_still_replays(chdb_settings):
    """A segment an earlier release spooled has no checksum in its name: it gets Arrow's full validation
    and the row count, as before, and is replayed."""
    settings, reader = chdb_settings
    spool = Spool(settings.spool_dir, settings.spool_max_bytes, sink=settings.sink)
    seg, _ = spool.append(records_to_arrow(rows(30)), uuid.uuid4().hex)
    spool.close()
    seg.path.rename(seg.path.with_name(f"{seg.seq:016d}-{seg.rows}-{seg.token}.arrow"))  # the older name
    writer = predlog.open_writer(settings)
    _submit_batches(writer, 2, first=500)
    s = _drained(writer)
    assert s["replayed"] == 30 and s["written"] == 50 and s["dropped"] == 0, s
    assert stored(reader, settings) == (50, 50)


def _submit_batches(writer, batches: int, first: int = 100) -> None:
    """``batches`` batches of 10 rows (request ids from ``first`` on), each flushed."""
    for i in range(batches):
        writer.submit(rows(10, first + 10 * i))
        assert writer.flush(30)


def _drained(writer) -> dict:
    """``writer``'s final stats, closed once its spool has drained."""
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0, 10)
    writer.close(30)
    return writer.stats()


def _spool_one(settings, table: pa.Table) -> str:
    """Leave one segment at the head of the writer's spool (as a writer that stopped would)."""
    spool = Spool(settings.spool_dir, settings.spool_max_bytes, sink=settings.sink)
    seg, _ = spool.append(table, uuid.uuid4().hex)
    spool.close()
    return seg.path.name


def test_a_segment_with_a_column_the_table_lacks_is_inserted_without_it(chdb_settings, caplog):
    """A downgrade with a non-empty spool: a newer writer's segment carries a column (``tenant``) this
    table lacks. Every insert failed (NO_SUCH_COLUMN_IN_TABLE), was retried for ever and every batch
    after it queued behind it."""
    settings, reader = chdb_settings
    newer = records_to_arrow(rows(30)).append_column("tenant", pa.array(["acme"] * 30))
    _spool_one(settings, newer)
    dropped = REGISTRY.get_sample_value("motlens_predlog_columns_dropped_total", {"column": "tenant"}) or 0
    writer = predlog.open_writer(settings)
    _submit_batches(writer, 5)
    s = _drained(writer)
    assert s["written"] == 80 and s["dropped"] == 0 and s["sink_ok"], s
    assert stored(reader, settings) == (80, 80)
    assert REGISTRY.get_sample_value("motlens_predlog_columns_dropped_total", {"column": "tenant"}) == dropped + 30
    assert "has no column tenant; left out of the insert" in caplog.text


def test_a_column_dropped_while_the_writer_runs_is_left_out_not_rejected(chdb_settings, caplog):
    """The sink reads the table's columns once per connection: a column dropped after that failed the
    next insert (16 NO_SUCH_COLUMN_IN_TABLE, a permanent code) and its batch was set aside as
    rejected before the columns were read again."""
    settings, reader = chdb_settings
    writer = predlog.open_writer(settings)
    _submit_batches(writer, 2)
    assert wait_for(lambda: writer.stats()["written"] == 20, 10)
    reader.client.command(f"ALTER TABLE {settings.database}.predictions DROP COLUMN protocol")
    _submit_batches(writer, 3, first=300)
    s = _drained(writer)
    assert s["written"] == 50 and s["dropped"] == 0, s
    assert stored(reader, settings) == (50, 50)
    assert not [p for p in settings.spool_dir.iterdir() if p.suffix == ".rejected"]
    assert "has no column protocol; left out of the insert" in caplog.text


def test_a_segment_clickhouse_refuses_for_good_is_set_aside_and_the_rest_go_on(chdb_settings, caplog):
    """A segment whose values can never fit the table (Code 6, CANNOT_PARSE_TEXT) is kept as
    ``*.rejected``, counted as dropped{reason="rejected"}, and the batches behind it are stored."""
    settings, reader = chdb_settings
    good = records_to_arrow(rows(20))
    bad = good.set_column(good.schema.get_field_index("item_index"), "item_index", pa.array(["x"] * 20))
    name = _spool_one(settings, bad)
    before = REGISTRY.get_sample_value("motlens_predlog_rows_dropped_total", {"reason": "rejected"}) or 0
    writer = predlog.open_writer(settings)
    _submit_batches(writer, 3)
    s = _drained(writer)
    assert s["written"] == 30 and s["dropped_by_reason"] == {"rejected": 20} and s["sink_ok"], s
    assert stored(reader, settings) == (30, 30)
    rejected = settings.spool_dir / name.replace(".arrow", ".rejected")
    assert rejected.exists() and not (settings.spool_dir / name).exists()
    assert REGISTRY.get_sample_value("motlens_predlog_rows_dropped_total", {"reason": "rejected"}) == before + 20
    assert f"refuses spool segment {name} for good (6 CANNOT_PARSE_TEXT" in caplog.text
    # docs/predlog.md: inspect it (and insert what fits) with ClickHouse's Arrow reader
    kept = reader.client.query(f"SELECT count(), any(item_index) FROM file('{rejected}', Arrow)").result_rows
    assert kept == [(20, "x")]
    # a transient error (the table away for a while) still spools and retries, nothing is set aside
    reader.client.command(f"RENAME TABLE {settings.database}.predictions TO {settings.database}.away")
    writer = predlog.open_writer(settings)
    writer.submit(rows(10, 500))
    assert writer.flush(30) and wait_for(lambda: not writer.stats()["sink_ok"], 10)
    reader.client.command(f"RENAME TABLE {settings.database}.away TO {settings.database}.predictions")
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0, 10)
    writer.close(30)
    assert writer.stats()["dropped"] == 0 and stored(reader, settings) == (40, 40)
    assert sorted(
        p.suffix for p in settings.spool_dir.iterdir() if p.name not in (".lock", SINK_FILE, EVENTS_SPOOL)
    ) == [".rejected"]


def test_a_failing_materialized_view_is_retried_not_rejected(chdb_settings):
    """A materialized view on ``predictions`` that fails (a DBA's ``toUInt32(text)``, Code 6 "while pushing
    to view …") fails every insert after ClickHouse stored its rows. Such a batch was set aside as
    ``.rejected`` and counted as dropped though stored (and the documented INSERT … SELECT doubled it);
    it is retried with its token instead, and stored once when the view is fixed."""
    settings, reader = chdb_settings
    db = settings.database
    reader.client.command(f"CREATE TABLE {db}.rollup (n UInt32) ENGINE = MergeTree ORDER BY n")
    reader.client.command(
        f"CREATE MATERIALIZED VIEW {db}.mv TO {db}.rollup AS SELECT toUInt32(text) AS n FROM {db}.predictions"
    )
    writer = predlog.open_writer(settings)
    _submit_batches(writer, 5, first=0)
    assert wait_for(lambda: not writer.stats()["sink_ok"], 10)
    assert stored(reader, settings) == (10, 10)  # the first batch is in the table; the rest wait behind it
    reader.client.command(f"DROP VIEW {db}.mv")  # the DBA fixes it
    _submit_batches(writer, 3, first=50)
    s = _drained(writer)
    assert s["written"] == 80 and s["dropped"] == 0 and s["sink_ok"], s
    assert stored(reader, settings) == (80, 80)
    assert [p.name for p in settings.spool_dir.iterdir() if p.name not in (".lock", SINK_FILE, EVENTS_SPOOL)] == []


def test_a_rejected_segment_renamed_back_is_replayed_once_with_its_token(chdb_settings):
    """docs/predlog.md: with the predictor stopped, a ``.rejected`` segment renamed back to ``.arrow`` is
    replayed by the next writer with its token, so rows already stored are not stored twice."""
    settings, reader = chdb_settings
    name = _spool_one(settings, records_to_arrow(rows(20)))
    segment, rejected = settings.spool_dir / name, settings.spool_dir / name.replace(".arrow", ".rejected")
    data = segment.read_bytes()
    segment.rename(rejected)
    predlog.open_writer(settings).close(30)  # a set-aside segment is not replayed
    assert stored(reader, settings) == (0, 0) and rejected.exists()
    for _ in range(2):  # replayed twice (e.g. a copy renamed back again): stored once
        rejected.unlink(missing_ok=True)
        segment.write_bytes(data)
        writer = predlog.open_writer(settings)
        assert wait_for(lambda w=writer: w.stats()["spool_rows"] == 0, 10)
        writer.close(30)
        assert writer.stats()["written"] == 20 and writer.stats()["dropped"] == 0
        assert stored(reader, settings) == (20, 20) and not segment.exists()


# ------------------------------------------------------------------ the server's audit rows


def _audit_row(action: str, ts: datetime) -> dict:
    from predictor.events import server_row

    return server_row(action, slot="production", from_version="1", to_version="2", percent=0, reason="test", ts=ts)


def test_audit_rows_wait_in_their_spool_until_the_log_takes_them(tmp_path):
    """An audit row (``promotion_events``) the log could not take (disk full, ClickHouse down) was logged
    once and lost. The server's rows go through its writer now: spooled at once, retried, stored once,
    in order."""
    from predictor.events import write_event

    settings = PredlogSettings(dir=tmp_path / "predlog", flush_interval_s=0.05, retry_initial_s=0.05,
                               retry_max_s=0.1, compact_interval_s=0)  # fmt: skip
    blocked = settings.table_dir("promotion_events")
    blocked.parent.mkdir(parents=True)
    blocked.write_text("")  # a file where the folder should be: every audit row's write fails
    writer = predlog.open_writer(settings)
    t0 = datetime.now(UTC)
    actions = ["serve_load", "serve_percent", "serve_promote", "serve_stop"]
    for i, action in enumerate(actions):
        assert write_event(settings, _audit_row(action, t0 + timedelta(seconds=i)))
    assert wait_for(lambda: not writer.stats()["events"]["sink_ok"])
    writer.close(10)
    events = writer.stats()["events"]
    assert events["spool_rows"] == 4 and events["written"] == 0 and events["dropped_by_reason"] == {}, events
    blocked.unlink()  # space is back
    for _ in range(2):  # a second start finds nothing left to store
        writer = predlog.open_writer(settings)
        assert wait_for(lambda w=writer: w.stats()["events"]["spool_rows"] == 0)
        writer.close(10)
    reader = predlog.open_reader(settings)
    try:
        trail = reader.promotion_events(limit=100).sort_values("ts")
    finally:
        reader.close()
    assert list(trail.action) == actions and list(trail.ts.dt.second) == [(t0 + timedelta(seconds=i)).second
                                                                           for i in range(4)]  # fmt: skip


def test_an_audit_row_stored_before_its_spool_copy_was_removed_is_stored_once(chdb_settings):
    """A replayed audit row carries its token: ClickHouse keeps the tokens of promotion_events' last inserts
    (migration 005), so a row stored before a crash removed its spool copy is not stored twice."""
    settings, reader = chdb_settings
    table = row_to_arrow("promotion_events", _audit_row("serve_stop", datetime.now(UTC)))
    spool = Spool(settings.spool_dir / EVENTS_SPOOL, settings.spool_max_bytes, sink=settings.sink)
    seg, _ = spool.append(table, uuid.uuid4().hex)
    spool.close()
    sink = ClickHouseSink(settings, "promotion_events")
    sink.insert(Spool.read(seg), seg.token)  # stored, then the process "died" before removing the segment
    sink.close()
    writer = predlog.open_writer(settings)
    assert wait_for(lambda: writer.stats()["events"]["spool_rows"] == 0)
    writer.close(10)
    assert writer.stats()["events"]["written"] == 1
    got = reader.client.query(f"SELECT action FROM {settings.database}.promotion_events").result_rows
    assert got == [("serve_stop",)]


# ------------------------------------------------------------------ a spool is bound to its sink


def _embedded_rows(settings: PredlogSettings) -> int:
    reader = predlog.open_reader(settings)
    try:
        return int(reader.query("SELECT count() AS n FROM predictions")["n"][0])
    finally:
        reader.close()


def _spooled_for_clickhouse(settings, reader, n: int) -> None:
    """Leave ``n`` rows in the spool as a ClickHouse writer stopped during an outage would."""
    db = settings.database
    reader.client.command(f"RENAME TABLE {db}.predictions TO {db}.away")
    writer = predlog.open_writer(settings)
    writer.submit(rows(n))
    assert writer.flush(30)
    writer.close(10)
    assert writer.stats()["spool_rows"] == n
    reader.client.command(f"RENAME TABLE {db}.away TO {db}.predictions")


def test_segments_spooled_for_clickhouse_wait_for_it_not_in_the_embedded_log(chdb_settings, caplog):
    """A writer whose ClickHouse URL was lost (an upgrade stopped reading CLICKHOUSE_URL) fell back to the
    embedded log and replayed the ClickHouse writer's spool into local Parquet: ClickHouse never got them."""
    settings, reader = chdb_settings
    _spooled_for_clickhouse(settings, reader, 100)
    embedded = PredlogSettings(dir=settings.root, flush_interval_s=0.02, compact_interval_s=0)
    with caplog.at_level(logging.WARNING, logger="predlog.spool"):
        writer = predlog.open_writer(embedded)
    # held rows are in no log its readers see: a gauge (alert MotlensPredlogHeld) says so while it runs
    assert writer.stats()["spool_held_rows"] == 100
    assert REGISTRY.get_sample_value("motlens_predlog_spool_held_rows") == 100
    writer.submit(rows(30, 1000))
    assert writer.flush(30)
    writer.close(10)
    assert writer.stats()["replayed"] == 0 and _embedded_rows(embedded) == 30
    (held,) = (settings.spool_dir / "held").iterdir()
    assert sum(int(p.name.split("-")[1]) for p in held.glob("*.arrow")) == 100
    assert not list(settings.spool_dir.glob("*.arrow"))
    warned = caplog.text
    assert (f"100 rows (2 segment file(s)) in {held} are kept there, not replayed into this writer's sink, the "
            f"embedded Parquet log in {embedded.table_dir('predictions')}: they were spooled for ClickHouse "
            f"chdb://memory (database {settings.database}); a writer on that sink replays them") in warned  # fmt: skip
    assert f"move the *.arrow files from {held} into {settings.spool_dir}" in warned
    assert stored(reader, settings) == (0, 0)

    caplog.clear()
    writer = predlog.open_writer(settings)  # pointed back at ClickHouse: it takes them back and replays them
    assert writer.stats()["spool_held_rows"] == 0 and REGISTRY.get_sample_value("motlens_predlog_spool_held_rows") == 0
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(10)
    assert writer.stats()["replayed"] == 100 and stored(reader, settings) == (100, 100)
    assert not held.exists() and "were spooled for" not in caplog.text
    assert _embedded_rows(embedded) == 30


def test_segments_of_the_embedded_log_wait_for_it_when_a_writer_goes_to_clickhouse(chdb_settings, tmp_path):
    settings, reader = chdb_settings
    embedded = PredlogSettings(dir=settings.root, flush_interval_s=0.02, compact_interval_s=0)
    spool = Spool(embedded.spool_dir, embedded.spool_max_bytes, sink=embedded.sink)  # a failed Parquet write's
    spool.append(records_to_arrow(rows(20)), uuid.uuid4().hex)
    spool.close()
    writer = predlog.open_writer(settings)
    writer.submit(rows(10, 500))
    assert writer.flush(30)
    writer.close(10)
    assert writer.stats()["replayed"] == 0 and stored(reader, settings) == (10, 10)
    assert [p.name for p in (settings.spool_dir / "held").iterdir()] == ["embedded"]
    moved = PredlogSettings(dir=tmp_path / "moved", flush_interval_s=0.02, compact_interval_s=0)
    settings.root.rename(moved.root)  # the embedded log is the one beside its spool, wherever it lies
    writer = predlog.open_writer(moved)
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(10)
    assert writer.stats()["replayed"] == 20 and _embedded_rows(moved) == 20
    assert not (moved.spool_dir / "held").exists()


def test_segments_an_older_release_spooled_are_held_from_the_embedded_log_and_replayed_by_clickhouse(
    chdb_settings, caplog
):
    """A spool with no recorded sink (an older release's): its ClickHouse writer spooled every batch."""
    settings, reader = chdb_settings
    old = Spool(settings.spool_dir, settings.spool_max_bytes)  # as a release before the binding wrote it
    old.append(records_to_arrow(rows(40)), uuid.uuid4().hex)
    old.close()
    embedded = PredlogSettings(dir=settings.root, flush_interval_s=0.02, compact_interval_s=0)
    with caplog.at_level(logging.WARNING, logger="predlog.spool"):
        predlog.open_writer(embedded).close(10)
    held = settings.spool_dir / "held" / "unrecorded"
    assert len(list(held.glob("*.arrow"))) == 1 and _embedded_rows(embedded) == 0
    assert "spooled by a release that recorded no sink" in caplog.text and "MOTLENS_CLICKHOUSE_URL" in caplog.text
    writer = predlog.open_writer(settings)
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(10)
    assert writer.stats()["replayed"] == 40 and stored(reader, settings) == (40, 40) and not held.exists()


def test_held_segments_moved_into_the_spool_by_hand_go_to_its_sink(tmp_path):
    """docs/predlog.md: to store held rows in the current sink instead, move them into the spool."""
    embedded = PredlogSettings(dir=tmp_path / "predlog", flush_interval_s=0.02, compact_interval_s=0)
    old = Spool(embedded.spool_dir, embedded.spool_max_bytes)
    old.append(records_to_arrow(rows(15)), uuid.uuid4().hex)
    old.close()
    predlog.open_writer(embedded).close(10)
    for path in (embedded.spool_dir / "held" / "unrecorded").glob("*.arrow"):
        path.rename(embedded.spool_dir / path.name)
    writer = predlog.open_writer(embedded)
    assert wait_for(lambda: writer.stats()["spool_rows"] == 0)
    writer.close(10)
    assert writer.stats()["replayed"] == 15 and _embedded_rows(embedded) == 15


def test_an_unbound_spool_is_one_error_not_one_per_batch(chdb_settings, monkeypatch, caplog):
    """A spool that could not record its sink at start refused every write-ahead copy, and each batch
    logged its own ERROR line (one a second at the default flush interval)."""
    import errno

    import predlog.spool as spool_module

    settings, reader = chdb_settings

    def full(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the disk is full (fault injection)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module, "atomic_write", full)
    caplog.set_level(logging.ERROR)
    writer = predlog.open_writer(settings)
    _submit_batches(writer, 5)
    writer.close(30)
    assert writer.stats()["written"] == 50 and stored(reader, settings) == (50, 50)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("predlog")]
    assert len(errors) == 1 and "cannot bind the spool" in errors[0].getMessage(), [r.getMessage() for r in errors]
