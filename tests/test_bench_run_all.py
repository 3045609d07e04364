"""How ``bench.run_all`` turns rounds into the issue-4 verdicts (no model, no server)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package

from bench.loadgen import LoadResult  # noqa: E402
from bench.mixes import make_mix  # noqa: E402
from bench.run_all import ceiling_shares, load_seed, summarise, target_lines  # noqa: E402


def result(system: str, mix: str, items_per_s: float, p99_ms: float = 50.0, rss: float = 400.0) -> LoadResult:
    return LoadResult(system, mix, 32, 1, 10.0, 100, 100, 0, items_per_s=items_per_s, p99_ms=p99_ms,
                      rss_max_mib=rss)  # fmt: skip


def test_novel_share_is_per_round_against_that_rounds_ceiling():
    # round 1: a slow box (ceiling 400, served 360 = 90 %); round 2: a fast one (ceiling 500, served 400 = 80 %)
    results = [result("motlens", "novel", 360), result("motlens", "novel", 400), result("naive", "novel", 50)]
    rounds = [1, 2, 2]
    ceilings = [{"texts_per_s": 400.0, "unsorted_texts_per_s": 360.0},
                {"texts_per_s": 500.0, "unsorted_texts_per_s": 400.0}]  # fmt: skip
    shares = ceiling_shares(results, rounds, ceilings)
    median, each, unsorted = shares["novel"]
    assert each == pytest.approx([0.9, 0.8]) and median == pytest.approx(0.85)
    assert unsorted == pytest.approx(1.0)
    assert "novel-bulk" not in shares
    # against the best round's ceiling alone it would read 380 / 500 = 76 %
    line = next(x for x in target_lines(summarise(results), shares) if "novel-only" in x)
    assert line.startswith("✓") and "85%" in line and "90% / 80%" in line


def test_targets_are_marked_from_the_medians():
    rows = summarise([
        result("motlens", "realistic", 1500, p99_ms=80), result("motlens", "realistic", 1300, p99_ms=110),
        result("infinity", "realistic", 160), result("naive", "realistic", 75), result("naive", "realistic", 71),
        result("motlens", "novel-bulk", 400, rss=1600),
    ])  # fmt: skip
    lines = target_lines(rows, {"novel-bulk": (0.8, [0.8], 0.95)})
    realistic, infinity, naive, rss, bulk = lines
    assert realistic.startswith("✓") and "1,400/s, p99 95 ms" in realistic  # medians of the rounds
    assert infinity.startswith("✓") and "8.8×" in infinity
    assert naive.startswith("✗") and "19.2×" in naive  # 1,400 / 73
    assert rss.startswith("✗") and "1600 MiB" in rss  # the largest RSS of any motlens load
    assert bulk.startswith("✗") and "bulk requests" in bulk and "95% of offline unsorted calls" in bulk


def test_every_system_gets_the_same_texts_in_a_load_and_loads_differ():
    """The seed was the number of loads run so far, so each system got its own Zipf hot set."""

    def texts(rnd: int, load: int) -> list[str]:
        return make_mix("realistic", 0.1, seed=load_seed(rnd, load)).take(500)

    assert texts(1, 0) == texts(1, 0)  # motlens, naive and Infinity alike
    assert texts(1, 0) != texts(1, 1) and texts(1, 0) != texts(2, 0)
    assert len({load_seed(r, i) for r in (1, 2, 3) for i in range(3)}) == 9


def test_the_ceiling_runs_on_the_servers_threads(monkeypatch):
    """The offline ceiling's threads default to the server's: a ``--threads`` passed to `motlens serve`,
    else the CPUs this process may use (it was 2 on any host: a 16-CPU server against a 2-thread ceiling)."""
    import predictor.settings
    from bench.run_all import server_threads

    monkeypatch.setattr(predictor.settings, "cgroup_cpu_count", lambda: 16)
    assert server_threads([]) == 16
    assert server_threads(["--model-workers", "2"]) == 16
    assert server_threads(["--threads", "3"]) == server_threads(["--threads=3"]) == 3
