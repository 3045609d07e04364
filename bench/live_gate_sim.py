"""How often the promotion live gate passes, waits and fails: seeded draws through the real ``live_gate``.

Production: 5,000 requests, 86.5 % cache hits (hits lognormal around 0.3 ms, misses around 74 ms: the
shape of a served test bundle); the canary is cold (48.5 % hits) unless said. Figures in
docs/promotion.md ("How much traffic a step needs")::

    python -m bench.live_gate_sim --trials 600
"""

from __future__ import annotations

import argparse

import numpy as np

from promotion import gates as g
from promotion.settings import PromoteSettings


def _side(rng: np.random.Generator, n: int, hit: float, err: float, slow: float = 1.0) -> dict:
    failed = rng.random(n) < err
    missed = rng.random(n) >= hit
    lat = np.where(missed, rng.lognormal(np.log(74), 0.7, n) * slow, rng.lognormal(np.log(0.3), 1.0, n))
    ok = ~failed
    return {"items": n, "requests": n, "failed_requests": int(failed.sum()), "miss_requests": int((missed & ok).sum()),
            "latencies": lat[ok], "miss_latencies": lat[ok & missed]}  # fmt: skip


CASES = [  # label, canary error rate, production error rate, canary slowdown of model calls
    ("healthy, errors 0 % (as production)", 0.0, 0.0, 1.0),
    ("healthy, errors 0.2 % (as production)", 0.002, 0.002, 1.0),
    ("healthy, errors 0.5 % (as production)", 0.005, 0.005, 1.0),
    ("errors 1 % (production 0 %)", 0.01, 0.0, 1.0),
    ("errors 2 % (production 0 %)", 0.02, 0.0, 1.0),
    ("model calls 2x slower", 0.0, 0.0, 2.0),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=600)
    ap.add_argument("--sizes", default="200,600,2000", help="canary requests per look")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng, settings = np.random.default_rng(args.seed), PromoteSettings()
    for label, err_c, err_p, slow in CASES:
        cells = []
        for n in map(int, args.sizes.split(",")):
            seen = {"pass": 0, "wait": 0, "fail": 0}
            for _ in range(args.trials):
                r = g.live_gate(_side(rng, n, 0.485, err_c, slow), _side(rng, 5000, 0.865, err_p), settings)
                seen[r.status] += 1
            shares = " / ".join(f"{100 * seen[k] / args.trials:.1f}" for k in ("pass", "wait", "fail"))
            cells.append(f"n={n}: {shares}")
        print(f"{label:40s} " + "   ".join(cells) + "   (% pass / wait / fail)", flush=True)


if __name__ == "__main__":
    main()
