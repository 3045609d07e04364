-- One row per predicted item (failed requests: item_index -1, status != 'ok').
-- Day partitions; ORDER BY serves the drift/canary scans (model, version, slot, hour) and ends in
-- the SAMPLE BY key so SAMPLE k reads ~k of the granules. Dedup window makes spool replays exactly-once.
CREATE TABLE IF NOT EXISTS ${db}.predictions
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
ENGINE = MergeTree
PARTITION BY toDate(ts)
ORDER BY (model_name, model_version, slot, toStartOfHour(ts), cityHash64(request_id, item_index))
SAMPLE BY cityHash64(request_id, item_index)
TTL toDateTime(ts) + INTERVAL ${ttl_days} DAY DELETE
SETTINGS index_granularity = 8192, non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;
