"""A spool write that fails (disk full, EFBIG, I/O error) is counted as dropped, never lost silently.

The fault is real: the writer runs in a subprocess whose RLIMIT_FSIZE makes every segment write fail
while the sink is down, so every batch must be spooled — and each one that cannot be is counted.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest

from predlog import PredictionRecord
from predlog.schema import records_to_arrow
from predlog.spool import Spool

SCRIPT = textwrap.dedent(
    """
    import json, resource, signal, socket, sys
    from pathlib import Path
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
    from prometheus_client import REGISTRY
    import predlog
    from predlog import PredictionRecord, PredlogSettings
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed: the sink is down, every batch must go to the spool
    settings = PredlogSettings(
        clickhouse_url=f"http://127.0.0.1:{port}", dir=Path(sys.argv[1]), batch_rows=10,
        flush_interval_s=0.05, retry_initial_s=0.05, retry_max_s=0.1, connect_timeout_s=1,
    )
    writer = predlog.open_writer(settings)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # the disk is "full" from now on
    writer.submit([
        PredictionRecord(request_id=f"r{i}", item_index=0, model_name="mot-defects", model_version="1",
                         slot="production", text=f"brake pipe corroded {i}")
        for i in range(50)
    ])
    writer.flush(20)
    writer.close(10)
    dropped = sum(
        s.value for m in REGISTRY.collect() if m.name == "motlens_predlog_rows_dropped"
        for s in m.samples if s.name == "motlens_predlog_rows_dropped_total"
    )
    print(json.dumps({**writer.stats(), "metric_dropped": dropped}))
    """
)


def test_spool_write_failure_is_counted_not_silent(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "predlog")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["written"] + stats["spool_rows"] + stats["dropped"] == 50, stats
    assert stats["metric_dropped"] == stats["dropped"], stats
    assert stats["dropped_by_reason"].get("spool_error", 0) > 0, stats


FULL_THEN_FAILING = textwrap.dedent(
    """
    import json, resource, signal, socket, sys
    from pathlib import Path
    import pyarrow as pa
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    from prometheus_client import REGISTRY
    import predlog
    from predlog import PredictionRecord, PredlogSettings
    from predlog.schema import records_to_arrow
    root, backend = Path(sys.argv[1]), sys.argv[2]

    def batch(k):  # equal-length texts: every batch's segment has the same size
        return [PredictionRecord(request_id=f"r{k}-{i}", item_index=0, model_name="mot-defects", model_version="1",
                                 slot="production", text=f"brake pipe corroded {k} {i}") for i in range(10)]

    buf = pa.BufferOutputStream()
    table = records_to_arrow(batch(0))
    with pa.ipc.new_file(buf, table.schema) as w:
        w.write_table(table)
    if backend == "clickhouse":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed: every batch stays in the spool
    else:
        url = None
        root.mkdir(parents=True)
        (root / "predictions").write_text("")  # a file where the folder should be: every Parquet write fails
    settings = PredlogSettings(
        clickhouse_url=url, dir=root, batch_rows=10, flush_interval_s=0.05, retry_initial_s=600,
        retry_max_s=600, connect_timeout_s=1, spool_max_bytes=int(buf.getvalue().size * 3.5),
    )
    writer = predlog.open_writer(settings)
    for k in range(3):  # the spool is full
        writer.submit(batch(k))
        writer.flush(20)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))  # then the disk is "full"
    writer.submit(batch(3))
    writer.flush(20)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    writer.close(10)
    dropped = sum(
        s.value for m in REGISTRY.collect() if m.name == "motlens_predlog_rows_dropped"
        for s in m.samples if s.name == "motlens_predlog_rows_dropped_total"
    )
    print(json.dumps({**writer.stats(), "metric_dropped": dropped}))
    """
)


@pytest.mark.parametrize("backend", ["clickhouse", "embedded"])
def test_a_full_spool_loses_no_segment_to_a_write_that_then_fails(tmp_path, backend):
    """drop_oldest once deleted the oldest segments before writing the new one: when that write then
    failed (disk full) their rows were gone and counted nowhere."""
    out = subprocess.run(
        [sys.executable, "-c", FULL_THEN_FAILING, str(tmp_path / "predlog"), backend],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["written"] + stats["spool_rows"] + stats["dropped"] == 40, stats
    assert stats["metric_dropped"] == stats["dropped"], stats
    assert stats["spool_rows"] == 30 and stats["dropped_by_reason"] == {"spool_error": 10}, stats


def test_a_failed_segment_write_evicts_nothing(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool", 10**9)
    tables = [records_to_arrow([_row(k)]) for k in range(4)]
    for k in range(3):
        spool.append(tables[k], f"{k:032x}")
    spool.max_bytes = spool.bytes  # full: the next segment needs the oldest one's room

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        spool.append(tables[3], f"{3:032x}")
    monkeypatch.undo()
    assert spool.rows == 3 and len(list(spool.root.glob("*.arrow"))) == 3
    assert not list(spool.root.glob("*.tmp"))
    seg, dropped = spool.append(tables[3], f"{3:032x}")  # space is back: now the oldest makes room
    assert seg is not None and dropped == 1 and spool.rows == 3
    spool.close()


def _row(k: int) -> PredictionRecord:
    return PredictionRecord(
        request_id=f"r{k}", item_index=0, model_name="mot-defects", model_version="1", slot="production",
        text=f"brake pipe corroded {k}",
    )  # fmt: skip


def test_a_spool_that_cannot_record_its_sink_leaves_the_writer_serving(tmp_path, monkeypatch):
    """Writing ``spool/.sink`` (a first start, or a new sink) with the disk full raised out of
    ``open_writer``, so ``motlens serve`` died at start. Now that run neither spools nor replays (the
    segments there may be another sink's) and stores straight into the log; the next start binds."""
    import predlog
    import predlog.spool as spool_module
    from predlog import PredlogSettings

    settings = PredlogSettings(dir=tmp_path / "predlog", batch_rows=10, flush_interval_s=0.05, compact_interval_s=0)
    other = Spool(settings.spool_dir, 10**9)  # a segment an earlier run left, its sink not recorded
    other.append(records_to_arrow([_row(99)]), f"{99:032x}")
    other.close()

    def full(path, data, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - fault injection
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module, "atomic_write", full)
    writer = predlog.open_writer(settings)
    assert writer.spool.unbound and writer.stats()["spool_rows"] == 0
    writer.submit([_row(k) for k in range(20)])
    assert writer.flush(30)
    writer.close(10)
    assert writer.stats()["written"] == 20 and writer.stats()["dropped"] == 0, writer.stats()
    assert len(list(settings.spool_dir.rglob("*.arrow"))) == 1  # kept (in place or held), not replayed here
    monkeypatch.undo()
    writer = predlog.open_writer(settings)  # space is back: the spool binds, its segment is held
    assert writer.spool.unbound is None and writer.stats()["spool_held_rows"] == 1
    writer.close(10)


def test_a_spool_whose_opening_fails_releases_its_lock(tmp_path, monkeypatch):
    def broken(self, sink):  # noqa: ANN001, ANN202 - fault injection
        raise RuntimeError("boom")

    monkeypatch.setattr(Spool, "_open", broken)
    with pytest.raises(RuntimeError):
        Spool(tmp_path / "spool", 10**9)
    monkeypatch.undo()
    Spool(tmp_path / "spool", 10**9).close()  # not SpoolBusy


def _read_only_mounts() -> bool:
    """Whether this machine lets an unprivileged mount namespace bind a folder read-only (``unshare``)."""
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _read_only_mounts(), reason="needs `unshare -rm` (user and mount namespaces)")
def test_a_read_only_spool_serves_with_one_error_and_counts_the_drops(tiny_bundle, tmp_path):
    """A prediction log on a read-only file system (a real read-only bind mount): ``Spool`` opened its
    ``.lock`` for writing, and ``motlens serve`` exited 2 at start with ``OSError: [Errno 30] Read-only file
    system``. It serves now, says so in one ERROR line and counts each row it cannot store."""
    import signal
    import time

    import httpx
    from conftest import free_port
    from test_reliability_faults import metric, predict_sequentially, wait_until
    from test_reliability_shutdown import motlens_bin, wait_ready

    import predlog
    from predlog import PredlogSettings

    log_dir = tmp_path / "predlog"
    predlog.open_writer(PredlogSettings(dir=log_dir, compact_interval_s=0)).close(10)  # a spool an earlier run left
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOTLENS_", "MLFLOW_TRACKING"))}
    env.update(MOTLENS_HOME=str(tmp_path / "home"), MOTLENS_PREDLOG_DIR=str(log_dir),
               MOTLENS_PREDLOG_FLUSH_INTERVAL_S="0.1", MOTLENS_PREDLOG_COMPACT_INTERVAL_S="0")  # fmt: skip
    serve = [motlens_bin(), "serve", "--model", str(tiny_bundle.root), "--http-port", str(port), "--no-grpc",
             "--device", "cpu", "--threads", "1"]  # fmt: skip
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as out:
        proc = subprocess.Popen(["unshare", "-rm", "sh", "-c", script, "sh", str(log_dir), *serve], env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, log_path)
        assert [status for _, status in predict_sequentially(base, 3)] == [200] * 3
        wait_until(lambda: metric(base, "motlens_predlog_rows_dropped_total", reason="spool_error") == 6, 60)
        assert httpx.get(f"{base}/v2/models/mot-defects/ready", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            time.sleep(0.1)
    text = log_path.read_text()
    errors = [line for line in text.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "cannot bind the spool" in errors[0] and "Read-only file system" in errors[0], text
    assert not list((log_dir / "predictions").glob("*.parquet"))  # nothing stored, nothing half-written
