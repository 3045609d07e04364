"""The clickhouse-connect path against a real ClickHouse server (≥ 25.8), when one is configured.

Run with e.g. ``MOTLENS_CLICKHOUSE_URL=http://default@localhost:8123 MOTLENS_CLICKHOUSE_PASSWORD=…``.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from conftest import migrated_reader

import predlog
from predlog import PredictionRecord, PredlogSettings
from predlog.schema import records_to_arrow
from predlog.sinks import ClickHouseSink

URL = os.environ.get("MOTLENS_CLICKHOUSE_URL", "")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not URL or URL.startswith("chdb:"),
        reason="needs a ClickHouse server: set MOTLENS_CLICKHOUSE_URL=http(s)://… (none can be installed here)",
    ),
]


@pytest.fixture()
def server(tmp_path):
    settings = PredlogSettings(database=f"motlens_it_{uuid.uuid4().hex[:8]}", dir=tmp_path, flush_interval_s=0.05)
    reader = migrated_reader(settings)
    yield settings, reader
    reader.client.command(f"DROP DATABASE IF EXISTS {settings.database}")
    reader.close()


def _rows(n: int) -> list[PredictionRecord]:
    return [
        PredictionRecord(
            request_id=f"r{i}",
            item_index=0,
            model_name="mot-defects",
            model_version="9",
            slot=("production", "canary")[i % 2],
            text=f"brake hose chafed {i}",
            section="1 Brakes",
            severity="minor",
            latency_ms=float(i % 40),
            embedding=[0.05] * 384 if i % 5 == 0 else None,
        )
        for i in range(n)
    ]


def test_server_round_trip_stats_and_sampling(server):
    settings, reader = server
    writer = predlog.open_writer(settings)
    writer.submit(_rows(1000))
    writer.close(60)
    assert writer.stats()["written"] == 1000
    assert len(reader.window(limit=5000)) == 1000
    assert len(reader.window(with_embeddings=True)) == 200
    sampled = reader.window(sample=0.3)
    assert 200 < len(sampled) < 400
    stats = reader.live_stats(since=datetime.now(UTC) - timedelta(hours=1))
    assert stats["n"].sum() == 1000 and set(stats["slot"]) == {"production", "canary"}
    reader.insert_drift_report({"model_version": "9", "slot": "canary", "drift_detected": False})
    assert len(reader.drift_reports(model_version="9")) == 1


def test_server_deduplicates_replayed_token(server):
    settings, reader = server
    sink = ClickHouseSink(settings)
    table = records_to_arrow(_rows(100))
    sink.insert(table, "same-token")
    sink.insert(table, "same-token")
    sink.close()
    assert reader.query("SELECT count() AS n FROM predictions")["n"].tolist() == [100]
