"""The prediction log: schema, writers (ClickHouse / local Parquet) and readers."""
