"""``log tail`` and ``log count`` at any table size: tail reads the newest span that holds its rows, count
an aggregate projection (migration 004) — with the answers of a full scan."""

from __future__ import annotations

import dataclasses
import time
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from conftest import migrated_reader
from test_predlog_roundtrip import make_records, write_all

import predlog
from predlog import PredlogSettings, migrate, queries, schema
from predlog.sinks import make_client

#: newest first: 4 rows in the last hour, 16 more in the last day, 40 more in the last 31 days, 60 older
AGES = (
    [timedelta(minutes=5 + 10 * i) for i in range(4)]
    + [timedelta(hours=2 + i) for i in range(16)]
    + [timedelta(days=2, hours=7 * i) for i in range(40)]
    + [timedelta(days=40, hours=13 * i) for i in range(60)]
)


@pytest.fixture(scope="module")
def records():
    """Rows aged from now, when this module runs (not when the suite was collected: ``tail`` reads its spans
    back from the real clock, and a 35-minute-old row left the last hour in a run past 25 minutes)."""
    now = datetime.now(UTC).replace(microsecond=0)
    recs = make_records(len(AGES), seed=7)
    return [dataclasses.replace(r, ts=now - age) for r, age in zip(recs, AGES, strict=True)]


@pytest.fixture(scope="module", params=["embedded", "table"])
def reader(request, tmp_path_factory, records):
    kwargs = {"dir": tmp_path_factory.mktemp("predlog"), "batch_rows": 50, "flush_interval_s": 0.05}
    if request.param == "table":
        kwargs.update(clickhouse_url="chdb://memory", database=f"tc_{uuid.uuid4().hex[:10]}")
    settings = PredlogSettings(**kwargs)
    reader = migrated_reader(settings)
    assert write_all(settings, records)["written"] == len(records)
    yield reader
    if request.param == "table":
        reader.client.command(f"DROP DATABASE IF EXISTS {settings.database}")
    reader.close()


def _spy(reader, monkeypatch) -> list[str]:
    seen: list[str] = []
    real = reader._df

    def df(sql, params):
        seen.append(sql)
        return real(sql, params)

    monkeypatch.setattr(reader, "_df", df)
    return seen


@pytest.mark.parametrize(
    ("n", "reads"), [(1, 1), (4, 1), (5, 2), (20, 2), (21, 3), (60, 3), (61, 4), (120, 4), (500, 4)]
)
def test_tail_reads_the_newest_span_that_holds_n_rows(reader, records, monkeypatch, n, reads):
    seen = _spy(reader, monkeypatch)
    got = reader.tail(n)
    want = sorted(records, key=lambda r: r.ts, reverse=True)[:n]
    assert [(r, i) for r, i in zip(got["request_id"], got["item_index"], strict=True)] == [
        (r.request_id, r.item_index) for r in want
    ]
    assert [pd.Timestamp(t).to_pydatetime() for t in got["ts"]] == [r.ts for r in want]
    assert len(seen) == reads  # a span too short for n rows is widened; the last read has no bound
    assert all("ts >=" in sql for sql in seen[:3]) and ("ts >=" in seen[-1]) == (reads < 4)


def _wait_for_mutations(client, database: str) -> None:
    for _ in range(600):
        q = "SELECT count() FROM system.mutations WHERE database = {d:String} AND NOT is_done"
        if client.query(q, parameters={"d": database}).result_rows[0][0] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("MATERIALIZE PROJECTION did not finish in 60 s")


def _counts_plan(client, database: str) -> str:
    sql = queries.COUNTS.replace("{source}", f"{database}.predictions")
    return "\n".join(str(r[0]) for r in client.query(f"EXPLAIN projections = 1 {sql}").result_rows)


def test_count_is_answered_from_the_projection_after_an_upgrade(monkeypatch):
    """A log migrated by a release without 004 and holding rows: 004 adds the projection, builds it for
    the parts already there, and the count reads it with the full scan's answer."""
    settings = PredlogSettings(clickhouse_url="chdb://memory", database=f"pc_{uuid.uuid4().hex[:10]}")
    client = make_client(settings)
    db = settings.database
    try:
        shipped = migrate.load
        monkeypatch.setattr(migrate, "load", lambda cluster=False: [m for m in shipped(cluster) if m.version < 4])
        assert migrate.apply(client, settings) == [1, 2, 3]
        for part in range(3):  # three parts, rows of three versions and both slots, some with embeddings
            client.command(
                f"INSERT INTO {db}.predictions (ts, model_name, model_version, slot, request_id, item_index, text, "
                "embedding_q) SELECT toDateTime64('2026-11-01 00:00:00', 3, 'UTC') + number * 7 + {p:UInt32}, "
                "'mot-defects', toString(number % 3), if(number % 10 = 0, 'canary', 'production'), toString(number), "
                "0, 'x', if(number % 7 = 0, [toInt8(1), 2], []) FROM numbers(20000)",
                parameters={"p": part},
            )
        assert "p_counts" not in _counts_plan(client, db)
        monkeypatch.setattr(migrate, "load", shipped)
        assert migrate.apply(client, settings) == [4, 5]
        _wait_for_mutations(client, db)
        where = "WHERE database = {d:String} AND table = 'predictions' AND active"
        n_parts = client.query(f"SELECT count() FROM system.parts {where}", parameters={"d": db}).result_rows[0][0]
        q = f"SELECT count() FROM system.projection_parts {where} AND name = 'p_counts'"
        assert client.query(q, parameters={"d": db}).result_rows[0][0] == n_parts >= 1
        plan = _counts_plan(client, db)
        assert "ReadFromMergeTree (p_counts)" in plan, plan
        # the writer's inserts build the projection as they go (one naming a subcolumn failed every insert)
        client.insert_arrow(f"{db}.predictions", schema.records_to_arrow(make_records(40, seed=3)))

        reader = predlog.open_reader(settings)
        try:
            got = reader.counts()
            full = queries.COUNTS.replace("{source}", f"{db}.predictions") + " SETTINGS optimize_use_projections = 0"
            pd.testing.assert_frame_equal(got, client.query_df(full))
            assert got["n"].sum() == 60040 and len(got) == 6 + 2  # + versions 3 and 4 of the records
            assert got["with_embedding"].sum() == 3 * len(range(0, 20000, 7)) + len(range(0, 40, 4))
        finally:
            reader.close()
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db}")
        client.close()


def test_counts_agree_on_table_and_parquet(reader, records):
    got = reader.counts().set_index(["model_version", "slot"])
    for (version, slot), row in got.iterrows():
        mine = [r for r in records if r.model_version == version and r.slot == slot]
        assert row["n"] == len(mine) and row["with_embedding"] == sum(r.embedding is not None for r in mine)
        assert pd.Timestamp(row["last_ts"]).to_pydatetime() == max(r.ts for r in mine)
