"""``motlens log`` on the embedded backend and on the chdb table backend."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid
import warnings
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from conftest import migrated_reader

import predlog
from motlens.cli import main
from predlog import PredictionRecord, PredlogSettings
from predlog.cli import _print


@pytest.fixture(params=["embedded", "table"])
def logged(request, tmp_path, monkeypatch):
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path))
    monkeypatch.delenv("MOTLENS_CLICKHOUSE_URL", raising=False)
    if request.param == "table":
        monkeypatch.setenv("MOTLENS_CLICKHOUSE_URL", "chdb://memory")
        monkeypatch.setenv("MOTLENS_PREDLOG_DATABASE", f"c_{uuid.uuid4().hex[:10]}")
    settings = PredlogSettings(flush_interval_s=0.02)
    keeper = migrated_reader(settings)  # keeps the in-process chdb engine (and its tables) alive
    writer = predlog.open_writer(settings)
    writer.submit(
        [
            PredictionRecord(
                request_id=f"r{i}",
                item_index=0,
                model_name="mot-defects",
                model_version=str(1 + i % 2),
                slot=("production", "canary")[i % 2],
                text=f"tyre worn {i}",
                section="5 Axles, wheels, tyres and suspension",
                severity="advisory",
                latency_ms=float(i),
                status="ok" if i % 5 else "server_error",
            )
            for i in range(30)
        ]
    )
    writer.close(30)
    yield settings
    if request.param == "table":
        keeper.client.command(f"DROP DATABASE IF EXISTS {settings.database}")
    keeper.close()


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_log_count_tail_stats_query(logged, capsys):
    assert main(["log", "count", "--json"]) == 0
    counts = _json_lines(capsys.readouterr().out)
    assert sorted((c["model_version"], c["slot"], c["n"]) for c in counts) == [
        ("1", "production", 15),
        ("2", "canary", 15),
    ]

    assert main(["log", "tail", "-n", "3", "--json"]) == 0
    tail = _json_lines(capsys.readouterr().out)
    assert len(tail) == 3 and [t["ts"] for t in tail] == sorted((t["ts"] for t in tail), reverse=True)
    for n in ("0", "-5"):  # named by its flag, as every bad setting is
        assert main(["log", "tail", "-n", n]) == 2
        assert capsys.readouterr().err == f"motlens log tail: bad setting: -n: must be in 1..5000000, got {n}\n"

    assert main(["log", "stats", "--since", "1h", "--json"]) == 0
    stats = {s["model_version"]: s for s in _json_lines(capsys.readouterr().out)}
    assert stats["1"]["errors"] == 3 and stats["1"]["n"] == 15
    assert stats["2"]["section_counts"] == {"5 Axles, wheels, tyres and suspension": 12}

    sql = "SELECT count() AS n FROM predictions WHERE slot = {s:String}"
    assert main(["log", "query", sql, "--param", "s=canary", "--json"]) == 0
    assert _json_lines(capsys.readouterr().out) == [{"n": 15}]

    assert main(["log", "count"]) == 0
    assert "canary" in capsys.readouterr().out


def test_log_stats_reads_in_a_narrow_terminal_without_warnings(logged, capsys, monkeypatch):
    """At 80 columns the 14-column stats table squeezed every value to 2-3 characters, and sorting the
    section/severity counts negated unsigned numpy ints (RuntimeWarning: overflow)."""
    monkeypatch.setenv("COLUMNS", "80")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["log", "stats", "--since", "1h"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), out
    fields = {k: v.strip() for k, _, v in (line.strip().partition(" ") for line in lines if line.startswith("  "))}
    assert fields["section_counts"] == "5 Axles, wheels, tyres and suspension: 12", out
    assert fields["severity_counts"] == "advisory: 12"
    assert {"model_version", "slot", "latency_p99_ms", "mean_fail_probability", "first_ts", "last_ts"} <= set(fields)
    assert "row 2" in out and lines[-1] == "2 row(s)"

    monkeypatch.setenv("COLUMNS", "400")  # wide enough: one table
    assert main(["log", "stats", "--since", "1h"]) == 0
    out = capsys.readouterr().out
    assert "┃ model_version ┃" in out and "5 Axles, wheels, tyres and suspension: 12" in out


@pytest.mark.parametrize("columns", ["200", "20"])
def test_logged_text_is_printed_as_is_not_as_markup(capsys, monkeypatch, columns):
    """A logged text with rich markup in it crashed the table (`[/]`: MarkupError) or lost its brackets."""
    monkeypatch.setenv("COLUMNS", columns)
    _print(pd.DataFrame({"text": ["[bold]worn[/] tyre [/]"]}), as_json=False)
    assert "[bold]worn[/] tyre [/]" in capsys.readouterr().out


def test_only_a_text_is_cut_other_values_print_in_full(capsys, monkeypatch):
    """Every value was cut at 80 characters: a promotion's gate reasons (docs/promotion.md "Audit"
    queries them) read "… wait (0 canary requests since the last step..." with no way but --json."""
    monkeypatch.setenv("COLUMNS", "100")
    reason = "forced past gates: live: wait (0 canary requests since the last step); drift: " + "x" * 80
    _print(pd.DataFrame({"text": ["tyre worn " * 20], "reason": [reason]}), as_json=False)
    out = capsys.readouterr().out
    assert reason in out and ("tyre worn " * 20) not in out and "tyre worn tyre worn" in out


def test_log_query_exists_on_both_backends(logged, capsys):
    """docs/predlog.md: `log query` takes EXISTS on both backends (embedded: it was a syntax error)."""
    assert main(["log", "query", "EXISTS TABLE predictions", "--json"]) == 0
    assert _json_lines(capsys.readouterr().out) == [{"result": 1}]


def test_log_query_leaves_string_literals_as_written(logged, capsys):
    """The log's table names are qualified with its database in the query, not inside its strings:
    `WHERE text = 'from predictions'` compared with `from <db>.predictions` and matched nothing."""
    assert main(["log", "query", "SELECT 'select * from predictions' AS s, $$join drift_reports$$ AS h", "--json"]) == 0
    assert _json_lines(capsys.readouterr().out) == [{"s": "select * from predictions", "h": "join drift_reports"}]
    sql = (
        "SELECT count() AS n FROM /* the log */ predictions -- its rows\n"
        "WHERE concat('from predictions ', text) LIKE '%from predictions tyre worn 1%'"
    )
    assert main(["log", "query", sql, "--json"]) == 0
    assert _json_lines(capsys.readouterr().out) == [{"n": 11}]  # tyre worn 1, 10 … 19
    assert main(["log", "query", "SELECT count() AS n FROM `predictions` WHERE text = 'tyre worn 3'", "--json"]) == 0
    assert _json_lines(capsys.readouterr().out) == [{"n": 1}]
    assert main(["log", "query", "SELECT 'a\x00b' AS x", "--json"]) == 0  # rendered escaped: no placeholder
    assert _json_lines(capsys.readouterr().out) == [{"x": "a\x00b"}]


def test_log_query_refuses_writes_with_a_clear_error(logged, capsys):
    assert main(["log", "query", "DROP TABLE predictions"]) == 2
    assert "only SELECT/WITH/SHOW/DESCRIBE/EXPLAIN/EXISTS are allowed, not 'DROP'" in capsys.readouterr().err
    assert main(["log", "count", "--json"]) == 0
    assert sum(c["n"] for c in _json_lines(capsys.readouterr().out)) == 30


def test_a_read_only_clickhouse_user_reads_the_log(logged, capsys, monkeypatch):
    """A least-privilege user (``readonly=1``: SELECT only) runs ``motlens log count/query`` and the drift
    and promotion reads. open_reader ran DDL on every open (Code 164: READONLY), and query() set
    ``readonly=2``, which such a user may not change."""
    import predlog.sinks
    from predlog.reader import PredictionLogReader

    if logged.embedded:
        pytest.skip("not applicable: the embedded log has no ClickHouse users (the table variant runs)")
    real = predlog.sinks.make_client
    monkeypatch.setattr(predlog.sinks, "make_client", lambda s, **kw: real(s, **{"settings": {"readonly": 1}, **kw}))
    assert main(["log", "count", "--json"]) == 0
    assert sum(c["n"] for c in _json_lines(capsys.readouterr().out)) == 30
    assert main(["log", "query", "SELECT count() AS n FROM predictions", "--json"]) == 0
    assert _json_lines(capsys.readouterr().out) == [{"n": 30}]
    reader = predlog.open_reader(logged)
    try:
        with pytest.raises(Exception, match="READONLY"):  # the user really is read-only
            reader.client.command(f"CREATE TABLE {logged.database}.x (a UInt8) ENGINE = Memory")
        assert len(reader.window(limit=100)) == 30  # drift's window
        stats = reader.live_stats(since=datetime.now(UTC) - timedelta(hours=1), by_slot=False)  # the gates
        assert sorted(stats["model_version"]) == ["1", "2"]
        assert reader.promotion_events(limit=5).empty and reader.drift_reports(limit=5).empty
        # what query() does against a server URL: no readonly=2 for a session that is read-only already
        server = PredictionLogReader(
            reader.client, reader.source, logged.model_copy(update={"clickhouse_url": "http://127.0.0.1:1"})
        )
        assert server.query("SELECT count() AS n FROM predictions")["n"].tolist() == [30]
    finally:
        reader.close()


@pytest.fixture()
def embedded_log(tmp_path, monkeypatch):
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path))
    monkeypatch.delenv("MOTLENS_CLICKHOUSE_URL", raising=False)
    monkeypatch.delenv("MOTLENS_PREDLOG_DIR", raising=False)
    settings = PredlogSettings(flush_interval_s=0.02)
    writer = predlog.open_writer(settings)
    writer.submit(
        [
            PredictionRecord(request_id=f"r{i}", item_index=0, model_name="mot-defects", model_version="1",
                             slot="production", text="tyre worn")
            for i in range(5)
        ]
    )  # fmt: skip
    writer.close(30)
    return settings


@pytest.mark.parametrize("table", ["", "predictions", "drift_reports"])
def test_an_unreadable_log_folder_is_an_error_not_an_empty_log(embedded_log, monkeypatch, capsys, table):
    """`chmod 000 …/predlog/predictions` once read as `0 row(s)`, exit 0: the drift job and the
    promotion gates then saw "no data" instead of a broken log."""
    folder = embedded_log.table_dir(table) if table else embedded_log.root
    folder.mkdir(exist_ok=True)
    scandir = os.scandir

    def denied(path=".", *args):  # noqa: ANN001, ANN002, ANN202 - a folder without read permission
        if os.fspath(path) == str(folder):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return scandir(path, *args)

    monkeypatch.setattr(os, "scandir", denied)
    assert main(["log", "count"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder) in err[0] and "Permission denied" in err[0], err
    with pytest.raises(PermissionError, match=str(folder)):
        predlog.open_reader(embedded_log)


COUNT = "from motlens.cli import main; raise SystemExit(main(['log', 'count']))"


def test_an_unreadable_log_folder_for_real(embedded_log):
    """The same with a real `chmod 000` (root's capabilities that bypass it dropped through capsh)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("capsh"):
            pytest.skip("running as root without capsh: chmod 000 does not block root")
        prefix = ["capsh", "--drop=cap_dac_override,cap_dac_read_search,cap_fowner", "--", "-c"]
    folder = embedded_log.table_dir("predictions")
    cmd = [sys.executable, "-c", COUNT]
    folder.chmod(0)
    try:
        out = subprocess.run(
            [*prefix, shlex.join(cmd)] if prefix else cmd, capture_output=True, text=True, timeout=120, env=os.environ
        )
    finally:
        folder.chmod(0o755)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert str(folder) in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("backend", ["embedded", "table"])
def test_log_stats_over_a_closed_window(backend, tmp_path, monkeypatch, capsys):
    """`--until` closes the window: rows at or after it are left out (an auditor's [T1, T2))."""
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path))
    monkeypatch.delenv("MOTLENS_CLICKHOUSE_URL", raising=False)
    if backend == "table":
        monkeypatch.setenv("MOTLENS_CLICKHOUSE_URL", "chdb://memory")
        monkeypatch.setenv("MOTLENS_PREDLOG_DATABASE", f"c_{uuid.uuid4().hex[:10]}")
    settings = PredlogSettings(flush_interval_s=0.02)
    keeper = migrated_reader(settings)
    now = datetime.now(UTC)
    writer = predlog.open_writer(settings)
    writer.submit(
        [
            PredictionRecord(
                request_id=f"r{h}",
                item_index=0,
                model_name="mot-defects",
                model_version=str(v),
                slot="production",
                text="tyre worn",
                ts=now - timedelta(hours=h),
            )  # fmt: skip
            for h, v in ((5, 1), (3, 1), (2, 2), (2, 2), (0.5, 2))
        ]
    )
    writer.close(30)
    until = (now - timedelta(hours=1)).isoformat()
    assert main(["log", "stats", "--since", "4h", "--until", until, "--json"]) == 0
    stats = {s["model_version"]: s["n"] for s in _json_lines(capsys.readouterr().out)}
    assert stats == {"1": 1, "2": 2}
    assert main(["log", "stats", "--since", "4h", "--json"]) == 0
    assert {s["model_version"]: s["n"] for s in _json_lines(capsys.readouterr().out)} == {"1": 1, "2": 3}
    assert main(["log", "stats", "--since", "1h", "--until", "2h"]) == 2
    assert "must come after --since" in capsys.readouterr().err
    # a duration reaching before 1970 means everything (it was an OverflowError traceback)
    for since in ("999999999d", "99999999999d"):
        assert main(["log", "stats", "--since", since, "--json"]) == 0
        assert {s["model_version"]: s["n"] for s in _json_lines(capsys.readouterr().out)} == {"1": 2, "2": 3}
    for bad in ("0001-01-01", "9999-01-01"):
        with pytest.raises(SystemExit) as exit_info:
            main(["log", "stats", "--since", bad])
        assert exit_info.value.code == 2 and "time out of range" in capsys.readouterr().err
    if backend == "table":
        keeper.client.command(f"DROP DATABASE IF EXISTS {settings.database}")
    keeper.close()
