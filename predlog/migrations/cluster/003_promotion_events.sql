-- Cluster variant of promotion_events.
CREATE TABLE IF NOT EXISTS ${db}.promotion_events_local ON CLUSTER '{cluster}'
(
    ts DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
    model_name LowCardinality(String),
    action LowCardinality(String),
    from_version String,
    to_version String,
    canary_percent Float32,
    target LowCardinality(String),
    actor String,
    dry_run Bool,
    success Bool,
    reason String,
    gates String CODEC(ZSTD(3)),
    details String CODEC(ZSTD(3))
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/${db}/promotion_events_local', '{replica}')
PARTITION BY toYYYYMM(ts)
ORDER BY (model_name, ts);

CREATE TABLE IF NOT EXISTS ${db}.promotion_events ON CLUSTER '{cluster}' AS ${db}.promotion_events_local
ENGINE = Distributed('{cluster}', ${db}, promotion_events_local, rand());
