"""Reading windows for the drift job on both prediction-log backends (Parquet + chdb, and the real
tables through clickhouse-connect's in-process chdb): row caps sample the whole window."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from conftest import migrated_reader

from drift.simulate import records, traffic
from drift.sources import read_window
from drift.windows import Window

NOW = datetime.now(UTC)


def _log(settings):
    import predlog
    from predlog import PredictionRecord

    df = traffic(600, 21, end=NOW, span=timedelta(hours=10))
    df = df.assign(embedding=[np.full(384, 0.05, np.float32) if i % 3 == 0 else None for i in range(len(df))])
    failed = PredictionRecord(request_id="bad", item_index=-1, model_name="mot-defects", model_version="1",
                              slot="production", text="", status="client_error",
                              ts=NOW - timedelta(minutes=1))  # fmt: skip
    reader = migrated_reader(settings)  # first: chdb://memory tables live while a handle is open
    writer = predlog.open_writer(settings)
    writer.submit(records(df) + [failed])
    assert writer.flush(30)
    writer.close(30)
    return reader


@pytest.fixture(scope="module", params=["embedded", "table"])
def reader(request, tmp_path_factory):
    from predlog import PredlogSettings

    kw = {"dir": tmp_path_factory.mktemp("predlog"), "batch_rows": 1000, "flush_interval_s": 0.05}
    if request.param == "table":
        kw |= {"clickhouse_url": "chdb://memory", "database": f"drift_{uuid.uuid4().hex[:10]}"}
    r = _log(PredlogSettings(**kw))
    yield r
    if request.param == "table":
        r.client.command(f"DROP DATABASE IF EXISTS {kw['database']}")
    r.close()


def test_capped_window_is_a_sample_of_the_whole_window(reader):
    side = read_window(reader, label="current", model_name="mot-defects", model_version="1", slot="production",
                       window=Window(NOW - timedelta(hours=11), NOW + timedelta(seconds=1)),
                       max_rows=200, embedding_max_rows=50)  # fmt: skip
    assert side.rows_in_source == 600 and side.embedding_rows_in_source == 200  # the failed request is not counted
    assert 150 <= len(side.frame) <= 200 and (side.frame["status"] == "ok").all()
    span = side.frame["ts"].max() - side.frame["ts"].min()
    assert span > timedelta(hours=8)  # sampled across the window, not the oldest 200 rows
    assert 30 <= len(side.embeddings) <= 50 and side.embeddings.shape[1] == 384
    assert len(side.embedding_hashes) == len(side.embeddings)
    assert side.versions == ["1"]


def test_empty_window_and_other_slot(reader):
    side = read_window(reader, label="canary", model_name="mot-defects", model_version=None, slot="canary",
                       window=Window(NOW - timedelta(hours=1), NOW), max_rows=100, embedding_max_rows=10)  # fmt: skip
    assert (side.rows_in_source, len(side.frame), len(side.embeddings)) == (0, 0, 0)
