"""How often the promotion live gate passes, waits and fails: seeded draws through the real ``live_gate``.

Production: 5,000 requests, 86.5 % cache hits (hits lognormal around 0.3 ms, misses around 74 ms: the
shape of a served test bundle); the canary is cold (48.5 % hits) unless said. Figures in
docs/promotion.md ("How much traffic a step needs")::

    python -m bench.live_gate_sim --trials 600

Batched requests (``--items``: a fixed count, ``8``, or a mix, ``1,8,32`` equally likely or
``1:0.5,8:0.3,32:0.2`` weighted; ``--production-items`` when production's differ) are drawn as the
predictor logs them (predictor/model.py): an ok request logs one row per item, all sharing its request
id and latency, each with its own ``cache_hit`` (the cache is per text); a failed request logs one row
(item_index -1, status not ``ok``, whatever its items). The rows are then counted as
``predlog.queries.LIVE_REQUESTS`` counts them (:func:`live_requests`). A request's latency: hits only,
lognormal around 0.3 ms; with ``m`` missed texts, a model call lognormal around 74 ms plus
``--miss-ms-per-text`` (5 ms, in-server per-text cost on CPU, docs/benchmarks.md) for each further
missed text, both × the case's slowdown; plus ``--item-ms`` per further item (cache lookups, head, log
rows). With one item a request draws exactly what the single-text simulation drew (same figures).
Batched figures in docs/promotion.md ("Batched requests")::

    python -m bench.live_gate_sim --trials 600 --items 1,8,32 --canary-hits 0.865

and how warm a batched canary must be, or one missing fewer texts per request than production
(the latency test's ``matched misses``)::

    python -m bench.live_gate_sim --trials 200 --cases 0,5 --sizes 2000 --items 32 --canary-hits 0.75
    python -m bench.live_gate_sim --trials 200 --cases 0,5 --sizes 2000 --items 1 --production-items 32 \
        --canary-hits 0.865
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from promotion import gates as g
from promotion.settings import PromoteSettings

#: the reader's default ``cap`` (predlog.reader.PredictionLogReader.live_requests): latencies sampled per side
LATENCY_CAP = 20_000
HIT_MS, MISS_MS = 0.3, 74.0


def parse_items(spec: str) -> tuple[np.ndarray, np.ndarray]:
    """``"8"`` → always 8 items; ``"1,8,32"`` → each equally likely; ``"1:0.5,8:0.3,32:0.2"`` → weighted.
    Returns (counts, probabilities)."""
    counts, weights = [], []
    for part in spec.split(","):
        k, _, w = part.strip().partition(":")
        counts.append(int(k))
        weights.append(float(w) if w else 1.0)
    if not counts or min(counts) < 1 or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"items must be counts ≥ 1 with weights ≥ 0 (e.g. 8, 1,8,32 or 1:0.5,32:0.5), got {spec!r}")
    p = np.asarray(weights, float)
    return np.asarray(counts, int), p / p.sum()


def draw_rows(
    rng: np.random.Generator,
    n: int,
    hit: float,
    err: float,
    slow: float = 1.0,
    items: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    miss_ms_per_text: float = 5.0,
    item_ms: float = 0.01,
) -> dict[str, np.ndarray]:
    """The prediction-log rows of ``n`` requests (columns as in the predictions table): ``request_id``,
    ``item_index``, ``latency_ms``, ``status``, ``cache_hit``; plus ``drawn_items`` per request (what it
    asked for). ``hit``: each text's cache-hit probability; ``err``: each request's failure probability;
    ``slow``: the model calls' slowdown. Single-text draws (``items`` None or always 1) take the random
    numbers the single-text simulation took, in its order."""
    counts, p = items if items is not None else (np.array([1]), np.array([1.0]))
    k = np.full(n, counts[0]) if len(counts) == 1 else rng.choice(counts, n, p=p)
    failed = rng.random(n) < err
    text_missed = rng.random(int(k.sum())) >= hit
    miss_base, hit_base = rng.lognormal(np.log(MISS_MS), 0.7, n), rng.lognormal(np.log(HIT_MS), 1.0, n)
    req_of_text = np.repeat(np.arange(n), k)
    m = np.bincount(req_of_text, weights=text_missed, minlength=n).astype(int)
    lat = np.where(m > 0, (miss_base + np.maximum(m - 1, 0) * miss_ms_per_text) * slow, hit_base)
    lat = lat + (k - 1) * item_ms
    # ok requests: one row per item; a failed one: a single row, item_index -1, no cache hit
    rows_per = np.where(failed, 1, k)
    req = np.repeat(np.arange(n), rows_per)
    first = np.repeat(np.cumsum(rows_per) - rows_per, rows_per)
    idx = np.arange(len(req)) - first
    ok_row = ~failed[req]
    cache_hit = np.zeros(len(req), bool)
    cache_hit[ok_row] = ~text_missed[~failed[req_of_text]]  # rows and texts of ok requests, both in order
    return {
        "request_id": req,
        "item_index": np.where(ok_row, idx, -1),
        "latency_ms": lat[req],
        "status": np.where(ok_row, "ok", "server_error"),
        "cache_hit": cache_hit,
        "drawn_items": k,
    }


def live_requests(rows: dict[str, np.ndarray], rng: np.random.Generator, cap: int = LATENCY_CAP) -> dict[str, Any]:
    """One version's ``predlog.queries.LIVE_REQUESTS`` row from its log rows: a request is the rows
    sharing its request id (and latency); it failed when any row is not ``ok``, missed the ok texts
    without a cache hit; up to ``cap`` latencies sampled per array (``groupArraySample``), and up to
    ``cap`` (latency, missed texts) pairs of the ok requests with a miss (``miss_pair_latencies``,
    ``miss_pair_texts``)."""
    req = rows["request_id"]
    n = int(req.max()) + 1 if len(req) else 0
    count = np.bincount(req, minlength=n)
    present = count > 0
    ok_row = rows["status"] == "ok"
    failed = (np.bincount(req, weights=~ok_row, minlength=n) > 0)[present]
    missed = np.bincount(req, weights=ok_row & ~rows["cache_hit"], minlength=n).astype(int)[present]
    latency = np.zeros(n)
    latency[req] = rows["latency_ms"]  # every row of a request carries its latency
    latency = latency[present]
    ok = ~failed

    def sample(mask: np.ndarray) -> np.ndarray:
        lat = latency[mask]
        return lat if len(lat) <= cap else rng.choice(lat, cap, replace=False)

    samples = {k: sample(mask) for k, mask in (("latencies", ok), ("miss_latencies", ok & (missed > 0)),
                                                ("one_miss_latencies", ok & (missed == 1)))}  # fmt: skip
    # (latency, missed texts) of the ok requests with a miss: one sample of pairs, as two arrays
    paired = np.flatnonzero(ok & (missed > 0))
    if len(paired) > cap:
        paired = np.sort(rng.choice(paired, cap, replace=False))
    return {
        "items": int(count.sum()),
        "requests": int(present.sum()),
        "failed_requests": int(failed.sum()),
        "miss_requests": int((missed > 0).sum()),
        "missed_items": int(missed.sum()),
        **samples,
        "miss_pair_latencies": latency[paired],
        "miss_pair_texts": missed[paired],
        "latency_cap": cap,
    }


CASES = [  # label, canary error rate, production error rate, canary slowdown of model calls
    ("healthy, errors 0 % (as production)", 0.0, 0.0, 1.0),
    ("healthy, errors 0.2 % (as production)", 0.002, 0.002, 1.0),
    ("healthy, errors 0.5 % (as production)", 0.005, 0.005, 1.0),
    ("errors 1 % (production 0 %)", 0.01, 0.0, 1.0),
    ("errors 2 % (production 0 %)", 0.02, 0.0, 1.0),
    ("model calls 2x slower", 0.0, 0.0, 2.0),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=600)
    ap.add_argument("--sizes", default="200,600,2000", help="canary requests per look")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--items", default="1", help="items per canary request: 8, 1,8,32 or 1:0.5,8:0.3,32:0.2")
    ap.add_argument("--production-items", default=None, help="items per production request (default: --items)")
    ap.add_argument("--canary-hits", type=float, default=0.485, help="the canary's per-text cache-hit rate")
    ap.add_argument("--production-hits", type=float, default=0.865, help="production's per-text cache-hit rate")
    ap.add_argument("--production-requests", type=int, default=5000)
    ap.add_argument("--miss-ms-per-text", type=float, default=5.0, help="model time per further missed text")
    ap.add_argument("--item-ms", type=float, default=0.01, help="time per further item (lookups, head, log)")
    ap.add_argument("--cases", default=None, help="which CASES rows to run, by index (0-5, comma-separated)")
    args = ap.parse_args(argv)
    items_c = parse_items(args.items)
    items_p = parse_items(args.production_items or args.items)
    cost = {"miss_ms_per_text": args.miss_ms_per_text, "item_ms": args.item_ms}
    rng, settings = np.random.default_rng(args.seed), PromoteSettings()
    cases = CASES if args.cases is None else [CASES[int(i)] for i in args.cases.split(",")]
    for label, err_c, err_p, slow in cases:
        cells = []
        for n in map(int, args.sizes.split(",")):
            seen = {"pass": 0, "wait": 0, "fail": 0}
            for _ in range(args.trials):
                canary = draw_rows(rng, n, args.canary_hits, err_c, slow, items_c, **cost)
                prod = draw_rows(rng, args.production_requests, args.production_hits, err_p, 1.0, items_p, **cost)
                r = g.live_gate(live_requests(canary, rng), live_requests(prod, rng), settings)
                seen[r.status] += 1
            shares = " / ".join(f"{100 * seen[k] / args.trials:.1f}" for k in ("pass", "wait", "fail"))
            cells.append(f"n={n}: {shares}")
        print(f"{label:40s} " + "   ".join(cells) + "   (% pass / wait / fail)", flush=True)


if __name__ == "__main__":
    main()
