"""The live-gate simulation (bench/live_gate_sim.py): its single-text figures unchanged, its batched
requests logged as the predictor logs them and counted as the reader counts them, and seeded batched
canaries decided by the real gate."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package

from bench import live_gate_sim as sim  # noqa: E402
from promotion import gates as g  # noqa: E402
from promotion.settings import PromoteSettings  # noqa: E402

# `python -m bench.live_gate_sim --trials 40 --sizes 2000` before batched requests existed (same seed):
# single-text draws must take the same random numbers in the same order
SINGLE_TEXT_2000 = """\
healthy, errors 0 % (as production)      n=2000: 95.0 / 5.0 / 0.0   (% pass / wait / fail)
healthy, errors 0.2 % (as production)    n=2000: 87.5 / 12.5 / 0.0   (% pass / wait / fail)
healthy, errors 0.5 % (as production)    n=2000: 72.5 / 27.5 / 0.0   (% pass / wait / fail)
errors 1 % (production 0 %)              n=2000: 0.0 / 17.5 / 82.5   (% pass / wait / fail)
errors 2 % (production 0 %)              n=2000: 0.0 / 0.0 / 100.0   (% pass / wait / fail)
model calls 2x slower                    n=2000: 0.0 / 22.5 / 77.5   (% pass / wait / fail)
"""


def test_single_text_figures_unchanged(capsys):
    sim.main(["--trials", "40", "--sizes", "2000"])
    assert capsys.readouterr().out == SINGLE_TEXT_2000


def test_parse_items():
    counts, p = sim.parse_items("1:0.5,8:0.3,32:0.2")
    assert counts.tolist() == [1, 8, 32] and p.tolist() == pytest.approx([0.5, 0.3, 0.2])
    assert sim.parse_items("1,8,32")[1].tolist() == pytest.approx([1 / 3] * 3)
    assert sim.parse_items("8")[0].tolist() == [8]
    for bad in ("0", "8:-1", "x"):
        with pytest.raises(ValueError):
            sim.parse_items(bad)


def _per_request(rows: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    req = rows["request_id"]
    return [{k: v[req == r] for k, v in rows.items() if k != "drawn_items"} for r in range(len(rows["drawn_items"]))]


def test_batched_rows_are_logged_as_the_predictor_logs_them():
    """An ok request: one row per drawn item (item_index 0…k-1), all with its latency, a cache hit per
    text; a failed one: one row, item_index -1, not ok, whatever its items (predictor/model.py)."""
    rng = np.random.default_rng(3)
    rows = sim.draw_rows(rng, 300, hit=0.5, err=0.1, items=sim.parse_items("1,8,32"))
    drawn = rows["drawn_items"]
    assert set(drawn.tolist()) == {1, 8, 32}
    failed = 0
    for k, r in zip(drawn, _per_request(rows), strict=True):
        assert len(set(r["latency_ms"].tolist())) == 1
        if r["status"][0] != "ok":
            failed += 1
            assert len(r["status"]) == 1 and r["item_index"].tolist() == [-1] and not r["cache_hit"][0]
        else:
            assert len(r["status"]) == k and r["item_index"].tolist() == list(range(k))
            assert (r["status"] == "ok").all()
    assert 15 <= failed <= 50  # 10 % of 300 requests
    ok_rows = rows["status"] == "ok"
    assert 0.45 < rows["cache_hit"][ok_rows].mean() < 0.55  # per text
    got = sim.live_requests(rows, rng)
    missed_per_request = np.bincount(rows["request_id"], weights=ok_rows & ~rows["cache_hit"]).astype(int)
    ok_requests = np.bincount(rows["request_id"], weights=~ok_rows) == 0
    assert got["requests"] == 300 and got["failed_requests"] == failed
    assert got["items"] == int(drawn[ok_requests].sum()) + failed
    assert got["missed_items"] == int((ok_rows & ~rows["cache_hit"]).sum())
    assert got["miss_requests"] == int((missed_per_request > 0).sum()) == len(got["miss_latencies"])
    assert len(got["one_miss_latencies"]) == int((missed_per_request == 1).sum())
    assert len(got["latencies"]) == 300 - failed


def test_single_text_rows():
    rows = sim.draw_rows(np.random.default_rng(0), 500, hit=0.865, err=0.02)
    assert len(rows["request_id"]) == 500 and set(rows["item_index"].tolist()) <= {0, -1}


def test_the_simulation_counts_as_the_reader_does(tmp_path):
    """The sim's :func:`live_requests` against ``PredictionLogReader.live_requests`` (the embedded
    backend's SQL) on the same batched rows."""
    import predlog
    from predlog import PredictionRecord, PredlogSettings

    rng = np.random.default_rng(11)
    rows = sim.draw_rows(rng, 120, hit=0.6, err=0.1, items=sim.parse_items("1,8,32"))
    now = datetime.now(UTC)
    records = [
        PredictionRecord(request_id=f"r{req}", item_index=int(i), model_name="mot-defects", model_version="7",
                         slot="canary", text="" if i < 0 else f"t{req}-{i}", latency_ms=float(lat),
                         cache_hit=bool(hit), status=str(status), ts=now)
        for req, i, lat, hit, status in zip(rows["request_id"], rows["item_index"], rows["latency_ms"],
                                            rows["cache_hit"], rows["status"], strict=True)
    ]  # fmt: skip
    settings = PredlogSettings(dir=tmp_path, flush_interval_s=0.02)
    reader = predlog.open_reader(settings)
    writer = predlog.open_writer(settings)
    writer.submit(records)
    assert writer.flush(60)
    writer.close(60)
    try:
        got = reader.live_requests(since=now - timedelta(minutes=5)).set_index("model_version").loc["7"]
    finally:
        reader.close()
    want = sim.live_requests(rows, rng)
    for key in ("items", "requests", "failed_requests", "miss_requests", "missed_items"):
        assert int(got[key]) == want[key], key
    for key in ("latencies", "miss_latencies", "one_miss_latencies"):
        assert sorted(map(float, got[key])) == pytest.approx(sorted(want[key]), rel=1e-6), key
    pairs = {key: sorted(zip(map(float, side["miss_pair_latencies"]), map(int, side["miss_pair_texts"]), strict=True))
             for key, side in (("got", got), ("want", want))}  # fmt: skip
    assert [t for _, t in pairs["got"]] == [t for _, t in pairs["want"]] and len(pairs["got"]) == want["miss_requests"]
    assert [lat for lat, _ in pairs["got"]] == pytest.approx([lat for lat, _ in pairs["want"]], rel=1e-6)


def _look(items: str, canary_hits: float, err: float = 0.0, slow: float = 1.0, n: int = 2000, seed: int = 0):
    rng = np.random.default_rng(seed)
    it = sim.parse_items(items)
    canary = sim.live_requests(sim.draw_rows(rng, n, canary_hits, err, slow, it), rng)
    production = sim.live_requests(sim.draw_rows(rng, 5000, 0.865, 0.0, 1.0, it), rng)
    return g.live_gate(canary, production, PromoteSettings())


def test_batched_canaries_through_the_gate():
    """Seeded looks at 2,000 batched canary requests against 5,000 production ones: a warm healthy canary
    passes, a 2× slower one and one failing 2 % of its requests fail; a cold one waits for its
    single-miss requests (its requests miss ~4 of 8 texts, production's ~1.6)."""
    assert _look("8", 0.865).status == g.PASS
    assert _look("1,8,32", 0.865).status == g.PASS
    slow = _look("8", 0.865, slow=2.0)
    assert slow.status == g.FAIL and "p99 of cache misses" in slow.detail
    errors = _look("8", 0.865, err=0.02)
    assert errors.status == g.FAIL and "error rate" in errors.detail
    cold = _look("8", 0.485)
    assert cold.status == g.WAIT and cold.values["p99_basis"] == "single misses"
    assert _look("8", 0.485, slow=2.0).status == g.WAIT  # waits, never passes, while cold


def test_a_warming_32_item_canary_through_the_gate():
    """At 80 % cache hits a 32-item canary's requests miss ~6.4 texts where production's miss ~4.4: it waited
    at every size (single misses: none); matched by missed texts it decides."""
    healthy = _look("32", 0.8)
    assert healthy.status == g.PASS and healthy.values["p99_basis"] == "matched misses", healthy.detail
    slow = _look("32", 0.8, slow=2.0)
    assert slow.status == g.FAIL and "matched by missed texts" in slow.detail, slow.detail
