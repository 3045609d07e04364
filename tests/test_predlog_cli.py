"""``motlens log`` on the embedded backend and on the chdb table backend."""

from __future__ import annotations

import json
import uuid

import pytest

import predlog
from motlens.cli import main
from predlog import PredictionRecord, PredlogSettings


@pytest.fixture(params=["embedded", "table"])
def logged(request, tmp_path, monkeypatch):
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path))
    monkeypatch.delenv("MOTLENS_CLICKHOUSE_URL", raising=False)
    if request.param == "table":
        monkeypatch.setenv("MOTLENS_CLICKHOUSE_URL", "chdb://memory")
        monkeypatch.setenv("MOTLENS_PREDLOG_DATABASE", f"c_{uuid.uuid4().hex[:10]}")
    settings = PredlogSettings(flush_interval_s=0.02)
    keeper = predlog.open_reader(settings)  # keeps the in-process chdb engine (and its tables) alive
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

    assert main(["log", "stats", "--since", "1h", "--json"]) == 0
    stats = {s["model_version"]: s for s in _json_lines(capsys.readouterr().out)}
    assert stats["1"]["errors"] == 3 and stats["1"]["n"] == 15
    assert stats["2"]["section_counts"] == {"5 Axles, wheels, tyres and suspension": 12}

    sql = "SELECT count() AS n FROM predictions WHERE slot = {s:String}"
    assert main(["log", "query", sql, "--param", "s=canary", "--json"]) == 0
    assert _json_lines(capsys.readouterr().out) == [{"n": 15}]

    assert main(["log", "count"]) == 0
    assert "canary" in capsys.readouterr().out


def test_log_query_refuses_writes_with_a_clear_error(logged, capsys):
    assert main(["log", "query", "DROP TABLE predictions"]) == 2
    assert "only SELECT" in capsys.readouterr().err
    assert main(["log", "count", "--json"]) == 0
    assert sum(c["n"] for c in _json_lines(capsys.readouterr().out)) == 30
