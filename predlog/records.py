"""The prediction-log row: the contract between the predictor (writer) and drift/promotion (readers)."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime


@functools.lru_cache(maxsize=8192)  # MOT texts repeat (Zipf): the predictor hashes every item it serves
def text_hash(normalised_text: str) -> int:
    """Stable 64-bit hash of a normalised text (UInt64 in ClickHouse)."""
    return int.from_bytes(hashlib.blake2b(normalised_text.encode("utf-8"), digest_size=8).digest(), "big")


@dataclass(slots=True)
class PredictionRecord:
    """One predicted item (or one failed request, with ``status`` != "ok" and item_index -1)."""

    request_id: str
    item_index: int
    model_name: str
    model_version: str
    slot: str  # "production" | "canary"
    text: str
    section: str = ""
    section_score: float = 0.0
    severity: str = ""
    fail_probability: float = 0.0
    latency_ms: float = 0.0
    cache_hit: bool = False
    backend: str = ""
    device: str = ""
    protocol: str = ""  # "v1" | "v2-rest" | "v2-grpc"
    status: str = "ok"  # "ok" | "server_error" | "overloaded" | "cancelled"
    make: str | None = None
    model: str | None = None
    fuel_type: str | None = None
    vehicle_age_years: float | None = None
    odometer_miles: float | None = None
    embedding: list[float] | None = None  # present only for sampled rows
    text_hash: int = 0
    ts: datetime = field(default_factory=lambda: datetime.now(UTC))
