"""``motlens log replay``: the spools of predictors that are gone, drained into ClickHouse (chdb here).

Predictors on a shared volume (``MOTLENS_PREDLOG_DIR_PER_HOST``) stop while ClickHouse is down and leave
their rows spooled below ``DIR/<pod name>``; the job replays each directory no process holds, exactly
once, and leaves a running predictor's directory alone.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest
from conftest import migrated_reader
from test_predlog_faults import closed_port, rows, wait_for

import predlog
from motlens.cli import main
from predictor.events import server_row
from predlog import PredlogSettings
from predlog import spool as predlog_spool
from predlog.replay import Replayed, _remove_if_drained, replay_dir
from predlog.sinks import ClickHouseSink
from predlog.spool import Spool, SpoolBusy, same_file

N = 30


@pytest.fixture()
def server(tmp_path, monkeypatch):
    """A chdb "server" with the tables, a switch that takes it down, and the environment of the job."""
    settings = PredlogSettings(
        clickhouse_url="chdb://memory", database=f"r_{uuid.uuid4().hex[:10]}", dir=tmp_path / "shared",
        dir_per_host=True, batch_rows=10, flush_interval_s=0.02, retry_initial_s=0.05, retry_max_s=0.2,
    )  # fmt: skip
    reader = migrated_reader(settings)
    down = {"now": False}
    insert = ClickHouseSink.insert

    def maybe_down(self, table, token):  # noqa: ANN001, ANN202
        if down["now"]:
            raise ConnectionRefusedError(111, "Connection refused")  # the server is down (fault injection)
        return insert(self, table, token)

    monkeypatch.setattr(ClickHouseSink, "insert", maybe_down)
    for k in ("MOTLENS_PREDLOG_DIR", "MOTLENS_PREDLOG_DIR_PER_HOST"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MOTLENS_CLICKHOUSE_URL", "chdb://memory")
    monkeypatch.setenv("MOTLENS_PREDLOG_DATABASE", settings.database)
    monkeypatch.setenv("MOTLENS_PREDLOG_RETRY_INITIAL_S", "0.05")
    yield settings, reader, down
    reader.client.command(f"DROP DATABASE IF EXISTS {settings.database}")
    reader.close()


def _stored(reader, settings) -> tuple[int, int, int]:
    """(prediction rows, distinct request ids, audit rows) in the tables."""
    (n, u), (e,) = (
        reader.client.query(f"SELECT count(), uniqExact(request_id, item_index) FROM {settings.database}.predictions")
        .result_rows[0],
        reader.client.query(f"SELECT count() FROM {settings.database}.promotion_events").result_rows[0],
    )  # fmt: skip
    return int(n), int(u), int(e)


def _pod(settings, monkeypatch, name: str):
    """A predictor's writer on the shared volume, as the pod ``name`` opens it."""
    monkeypatch.setattr("predlog.settings.socket.gethostname", lambda: name)
    assert settings.root == (settings.dir / name).resolve()
    return predlog.open_writer(settings)


def _spooled_while_down(settings, monkeypatch, name: str, start: int) -> None:
    writer = _pod(settings, monkeypatch, name)
    writer.submit(rows(N, start))
    assert writer.record_event(
        server_row("serve_stop", slot="production", from_version="7", to_version=None, percent=0.0, reason=name)
    )
    assert writer.flush(30)
    writer.close(10)
    stats = writer.stats()
    assert stats["spool_rows"] == N and stats["events"]["spool_rows"] == 1 and stats["written"] == 0, stats


def test_replay_drains_the_spools_of_gone_pods_once_and_leaves_a_running_ones(server, monkeypatch, capsys):
    settings, reader, down = server
    down["now"] = True
    _spooled_while_down(settings, monkeypatch, "mot-defects-predictor-00001-a", 0)
    _spooled_while_down(settings, monkeypatch, "mot-defects-predictor-00001-b", 1000)
    live = _pod(settings, monkeypatch, "mot-defects-predictor-00002-c")  # still running: its lock is held
    down["now"] = False
    shared = settings.dir.resolve()
    try:
        assert main(["log", "replay", "--under", str(shared), "--remove-empty", "--timeout", "60"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out == [
            f"{shared}/mot-defects-predictor-00001-a: {N} prediction rows and 1 audit rows replayed, directory removed",
            f"{shared}/mot-defects-predictor-00001-b: {N} prediction rows and 1 audit rows replayed, directory removed",
            f"{shared}/mot-defects-predictor-00002-c: held by a running writer, left alone",
        ], out
        assert _stored(reader, settings) == (2 * N, 2 * N, 2)
        assert sorted(p.name for p in shared.iterdir()) == ["mot-defects-predictor-00002-c"]
        # again: nothing left to replay, nothing stored twice
        assert main(["log", "replay", "--under", str(shared), "--timeout", "10"]) == 0
        assert capsys.readouterr().out.splitlines() == [
            f"{shared}/mot-defects-predictor-00002-c: held by a running writer, left alone"
        ]
        assert _stored(reader, settings) == (2 * N, 2 * N, 2)
        live.submit(rows(5, 5000))  # the running pod's writer goes on storing its own rows
        assert live.flush(30) and wait_for(lambda: _stored(reader, settings)[0] == 2 * N + 5)
    finally:
        live.close(10)
    # once it is gone its (drained) directory goes too
    assert main(["log", "replay", "--under", str(shared), "--remove-empty"]) == 0
    assert capsys.readouterr().out == (
        f"{shared}/mot-defects-predictor-00002-c: 0 prediction rows and 0 audit rows replayed, directory removed\n"
    )
    assert list(shared.iterdir()) == [] and _stored(reader, settings) == (2 * N + 5, 2 * N + 5, 2)


def test_a_sink_still_down_keeps_the_rows_and_fails_the_run(server, monkeypatch, capsys):
    settings, reader, down = server
    down["now"] = True
    _spooled_while_down(settings, monkeypatch, "pod-a", 0)
    _spooled_while_down(settings, monkeypatch, "pod-b", 1000)
    shared = settings.dir.resolve()
    assert main(["log", "replay", "--under", str(shared), "--remove-empty", "--timeout", "2"]) == 1
    assert capsys.readouterr().out == (
        f"{shared}/pod-a: 0 prediction rows and 0 audit rows replayed, {N + 1} rows still spooled (the sink did "
        "not take them; kept for the next run)\n1 more directories left for the next run\n"
    )  # not another timeout's wait for each directory while the sink is down
    assert sorted(p.name for p in shared.iterdir()) == ["pod-a", "pod-b"] and _stored(reader, settings) == (0, 0, 0)
    down["now"] = False  # the next run, once the server is back
    assert main(["log", "replay", "--under", str(shared), "--remove-empty"]) == 0
    assert capsys.readouterr().out.count("directory removed\n") == 2
    assert _stored(reader, settings) == (2 * N, 2 * N, 2) and list(shared.iterdir()) == []


def test_rows_spooled_for_another_sink_are_held_not_replayed_and_keep_the_directory(server, monkeypatch, capsys):
    settings, reader, _ = server
    other = settings.model_copy(update={"clickhouse_url": f"http://default@127.0.0.1:{closed_port()}/default"})
    _spooled_while_down(other, monkeypatch, "pod-a", 0)  # another ClickHouse: its spool is bound to it
    pod = settings.dir.resolve() / "pod-a"
    assert main(["log", "replay", str(pod), "--remove-empty", "--timeout", "10"]) == 0
    assert capsys.readouterr().out == (
        f"{pod}: 0 prediction rows and 0 audit rows replayed, {N + 1} rows held for another sink (kept)\n"
    )
    assert _stored(reader, settings) == (0, 0, 0)
    assert sum(int(p.name.split("-")[1]) for p in pod.rglob("held/*/*.arrow")) == N + 1  # kept, where they were


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["log", "replay", "{tmp}"], {"MOTLENS_CLICKHOUSE_URL": None},
         "motlens log replay: needs the ClickHouse sink (MOTLENS_CLICKHOUSE_URL); an embedded log's own spool is "
         "replayed by its server at start\n"),
        (["log", "replay"], {},
         "motlens log replay: name the directories (DIR ...) or their parent (--under PARENT)\n"),
        (["log", "replay", "--under", "{tmp}/nowhere"], {},
         "motlens log replay: --under {tmp}/nowhere: no such directory\n"),
    ],
)  # fmt: skip
def test_a_bad_invocation_is_one_line_and_exit_2(argv, env, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOTLENS_CLICKHOUSE_URL", "chdb://memory")
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k)
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path / "home"))
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert capsys.readouterr().err == expected.replace("{tmp}", str(tmp_path))


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e300", "3601"])
def test_a_timeout_that_is_no_bounded_wait_is_refused(value, capsys):
    """`--timeout inf` waited for nothing (inf - inf/4 is NaN); 1e300 overflowed a time_t."""
    with pytest.raises(SystemExit) as info:
        main(["log", "replay", "/nowhere", "--timeout", value])
    assert info.value.code == 2
    assert f"must be a number of seconds above 0 and at most 3600, not {value}" in capsys.readouterr().err


def test_a_directory_that_is_not_there_fails_the_run(server, tmp_path, capsys):
    assert main(["log", "replay", str(tmp_path / "gone"), "--timeout", "5"]) == 1
    assert capsys.readouterr().out == f"{tmp_path / 'gone'}: no such directory\n"


def test_the_shared_parent_named_as_a_dir_is_refused_and_nothing_below_it_touched(server, monkeypatch, capsys):
    """The parent of MOTLENS_PREDLOG_DIR_PER_HOST's directories is no predictor's directory: replaying it
    made it a spool and --remove-empty deleted it, a running predictor's directory included."""
    settings, reader, _ = server
    live = _pod(settings, monkeypatch, "pod-live")
    shared = settings.dir.resolve()
    try:
        assert main(["log", "replay", str(shared), "--remove-empty", "--timeout", "5"]) == 1
        assert capsys.readouterr().out == (
            f"{shared}: not a predictor's directory (no spool/ in it); name MOTLENS_PREDLOG_DIR/<host name> of a "
            "predictor with MOTLENS_PREDLOG_DIR_PER_HOST, or its parent with --under\n"
        )
        assert sorted(p.name for p in shared.iterdir()) == ["pod-live"]
        live.submit(rows(5))
        assert live.flush(30) and wait_for(lambda: _stored(reader, settings)[0] == 5)
    finally:
        live.close(10)


@pytest.mark.parametrize(
    ("read_only", "replayed", "left"),
    [("spool", 0, 4), ("events", N, 1)],  # both spools (the events one is inside); the audit rows' only
)
def test_a_spool_that_cannot_be_written_is_reported_and_fails_the_run(
    read_only, replayed, left, server, monkeypatch, capsys
):
    settings, reader, down = server
    down["now"] = True
    _spooled_while_down(settings, monkeypatch, "pod-a", 0)
    down["now"] = False
    pod = settings.dir.resolve() / "pod-a"
    bind = Spool._bind

    def bind_read_only(self, sink):  # noqa: ANN001, ANN202 - fault injection: a volume mounted read-only
        if read_only == "spool" or self.root.name == read_only:
            raise OSError(30, "Read-only file system")
        return bind(self, sink)

    monkeypatch.setattr(Spool, "_bind", bind_read_only)
    assert main(["log", "replay", str(pod), "--remove-empty", "--timeout", "5"]) == 1
    assert capsys.readouterr().out == (
        f"{pod}: {replayed} prediction rows and 0 audit rows replayed; a spool of it cannot be used ([Errno 30] "
        "Read-only file system): what it holds is left there\n"
    )
    assert _stored(reader, settings) == (replayed, replayed, 0) and len(list(pod.rglob("*.arrow"))) == left


def test_a_restarting_predictor_waits_for_the_replay_of_its_directory(server, monkeypatch):
    """A container restart keeps its pod's name: while the job holds the directory (ClickHouse down, so up
    to its timeout) the predictor waits for the lock (MOTLENS_PREDLOG_LOCK_WAIT_S) instead of exiting."""
    settings, reader, down = server
    down["now"] = True
    _spooled_while_down(settings, monkeypatch, "pod-a", 0)
    pod = settings.dir.resolve() / "pod-a"
    job_done: list[Replayed] = []
    holding = threading.Event()
    open_writer = predlog.open_writer

    def opened(here):  # noqa: ANN001, ANN202 - tells when the job holds the lock (a probe taking it could race it)
        writer = open_writer(here)
        holding.set()
        return writer

    monkeypatch.setattr(predlog, "open_writer", opened)
    job = threading.Thread(target=lambda: job_done.append(replay_dir(settings, pod, 10.0, True)))
    job.start()
    assert holding.wait(30), job_done
    monkeypatch.setattr(predlog, "open_writer", open_writer)
    with pytest.raises(SpoolBusy):  # the default: refused at once, naming the holder
        _pod(settings, monkeypatch, "pod-a")
    restarted = _pod(settings.model_copy(update={"lock_wait_s": 30.0}), monkeypatch, "pod-a")
    job.join(30)
    try:
        assert job_done[0].state == "pending"  # the job gave up its hold; the predictor has it now
        down["now"] = False
        assert wait_for(lambda: _stored(reader, settings) == (N, N, 1))  # it replays its own spool
    finally:
        restarted.close(10)


def test_a_predictor_starting_while_its_drained_directory_is_removed_gets_a_new_one(server, monkeypatch):
    """--remove-empty moves the directory aside under its lock before deleting it: a predictor (a container
    restart, same pod name) that waits for the lock meanwhile makes the directory again and spools there."""
    settings, reader, down = server
    _pod(settings, monkeypatch, "pod-a").close(10)  # a drained directory
    pod = settings.dir.resolve() / "pod-a"
    waiting = threading.Event()
    warning = predlog_spool.log.warning

    def noted(msg, *args):  # noqa: ANN001, ANN202
        if "waiting up to" in msg:
            waiting.set()
        warning(msg, *args)

    monkeypatch.setattr(predlog_spool.log, "warning", noted)
    opened: list = []
    rename = Path.rename

    def rename_once_the_predictor_waits(self, target):  # noqa: ANN001, ANN202
        if self == pod:
            starting = threading.Thread(
                target=lambda: opened.append(_open_as(settings.model_copy(update={"lock_wait_s": 30.0}), "pod-a"))
            )
            starting.start()
            assert waiting.wait(30)  # it holds the old .lock open and waits for the flock
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_once_the_predictor_waits)
    monkeypatch.setattr("predlog.settings.socket.gethostname", lambda: "pod-a")
    assert replay_dir(settings, pod, 10.0, True).removed
    assert wait_for(lambda: bool(opened))
    writer = opened[0]
    down["now"] = True
    try:
        writer.submit(rows(5))
        assert writer.record_event(
            server_row("serve_stop", slot="production", from_version="7", to_version=None, percent=0.0, reason="r")
        )
        assert writer.flush(30)
    finally:
        writer.close(10)
    stats = writer.stats()
    assert stats["spool_rows"] == 5 and stats["events"]["spool_rows"] == 1 and stats["dropped"] == 0, stats
    assert stats["events"]["dropped_by_reason"] == {}
    assert sorted(p.name for p in pod.parent.iterdir()) == ["pod-a"]  # the new one; the old one deleted


def _open_as(settings, name: str):  # noqa: ANN202
    return predlog.open_writer(settings)


def test_a_lock_taken_on_a_file_moved_away_meanwhile_does_not_count(tmp_path, monkeypatch):
    """The window the retry loop leaves: a writer opens ``.lock``; before its flock the job moves the drained
    directory aside and lets go. Its flock then succeeds on the moved file: it must make the directory
    again and lock the file there, not spool into the directory being deleted."""
    root = tmp_path / "pod-a" / "spool"
    holder = Spool(root, 10**6)
    flock, moved = predlog_spool.fcntl.flock, []

    def racing(f, op):  # noqa: ANN001, ANN202
        if not moved and op & predlog_spool.fcntl.LOCK_EX and f is not holder._lock_file:
            moved.append((tmp_path / "pod-a").rename(tmp_path / ".removing-pod-a"))
            holder.close()
        return flock(f, op)

    monkeypatch.setattr(predlog_spool.fcntl, "flock", racing)
    spool = Spool(root, 10**6, lock_wait_s=5)
    try:
        assert moved and root.is_dir()
        assert os.path.samestat(os.fstat(spool._lock_file.fileno()), os.stat(root / ".lock"))
    finally:
        spool.close()


def test_a_directory_moved_away_before_the_lock_opens_is_made_again(tmp_path, monkeypatch):
    """The rename can land between a waiting writer's mkdir and its open of ``.lock``: that is no
    read-only spool (it ran unlocked and unbound, dropping what the sink refused), it makes it again."""
    pod, spool = tmp_path / "pod-a", tmp_path / "pod-a" / "spool"
    spool.mkdir(parents=True)
    (spool / ".lock").touch()
    holder = open(spool / ".lock", "rb")  # noqa: SIM115 - the replay's writer holds the directory
    predlog_spool.fcntl.flock(holder, predlog_spool.fcntl.LOCK_EX | predlog_spool.fcntl.LOCK_NB)
    mkdir, tries = Path.mkdir, []

    def mkdir_then_removed(self, *args, **kwargs):  # noqa: ANN001, ANN202
        mkdir(self, *args, **kwargs)
        if self == spool:
            tries.append(self)
            if len(tries) == 2:  # the writer's second try: the replay lets go and removes the drained dir
                holder.close()
                assert _remove_if_drained(spool, pod)

    monkeypatch.setattr(Path, "mkdir", mkdir_then_removed)
    writer_spool = Spool(spool, 10**6, lock_wait_s=5)
    try:
        assert writer_spool.unbound is None and writer_spool._lock_file is not None
        assert same_file(writer_spool._lock_file, spool / ".lock")
    finally:
        writer_spool.close()


def test_an_error_of_an_earlier_try_does_not_stay_with_the_spool(tmp_path, monkeypatch):
    """A first try that could not open ``.lock`` for writing waits on a read-only handle; once the directory
    is made again, the fresh, writable spool is used (the first error had left it unbound for the run)."""
    pod, spool = tmp_path / "pod-a", tmp_path / "pod-a" / "spool"
    spool.mkdir(parents=True)
    (spool / ".lock").touch()
    holder = open(spool / ".lock", "rb")  # noqa: SIM115
    predlog_spool.fcntl.flock(holder, predlog_spool.fcntl.LOCK_EX | predlog_spool.fcntl.LOCK_NB)
    real_open, opened = open, []

    def open_denied_once(path, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202
        if str(path) == str(spool / ".lock") and mode == "ab+":
            opened.append(path)
            if len(opened) == 1:  # the old directory's lock file is not ours to write (another uid)
                raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    sleep = predlog_spool.time.sleep

    def replay_done(seconds):  # noqa: ANN001, ANN202 - while the writer waits, the replay removes the dir
        if holder.closed is False:
            holder.close()
            pod.rename(tmp_path / ".removing-pod-a-1")
        sleep(seconds)

    monkeypatch.setattr("builtins.open", open_denied_once)
    monkeypatch.setattr(predlog_spool.time, "sleep", replay_done)
    writer_spool = Spool(spool, 10**6, lock_wait_s=5)
    try:
        assert writer_spool.unbound is None and same_file(writer_spool._lock_file, spool / ".lock")
    finally:
        writer_spool.close()


def test_a_second_replay_does_not_remove_the_directory_a_restarted_predictor_made(tmp_path, monkeypatch):
    """Two replays (the CronJob and one by hand) on one drained directory: the second opens ``.lock``, the
    first moves the directory aside, a restarted predictor makes and locks a new one; the second's flock
    then succeeds on the old file and must not take the new directory for the one it checked."""
    pod, spool = tmp_path / "pod-a", tmp_path / "pod-a" / "spool"
    spool.mkdir(parents=True)
    (spool / ".lock").touch()
    flock, predictor = predlog_spool.fcntl.flock, []

    def first_replay_then_restart(f, op):  # noqa: ANN001, ANN202
        if not predictor:
            monkeypatch.setattr(predlog_spool.fcntl, "flock", flock)
            assert _remove_if_drained(spool, pod)  # the first replay, start to end
            predictor.append(Spool(spool, 10**6))  # the restarted predictor: a new pod-a/, locked
        return flock(f, op)

    monkeypatch.setattr(predlog_spool.fcntl, "flock", first_replay_then_restart)
    try:
        assert not _remove_if_drained(spool, pod)
        assert pod.is_dir() and same_file(predictor[0]._lock_file, spool / ".lock")
    finally:
        predictor[0].close()


def test_a_directory_with_other_spools_below_it_is_not_removed(server, monkeypatch, capsys):
    """The shared parent once ran a writer itself (MOTLENS_PREDLOG_DIR without _PER_HOST): it has a spool/
    of its own, and its pods' directories below it hold only bookkeeping too; none of it goes."""
    settings, reader, _ = server
    shared = settings.dir.resolve()
    predlog.open_writer(settings.model_copy(update={"dir_per_host": False})).close(10)  # the parent's own spool
    live = _pod(settings, monkeypatch, "pod-b")
    try:
        assert main(["log", "replay", str(shared), "--remove-empty", "--timeout", "5"]) == 0
        assert capsys.readouterr().out == f"{shared}: 0 prediction rows and 0 audit rows replayed\n"
        assert (shared / "pod-b" / "spool").is_dir() and (shared / "spool").is_dir()
    finally:
        live.close(10)
