"""``live_stats`` against known data: latency quantiles (the canary p99 gate reads them), error and
cache-hit rates, mean fail probability and label counts, on every backend the reader supports."""

from __future__ import annotations

import os
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from conftest import migrated_reader

import predlog
from predlog import PredictionRecord, PredlogSettings

SERVER_URL = os.environ.get("MOTLENS_CLICKHOUSE_URL", "")
# ClickHouse's quantiles() is a reservoir sample (exact below 8,192 rows, then approximate): the
# tolerance allows for that and for Float32 storage, not for a different quantile.
REL = 0.03


def _rows(version: str, slot: str, latencies: np.ndarray, seed: int) -> list[PredictionRecord]:
    """One row per latency; every 9th a server error, every 4th a cache hit, labels cycling."""
    rng = np.random.default_rng(seed)
    now = datetime.now(UTC)
    out = []
    for i, lat in enumerate(latencies):
        failed = i % 9 == 0
        out.append(
            PredictionRecord(
                request_id=f"{version}-{i}",
                item_index=-1 if failed else 0,
                model_name="mot-defects",
                model_version=version,
                slot=slot,
                text="" if failed else f"Brake pipe corroded {i}",
                section="" if failed else ["1 Brakes", "2 Steering", "5 Axles"][i % 3],
                severity="" if failed else ["minor", "major"][i % 2],
                fail_probability=0.0 if failed else float(rng.uniform(0, 1)),
                latency_ms=float(lat),
                cache_hit=i % 4 == 0,
                status="server_error" if failed else "ok",
                ts=now - timedelta(seconds=60) + timedelta(microseconds=i),
            )
        )
    return out


def bimodal() -> np.ndarray:
    """95 fast requests and a 5 % tail at one second: p50 and p99 fall on different modes."""
    return np.array([5.0] * 95 + [1000.0] * 5)


def smooth() -> np.ndarray:
    return np.random.default_rng(7).lognormal(mean=3.0, sigma=0.8, size=3000)


@pytest.fixture(params=["embedded", "table", pytest.param("server", marks=pytest.mark.integration)])
def log(request, tmp_path):
    """(settings, reader, rows by version) after writing both distributions through the real writer."""
    if request.param == "embedded":
        settings = PredlogSettings(dir=tmp_path, flush_interval_s=0.02)
    elif request.param == "table":
        settings = PredlogSettings(
            clickhouse_url="chdb://memory", database=f"ls_{uuid.uuid4().hex[:10]}", dir=tmp_path, flush_interval_s=0.02
        )
    else:
        if not SERVER_URL or SERVER_URL.startswith("chdb:"):
            pytest.skip("needs a ClickHouse server: set MOTLENS_CLICKHOUSE_URL=http(s)://…")
        settings = PredlogSettings(database=f"motlens_ls_{uuid.uuid4().hex[:8]}", dir=tmp_path, flush_interval_s=0.02)
    reader = migrated_reader(settings)  # first: creates the tables and keeps chdb's engine alive
    data = {"2": _rows("2", "canary", bimodal(), 1), "1": _rows("1", "production", smooth(), 2)}
    writer = predlog.open_writer(settings)
    for rows in data.values():
        writer.submit(rows)
    assert writer.flush(60)
    writer.close(60)
    assert writer.stats()["written"] == sum(map(len, data.values())) and writer.stats()["dropped"] == 0
    yield reader, data
    if settings.clickhouse_url:
        reader.client.command(f"DROP DATABASE IF EXISTS {settings.database}")
    reader.close()


def _expected(rows: list[PredictionRecord]) -> dict:
    lat = np.array([r.latency_ms for r in rows], np.float32).astype(np.float64)
    ok = [r for r in rows if r.status == "ok"]
    errors = len(rows) - len(ok)
    return {
        "n": len(rows),
        "errors": errors,
        "error_rate": errors / len(rows),
        "latency_p50_ms": np.quantile(lat, 0.5),
        "latency_p95_ms": np.quantile(lat, 0.95),
        "latency_p99_ms": np.quantile(lat, 0.99),
        "mean_fail_probability": np.mean([np.float32(r.fail_probability) for r in ok]),
        # over the ok items: a failed request's row (cache_hit false) was counted as a miss
        "cache_hit_rate": np.mean([r.cache_hit for r in ok]),
        "misses": sum(not r.cache_hit for r in ok),
        "latency_miss_p99_ms": np.quantile(lat[[r.status == "ok" and not r.cache_hit for r in rows]], 0.99),
        "section_counts": dict(Counter(r.section for r in ok)),
        "severity_counts": dict(Counter(r.severity for r in ok)),
    }


def test_live_stats_match_the_logged_rows(log):
    reader, data = log
    stats = reader.live_stats(since=datetime.now(UTC) - timedelta(hours=1)).set_index("model_version")
    assert sorted(stats.index) == ["1", "2"]
    assert stats.loc["2", "slot"] == "canary" and stats.loc["1", "slot"] == "production"
    for version, rows in data.items():
        got, want = stats.loc[version], _expected(rows)
        where = f"version {version}"
        assert int(got["n"]) == want["n"] and int(got["errors"]) == want["errors"], where
        assert float(got["error_rate"]) == pytest.approx(want["error_rate"], rel=1e-9), where
        assert int(got["misses"]) == want["misses"], where
        for q in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_miss_p99_ms"):
            assert float(got[q]) == pytest.approx(want[q], rel=REL), f"{where} {q}: {got[q]} vs numpy {want[q]}"
        assert float(got["mean_fail_probability"]) == pytest.approx(want["mean_fail_probability"], rel=1e-5), where
        assert float(got["cache_hit_rate"]) == pytest.approx(want["cache_hit_rate"], rel=1e-9), where
        assert {k: int(v) for k, v in dict(got["section_counts"]).items()} == want["section_counts"], where
        assert {k: int(v) for k, v in dict(got["severity_counts"]).items()} == want["severity_counts"], where
    tail = stats.loc["2"]  # the bimodal canary: the median is fast, the p99 is the one-second tail
    assert float(tail["latency_p50_ms"]) == pytest.approx(5.0, rel=1e-6)
    assert float(tail["latency_p99_ms"]) == pytest.approx(1000.0, rel=1e-6)


def test_live_stats_since_excludes_older_rows(log):
    reader, _ = log
    assert reader.live_stats(since=datetime.now(UTC) + timedelta(minutes=1)).empty


def _requests(version: str, n: int, seed: int) -> tuple[list[PredictionRecord], dict]:
    """``n`` requests of 1–5 items (every row of a request shares its latency); every 7th request failed
    (one row, item_index -1); a request misses the cache when any of its items does."""
    rng = np.random.default_rng(seed)
    now, rows = datetime.now(UTC), []
    want: dict[str, Any] = {"items": 0, "requests": n, "failed_requests": 0, "miss_requests": 0, "missed_items": 0,
                            "latencies": [], "miss_latencies": [], "miss_pairs": []}  # fmt: skip
    for r in range(n):
        latency = float(np.float32(rng.lognormal(3.0, 0.8)))
        if r % 7 == 0:
            rows.append(PredictionRecord(request_id=f"{version}-{r}", item_index=-1, model_name="mot-defects",
                                         model_version=version, slot="canary", text="", latency_ms=latency,
                                         status="server_error", ts=now))  # fmt: skip
            want["failed_requests"] += 1
            want["items"] += 1
            continue
        hits = rng.random(int(rng.integers(1, 6))) < 0.6
        for i, hit in enumerate(hits):
            rows.append(PredictionRecord(request_id=f"{version}-{r}", item_index=i, model_name="mot-defects",
                                         model_version=version, slot="canary", text=f"t{r}-{i}", latency_ms=latency,
                                         cache_hit=bool(hit), ts=now))  # fmt: skip
        want["items"] += len(hits)
        want["latencies"].append(latency)
        want["missed_items"] += int((~hits).sum())
        if not hits.all():
            want["miss_requests"] += 1
            want["miss_latencies"].append(latency)
            want["miss_pairs"].append((latency, int((~hits).sum())))
    return rows, want


def _pairs(got) -> list[tuple[float, int]]:
    """``live_requests``' sampled (latency, missed texts) of the requests with a miss, sorted."""
    lat, texts = list(map(float, got["miss_pair_latencies"])), list(map(int, got["miss_pair_texts"]))
    assert len(lat) == len(texts)
    return sorted(zip(lat, texts, strict=True))


def test_live_requests_count_requests_not_rows(log, tmp_path):
    """What the canary gate tests: failed and missing requests counted once each however many items they
    held, and each request's latency once (a sample of at most ``cap``)."""
    reader, _ = log
    rows, want = _requests("3", 400, 5)
    settings = reader.settings
    writer = predlog.open_writer(settings)
    writer.submit(rows)
    assert writer.flush(60)
    writer.close(60)
    since = datetime.now(UTC) - timedelta(hours=1)
    got = reader.live_requests(since=since).set_index("model_version").loc["3"]
    for key in ("items", "requests", "failed_requests", "miss_requests", "missed_items"):
        assert int(got[key]) == want[key], key
    assert float(got["requests_fraction"]) == 1.0 and int(got["latency_cap"]) == 20_000
    for key in ("latencies", "miss_latencies"):
        assert sorted(map(float, got[key])) == pytest.approx(sorted(want[key]), rel=1e-6), key
    # each request with a miss once, with its latency and how many texts it missed (the gate matches by these)
    assert _pairs(got) == sorted(want["miss_pairs"]) and max(t for _, t in want["miss_pairs"]) > 1
    capped = reader.live_requests(since=since, cap=50).set_index("model_version").loc["3"]
    assert len(capped["latencies"]) == 50 and set(map(float, capped["latencies"])) <= set(want["latencies"])
    assert len(_pairs(capped)) == 50 and set(_pairs(capped)) <= set(want["miss_pairs"])  # pairs kept together
    assert reader.live_requests(since=since, until=since + timedelta(seconds=1)).empty
    # a long window keeps a hash range of request ids (bounded grouping memory), whole requests only
    part = reader.live_requests(since=since, max_requests=1000).set_index("model_version")
    assert 0.2 < float(part.loc["3", "requests_fraction"]) < 0.3  # 1,000 of ≈ 3,000+400+400 requests
    assert 40 <= int(part.loc["3", "requests"]) <= 180
    assert int(part.loc["3", "items"]) < want["items"] and set(map(float, part.loc["3", "latencies"])) <= set(
        want["latencies"]
    )
    sampled = _pairs(part.loc["3"])  # the same requests' pairs: every kept request with a miss, none other
    assert len(sampled) == int(part.loc["3", "miss_requests"]) and set(sampled) <= set(want["miss_pairs"])


def test_live_requests_sample_requests_that_share_an_id(log):
    """Review: the hash range was of request ids alone, so requests a client sent under one id were kept or
    dropped together (an error rate of 10 % read 0 %); it is of (request id, latency), the grouping key."""
    reader, _ = log
    now = datetime.now(UTC)
    rows = [PredictionRecord(request_id="nightly-batch", item_index=-1 if i % 5 == 0 else 0, model_name="mot-defects",
                             model_version="4", slot="canary", text="" if i % 5 == 0 else "t", latency_ms=10.0 + i,
                             status="server_error" if i % 5 == 0 else "ok", ts=now)
            for i in range(1000)]  # fmt: skip
    writer = predlog.open_writer(reader.settings)
    writer.submit(rows)
    assert writer.flush(60)
    writer.close(60)
    since = now - timedelta(minutes=5)
    full = reader.live_requests(since=since).set_index("model_version").loc["4"]
    assert (int(full["requests"]), int(full["failed_requests"])) == (1000, 200)
    part = reader.live_requests(since=since, max_requests=1500).set_index("model_version").loc["4"]
    n, k = int(part["requests"]), int(part["failed_requests"])
    assert 150 < n < 650 and 0.12 < k / n < 0.28, (n, k)  # a sample of the batch's requests, not all or none
