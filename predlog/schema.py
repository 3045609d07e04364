"""Column sets of the three tables and their Arrow encodings (Parquet segments, spool, inserts).

The DDL lives in ``migrations/``; a test checks that it matches the columns declared here.
Embeddings are stored quantized: ``embedding_q`` Array(Int8) = round(v / scale) with
``embedding_scale`` = max|v| / 127 (measured in docs/predlog.md: 4x smaller than Float32).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

import numpy as np
import pyarrow as pa

from predlog.records import PredictionRecord

TS = pa.timestamp("ms", tz="UTC")


@dataclass(frozen=True)
class Column:
    name: str
    ch_type: str
    arrow_type: pa.DataType


PREDICTIONS: tuple[Column, ...] = (
    Column("ts", "DateTime64(3, 'UTC')", TS),
    Column("model_name", "LowCardinality(String)", pa.string()),
    Column("model_version", "LowCardinality(String)", pa.string()),
    Column("slot", "LowCardinality(String)", pa.string()),
    Column("request_id", "String", pa.string()),
    Column("item_index", "Int32", pa.int32()),
    Column("text", "String", pa.string()),
    Column("text_hash", "UInt64", pa.uint64()),
    Column("section", "LowCardinality(String)", pa.string()),
    Column("section_score", "Float32", pa.float32()),
    Column("severity", "LowCardinality(String)", pa.string()),
    Column("fail_probability", "Float32", pa.float32()),
    Column("latency_ms", "Float32", pa.float32()),
    Column("cache_hit", "Bool", pa.bool_()),
    Column("backend", "LowCardinality(String)", pa.string()),
    Column("device", "LowCardinality(String)", pa.string()),
    Column("protocol", "LowCardinality(String)", pa.string()),
    Column("status", "LowCardinality(String)", pa.string()),
    Column("make", "LowCardinality(Nullable(String))", pa.string()),
    Column("model", "LowCardinality(Nullable(String))", pa.string()),
    Column("fuel_type", "LowCardinality(Nullable(String))", pa.string()),
    Column("vehicle_age_years", "Nullable(Float32)", pa.float32()),
    Column("odometer_miles", "Nullable(Float32)", pa.float32()),
    Column("embedding_q", "Array(Int8)", pa.list_(pa.int8())),
    Column("embedding_scale", "Float32", pa.float32()),
)

DRIFT_REPORTS: tuple[Column, ...] = (
    Column("ts", "DateTime64(3, 'UTC')", TS),
    Column("model_name", "LowCardinality(String)", pa.string()),
    Column("model_version", "LowCardinality(String)", pa.string()),
    Column("slot", "LowCardinality(String)", pa.string()),
    Column("reference", "String", pa.string()),
    Column("window_start", "DateTime64(3, 'UTC')", TS),
    Column("window_end", "DateTime64(3, 'UTC')", TS),
    Column("n_current", "UInt64", pa.uint64()),
    Column("n_reference", "UInt64", pa.uint64()),
    Column("drift_detected", "Bool", pa.bool_()),
    Column("drift_share", "Float64", pa.float64()),
    Column("scores", "Map(String, Float64)", pa.map_(pa.string(), pa.float64())),
    Column("report_path", "String", pa.string()),
    Column("run_id", "String", pa.string()),
    Column("details", "String", pa.string()),
)

PROMOTION_EVENTS: tuple[Column, ...] = (
    Column("ts", "DateTime64(3, 'UTC')", TS),
    Column("model_name", "LowCardinality(String)", pa.string()),
    Column("action", "LowCardinality(String)", pa.string()),
    Column("from_version", "String", pa.string()),
    Column("to_version", "String", pa.string()),
    Column("canary_percent", "Float32", pa.float32()),
    Column("target", "LowCardinality(String)", pa.string()),
    Column("actor", "String", pa.string()),
    Column("dry_run", "Bool", pa.bool_()),
    Column("success", "Bool", pa.bool_()),
    Column("reason", "String", pa.string()),
    Column("gates", "String", pa.string()),
    Column("details", "String", pa.string()),
)

TABLES: dict[str, tuple[Column, ...]] = {
    "predictions": PREDICTIONS,
    "drift_reports": DRIFT_REPORTS,
    "promotion_events": PROMOTION_EVENTS,
}


def arrow_schema(table: str) -> pa.Schema:
    return pa.schema([pa.field(c.name, c.arrow_type) for c in TABLES[table]])


def differences(table: str, columns: Sequence[tuple[str, str]], *, extra: bool = True) -> list[str]:
    """How ``columns`` ((name, ClickHouse type) as ``system.columns`` or ``DESCRIBE`` give them) differ from
    ``table``'s declared columns: the missing ones and those of another type; columns the declaration
    lacks count only with ``extra=False`` (a newer release's column does not stop this one)."""
    found = dict(columns)
    declared = {c.name: c.ch_type for c in TABLES[table]}
    missing = [f"{name} {t}" for name, t in declared.items() if name not in found]
    mistyped = [f"{n} is {found[n]}, expected {t}" for n, t in declared.items() if n in found and found[n] != t]
    out = []
    if missing:
        out.append("missing columns " + ", ".join(missing))
    if mistyped:
        out.append("columns of another type: " + ", ".join(mistyped))
    if not extra and (unknown := [n for n in found if n not in declared]):
        out.append("undeclared columns " + ", ".join(unknown))
    return out


def structure(table: str) -> str:
    """The ``file()`` structure argument: the table's columns and types (codecs aside)."""
    return ", ".join(f"{c.name} {c.ch_type}" for c in TABLES[table])


_NO_VECTOR = np.zeros(0, dtype=np.int8)
_NO_VECTOR.flags.writeable = False


def quantize(vectors: Sequence[Sequence[float] | None]) -> tuple[list[np.ndarray | None], np.ndarray]:
    """Symmetric per-row int8 quantization; rows without a vector get an empty array and scale 0."""
    out: list[np.ndarray | None] = []
    scales = np.zeros(len(vectors), dtype=np.float32)
    for i, v in enumerate(vectors):
        if v is None or len(v) == 0:
            out.append(_NO_VECTOR)  # most rows (the sample rate is ≈ 1 %): one shared empty array
            continue
        a = np.asarray(v, dtype=np.float32)
        if not np.all(np.isfinite(a)):
            raise ValueError("embedding has non-finite values")
        m = float(np.abs(a).max())
        scale = m / 127.0 if m > 0 else 1.0
        scales[i] = scale
        out.append(np.clip(np.rint(a / scale), -127, 127).astype(np.int8))
    return out, scales


def _ts_ms(ts: datetime) -> int:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return int(ts.timestamp() * 1000)


def records_to_arrow(records: Sequence[PredictionRecord]) -> pa.Table:
    """Encode records as the ``predictions`` Arrow table (raises ValueError/TypeError on bad fields)."""
    q, scales = quantize([r.embedding for r in records])
    ms: dict[int, int] = {}  # a request's rows share one timestamp object: converted once
    stamps = [ms[id(r.ts)] if id(r.ts) in ms else ms.setdefault(id(r.ts), _ts_ms(r.ts)) for r in records]
    cols: dict[str, Any] = {
        "ts": pa.array(stamps, pa.int64()).cast(TS),
        "embedding_q": pa.array(q, pa.list_(pa.int8())),
        "embedding_scale": pa.array(scales, pa.float32()),
    }
    for c in PREDICTIONS:
        if c.name not in cols:
            cols[c.name] = pa.array(list(map(attrgetter(c.name), records)), c.arrow_type)
    return pa.Table.from_pydict(cols, schema=arrow_schema("predictions"))


def _coerce(col: Column, value: Any) -> Any:
    if value is None:
        return None
    if col.arrow_type == TS:
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if not isinstance(value, datetime):
            raise TypeError(f"{col.name}: expected a datetime, got {type(value).__name__}")
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if col.ch_type == "String" and isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    if col.ch_type.startswith("Map("):
        return {str(k): float(v) for k, v in dict(value).items()}
    return value


_DEFAULTS: dict[str, Any] = {"model_name": "mot-defects"}


def row_to_arrow(table: str, row: dict[str, Any]) -> pa.Table:
    """One drift-report / promotion-event row; unknown keys are refused, missing ones get defaults."""
    cols = TABLES[table]
    names = {c.name for c in cols}
    unknown = sorted(set(row) - names)
    if unknown:
        raise ValueError(f"{table}: unknown column(s) {unknown}; known: {sorted(names)}")
    data: dict[str, list[Any]] = {}
    for c in cols:
        v = _coerce(c, row.get(c.name, _DEFAULTS.get(c.name)))
        if v is None and c.name == "ts":
            v = datetime.now(UTC)
        if v is None:
            v = _zero(c)
        data[c.name] = [v]
    return pa.Table.from_pydict(data, schema=arrow_schema(table))


def _zero(col: Column) -> Any:
    t = col.arrow_type
    if t == TS:
        return datetime.fromtimestamp(0, UTC)
    if pa.types.is_string(t):
        return ""
    if pa.types.is_boolean(t):
        return False
    if pa.types.is_map(t):
        return {}
    return 0
