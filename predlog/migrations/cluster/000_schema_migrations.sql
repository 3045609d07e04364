-- Bootstrap (cluster): replicated on every node; {cluster}/{shard}/{replica} are server macros.
CREATE TABLE IF NOT EXISTS ${db}.schema_migrations ON CLUSTER '{cluster}'
(
    version UInt32,
    name String,
    checksum String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/${db}/schema_migrations', '{replica}', applied_at)
ORDER BY version;
