"""Races of the prediction-log writer's two threads, ``close`` and ``record_event`` with a spool whose fsync
hangs and a sink that stalls or fails (held on events, no sleeps): every row submitted is counted once, as
written, left in the spool or dropped, and order is kept where the docs promise it."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from predlog import PredictionRecord, PredlogSettings
from predlog.schema import records_to_arrow
from predlog.spool import EVENTS_SPOOL, Spool, SpoolBusy, check_free
from predlog.writer import PredictionLogWriter

WAIT_S = 30.0


def rows(n: int, start: int = 0) -> list[PredictionRecord]:
    return [
        PredictionRecord(request_id=f"r{i}", item_index=0, model_name="mot-defects", model_version="7",
                         slot="production", text=f"brake pipe corroded {i}")
        for i in range(start, start + n)
    ]  # fmt: skip


def wait_for(cond: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def in_thread(fn: Callable[[], object]) -> tuple[threading.Event, list[object]]:
    """Run ``fn`` in a daemon thread: (set when it returned, [its result])."""
    done, out = threading.Event(), []

    def run() -> None:
        out.append(fn())
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done, out


class Gate:
    """Held until released: ``entered`` is set when a caller reaches it."""

    def __init__(self) -> None:
        self.entered, self.released = threading.Event(), threading.Event()

    def pass_through(self) -> None:
        self.entered.set()
        assert self.released.wait(WAIT_S)


class FakeSink:
    """A sink in memory that stores a token once (as ClickHouse's deduplication token and the Parquet file
    name do); ``hold`` stalls the next insert at a gate, ``failing`` makes inserts raise."""

    def __init__(self, local: bool) -> None:
        self.local = local
        self.tokens: list[str] = []
        self.keys: list[str] = []  # request ids (predictions) or actions (audit rows), in the order stored
        self.failing = False
        self.hold: Gate | None = None
        self.gates: list[Gate] = []

    def stall_next(self) -> Gate:
        self.hold = gate = Gate()
        self.gates.append(gate)
        return gate

    def insert(self, table: pa.Table, token: str) -> None:
        gate, self.hold = self.hold, None
        if gate is not None:
            gate.pass_through()
        if self.failing:
            raise ConnectionError("the sink is down")
        if token not in self.tokens:
            self.tokens.append(token)
            self.keys += table.column("request_id" if "request_id" in table.column_names else "action").to_pylist()

    def close(self) -> None:
        pass


class Harness:
    """Writers on ``tmp_path`` with fake sinks and real spools; everything held is released at the end."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path, self.monkeypatch = tmp_path, monkeypatch
        self.writers: list[PredictionLogWriter] = []
        self.gates: list[Gate] = []
        self.sinks: list[FakeSink] = []

    def writer(
        self, sink: FakeSink, events: FakeSink | None = None, *, spool_max_bytes: int = 10**9
    ) -> PredictionLogWriter:
        settings = PredlogSettings(dir=self.tmp_path, batch_rows=10, flush_interval_s=0.05, retry_initial_s=0.05,
                                   retry_max_s=0.1, compact_interval_s=0)  # fmt: skip
        events = events or FakeSink(sink.local)
        self.sinks += [sink, events]
        spool = Spool(settings.spool_dir, spool_max_bytes)
        events_spool = Spool(settings.spool_dir / EVENTS_SPOOL, 10**9)
        writer = PredictionLogWriter(sink, spool, settings, events=(events, events_spool))
        self.writers.append(writer)
        return writer

    def stall_fsync(self, thread: str, gate: Gate | None = None) -> Gate:
        """From now on the next fsync of thread ``thread`` hangs (a spool disk that stalls) until the gate
        is released."""
        gate, fsync = gate or Gate(), os.fsync
        self.gates.append(gate)

        def stalled(fd: int) -> None:
            if threading.current_thread().name == thread and not gate.entered.is_set():
                gate.pass_through()
            fsync(fd)

        self.monkeypatch.setattr(os, "fsync", stalled)
        return gate

    def release_all(self) -> None:
        for gate in self.gates + [g for s in self.sinks for g in s.gates]:
            gate.released.set()
        for writer in self.writers:
            writer.close(5)
            assert wait_for(lambda w=writer: stopped(w))


@pytest.fixture()
def harness(tmp_path, monkeypatch) -> Iterator[Harness]:
    h = Harness(tmp_path, monkeypatch)
    try:
        yield h
    finally:
        h.release_all()


def stopped(writer: PredictionLogWriter) -> bool:
    return not (writer._thread.is_alive() or writer._sender.is_alive())


def counts(writer: PredictionLogWriter) -> dict:
    s = writer.stats()
    return {k: s[k] for k in ("written", "spilled", "replayed", "dropped_by_reason", "spool_rows", "queue_depth")}


def spooled_tokens(writer: PredictionLogWriter) -> list[str]:
    return [p.name.split("-")[2] for p in sorted(writer.spool.root.glob("*.arrow"))]


# ------------------------------------------------------------------ R1: submit never waits on the disk


def test_submit_does_not_wait_for_a_spool_fsync(harness, monkeypatch):
    """The sender's pass ended while the batcher's spool write hung in fsync: the sender read the spool's
    size (its lock, held through the fsync) holding the writer's lock, so submit() waited on the disk."""
    sink = FakeSink(local=False)
    writer = harness.writer(sink)
    paused, fsync = threading.Event(), Gate()
    run_pass = PredictionLogWriter._pass

    def pass_then_pause(self: PredictionLogWriter, final: bool) -> None:
        run_pass(self, final)
        if not paused.is_set():  # the first pass ends as the batcher's next fsync starts
            paused.set()
            assert fsync.entered.wait(WAIT_S)

    monkeypatch.setattr(PredictionLogWriter, "_pass", pass_then_pause)
    writer.submit(rows(10))
    assert paused.wait(WAIT_S) and sink.keys == [f"r{i}" for i in range(10)]
    harness.stall_fsync("predlog-writer", fsync)
    writer.submit(rows(10, 10))  # its write-ahead copy hangs in fsync
    assert fsync.entered.wait(WAIT_S)
    assert wait_for(lambda: not writer._busy)  # the sender ends its pass
    done, _ = in_thread(lambda: writer.submit(rows(1, 20)))
    assert done.wait(5), "submit() waited for the spool's fsync"


# ------------------------------------------------------------------ R2: close() and a spool disk that hangs


def test_close_returns_within_its_timeout_while_the_spool_disk_hangs(harness):
    """close() spooled the batcher's work from the calling thread, waiting on the spool's lock that the
    hung fsync held: it returned only when the disk did. Now it returns in time, and what is not on disk by
    then is counted as dropped (spool_error), once: a write that ends later changes no count."""
    sink = FakeSink(local=False)
    writer = harness.writer(sink)
    fsync = harness.stall_fsync("predlog-writer")
    writer.submit(rows(10))
    assert fsync.entered.wait(WAIT_S)  # the batch's write-ahead copy hangs
    writer.submit(rows(10, 10))
    started = time.monotonic()
    done, _ = in_thread(lambda: writer.close(1.0))
    assert done.wait(10), "close(1.0) waited for the spool's disk"
    assert time.monotonic() - started < 4.0  # its timeout and slack for a loaded box; the disk hangs far longer
    at_close = counts(writer)
    assert at_close == {"written": 0, "spilled": 0, "replayed": 0, "dropped_by_reason": {"spool_error": 20},
                        "spool_rows": 0, "queue_depth": 0}, at_close  # fmt: skip
    fsync.released.set()  # the disk comes back: the writes close() gave up on end
    assert wait_for(lambda: stopped(writer))
    assert {k: v for k, v in counts(writer).items() if k != "spool_rows"} == {
        k: v for k, v in at_close.items() if k != "spool_rows"
    }
    tokens = spooled_tokens(writer)
    assert len(tokens) == len(set(tokens)) and sink.keys == []


def test_a_batch_spooling_when_close_gives_up_on_the_batcher_is_spooled_once(harness, monkeypatch):
    """close() gave up on a batcher whose write-ahead copy was in fsync and spooled the batch itself: once
    the disk came back the spool held two segments with one token, their rows counted twice."""
    sink = FakeSink(local=False)
    sink.failing = True  # nothing leaves the spool
    writer = harness.writer(sink)
    second = threading.Event()
    append = Spool.append

    def noting_a_second_copy(self: Spool, table: pa.Table, token: str, *args: object) -> object:
        if threading.current_thread().name != "predlog-writer":
            second.set()  # close() spools the batch itself
        return append(self, table, token, *args)

    monkeypatch.setattr(Spool, "append", noting_a_second_copy)
    fsync = harness.stall_fsync("predlog-writer")
    writer.submit(rows(10))
    assert fsync.entered.wait(WAIT_S)
    done, _ = in_thread(lambda: writer.close(4.0))
    assert wait_for(lambda: second.is_set() or writer._batches_done)  # close() is done with the batcher's work
    fsync.released.set()  # the write-ahead copy is on disk within close()'s timeout
    assert done.wait(10)
    s = counts(writer)
    assert s["spool_rows"] == 10 and len(spooled_tokens(writer)) == 1, s
    assert s["spilled"] == 10 and s["dropped_by_reason"] == {} and s["written"] == 0, s


def test_a_token_the_spool_holds_is_not_written_twice(tmp_path):
    spool = Spool(tmp_path / "spool", 10**9)
    table = records_to_arrow(rows(5))
    first, _ = spool.append(table, "a" * 32)
    again, dropped = spool.append(table, "a" * 32)
    assert again == first and dropped == 0
    assert spool.rows == 5 and len(list(spool.root.glob("*.arrow"))) == 1
    spool.close()


# ------------------------------------------------------------------ R3: the embedded log keeps submission order


def fail_a_handed_on_batch_behind_a_spooled_one(writer: PredictionLogWriter, sink: FakeSink) -> None:
    """rows 0-9 handed to the sender, whose write stalls; rows 10-19 spooled meanwhile; then the write
    fails (the sink stays failing)."""
    held = sink.stall_next()
    sink.failing = True
    writer.submit(rows(10))  # handed to the sender; its write stalls, then fails
    assert held.entered.wait(WAIT_S)
    writer.submit(rows(10, 10))  # to the spool: the sender is busy
    assert wait_for(lambda: writer.spool.count() == 1)
    held.released.set()


def test_a_failed_embedded_write_keeps_its_place_before_later_batches(harness):
    """A handed-on batch whose write failed was spooled behind the batch spooled while it was being
    written, and the replay stored the later batch first."""
    sink = FakeSink(local=True)
    writer = harness.writer(sink)
    fail_a_handed_on_batch_behind_a_spooled_one(writer, sink)
    assert wait_for(lambda: writer.spool.count() == 2)
    sink.failing = False
    assert writer.flush(WAIT_S) and wait_for(lambda: writer.spool.count() == 0)
    assert sink.keys == [f"r{i}" for i in range(20)]
    writer.close(5)
    s = counts(writer)
    assert s["written"] == 20 and s["spilled"] == 20 and s["replayed"] == 20 and s["dropped_by_reason"] == {}, s


# ------------------------------------------------------------------ R4 / R6: close() settles the counts


@pytest.mark.parametrize("spool_refuses", [False, True], ids=["embedded", "lost_as"])
def test_a_handed_on_batch_close_gave_up_on_is_counted_once(harness, spool_refuses):
    """A handed-on batch whose write outlasted close(): close() spooled it (or, when the spool could not
    take it, counted it as dropped), then the late write counted it as written too."""
    sink = FakeSink(local=not spool_refuses)  # a batch the spool refuses goes to a ClickHouse sink directly
    writer = harness.writer(sink, spool_max_bytes=64 if spool_refuses else 10**9)
    held = sink.stall_next()
    writer.submit(rows(10))
    assert held.entered.wait(WAIT_S)
    writer.close(2.0)
    at_close = counts(writer)
    if spool_refuses:
        assert at_close["dropped_by_reason"] == {"spool_full": 10} and at_close["spilled"] == 0, at_close
    else:
        assert at_close["spilled"] == 10 and at_close["spool_rows"] == 10, at_close
    held.released.set()  # the write lands after all
    assert wait_for(lambda: stopped(writer))
    assert counts(writer) == at_close and at_close["written"] == 0
    assert sink.keys == [f"r{i}" for i in range(10)]


def test_a_late_insert_after_close_gave_up_changes_no_count(harness):
    """A spooled batch whose insert outlasted close() was counted as spilled; the insert then landed and
    the same rows were counted as written and replayed as well (and left the spool close() reported)."""
    sink = FakeSink(local=False)
    writer = harness.writer(sink)
    held = sink.stall_next()
    writer.submit(rows(10))
    assert held.entered.wait(WAIT_S)
    writer.close(2.0)
    at_close = counts(writer)
    assert at_close == {"written": 0, "spilled": 10, "replayed": 0, "dropped_by_reason": {}, "spool_rows": 10,
                        "queue_depth": 0}, at_close  # fmt: skip
    held.released.set()
    assert wait_for(lambda: stopped(writer))
    assert counts(writer) == at_close
    assert sink.keys == [f"r{i}" for i in range(10)]
    again = harness.writer(sink)  # the next start replays the segment: its token stores it once
    assert wait_for(lambda: again.stats()["spool_rows"] == 0)
    again.close(5)
    assert again.stats()["replayed"] == 10 and sink.keys == [f"r{i}" for i in range(10)]


# ------------------------------------------------------------------ R5: audit rows in record order


def test_audit_rows_reach_the_sink_in_record_order(harness, monkeypatch):
    """An audit row its spool could not take waits in memory: the sender stored it before the rows spooled
    before it. Rows are stored in record order, whichever way each went."""
    events = FakeSink(local=False)
    events.failing = True
    append = Spool.append

    def disk_full_for_e2(self: Spool, table: pa.Table, token: str, *args: object) -> object:
        if "action" in table.column_names and table.column("action")[0].as_py() == "e2":
            raise OSError(28, "No space left on device")
        return append(self, table, token, *args)

    monkeypatch.setattr(Spool, "append", disk_full_for_e2)
    writer = harness.writer(FakeSink(local=False), events)
    for action in ("e1", "e2", "e3"):
        assert writer.record_event({"action": action})
    assert writer.stats()["events"]["pending"] == 1 and writer.stats()["events"]["spool_rows"] == 2
    assert wait_for(lambda: not writer.stats()["events"]["sink_ok"])
    events.failing = False
    assert wait_for(lambda: len(events.keys) == 3)
    assert events.keys == ["e1", "e2", "e3"]


def release_when_close_settles(monkeypatch: pytest.MonkeyPatch, gate: Gate) -> None:
    """Release ``gate`` as close() takes its last step (the sender's last pass is over; close() waits for
    the record_event() calls in flight)."""
    settle = PredictionLogWriter._settle

    def releasing(self: PredictionLogWriter, deadline: float) -> None:
        gate.released.set()
        settle(self, deadline)

    monkeypatch.setattr(PredictionLogWriter, "_settle", releasing)


def test_an_audit_row_recorded_during_close_is_kept_or_counted(harness, monkeypatch):
    """An audit row whose spool write failed after the sender's last pass waited in memory for a sender
    that had stopped: lost, uncounted."""
    writer = harness.writer(FakeSink(local=False))
    gate = Gate()
    harness.gates.append(gate)
    append = Spool.append

    def fails_after_close(self: Spool, table: pa.Table, token: str, *args: object) -> object:
        if "action" in table.column_names:
            gate.pass_through()
            raise OSError(28, "No space left on device")
        return append(self, table, token, *args)

    monkeypatch.setattr(Spool, "append", fails_after_close)
    release_when_close_settles(monkeypatch, gate)
    done, out = in_thread(lambda: writer.record_event({"action": "late"}))
    assert gate.entered.wait(WAIT_S)  # recorded before close(), still being spooled
    writer.close(5)
    assert done.wait(WAIT_S)
    events = writer.stats()["events"]
    assert out == [False], events
    assert events["dropped_by_reason"] == {"spool_error": 1} and events["pending"] == 0, events


def test_an_audit_row_spooled_while_close_runs_is_kept(harness, monkeypatch):
    """The other way an audit row recorded as the writer closes ends: on disk, for the next start."""
    writer = harness.writer(FakeSink(local=False))
    gate = Gate()
    harness.gates.append(gate)
    append = Spool.append

    def slow_disk(self: Spool, table: pa.Table, token: str, *args: object) -> object:
        if "action" in table.column_names:
            gate.pass_through()
        return append(self, table, token, *args)

    monkeypatch.setattr(Spool, "append", slow_disk)
    release_when_close_settles(monkeypatch, gate)
    done, out = in_thread(lambda: writer.record_event({"action": "late"}))
    assert gate.entered.wait(WAIT_S)
    writer.close(5)
    assert done.wait(WAIT_S)
    assert out == [True] and writer.stats()["events"]["spool_rows"] == 1
    assert not writer.record_event({"action": "after"})
    assert writer.stats()["events"]["dropped_by_reason"] == {"closed": 1}


def refuse_actions(monkeypatch: pytest.MonkeyPatch, *actions: str, gates: dict[str, Gate] | None = None) -> None:
    """The audit spool cannot take the rows of ``actions`` (disk full); a row with a gate in ``gates`` waits
    at it first."""
    append = Spool.append

    def disk_full(self: Spool, table: pa.Table, token: str, *args: object) -> object:
        if "action" in table.column_names and (action := table.column("action")[0].as_py()) in actions:
            if gates and action in gates:
                gates[action].pass_through()
            raise OSError(errno.ENOSPC, "No space left on device")
        return append(self, table, token, *args)

    monkeypatch.setattr(Spool, "append", disk_full)


def test_an_audit_row_spooled_while_an_earlier_one_is_stored_keeps_its_place(harness, monkeypatch):
    """While the sender stored e1 (from memory) e2 was spooled and e3 waited in memory: the sender went on
    with the rows in memory and stored e3 before e2."""
    events = FakeSink(local=False)
    held = events.stall_next()
    refuse_actions(monkeypatch, "e1", "e3")
    writer = harness.writer(FakeSink(local=False), events)
    assert writer.record_event({"action": "e1"})  # in memory; the sender's insert of it is held
    assert held.entered.wait(WAIT_S)
    assert writer.record_event({"action": "e2"}) and writer.record_event({"action": "e3"})
    held.released.set()
    assert wait_for(lambda: len(events.keys) == 3)
    assert events.keys == ["e1", "e2", "e3"]


def test_audit_rows_in_memory_when_the_last_pass_fails_are_counted(harness, monkeypatch):
    """An exception ended the sender's last pass before it spooled the audit rows waiting in memory, and
    nothing after it did: lost, uncounted."""
    events = FakeSink(local=False)
    events.failing = True
    refuse_actions(monkeypatch, "e1")
    drain = PredictionLogWriter._drain

    def failing_last_pass(self: PredictionLogWriter, lane: object, force: bool) -> bool:
        if force and lane is self._rows:
            raise RuntimeError("an unexpected error")
        return drain(self, lane, force)  # type: ignore[arg-type]

    monkeypatch.setattr(PredictionLogWriter, "_drain", failing_last_pass)
    writer = harness.writer(FakeSink(local=False), events)
    assert writer.record_event({"action": "e1"}) and writer.stats()["events"]["pending"] == 1
    writer.close(5)
    at_close = writer.stats()["events"]
    assert at_close["pending"] == 0 and at_close["dropped_by_reason"] == {"spool_error": 1}, at_close


def test_an_audit_row_put_first_in_memory_during_the_last_pass_is_counted(harness, monkeypatch):
    """The last pass was spooling the rows in memory when a row recorded before them (a slower spool write
    that failed) went first among them: the pass took that for close() taking them over and left both,
    uncounted, though record_event() had returned True."""
    events = FakeSink(local=False)
    events.failing = True
    early, later = Gate(), Gate()
    harness.gates += [early, later]
    append = Spool.append

    def failing_disk(self: Spool, table: pa.Table, token: str, *args: object) -> object:
        if "action" in table.column_names:
            action = table.column("action")[0].as_py()
            if action == "early":
                early.pass_through()
            if action == "later" and threading.current_thread().name == "predlog-sender":
                later.pass_through()
            raise OSError(errno.ENOSPC, "No space left on device")
        return append(self, table, token, *args)

    monkeypatch.setattr(Spool, "append", failing_disk)
    writer = harness.writer(FakeSink(local=False), events)
    first, out = in_thread(lambda: writer.record_event({"action": "early"}))
    assert early.entered.wait(WAIT_S)  # its place is taken, its spool write is slow
    assert writer.record_event({"action": "later"})  # waits in memory
    closed, _ = in_thread(lambda: writer.close(5))
    assert later.entered.wait(WAIT_S)  # the last pass spools the rows in memory
    early.released.set()
    assert first.wait(WAIT_S)  # "early" goes first among them
    later.released.set()
    assert closed.wait(WAIT_S)
    at_close = writer.stats()["events"]
    assert out == [True] and at_close["pending"] == 0, at_close
    assert at_close["dropped_by_reason"] == {"spool_error": 2}, at_close


def test_close_keeps_the_spools_locked_while_an_audit_row_is_written(harness, monkeypatch):
    """close() released the spools' locks while a record_event() begun before it was still writing its row:
    a second writer opened the spool and the late row landed there with a clashing place."""
    writer = harness.writer(FakeSink(local=False))
    gate = Gate()
    harness.gates.append(gate)
    append = Spool.append

    def slow_disk(self: Spool, table: pa.Table, token: str, *args: object) -> object:
        if "action" in table.column_names and table.column("action")[0].as_py() == "late":
            gate.pass_through()
        return append(self, table, token, *args)

    monkeypatch.setattr(Spool, "append", slow_disk)
    done, out = in_thread(lambda: writer.record_event({"action": "late"}))
    assert gate.entered.wait(WAIT_S)
    writer.close(1.0)
    at_close = writer.stats()["events"]
    assert at_close["dropped_by_reason"] == {"spool_error": 1} and at_close["pending"] == 0, at_close
    root = writer._events.spool.root
    with pytest.raises(SpoolBusy):
        check_free(root)
    gate.released.set()  # the row reaches the disk late: counted as dropped, replayed by the next start
    assert done.wait(WAIT_S) and out == [False]
    assert {k: v for k, v in writer.stats()["events"].items() if k != "spool_rows"} == {
        k: v for k, v in at_close.items() if k != "spool_rows"
    }

    def free() -> bool:
        try:
            check_free(root)
        except SpoolBusy:
            return False
        return True

    assert wait_for(free)
    events = FakeSink(local=False)
    again = harness.writer(FakeSink(local=False), events)
    assert again.record_event({"action": "after"})
    assert wait_for(lambda: len(events.keys) == 2) and events.keys == ["late", "after"]


# ------------------------------------------------------------------ close() and a segment leaving the spool


def test_a_segment_rejected_as_close_gives_up_is_counted_once(harness, monkeypatch):
    """A segment ClickHouse refuses for good was being set aside (its rename hung) when close() gave up on
    the sender: at close its rows were nowhere, then counted as rejected after close() returned."""

    class Refusing(FakeSink):
        def insert(self, table: pa.Table, token: str) -> None:
            raise DatabaseError("Code: 53. DB::Exception: Type mismatch")

    gate = Gate()
    harness.gates.append(gate)
    rename = Path.rename

    def hung_rename(self: Path, target: object) -> Path:
        if threading.current_thread().name == "predlog-sender" and str(target).endswith(".rejected"):
            gate.pass_through()
        return rename(self, target)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "rename", hung_rename)
    writer = harness.writer(Refusing(local=False))
    writer.submit(rows(10))
    assert gate.entered.wait(WAIT_S)
    writer.close(1.0)
    at_close = counts(writer)
    assert at_close == {"written": 0, "spilled": 0, "replayed": 0, "dropped_by_reason": {"rejected": 10},
                        "spool_rows": 0, "queue_depth": 0}, at_close  # fmt: skip
    gate.released.set()
    assert wait_for(lambda: stopped(writer))
    assert counts(writer) == at_close
    assert [p.suffix for p in writer.spool.root.glob("0*")] == [".rejected"]


def test_a_stored_segment_whose_removal_outlasts_close_is_not_reported_in_the_spool(harness, monkeypatch):
    """The sender counted a stored segment as written, then waited to remove it (the spool's lock, held by
    the batcher's hung fsync) when close() gave up: close reported its rows written and in the spool."""
    sink = FakeSink(local=False)
    writer = harness.writer(sink)
    held = sink.stall_next()
    writer.submit(rows(10))
    assert held.entered.wait(WAIT_S)  # the sender inserts the first segment
    gate, fsync = Gate(), os.fsync
    harness.gates.append(gate)

    def hung_then_eio(fd: int) -> None:
        if threading.current_thread().name == "predlog-writer" and not gate.entered.is_set():
            gate.pass_through()
            raise OSError(errno.EIO, "I/O error")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", hung_then_eio)
    writer.submit(rows(10, 10))
    assert gate.entered.wait(WAIT_S)  # the next write-ahead copy hangs, holding the spool's lock
    held.released.set()  # stored: the sender waits for the spool's lock to remove it
    assert wait_for(lambda: writer._rows.counts["written"] == 10)
    writer.close(1.0)
    at_close = counts(writer)
    assert at_close == {"written": 10, "spilled": 0, "replayed": 0, "dropped_by_reason": {"spool_error": 10},
                        "spool_rows": 0, "queue_depth": 0}, at_close  # fmt: skip
    gate.released.set()  # the write fails, the removal goes on
    assert wait_for(lambda: stopped(writer))
    assert counts(writer) == at_close and spooled_tokens(writer) == []


# ------------------------------------------------------------------ the spool's full policy


def test_drop_oldest_drops_a_failed_embedded_batch_older_than_the_spooled_ones(harness):
    """A handed-on embedded batch whose write failed went to the spool at its older place, and drop_oldest
    deleted the newer batch already there to make room for it."""
    sink = FakeSink(local=True)
    writer = harness.writer(sink, spool_max_bytes=segment_bytes(10) * 3 // 2)  # room for one batch
    fail_a_handed_on_batch_behind_a_spooled_one(writer, sink)
    assert wait_for(lambda: writer.stats()["dropped"] == 10)
    assert [Spool.read(s).column("request_id")[0].as_py() for s in writer.spool.segments()] == ["r10"]
    sink.failing = False
    assert writer.flush(WAIT_S) and wait_for(lambda: writer.spool.count() == 0)
    writer.close(5)
    s = counts(writer)
    assert sink.keys == [f"r{i}" for i in range(10, 20)]
    assert s["written"] == 10 and s["dropped_by_reason"] == {"spool_full": 10}, s


def segment_bytes(n: int) -> int:
    """The size of a spool segment of ``rows(n)``."""
    out = pa.BufferOutputStream()
    table = records_to_arrow(rows(n))
    with pa.ipc.new_file(out, table.schema) as f:
        f.write_table(table)
    return int(out.getvalue().size)


def test_a_spool_write_close_gave_up_on_deletes_no_segment(harness):
    """drop_oldest, the sink down, the spool full with two batches: a third batch's write-ahead copy hung in
    fsync past close(). When it ended, the full policy deleted the oldest segment close() had reported in the
    spool, and the writer counted its rows as dropped (spool_full) after close() returned."""
    sink = FakeSink(local=False)
    sink.failing = True
    writer = harness.writer(sink, spool_max_bytes=segment_bytes(10) * 5 // 2)  # room for two batches
    writer.submit(rows(10))
    assert wait_for(lambda: writer.spool.count() == 1)
    writer.submit(rows(10, 10))
    assert wait_for(lambda: writer.spool.count() == 2 and writer.stats()["spilled"] == 20)
    fsync = harness.stall_fsync("predlog-writer")
    writer.submit(rows(10, 20))
    assert fsync.entered.wait(WAIT_S)  # the third batch's write-ahead copy hangs
    writer.close(1.0)
    at_close, spooled = counts(writer), spooled_tokens(writer)
    assert at_close == {"written": 0, "spilled": 20, "replayed": 0, "dropped_by_reason": {"spool_error": 10},
                        "spool_rows": 20, "queue_depth": 0}, at_close  # fmt: skip
    fsync.released.set()  # the late copy lands over the limit: the next start's policy applies
    assert wait_for(lambda: stopped(writer) and writer._live == 0)
    assert {k: v for k, v in counts(writer).items() if k != "spool_rows"} == {
        k: v for k, v in at_close.items() if k != "spool_rows"
    }
    assert set(spooled) < set(spooled_tokens(writer)) and len(spooled) == 2


class Refusing(FakeSink):
    """ClickHouse refusing every batch for good."""

    def insert(self, table: pa.Table, token: str) -> None:
        raise DatabaseError("Code: 53. DB::Exception: Type mismatch")


@pytest.mark.parametrize("call", ["unlink", "rename"], ids=["stored", "rejected"])
def test_a_segment_whose_removal_fails_once_is_retried(harness, monkeypatch, call):
    """The unlink of a stored segment (the rename of a rejected one to .rejected) failed once: the spool had
    let go of it before the call, so it was never retried; the file stayed outside the spool's count, in the
    writer's ``_leaving`` for good, and a rejected one was counted as rejected again by the next start."""
    failed, unlink, rename = threading.Event(), Path.unlink, Path.rename

    def eio_once(this_call: str) -> None:
        if this_call == call and threading.current_thread().name == "predlog-sender" and not failed.is_set():
            failed.set()
            raise OSError(errno.EIO, "I/O error")

    def failing_unlink(self: Path, missing_ok: bool = False) -> None:
        if self.suffix == ".arrow":
            eio_once("unlink")
        unlink(self, missing_ok=missing_ok)

    def failing_rename(self: Path, target: Path) -> Path:
        if str(target).endswith(".rejected"):
            eio_once("rename")
        return rename(self, target)

    monkeypatch.setattr(Path, "unlink", failing_unlink)
    monkeypatch.setattr(Path, "rename", failing_rename)
    sink = Refusing(local=False) if call == "rename" else FakeSink(local=False)
    writer = harness.writer(sink)
    writer.submit(rows(10))
    assert failed.wait(WAIT_S)
    assert wait_for(lambda: not writer._leaving), "the removal was not retried"
    assert list(writer.spool.root.glob("0*.arrow")) == []
    assert (writer.spool.count(), writer.spool.rows, writer.spool.bytes) == (0, 0, 0)
    writer.close(5)
    s = counts(writer)
    if call == "rename":
        assert s["written"] == 0 and s["dropped_by_reason"] == {"rejected": 10}, s
        assert [p.suffix for p in writer.spool.root.glob("0*")] == [".rejected"]
    else:
        assert s["written"] == 10 and s["dropped_by_reason"] == {} and sink.keys == [f"r{i}" for i in range(10)], s
    assert s["spool_rows"] == 0, s
    again = harness.writer(sink)  # nothing left to replay: not counted a second time
    again.close(5)
    assert again.stats()["written"] == 0 and again.stats()["dropped_by_reason"] == {}


def test_the_spool_keeps_order_tokens_and_totals_through_removals(tmp_path):
    """The spool's list, its token index and its totals after appends in and out of order and removals from
    its head, middle and tail (what a drain and a late embedded batch do), as a reopened spool finds them."""
    spool = Spool(tmp_path / "spool", 10**9)
    table = records_to_arrow(rows(2))
    early = spool.reserve()
    segs = [spool.append(table, f"{k:032x}")[0] for k in range(1, 6)]
    first, _ = spool.append(table, f"{0:032x}", early)  # reserved before the others: it goes first
    assert spool.segments() == [first, *segs]
    assert spool.append(table, f"{3:032x}") == (segs[2], 0)  # a token it holds is not written again
    spool.remove(first)  # the head
    spool.remove(segs[2])  # the middle
    spool.set_aside(segs[4], ".rejected")  # the tail
    left = [segs[0], segs[1], segs[3]]
    assert spool.segments() == left and spool.count() == 3
    assert (spool.rows, spool.bytes) == (6, sum(s.bytes for s in left))
    again, _ = spool.append(table, f"{3:032x}")  # a token removed is spooled again, last
    assert again not in segs and spool.segments() == [*left, again] and spool.rows == 8
    spool.close()
    reopened = Spool(tmp_path / "spool", 10**9)
    assert [s.path for s in reopened.segments()] == [s.path for s in spool.segments()]
    assert (reopened.rows, reopened.bytes) == (spool.rows, spool.bytes)
    reopened.close()


def test_a_segment_whose_removal_failed_stays_until_retried(tmp_path, monkeypatch):
    """A segment whose unlink raised stays in the spool and its counts, and the full policy leaves it to
    its owner's retry (its rows are counted already): it deletes the next oldest instead."""
    size = segment_bytes(10)
    spool = Spool(tmp_path / "spool", size * 5 // 2)
    table = records_to_arrow(rows(10))
    a, b = (spool.append(table, t * 32)[0] for t in "ab")
    assert a is not None and b is not None
    unlink = Path.unlink

    def failing_unlink(self: Path, missing_ok: bool = False) -> None:
        if self == a.path:
            raise OSError(errno.EIO, "I/O error")
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", failing_unlink)
    with pytest.raises(OSError):
        spool.remove(a)
    assert spool.segments() == [a, b] and (spool.rows, spool.bytes) == (20, 2 * size)
    c, dropped = spool.append(table, "c" * 32)
    assert dropped == 10 and spool.segments() == [a, c] and not b.path.exists() and spool.evicted == 10
    monkeypatch.undo()
    spool.remove(a)  # the retry
    assert spool.segments() == [c] and (spool.rows, spool.bytes) == (10, size) and not a.path.exists()
    spool.close()
