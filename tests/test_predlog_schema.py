"""DDL migrations on the real ClickHouse engine (chdb through clickhouse-connect)."""

from __future__ import annotations

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
    assert migrate.apply(client, settings) == [1, 2, 3]
    assert migrate.apply(client, settings) == []
    for table, cols in schema.TABLES.items():
        desc = client.query_df(f"DESCRIBE {settings.database}.{table}")
        assert list(zip(desc["name"], desc["type"], strict=True)) == [(c.name, c.ch_type) for c in cols]
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
    with pytest.raises(RuntimeError, match="002_drift_reports changed"):
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
    for table, cols in schema.TABLES.items():
        desc = client.query_df(f"DESCRIBE {source.ref(table)}")
        assert list(zip(desc["name"], desc["type"], strict=True)) == [(c.name, c.ch_type) for c in cols]
