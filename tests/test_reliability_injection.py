"""Hostile values through every SQL path that takes user input — ``motlens log`` flags and params, the
drift job's window reader, drift reports and promotion events — on chdb (real tables) and on the
embedded Parquet backend: injection strings are stored and matched as data, never as SQL (no error,
no extra rows, tables intact). The reader methods themselves are table-tested in test_predlog_sql.py.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from conftest import migrated_reader

import predlog
from motlens.cli import main
from predlog import PredictionRecord, PredlogSettings

HOSTILE = [
    "1' OR '1'='1",
    "x'); DROP TABLE predictions; --",
    "canary\\' UNION SELECT * FROM system.tables --",
    "{model_version:String}",
    "`production`",
    '7" OR ""="',
    "1; SELECT 1",
]
HONEST = ["1", "2"]


@pytest.fixture(scope="module", params=["chdb", "embedded"])
def logged(request, tmp_path_factory):
    """A prediction log holding one row per honest and per hostile version/slot value; yields env + reader."""
    root = tmp_path_factory.mktemp("predlog")
    env = {"MOTLENS_PREDLOG_DIR": str(root)}
    kwargs: dict = {"dir": root, "flush_interval_s": 0.02}
    if request.param == "chdb":
        db = f"inj_{uuid.uuid4().hex[:10]}"
        kwargs.update(clickhouse_url="chdb://memory", database=db)
        env.update(MOTLENS_CLICKHOUSE_URL="chdb://memory", MOTLENS_PREDLOG_DATABASE=db)
    settings = PredlogSettings(**kwargs)
    reader = migrated_reader(settings)  # first: keeps the in-process chdb engine and its tables
    writer = predlog.open_writer(settings)
    writer.submit(
        [
            PredictionRecord(
                request_id=f"r{i}",
                item_index=0,
                model_name="mot-defects",
                model_version=v,
                slot=v,
                text=v,
                make=v,
                section="1 Brakes",
                severity="major",
            )  # fmt: skip
            for i, v in enumerate(HONEST + HOSTILE)
        ]
    )
    writer.close(30)
    yield env, reader, request.param
    if request.param == "chdb":
        reader.client.command(f"DROP DATABASE IF EXISTS {settings.database}")
    reader.close()


def total_rows(reader) -> int:
    return int(reader.query("SELECT count() AS n FROM predictions")["n"][0])


def run_log(monkeypatch, capsys, env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    for k in ("MOTLENS_CLICKHOUSE_URL", "MOTLENS_PREDLOG_CLICKHOUSE_URL", "MOTLENS_PREDLOG_DATABASE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        code = main(["log", *argv])
    except SystemExit as e:  # argparse refusals
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("value", HOSTILE)
def test_motlens_log_params_and_flags_are_data(logged, monkeypatch, capsys, value):
    env, reader, _ = logged
    sql = "SELECT text FROM predictions WHERE model_version = {v:String} AND slot = {s:String}"
    code, out, err = run_log(monkeypatch, capsys, env, "query", sql, "--param", f"v={value}", "--param",
                             f"s={value}", "--json")  # fmt: skip
    assert code == 0, err
    assert [json.loads(line)["text"] for line in out.splitlines()] == [value]  # exactly its own row
    code, out, err = run_log(monkeypatch, capsys, env, "stats", "--model-name", value, "--json")
    assert code == 0 and out.strip() == "", err  # a model of that name has no rows; nothing else leaks
    code, _, err = run_log(monkeypatch, capsys, env, "stats", "--since", value)
    assert code == 2 and "--since" in err  # refused by the parser, never reaches SQL
    code, _, err = run_log(monkeypatch, capsys, env, "query", f"SELECT 1; {value}")
    assert code == 2 and "motlens log query:" in err
    assert total_rows(reader) == len(HONEST + HOSTILE)


@pytest.mark.parametrize("value", HOSTILE)
def test_drift_window_reader_takes_versions_and_slots_as_data(logged, value):
    from drift.sources import read_window
    from drift.windows import Window

    _, reader, _ = logged
    now = datetime.now(UTC)
    window = Window(now - timedelta(hours=1), now + timedelta(minutes=1))
    common = {"label": "current", "model_name": "mot-defects", "window": window, "max_rows": 100,
              "embedding_max_rows": 10}  # fmt: skip
    side = read_window(reader, model_version=value, slot=value, **common)
    assert side.rows_in_source == 1 and side.frame["text"].tolist() == [value]
    assert read_window(reader, model_version=value + "'", slot=value, **common).rows_in_source == 0
    assert read_window(reader, model_version="1", slot=value, **common).rows_in_source == 0
    assert read_window(reader, model_version=None, slot=None, **common).rows_in_source == len(HONEST + HOSTILE)


def test_drift_reports_and_promotion_events_store_hostile_values_verbatim(logged):
    _, reader, _ = logged
    now = datetime.now(UTC)
    for value in HOSTILE:
        reader.insert_drift_report(
            {"ts": now, "model_name": "mot-defects", "model_version": value, "slot": "canary", "reference": value,
             "window_start": now - timedelta(hours=1), "window_end": now, "n_current": 1, "n_reference": 1,
             "drift_detected": False, "drift_share": 0.0, "scores": {value: 0.5}, "report_path": value,
             "run_id": value, "details": {"note": value}}
        )  # fmt: skip
        reader.insert_promotion_event(
            {"ts": now, "model_name": "mot-defects", "action": "promote", "from_version": value,
             "to_version": value, "canary_percent": 10.0, "target": "local", "actor": value, "dry_run": True,
             "success": False, "reason": value, "gates": {"g": value}, "details": {"d": value}}
        )  # fmt: skip
    for value in HOSTILE:
        reports = reader.drift_reports(model_version=value, slot="canary")
        assert reports["reference"].tolist() == [value] and reports["run_id"].tolist() == [value]
    assert len(reader.drift_reports(limit=100)) == len(HOSTILE)
    events = reader.promotion_events(limit=100)
    assert sorted(events["reason"]) == sorted(HOSTILE) and sorted(events["actor"]) == sorted(HOSTILE)
    assert total_rows(reader) == len(HONEST + HOSTILE)  # predictions untouched
