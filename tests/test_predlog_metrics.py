"""The writer's Prometheus series carry exactly the names in docs/architecture.md "Metrics"."""

from __future__ import annotations

from prometheus_client import REGISTRY, generate_latest

import predlog
from predlog import PredictionRecord, PredlogSettings

NAMES = [
    "motlens_predlog_rows_written_total",
    "motlens_predlog_rows_spilled_total",
    "motlens_predlog_rows_replayed_total",
    'motlens_predlog_rows_dropped_total{reason="queue_full"}',
    "motlens_predlog_queue_depth",
    "motlens_predlog_spool_bytes",
    "motlens_predlog_spool_held_rows",
    "motlens_predlog_insert_seconds_bucket",
]


def test_metric_names_and_counts(tmp_path):
    before = REGISTRY.get_sample_value("motlens_predlog_rows_written_total") or 0.0
    inserts = REGISTRY.get_sample_value("motlens_predlog_insert_seconds_count") or 0.0
    writer = predlog.open_writer(PredlogSettings(dir=tmp_path, queue_rows=30, flush_interval_s=30, batch_rows=1000))
    rows = [
        PredictionRecord(
            request_id=f"r{i}", item_index=0, model_name="mot-defects", model_version="1", slot="canary", text="x"
        )
        for i in range(40)
    ]
    writer.submit(rows)
    assert REGISTRY.get_sample_value("motlens_predlog_queue_depth") == 30
    writer.close(10)
    assert REGISTRY.get_sample_value("motlens_predlog_rows_written_total") - before == 30
    assert REGISTRY.get_sample_value("motlens_predlog_insert_seconds_count") - inserts == 1
    text = generate_latest(REGISTRY).decode()
    for name in NAMES:
        assert name in text, name
