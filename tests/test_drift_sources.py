"""Reading windows for the drift job on both prediction-log backends (Parquet + chdb, and the real
tables through clickhouse-connect's in-process chdb): row caps sample the whole window."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from conftest import migrated_reader

from drift.simulate import records, traffic
from drift.sources import Side, read_window
from drift.windows import Window

NOW = datetime.now(UTC)
DAY = Window(NOW - timedelta(hours=30), NOW - timedelta(hours=6))  # the even-traffic versions' 24 h window


def _even(version: str, n: int, *, error_every: int = 0) -> list:
    """``n`` rows of ``version`` evenly over DAY (deterministic request ids); with ``error_every`` = k
    every k-th one is a failed request (status server_error, item_index -1)."""
    from predlog import PredictionRecord

    step = (DAY.end - DAY.start) / n
    out = []
    for i in range(n):
        failed = bool(error_every) and i % error_every == 0
        out.append(PredictionRecord(
            request_id=f"even-{version}-{i}", item_index=-1 if failed else 0, model_name="mot-defects",
            model_version=version, slot="production", text="t", status="server_error" if failed else "ok",
            embedding=[0.05] * 384 if i % 2 else None, ts=DAY.start + step * (i + 0.5)))  # fmt: skip
    return out


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
    writer.submit(records(df) + [failed] + _even("2", 4000) + _even("3", 4000, error_every=2))
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
    assert len(side.frame) == 200 and (side.frame["status"] == "ok").all()  # the cap, never short of it
    span = side.frame["ts"].max() - side.frame["ts"].min()
    assert span > timedelta(hours=8)  # sampled across the window, not the oldest 200 rows
    assert len(side.embeddings) == 50 and side.embeddings.shape[1] == 384
    assert len(side.embedding_hashes) == len(side.embeddings)
    assert side.versions == ["1"]


def test_empty_window_and_other_slot(reader):
    side = read_window(reader, label="canary", model_name="mot-defects", model_version=None, slot="canary",
                       window=Window(NOW - timedelta(hours=1), NOW), max_rows=100, embedding_max_rows=10)  # fmt: skip
    assert (side.rows_in_source, len(side.frame), len(side.embeddings)) == (0, 0, 0)


def _newest_share(side: Side, hours: float) -> float:
    return float((side.frame["ts"] >= DAY.end - timedelta(hours=hours)).mean())


@pytest.mark.parametrize("max_rows", [1000, 3000])
def test_capped_sample_is_uniform_over_the_window(reader, max_rows):
    """The cap trims the hash sample uniformly, not from the newest end: the newest quarter of the
    window holds a quarter of the sample and the newest hour is in it (old: 2+ h cut off the end)."""
    side = read_window(reader, label="current", model_name="mot-defects", model_version="2", slot=None,
                       window=DAY, max_rows=max_rows, embedding_max_rows=max_rows // 4)  # fmt: skip
    assert side.rows_in_source == 4000 and side.embedding_rows_in_source == 2000
    assert len(side.frame) == max_rows
    assert side.frame["ts"].is_monotonic_increasing  # still oldest first
    assert abs(_newest_share(side, 6) - 0.25) < 0.04
    assert _newest_share(side, 1) > 0.5 / 24  # the newest hour is represented (even: 1/24)
    emb = read_window(reader, label="current", model_name="mot-defects", model_version="2", slot=None,
                      window=Window(DAY.start, DAY.end), max_rows=4000, embedding_max_rows=max_rows // 4)  # fmt: skip
    assert len(emb.embeddings) == max_rows // 4
    assert len(emb.frame) == 4000  # under the cap: the whole window


def test_error_rows_do_not_shift_or_shrink_the_sample(reader):
    """Half the rows are failed requests: the window reads ok rows only (in SQL), so the sample spans
    the window and fills the cap with ok rows (it held about half of it when errors were read and
    dropped after the cap)."""
    side = read_window(reader, label="current", model_name="mot-defects", model_version="3", slot=None,
                       window=DAY, max_rows=1000, embedding_max_rows=200)  # fmt: skip
    assert side.rows_in_source == 2000  # ok rows
    assert (side.frame["status"] == "ok").all() and 900 <= len(side.frame) <= 1000
    assert abs(_newest_share(side, 6) - 0.25) < 0.05
    assert _newest_share(side, 1) > 0.5 / 24


def test_the_count_reads_only_the_days_of_the_window(tmp_path):
    """The drift job counted a window's rows over every file of the embedded log (the window read itself
    was already limited to its days): a segment of another day that cannot be read must not matter."""
    import predlog
    from predlog import PredlogSettings

    settings = PredlogSettings(dir=tmp_path, batch_rows=1000, flush_interval_s=0.05)
    writer = predlog.open_writer(settings)
    writer.submit(_even("5", 300))
    assert writer.flush(30)
    writer.close(30)
    old = DAY.start - timedelta(days=5)
    (settings.table_dir("predictions") / f"{old:%Y%m%dT%H%M%S}-{uuid.uuid4().hex}.parquet").write_bytes(b"x" * 64)
    reader = predlog.open_reader(settings)
    try:
        side = read_window(reader, label="current", model_name="mot-defects", model_version="5", slot=None,
                           window=DAY, max_rows=100, embedding_max_rows=20)  # fmt: skip
    finally:
        reader.close()
    assert side.rows_in_source == 300 and 90 <= len(side.frame) <= 100 and side.versions == ["5"]


def test_a_window_knows_its_first_row(reader):
    """The canary comparison starts both sides at the canary's first row (drift/job.py)."""
    step = (DAY.end - DAY.start) / 4000
    read = {"label": "w", "model_name": "mot-defects", "model_version": "2", "slot": None, "max_rows": 100,
            "embedding_max_rows": 10}  # fmt: skip
    side = read_window(reader, window=DAY, **read)
    assert side.first_row is not None and abs(side.first_row - (DAY.start + step / 2)) < timedelta(milliseconds=1)
    assert read_window(reader, window=Window(NOW, NOW + timedelta(hours=1)), **read).first_row is None


def test_the_last_serve_load_of_a_version(reader):
    """The live gate counts a canary reloaded after its step (a restart) from the reload (promotion/evidence.py)."""
    from predictor.events import server_row

    assert reader.last_serve_load("9") is None
    first, later = NOW - timedelta(minutes=30), NOW - timedelta(minutes=5)
    for ts, version, action in ((first, "9", "serve_load"), (later, "9", "serve_load"),
                                (NOW, "8", "serve_load"), (NOW, "9", "serve_percent")):  # fmt: skip
        reader.insert_promotion_event(server_row(action, slot="canary", from_version=None, to_version=version,
                                                 percent=10.0, reason="", ts=ts, cause="restore"))  # fmt: skip
    assert abs(reader.last_serve_load("9") - later) < timedelta(milliseconds=1)


def test_a_reference_that_is_not_parquet_is_named(tmp_path):
    """pyarrow's message named '<Buffer>', not the file the user gave as --reference."""
    from drift.sources import read_reference_file

    bad = tmp_path / "notes.parquet"
    bad.write_text("not parquet")
    with pytest.raises(ValueError, match=f"reference {bad} is not a readable Parquet file"):
        read_reference_file(bad, "reference")


def test_a_capped_window_is_never_short_of_its_cap(reader):
    """The hash sample leaves ≈ 1.1 × the cap, by chance fewer: a window of plenty came back with, say,
    192 rows for a cap of 200, and with the cap at the minimum (allowed) the run said "insufficient"."""
    short = []
    for cap in range(100, 1000, 37):
        side = read_window(reader, label="current", model_name="mot-defects", model_version="2", slot=None,
                           window=DAY, max_rows=cap, embedding_max_rows=cap)  # fmt: skip
        if (len(side.frame), len(side.embeddings)) != (cap, cap):
            short.append((cap, len(side.frame), len(side.embeddings)))
    assert not short
