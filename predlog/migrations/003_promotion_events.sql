-- One row per promotion-CLI action (canary start/set, advance, promote, rollback, gate verdicts).
CREATE TABLE IF NOT EXISTS ${db}.promotion_events
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
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (model_name, ts);
