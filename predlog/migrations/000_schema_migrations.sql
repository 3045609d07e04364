-- Bootstrap: the record of applied migrations (always applied, never recorded itself).
CREATE TABLE IF NOT EXISTS ${db}.schema_migrations
(
    version UInt32,
    name String,
    checksum String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(applied_at)
ORDER BY version;
