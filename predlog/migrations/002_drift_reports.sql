-- One row per drift-job verdict (model version, slot, window).
CREATE TABLE IF NOT EXISTS ${db}.drift_reports
(
    ts DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
    model_name LowCardinality(String),
    model_version LowCardinality(String),
    slot LowCardinality(String),
    reference String,
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    n_current UInt64,
    n_reference UInt64,
    drift_detected Bool,
    drift_share Float64,
    scores Map(String, Float64),
    report_path String,
    run_id String,
    details String CODEC(ZSTD(3))
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (model_name, model_version, slot, ts);
