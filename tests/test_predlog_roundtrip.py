"""Writer → reader on both backends, and the same reader SQL over the table and the Parquet segments."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from conftest import migrated_reader

import predlog
from drift.columns import embedding_matrix
from predlog import PredictionRecord, PredlogSettings

SECTIONS = [
    "1 Brakes",
    "2 Steering",
    "5 Axles, wheels, tyres and suspension",
    "4 Lamps, reflectors and electrical equipment",
]
SEVERITIES = ["advisory", "minor", "major", "dangerous"]
NOW = datetime.now(UTC).replace(microsecond=0)


def make_records(n: int, seed: int = 0) -> list[PredictionRecord]:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        emb = None
        if i % 4 == 0:
            v = nrng.standard_normal(384).astype(np.float32)
            emb = (v / np.linalg.norm(v)).tolist()
        failed = i % 17 == 0
        out.append(
            PredictionRecord(
                request_id=f"req-{seed}-{i // 3}",
                item_index=-1 if failed else i % 3,
                model_name="mot-defects",
                model_version=["3", "4"][i % 2],
                slot=["production", "canary"][i % 2],
                text=f"Nearside front brake disc worn {i}",
                section="" if failed else rng.choice(SECTIONS),
                section_score=rng.random(),
                severity="" if failed else rng.choice(SEVERITIES),
                fail_probability=rng.random(),
                latency_ms=rng.uniform(1, 50),
                cache_hit=i % 5 == 0,
                backend=["torch", "onnx"][i % 2],
                device=["cpu", "cuda:0", "cpu"][i % 3],
                protocol=["v1", "v2-rest", "v2-grpc"][i % 3],
                status="server_error" if failed else "ok",
                make=None if i % 7 == 0 else rng.choice(["FORD", "VAUXHALL", "TOYOTA"]),
                model=None if i % 5 == 1 else rng.choice(["FOCUS", "CORSA", "YARIS"]),
                fuel_type=None if i % 9 == 0 else rng.choice(["PE", "DI", "EL"]),
                vehicle_age_years=None if i % 6 == 0 else rng.uniform(0, 25),
                odometer_miles=None if i % 8 == 0 else rng.uniform(0, 250_000),
                embedding=emb,
                text_hash=rng.getrandbits(64),
                ts=NOW - timedelta(seconds=n - i),
            )
        )
    return out


def write_all(settings: PredlogSettings, records: list[PredictionRecord]) -> dict:
    writer = predlog.open_writer(settings)
    for i in range(0, len(records), 37):
        writer.submit(records[i : i + 37])
    assert writer.flush(30)
    writer.close(30)
    return writer.stats()


@pytest.fixture(scope="module")
def records():
    return make_records(600)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, records):
    settings = PredlogSettings(dir=tmp_path_factory.mktemp("predlog"), batch_rows=200, flush_interval_s=0.05)
    stats = write_all(settings, records)
    reader = predlog.open_reader(settings)
    yield reader, stats
    reader.close()


@pytest.fixture(scope="module")
def table(tmp_path_factory, records):
    settings = PredlogSettings(
        clickhouse_url="chdb://memory",
        database=f"rt_{uuid.uuid4().hex[:10]}",
        dir=tmp_path_factory.mktemp("predlog"),
        batch_rows=200,
        flush_interval_s=0.05,
    )
    reader = migrated_reader(settings)  # opened first: it keeps the in-process chdb engine alive
    stats = write_all(settings, records)
    yield reader, stats
    reader.client.command(f"DROP DATABASE IF EXISTS {settings.database}")
    reader.close()


@pytest.mark.parametrize("backend", ["embedded", "table"])
def test_round_trip_with_embeddings(backend, records, request):
    reader, stats = request.getfixturevalue(backend)
    assert stats["written"] == len(records) and stats["dropped"] == 0 and stats["spool_rows"] == 0
    df = reader.window(limit=10_000)
    assert len(df) == len(records)
    got = df.sort_values(["request_id", "item_index"]).reset_index(drop=True)
    want = pd.DataFrame([_asdict(r) for r in records])
    want = want.sort_values(["request_id", "item_index"]).reset_index(drop=True)
    assert_rows_equal(got, want)

    emb = reader.window(limit=10_000, with_embeddings=True).sort_values(["request_id", "item_index"])
    src = {(r.request_id, r.item_index): r.embedding for r in records if r.embedding is not None}
    assert len(emb) == len(src)
    mat = embedding_matrix(emb)
    ref = np.array([src[(a, b)] for a, b in zip(emb["request_id"], emb["item_index"], strict=True)], np.float32)
    assert mat.shape == (len(src), 384)
    cos = (mat * ref).sum(1) / np.linalg.norm(mat, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.999


def _asdict(r: PredictionRecord) -> dict:
    return {f: getattr(r, f) for f in r.__slots__}


FLOAT32_FIELDS = ("section_score", "fail_probability", "latency_ms", "vehicle_age_years", "odometer_miles")


def _missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))


def assert_rows_equal(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Every PredictionRecord field (the embedding aside: compared by cosine) equal per row, None-aware;
    Float32 columns to float32 precision."""
    fields = [f for f in PredictionRecord.__slots__ if f != "embedding"]
    assert set(fields) <= set(got.columns), set(fields) - set(got.columns)
    for f in fields:
        for i, (g, w) in enumerate(zip(got[f].tolist(), want[f].tolist(), strict=True)):
            where = f"{f} row {i} ({want['request_id'][i]}/{want['item_index'][i]}): got {g!r}, want {w!r}"
            if _missing(w):
                assert _missing(g), where
            elif f in FLOAT32_FIELDS:
                assert not _missing(g) and float(g) == pytest.approx(float(w), rel=1e-6, abs=1e-6), where
            elif f == "text_hash":
                assert int(g) == int(w), where
            elif f == "ts":
                assert pd.Timestamp(g).to_pydatetime() == w, where
            elif f == "cache_hit":
                assert bool(g) is w, where
            else:
                assert g == w, where


def _norm(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    out = df.sort_values(keys).reset_index(drop=True)
    for c in out.columns:
        if str(out[c].dtype) == "string":
            out[c] = out[c].astype(object)
    return out


def test_same_sql_same_results_on_table_and_parquet(embedded, table, records):
    emb_reader, tab_reader = embedded[0], table[0]
    keys = ["request_id", "item_index"]
    for kwargs in (
        {"model_version": "4", "slot": "canary"},
        {"sample": 0.3},
        {"sample": 0.5, "start": NOW - timedelta(seconds=300), "end": NOW - timedelta(seconds=100)},
    ):
        a, b = emb_reader.window(**kwargs), tab_reader.window(**kwargs)
        assert 0 < len(a) < len(records)
        pd.testing.assert_frame_equal(_norm(a, keys), _norm(b, keys), check_dtype=False)
    sampled = emb_reader.window(sample=0.3)
    assert 0.15 * len(records) < len(sampled) < 0.45 * len(records)
    # a share that rounds to 1 at the 1e-6 resolution keeps every row (its bound overflowed: none)
    for reader in (emb_reader, tab_reader):
        assert len(reader.window(sample=0.9999996)) == len(reader.window()) == len(records)

    since = NOW - timedelta(hours=1)
    sa, sb = emb_reader.live_stats(since=since), tab_reader.live_stats(since=since)
    assert sa["n"].tolist() == sb["n"].tolist() == [300, 300]
    for col in ("model_version", "slot", "errors", "section_counts", "severity_counts"):
        assert sa[col].tolist() == sb[col].tolist(), col
    assert np.allclose(sa["latency_p50_ms"], sb["latency_p50_ms"], rtol=0.05)
    expected_errors = sum(r.status != "ok" for r in records if r.model_version == "3")
    assert sa.set_index("model_version").loc["3", "errors"] == expected_errors
    va, vb = (r.live_stats(since=since, by_slot=False) for r in (emb_reader, tab_reader))  # per version
    for col in ("model_version", "slots", "n", "errors"):
        assert va[col].tolist() == vb[col].tolist(), col
    assert va["n"].sum() == sa["n"].sum() and "slot" not in va.columns
    slots = [",".join(sorted(set(sa[sa.model_version == v]["slot"]))) for v in va["model_version"]]
    assert va["slots"].tolist() == slots

    pd.testing.assert_frame_equal(
        _norm(emb_reader.counts(), ["model_version"]),
        _norm(tab_reader.counts(), ["model_version"]),
        check_dtype=False,
    )
    ta, tb = emb_reader.tail(5), tab_reader.tail(5)
    assert ta["ts"].tolist() == tb["ts"].tolist() and len(ta) == 5
    q = "SELECT slot, count() AS n FROM predictions WHERE model_version = {v:String} GROUP BY slot"
    assert emb_reader.query(q, {"v": "3"}).to_dict("records") == tab_reader.query(q, {"v": "3"}).to_dict("records")


@pytest.mark.parametrize("backend", ["embedded", "table"])
def test_drift_reports_and_promotion_events(backend, request):
    reader, _ = request.getfixturevalue(backend)
    reader.insert_drift_report(
        {
            "model_version": "4",
            "slot": "canary",
            "window_start": NOW - timedelta(hours=1),
            "window_end": NOW.isoformat(),
            "n_current": 300,
            "drift_detected": True,
            "drift_share": 0.25,
            "scores": {"embedding_mmd": 0.12},
            "details": {"columns": ["section"]},
        }
    )
    reader.insert_drift_report({"model_version": "3", "slot": "production"})
    got = reader.drift_reports(model_version="4", slot="canary")
    assert len(got) == 1
    row = got.iloc[0]
    assert bool(row["drift_detected"]) and row["scores"] == {"embedding_mmd": 0.12}
    assert row["details"] == '{"columns": ["section"]}' and row["model_name"] == "mot-defects"
    assert len(reader.drift_reports()) == 2
    with pytest.raises(ValueError, match="unknown column"):
        reader.insert_drift_report({"model_version": "4", "verdict": "x"})

    reader.insert_promotion_event({"action": "canary_start", "to_version": "4", "canary_percent": 10, "success": True})
    reader.insert_promotion_event(
        {"action": "rollback", "from_version": "4", "to_version": "3", "reason": "gate failed"}
    )
    ev = reader.promotion_events(limit=10)
    assert ev["action"].tolist() == ["rollback", "canary_start"]
