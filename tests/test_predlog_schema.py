"""DDL migrations on the real ClickHouse engine (chdb through clickhouse-connect)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import uuid

import pytest

from predlog import migrate, schema
from predlog.settings import PredlogSettings
from predlog.sinks import make_client


@pytest.fixture()
def chdb_db():
    settings = PredlogSettings(clickhouse_url="chdb://memory", database=f"t_{uuid.uuid4().hex[:12]}")
    client = make_client(settings)
    yield client, settings
    client.command(f"DROP DATABASE IF EXISTS {settings.database}")
    client.close()


def test_migrations_apply_once_and_match_schema(chdb_db):
    client, settings = chdb_db
    assert migrate.apply(client, settings) == [1, 2, 3, 4, 5]
    assert migrate.apply(client, settings) == []
    for table in schema.TABLES:
        desc = client.query_df(f"DESCRIBE {settings.database}.{table}")
        assert schema.differences(table, list(zip(desc["name"], desc["type"], strict=True)), extra=False) == []
    migrate.verify(client, settings.database)  # the same comparison, as readers and the writer run it
    ddl = client.query(
        "SELECT sorting_key, sampling_key, partition_key FROM system.tables "
        "WHERE database = {d:String} AND name = 'predictions'",
        parameters={"d": settings.database},
    ).result_rows[0]
    assert ddl[1] == "cityHash64(request_id, item_index)"
    assert ddl[1] in ddl[0] and ddl[0].startswith("model_name, model_version, slot")
    assert ddl[2] == "toDate(ts)"
    create = client.command(f"SHOW CREATE TABLE {settings.database}.predictions")
    assert f"toIntervalDay({settings.ttl_days})" in create and "CODEC(ZSTD(3))" in create


def test_changed_migration_is_refused(chdb_db):
    client, settings = chdb_db
    migrate.apply(client, settings)
    client.insert(
        f"{settings.database}.schema_migrations",
        [[2, "drift_reports", "0" * 64]],
        column_names=["version", "name", "checksum"],
    )
    with pytest.raises(migrate.SchemaError, match="002_drift_reports changed"):
        migrate.apply(client, settings)


def test_cluster_variant_parses_and_uses_replicated_distributed(chdb_db):
    client, _ = chdb_db
    migrations = migrate.load(cluster=True)
    assert [m.version for m in migrations] == [m.version for m in migrate.load(cluster=False)]
    engines = []
    for m in migrations:
        for stmt in m.statements("motlens", 90):
            formatted = client.query("SELECT formatQuery({q:String})", parameters={"q": stmt}).result_rows[0][0]
            assert "ON CLUSTER `{cluster}`" in formatted
            engines.append(formatted)
    text = "\n".join(engines)
    assert "ReplicatedMergeTree('/clickhouse/tables/{shard}/motlens/predictions_local', '{replica}')" in text
    assert "Distributed('{cluster}', motlens, predictions_local" in text


def test_parquet_source_has_the_table_types(chdb_db, tmp_path):
    """The embedded file() source exposes exactly the server table's columns and types."""
    from predlog.reader import ParquetSource

    client, _ = chdb_db
    source = ParquetSource(tmp_path)
    for table in schema.TABLES:
        desc = client.query_df(f"DESCRIBE {source.ref(table)}")
        assert schema.differences(table, list(zip(desc["name"], desc["type"], strict=True)), extra=False) == []


#: the statements' checksums of the shipped migrations: a release that changes one of them breaks every
#: deployment that applied it (write a new migration instead); comments and layout do not count
SHIPPED = {
    (False, 1): "47106bbe4a2209efb703e47c2f4a44b387d15d3523fcdf245728ec062cacf879",
    (False, 2): "e23ab7764f4bedc4b51868de0423fe3c6005d1f69f57418dcb616a9eda7e5fa7",
    (False, 3): "365c4231aa77b4ff18d939a25af7d624175afe0d05f0d6c4d9294271e8570202",
    (True, 1): "43394e301fa7444fcb33195d0c6c377c80b9d8d0cf554276894d9b0dd5874ca4",
    (True, 2): "2a711f3dee8ee666ec7e3e1054919afbbc3b316733c68c15f26727b25720c107",
    (True, 3): "b736226bccf6437223decc58f38ef481d8503d60c103b160078781acab3d565b",
    (False, 4): "1efa8ec6bdb0357f5209316d639f9fe2fdfd1bffff4fe80f7ec20c380235d214",
    (True, 4): "0e99daa091eb94ce01d429c587e4b298d5e963d21c05ea7e970c636ff7d61803",
    (False, 5): "262e9f1a1ebb5656e57e57b27af9837117fafa043ab769b626908cc1f75e78b9",
    (True, 5): "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
}


def test_shipped_migration_checksums_are_pinned():
    got = {(cluster, m.version): m.checksum for cluster in (False, True) for m in migrate.load(cluster)[1:]}
    assert got == SHIPPED
    # every ledger an older release wrote (sha256 of the raw file: migrations 1-3) maps to these same statements
    assert sorted(migrate.LEGACY_CHECKSUMS.values()) == sorted(v for (_, n), v in SHIPPED.items() if n <= 3)


def _edit_comment(monkeypatch):
    """A release that only rewords a comment (and re-indents a line) of 001_predictions.sql."""
    shipped = migrate.load

    def load(cluster=False):
        return [
            dataclasses.replace(
                m,
                sql=m.sql.replace("-- One row per predicted item", "-- One row per predicted item (reworded)")
                .replace("    ts DateTime64", "  ts  DateTime64")
                .replace("slot LowCardinality(String),", "slot LowCardinality(String), -- the serving slot"),
            )
            if m.version == 1
            else m
            for m in shipped(cluster)
        ]

    monkeypatch.setattr(migrate, "load", load)


def test_a_comment_edit_is_not_a_changed_migration(chdb_db, monkeypatch):
    client, settings = chdb_db
    assert migrate.apply(client, settings) == [1, 2, 3, 4, 5]
    _edit_comment(monkeypatch)
    assert migrate.apply(client, settings) == []
    migrate.check(client, settings)


def test_a_ledger_written_by_an_older_release_is_accepted(chdb_db, monkeypatch):
    """Ledgers written before the checksum covered statements only hold sha256(raw file): an in-place
    upgrade (and then a comment edit) must not refuse them."""
    client, settings = chdb_db
    migrate.apply(client, settings)
    legacy = [[m.version, m.name, hashlib.sha256(m.sql.encode()).hexdigest()] for m in migrate.load()[1:]]
    client.command(f"TRUNCATE TABLE {settings.database}.schema_migrations")
    client.insert(f"{settings.database}.schema_migrations", legacy, column_names=["version", "name", "checksum"])
    assert migrate.apply(client, settings) == []
    _edit_comment(monkeypatch)
    assert migrate.apply(client, settings) == []


def test_nothing_pending_runs_no_ddl_and_a_reader_never_migrates(chdb_db):
    client, settings = chdb_db
    readonly = make_client(settings, settings={"readonly": 1})
    try:
        with pytest.raises(migrate.SchemaError, match="motlens log migrate"):  # behind: said, not fixed
            migrate.check(readonly, settings)
        assert migrate.apply(client, settings) == [1, 2, 3, 4, 5]
        assert migrate.apply(readonly, settings) == []  # a read-only user: SELECTs only
        migrate.check(readonly, settings)
    finally:
        readonly.close()


def test_a_reader_on_a_database_behind_fails_with_what_to_do(chdb_db):
    import predlog

    client, settings = chdb_db
    with pytest.raises(migrate.SchemaError, match=r"pending: 001_predictions, 002_drift_reports.*motlens log migrate"):
        predlog.open_reader(settings)
    assert client.query(f"EXISTS TABLE {settings.database}.predictions").result_rows[0][0] == 0


@pytest.mark.parametrize("table", ["predictions", "drift_reports"])
def test_a_table_dropped_after_its_migration_is_created_again(chdb_db, table, monkeypatch, capsys):
    """The ledger said nothing was pending, so no DDL ran and the check refused the missing table, telling
    to run `motlens log migrate`, which failed the same way: no writer could start again."""
    from motlens.cli import main

    client, settings = chdb_db
    assert migrate.apply(client, settings) == [1, 2, 3, 4, 5]
    mutations = f"SELECT count() FROM system.mutations WHERE database = '{settings.database}'"
    rebuilt = client.query(mutations).result_rows[0][0]
    client.command(f"DROP TABLE {settings.database}.{table}")
    with pytest.raises(migrate.SchemaError, match=rf"{table} does not exist .*`motlens log migrate`.*create it again"):
        migrate.check(client, settings)  # a reader says what to do
    with pytest.raises(migrate.SchemaError, match="does not exist"):
        migrate.apply(client, settings)  # the writer's: a table renamed away for maintenance is not replaced
    monkeypatch.setenv("MOTLENS_CLICKHOUSE_URL", settings.clickhouse_url)
    monkeypatch.setenv("MOTLENS_PREDLOG_DATABASE", settings.database)
    assert main(["log", "migrate"]) == 0  # the command the message names does it; the ledger has it already
    assert "none pending" in capsys.readouterr().out
    migrate.check(client, settings)
    assert client.query(f"EXISTS TABLE {settings.database}.{table}").result_rows[0][0] == 1
    if table == "predictions":  # recreated with its projection (migration 004 ran again, on the empty table)
        ddl = client.query(f"SHOW CREATE TABLE {settings.database}.predictions").result_rows[0][0]
        assert "PROJECTION p_counts" in ddl
    else:  # the live predictions table's projection was not rebuilt (a mutation over the whole table)
        assert client.query(mutations).result_rows[0][0] == rebuilt
    ledger = f"SELECT version FROM {settings.database}.schema_migrations ORDER BY version"
    assert [r[0] for r in client.query(ledger).result_rows] == [1, 2, 3, 4, 5]  # nothing recorded twice


OLDER = """CREATE TABLE {db}.predictions (ts DateTime64(3, 'UTC'), model_name LowCardinality(String),
 model_version LowCardinality(String), slot LowCardinality(String), request_id String, item_index Int64,
 text String, text_hash UInt64, section LowCardinality(String), section_score Float32,
 severity LowCardinality(String), fail_probability Float32, latency_ms Float32,
 backend LowCardinality(String), device LowCardinality(String), protocol LowCardinality(String),
 status LowCardinality(String), make LowCardinality(Nullable(String)), model LowCardinality(Nullable(String)),
 fuel_type LowCardinality(Nullable(String)), vehicle_age_years Nullable(Float32), odometer_miles Nullable(Float32))
 ENGINE = MergeTree ORDER BY (model_name, ts)"""


def test_an_older_predictions_table_is_refused_not_recorded(chdb_db):
    import predlog

    client, settings = chdb_db
    client.command(f"CREATE DATABASE IF NOT EXISTS {settings.database}")
    client.command(OLDER.format(db=settings.database))
    want = r"predictions: missing columns cache_hit Bool, embedding_q Array\(Int8\), embedding_scale Float32; " \
        r"columns of another type: item_index is Int64, expected Int32"  # fmt: skip
    with pytest.raises(migrate.SchemaError, match=want):
        migrate.apply(client, settings)
    assert client.query(f"SELECT count() FROM {settings.database}.schema_migrations").result_rows[0][0] == 0
    with pytest.raises(migrate.SchemaError, match=want):
        migrate.apply(client, settings)  # still refused: nothing recorded it as migrated
    with pytest.raises(migrate.SchemaError, match="pending"):
        predlog.open_reader(settings)
    client.insert(
        f"{settings.database}.schema_migrations",
        [[m.version, m.name, m.checksum] for m in migrate.load()[1:]],
        column_names=["version", "name", "checksum"],
    )  # a ledger that says otherwise (as the old code wrote it) does not hide the mismatch
    with pytest.raises(migrate.SchemaError, match=want):
        predlog.open_reader(settings)
    with pytest.raises(migrate.SchemaError, match=want):
        migrate.apply(client, settings)


def _ttl(client, settings) -> str:
    return client.command(f"SHOW CREATE TABLE {settings.database}.predictions")


def test_a_changed_ttl_is_applied_by_migrate_and_warned_about_by_the_writer(chdb_db, caplog, monkeypatch, capsys):
    from motlens.cli import main

    client, settings = chdb_db
    migrate.apply(client, settings)
    assert "toIntervalDay(400)" in _ttl(client, settings)
    shorter = settings.model_copy(update={"ttl_days": 30})
    with caplog.at_level(logging.WARNING, logger="predlog.migrate"):
        assert migrate.apply(client, shorter) == []  # the writer's auto-migrate
    assert "TTL of 400 days but MOTLENS_PREDLOG_TTL_DAYS is 30" in caplog.text
    assert "toIntervalDay(400)" in _ttl(client, settings)
    for key, value in {"MOTLENS_CLICKHOUSE_URL": "chdb://memory", "MOTLENS_PREDLOG_DATABASE": settings.database,
                       "MOTLENS_PREDLOG_TTL_DAYS": "30"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    assert main(["log", "migrate"]) == 0
    assert "predictions TTL changed from 400 to 30 days" in capsys.readouterr().out
    assert "toIntervalDay(30)" in _ttl(client, settings)
    assert migrate.table_ttl_days(client, shorter) == 30 and migrate.sync_ttl(client, shorter, modify=True) is None


def test_only_projections_indexes_and_settings_are_optional_in_both_variants():
    for cluster in (False, True):
        assert {m.version for m in migrate.load(cluster) if m.optional} == {4, 5}, cluster


def test_a_pending_optional_migration_is_warned_about_not_refused(chdb_db, monkeypatch, caplog, capsys):
    """Between upgrading the jobs and `motlens log migrate`, a pending 004 (a projection for `log count`)
    made every reader refuse the log: the drift job exited 2, promotion read nothing. Required ones still
    refuse; the writer's auto-migrate applies it."""
    import predlog
    from motlens.cli import main
    from predlog.records import PredictionRecord

    client, settings = chdb_db
    db = settings.database
    shipped = migrate.load
    monkeypatch.setattr(migrate, "load", lambda cluster=False: [m for m in shipped(cluster) if m.version < 4])
    assert migrate.apply(client, settings) == [1, 2, 3]  # the log as a release before 004 left it
    monkeypatch.setattr(migrate, "load", shipped)
    rows = [PredictionRecord(request_id=f"r{i}", item_index=0, model_name="mot-defects", model_version="1",
                             slot="production", text="brake pipe corroded") for i in range(5)]  # fmt: skip
    client.insert_arrow(f"{db}.predictions", schema.records_to_arrow(rows))
    with caplog.at_level(logging.WARNING, logger="predlog.migrate"):
        reader = predlog.open_reader(settings)
    try:
        assert reader.counts()["n"].sum() == 5 and reader.drift_reports().empty
    finally:
        reader.close()
    assert f"database {db} lacks optional migration 004_predictions_counts" in caplog.text
    assert "run `motlens log migrate`" in caplog.text
    monkeypatch.setenv("MOTLENS_CLICKHOUSE_URL", "chdb://memory")
    monkeypatch.setenv("MOTLENS_PREDLOG_DATABASE", db)
    assert main(["log", "count", "--json"]) == 0 and '"n":5' in capsys.readouterr().out

    required = dataclasses.replace(shipped()[3], version=6, name="a_column")  # 003's statements, not optional
    monkeypatch.setattr(migrate, "load", lambda cluster=False: [*shipped(cluster), required])
    pending = r"pending: 004_predictions_counts, 005_promotion_events_dedup, 006_a_column.*log migrate"
    with pytest.raises(migrate.SchemaError, match=pending):
        predlog.open_reader(settings)
    monkeypatch.setattr(migrate, "load", shipped)
    assert migrate.apply(client, settings) == [4, 5]  # the writer with auto-migrate applies them as before
    caplog.clear()
    predlog.open_reader(settings).close()
    assert "optional migration" not in caplog.text


def test_rows_sharing_a_timestamp_object_and_rows_without_a_vector_encode_row_by_row():
    """The predictor gives a request's rows one timestamp object and most rows no embedding; the
    encoder converts each timestamp object once and shares one empty vector: every row keeps its own."""
    from datetime import UTC, datetime, timedelta

    from predlog.records import PredictionRecord

    t1 = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)
    t2, naive = t1 + timedelta(milliseconds=5), datetime(2026, 11, 30, 13, 0, 0)  # naive: read as UTC
    rows = [
        PredictionRecord("r1", 0, "mot-defects", "1", "production", "a", ts=t1),
        PredictionRecord("r1", 1, "mot-defects", "1", "production", "b", ts=t1, embedding=[0.6, -0.8]),
        PredictionRecord("r2", 0, "mot-defects", "1", "production", "c", ts=t2),
        PredictionRecord("r3", 0, "mot-defects", "1", "production", "d", ts=naive),
    ]
    table = schema.records_to_arrow(rows)
    assert table.column("ts").to_pylist() == [
        t1.replace(microsecond=123000), t1.replace(microsecond=123000), t2.replace(microsecond=128000),
        naive.replace(tzinfo=UTC),
    ]  # fmt: skip
    assert table.column("embedding_q").to_pylist() == [[], [95, -127], [], []]
    assert table.column("embedding_scale").to_pylist()[::2] == [0.0, 0.0]
    assert table.column("text").to_pylist() == ["a", "b", "c", "d"]
