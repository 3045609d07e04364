"""A spool write that fails (disk full, EFBIG, I/O error) is counted as dropped, never lost silently.

The fault is real: the writer runs in a subprocess whose RLIMIT_FSIZE makes every segment write fail
while the sink is down, so every batch must be spooled — and each one that cannot be is counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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
