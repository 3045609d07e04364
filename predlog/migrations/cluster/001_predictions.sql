-- Cluster variant: a ReplicatedMergeTree shard table on every node and a Distributed table
-- `predictions` (sharded by request) that writers insert into and readers query (SAMPLE works).
-- Replicated tables deduplicate inserts by insert_deduplication_token without extra settings.
CREATE TABLE IF NOT EXISTS ${db}.predictions_local ON CLUSTER '{cluster}'
(
    ts DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
    model_name LowCardinality(String),
    model_version LowCardinality(String),
    slot LowCardinality(String),
    request_id String CODEC(ZSTD(1)),
    item_index Int32 CODEC(T64, ZSTD(1)),
    text String CODEC(ZSTD(3)),
    text_hash UInt64,
    section LowCardinality(String),
    section_score Float32 CODEC(ZSTD(1)),
    severity LowCardinality(String),
    fail_probability Float32 CODEC(ZSTD(1)),
    latency_ms Float32 CODEC(ZSTD(1)),
    cache_hit Bool,
    backend LowCardinality(String),
    device LowCardinality(String),
    protocol LowCardinality(String),
    status LowCardinality(String),
    make LowCardinality(Nullable(String)),
    model LowCardinality(Nullable(String)),
    fuel_type LowCardinality(Nullable(String)),
    vehicle_age_years Nullable(Float32),
    odometer_miles Nullable(Float32),
    embedding_q Array(Int8) CODEC(ZSTD(1)),
    embedding_scale Float32,
    INDEX idx_request_id request_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_text_hash text_hash TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/${db}/predictions_local', '{replica}')
PARTITION BY toDate(ts)
ORDER BY (model_name, model_version, slot, toStartOfHour(ts), cityHash64(request_id, item_index))
SAMPLE BY cityHash64(request_id, item_index)
TTL toDateTime(ts) + INTERVAL ${ttl_days} DAY DELETE
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS ${db}.predictions ON CLUSTER '{cluster}' AS ${db}.predictions_local
ENGINE = Distributed('{cluster}', ${db}, predictions_local, cityHash64(request_id));
