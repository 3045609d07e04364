"""Gate rules (pure functions over real-shaped inputs) and the rollout state's patches."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from motlens.bundle import BundleError
from promotion import gates as g
from promotion.rollout import (
    ANN_PROD_SHA,
    DIGEST_ENV,
    RolloutError,
    RolloutState,
    apply_merge_patch,
    merge_patch,
    state_from_isvc,
)
from promotion.settings import PromoteSettings

F1, AUC = "section_macro_f1", "fail_auc"
S = PromoteSettings(offline_metrics=[F1, AUC], offline_tolerance=0.01, min_samples=100, max_error_rate=0.02,
                    error_rate_margin=0.005, max_p99_ratio=1.5, p99_slack_ms=10)  # fmt: skip
#: the run params that name a held-out split
SPLIT = {"split.seed": "0", "split.scheme": "text-hash", "split.holdout_fraction": "0.2", "split.max_texts": "None"}


@pytest.mark.parametrize(
    ("cand", "prod", "status"),
    [
        ({F1: 0.80, AUC: 0.90}, {F1: 0.80, AUC: 0.90}, "pass"),
        ({F1: 0.795, AUC: 0.90}, {F1: 0.80, AUC: 0.90}, "pass"),  # within tolerance
        ({F1: 0.78, AUC: 0.95}, {F1: 0.80, AUC: 0.90}, "fail"),  # one metric worse
        ({AUC: 0.95}, {F1: 0.80, AUC: 0.90}, "fail"),  # missing metric
        ({F1: 0.1}, None, "pass"),  # nothing in production
    ],
)
def test_offline_gate(cand, prod, status):
    assert g.offline_gate(cand, prod, S, candidate_params=SPLIT, production_params=SPLIT).status == status


@pytest.mark.parametrize(("value", "words"), [("", "name at least one of"), ("section_macro_f1,bogus", "'bogus' not")])
def test_an_empty_or_misspelt_offline_metric_list_is_refused(monkeypatch, value, words):
    """``MOTLENS_PROMOTE_OFFLINE_METRICS=`` (or a typo) passed every canary: nothing compared, no floor checked."""
    from pydantic import ValidationError

    monkeypatch.setenv("MOTLENS_PROMOTE_OFFLINE_METRICS", value)
    with pytest.raises(ValidationError, match=words):
        PromoteSettings()

# a shuffled-label training measured on 20k generated rows (docs/training.md "Quality floors")
SHUFFLED = {"section_macro_f1": 0.0903, "severity_macro_f1": 0.2469, "fail_auc": 0.5,
            "baseline_section_macro_f1": 0.049, "baseline_severity_macro_f1": 0.1372, "baseline_fail_auc": 0.5}
REAL = {"section_macro_f1": 0.9987, "severity_macro_f1": 0.8024, "fail_auc": 0.8127,
        "baseline_section_macro_f1": 0.049, "baseline_severity_macro_f1": 0.1372, "baseline_fail_auc": 0.5}
FLOORED = PromoteSettings()  # the default offline metrics and floor margins


@pytest.mark.parametrize(
    ("prod", "words"),
    [
        (None, "no production version to compare with: floors only"),
        ({}, "production has none of"),  # production registered without run metrics
    ],
)
def test_shuffled_label_candidate_fails_the_floors_with_nothing_to_compare(prod, words):
    """Audit finding 3: a shuffled-label model passed the offline gate when production had no metrics."""
    r = g.offline_gate(SHUFFLED, prod, FLOORED, candidate_params=SPLIT, production_params=SPLIT)
    assert r.status == "fail" and "below the quality floor" in r.detail and words in r.detail, r.detail
    assert "severity_macro_f1 0.2469 < 0.3372" in r.detail and "fail_auc 0.5000 < 0.6000" in r.detail
    assert r.values["floors"]["section_macro_f1"]["baseline"] == 0.049
    ok = g.offline_gate(REAL, prod, FLOORED, candidate_params=SPLIT, production_params=SPLIT)
    assert ok.status == "pass" and "above the quality floors" in ok.detail and words in ok.detail, ok.detail


def test_floors_of_a_run_without_baselines_check_what_they_can():
    """A version registered by an older motlens (no baseline_* metrics) or by hand: the AUC floor needs no
    baseline and is checked; the macro-F1 floors are named as not checked; a run with no metrics passes
    the floors unchecked, as the comparison skips metrics production lacks."""
    old = {k: v for k, v in SHUFFLED.items() if not k.startswith("baseline_")}
    r = g.offline_gate(old, None, FLOORED, candidate_params=None, production_params=None)
    assert r.status == "fail" and "fail_auc 0.5000 < 0.6000 (0.5 + 0.1)" in r.detail
    assert "floors not checked: run has no baseline_section_macro_f1" in r.detail
    bare = g.offline_gate({}, None, FLOORED, candidate_params=None, production_params=None)
    assert bare.status == "pass" and "floors not checked: run has no section_macro_f1" in bare.detail
    off = g.offline_gate(SHUFFLED, None, PromoteSettings(floors=False), candidate_params=None, production_params=None)
    assert off.status == "pass" and "nothing checked" in off.detail


@pytest.mark.parametrize(
    ("cand_params", "prod_params", "compared"),
    [
        (SPLIT, SPLIT, True),
        ({**SPLIT, "split.seed": 0, "split.holdout_fraction": 0.2, "split.max_texts": None}, SPLIT, True),  # as strings
        ({**SPLIT, "split.holdout_fraction": "0.3"}, SPLIT, False),  # another share held out
        ({**SPLIT, "split.max_texts": "5000"}, SPLIT, False),  # another set of texts kept
        ({**SPLIT, "split.seed": "1"}, SPLIT, False),  # another seed: another held-out set
        ({**SPLIT, "split.scheme": "group"}, SPLIT, False),
        (SPLIT, {"seed": "0"}, False),  # production trained before the split was recorded
        ({}, SPLIT, False),
        (None, None, False),
    ],
)
def test_offline_comparison_only_on_the_same_held_out_split(cand_params, prod_params, compared):
    """Audit finding 2: metrics of two held-out sets differ by seed noise (0.016-0.025) beyond the 0.01
    tolerance; only a shared split makes candidate vs production evidence."""
    worse = {**REAL, "severity_macro_f1": 0.7929, "fail_auc": 0.8138}
    prod = {**REAL, "severity_macro_f1": 0.8091, "fail_auc": 0.8294}
    r = g.offline_gate(worse, prod, FLOORED, candidate_params=cand_params, production_params=prod_params)
    if compared:
        assert r.status == "fail" and "worse than production: severity_macro_f1 0.7929 < 0.8091" in r.detail
    else:
        assert r.status == "pass", r.detail
        assert "production's metrics come from another held-out split" in r.detail and "floors only" in r.detail
        assert "above the quality floors" in r.detail
    # below its floors, a candidate fails whatever production's split
    bad = g.offline_gate(SHUFFLED, prod, FLOORED, candidate_params=cand_params, production_params=prod_params)
    assert bad.status == "fail" and "below the quality floor" in bad.detail


def _side(requests, failed=0, latencies=(), miss_latencies=None, items=None):
    """A ``live_requests`` row: ``latencies`` of the ok requests (every one a cache miss unless
    ``miss_latencies`` says which)."""
    lat = np.asarray(latencies, float)
    miss = lat if miss_latencies is None else np.asarray(miss_latencies, float)
    return {"items": requests if items is None else items, "requests": requests, "failed_requests": failed,
            "miss_requests": len(miss), "latencies": lat, "miss_latencies": miss}  # fmt: skip


FAST = np.full(2000, 10.0)


@pytest.mark.parametrize(
    ("canary", "prod", "status", "words"),
    [
        (_side(50, 0, FAST[:50]), _side(2000, 0, FAST), "wait", "50 canary requests since the last step, need 100"),
        (None, _side(2000, 0, FAST), "wait", "0 canary requests"),
        # no error in 2,000 requests: bounds 0.00%–0.14%, under production 0 % + 0.5 %
        (_side(2000, 0, FAST), _side(2000, 0, FAST), "pass", "error rate 0/2000 requests = 0.00%"),
        # 100 requests, no error: the upper bound (2.64 %) does not yet show the rate under 0.5 %: wait
        (_side(100, 0, FAST[:100]), _side(2000, 0, FAST), "wait", "inconclusive, more canary traffic needed"),
        (_side(200, 10, FAST[:190]), _side(2000, 0, FAST), "fail", "error rate 10/200 requests = 5.00%"),
        # 1 % errors on 2,000 requests against production at 1.2 %: within production's + 0.5 %
        (_side(2000, 20, FAST[:1980]), _side(2000, 24, FAST[:1976]), "pass", "limit production 1.20% + 0.50%"),
        # 1.5 %: its upper bound (2.05 %) is above that limit (1.7 %), its lower one (1.09 %) under: wait
        (_side(2000, 30, FAST[:1970]), _side(2000, 24, FAST[:1976]), "wait", "bounds 1.09%–2.05%"),
        # 3 % of requests at 40 ms against a production whose p99 is 10 ms (bound 25 ms)
        (_side(1000, 0, np.r_[np.full(970, 10.0), np.full(30, 40.0)]), _side(2000, 0, FAST), "fail",
         "30/1000 requests over 1.5 × production + 10 ms = 25.0 ms"),
        # nothing to compare with: errors against the ceiling only
        (_side(1000, 0, np.full(1000, 40.0)), None, "pass", "p99 not compared: 0 production"),
    ],
)
def test_live_gate(canary, prod, status, words):
    r = g.live_gate(canary, prod, S)
    assert r.status == status and words in r.detail, r.detail


def test_failed_requests_count_once_however_many_items_they_held():
    """Audit: a failed 32-item request logs one row, an ok one 32, so the item-weighted error rate shrank
    32-fold; counted by request, 10 % failed requests fail the gate."""
    canary = _side(300, 30, FAST[:270], items=270 * 32 + 30)
    r = g.live_gate(canary, _side(2000, 0, FAST), S)
    assert r.status == "fail" and "error rate 30/300 requests = 10.00%" in r.detail, r.detail


def test_wilson_bounds():
    assert g.wilson(0, 0, 0.95) == (0.0, 1.0)
    low, high = g.wilson(0, 1000, 0.95)
    assert low == 0.0 and 0.0030 < high < 0.0037  # exact (Clopper–Pearson) 0.0030; corrected: a little above
    low, high = g.wilson(50, 1000, 0.95)
    assert low < 0.05 < high and high - low < 0.025
    # review: 1 failure in 10 requests, plain Wilson lower bound 2.26 % against an exact 0.51 %
    assert g.wilson(1, 10, 0.95)[0] < 0.01


def test_a_few_batched_requests_decide_nothing():
    """Review: 10 requests of 289 items with one cancelled were rolled back (items met the floor)."""
    canary = _side(10, 1, FAST[:9], items=289)
    r = g.live_gate(canary, _side(2000, 0, FAST), S)
    assert r.status == "wait" and "10 canary requests since the last step, need 100" in r.detail


def test_a_zero_limit_passes_without_failures_and_a_capped_sample_decides():
    """Review: ERROR_RATE_MARGIN 0 against an error-free production waited for ever; a latency share between
    the bounds of a capped sample too."""
    zero = S.model_copy(update={"error_rate_margin": 0.0})
    assert g.live_gate(_side(1000, 0, FAST[:1000]), _side(2000, 0, FAST), zero).status == "pass"
    assert g.live_gate(_side(1000, 1, FAST[:999]), _side(2000, 0, FAST), zero).status == "fail"
    lat = np.r_[np.full(1982, 10.0), np.full(18, 40.0)]  # 0.9 % over the bound: between its bounds
    capped = {**_side(2000, 0, lat), "latency_cap": 2000}
    r = g.live_gate(capped, _side(2000, 0, FAST), S)
    assert r.status == "pass" and "decided on the capped sample" in r.detail, r.detail
    assert g.live_gate(_side(2000, 0, lat), _side(2000, 0, FAST), S).status == "wait"  # below the cap: more traffic


def test_production_p99_noise_does_not_fail_an_identical_canary():
    """Review: production's p99 from 250 misses was taken as exact; an identical canary failed 34 % of looks."""
    rng = np.random.default_rng(3)

    def draw(n):
        return np.where(rng.random(n) < 0.015, rng.normal(600, 30, n), rng.lognormal(np.log(74), 0.3, n))

    fails = sum(g.live_gate(_side(2000, 0, draw(2000)), _side(250, 0, draw(250)), S).status == "fail"
                for _ in range(100))  # fmt: skip
    assert fails <= 5, fails


def test_one_slow_model_call_does_not_fail_a_warm_canary():
    """Review: 400 ok requests with one 900 ms miss failed ('1/1 requests over ...')."""
    canary = _side(400, 0, np.r_[np.full(399, 0.3), 900.0], np.array([900.0]))
    prod = _side(5000, 0, np.r_[np.full(400, 22.0), np.full(4600, 0.3)], np.full(400, 22.0))
    assert g.live_gate(canary, prod, S).status != "fail"


def test_batched_cold_canary_is_compared_like_for_like():
    """Review: a cold canary's 8-text requests miss 4 texts each, production's 1: their latencies are compared
    over the requests that missed exactly one text on both sides; without enough of those it waits (a first
    fix passed it, a 3× slower canary included)."""
    canary = {**_side(2000, 0, np.full(2000, 110.0)), "missed_items": 8000}
    prod = {**_side(5000, 0, np.full(5000, 30.0)), "missed_items": 5400}
    r = g.live_gate(canary, prod, S)
    assert r.status == "wait" and r.values["p99_basis"] == "single misses", r.detail
    prod = {**prod, "one_miss_latencies": np.full(3000, 30.0)}
    healthy = g.live_gate({**canary, "one_miss_latencies": np.full(500, 30.0)}, prod, S)
    assert healthy.status == "pass", healthy.detail
    slow = g.live_gate({**canary, "one_miss_latencies": np.full(500, 90.0)}, prod, S)
    assert slow.status == "fail" and "missing one text" in slow.detail, slow.detail
    same = {**canary, "missed_items": 2200}  # as many misses per request as production: all its misses compared
    assert g.live_gate(same, prod, S).status == "fail"


def _batched(rng, n, hits, slow=1.0, items=32, per_text=5.0):
    """A ``live_requests`` row of ``n`` ok requests of ``items`` texts, each text a cache hit with probability
    ``hits``; latencies as bench/live_gate_sim.py draws them: with ``m`` missed texts a model call lognormal
    around 74 ms plus ``per_text`` ms per further missed text, × ``slow``; hits only, around 0.3 ms."""
    m = rng.binomial(items, 1 - hits, n)
    calls = (rng.lognormal(np.log(74.0), 0.7, n) + per_text * np.maximum(m - 1, 0)) * slow
    lat, miss = np.where(m > 0, calls, rng.lognormal(np.log(0.3), 1.0, n)), m > 0
    return {"items": n * items, "requests": n, "failed_requests": 0, "miss_requests": int(miss.sum()),
            "missed_items": int(m.sum()), "latencies": lat, "miss_latencies": lat[miss],
            "one_miss_latencies": lat[m == 1], "miss_pair_latencies": lat[miss],
            "miss_pair_texts": m[miss]}  # fmt: skip


def test_a_warming_batched_canary_is_compared_by_missed_texts():
    """Sim (bench/live_gate_sim.py --items 32 --canary-hits 0.8): a 32-item canary at 80 % cache hits misses
    ~6.4 texts a request where production (86.5 %) misses ~4.4, more than CALLS_RATIO, and it makes almost
    no single-miss requests: it waited at every size, healthy or 2× slower, although production holds many
    requests that missed as many texts. Production's misses, weighted to the canary's mix of missed texts
    per request, decide; a cold canary (~16 of 32 missed, more than production ever misses) still waits."""
    rng = np.random.default_rng(5)
    prod = _batched(rng, 5000, 0.865)
    healthy = g.live_gate(_batched(rng, 3000, 0.8), prod, S)
    assert healthy.status == "pass" and healthy.values["p99_basis"] == "matched misses", healthy.detail
    assert "matched by missed texts" in healthy.detail, healthy.detail
    slow = g.live_gate(_batched(rng, 3000, 0.8, slow=2.0), prod, S)
    assert slow.status == "fail" and slow.values["p99_basis"] == "matched misses", slow.detail
    for cold in (_batched(rng, 3000, 0.485), _batched(rng, 3000, 0.485, slow=2.0)):
        r = g.live_gate(cold, prod, S)
        assert r.status == "wait" and r.values["p99_basis"] == "single misses", r.detail


def test_a_canary_making_fewer_model_calls_per_request_is_compared_by_missed_texts():
    """Sim: a single-text canary against 32-item production (traffic not split at random, or production's
    hour before standing in) was compared over all misses, production's slower multi-text calls included
    (only more calls per request than production was checked): a 2× slower canary failed 39 % of looks at
    2,000 requests, fewer the more each further text costs. Matched by missed texts it is compared with
    production's single misses."""
    rng = np.random.default_rng(6)
    prod = _batched(rng, 15000, 0.865, items=32, per_text=20.0)  # each further text costs 20 ms (CPU)
    slow = g.live_gate(_batched(rng, 4000, 0.5, slow=2.0, items=1), prod, S)
    assert slow.status == "fail" and slow.values["p99_basis"] == "matched misses", slow.detail
    healthy = g.live_gate(_batched(rng, 4000, 0.5, items=1), prod, S)
    assert healthy.status == "pass" and healthy.values["p99_basis"] == "matched misses", healthy.detail


def test_a_canary_slower_than_all_production_misses_fails_when_it_misses_fewer_texts():
    """Production's single-text calls too few to decide on (50), its two-text calls many: a single-text
    canary slower even than the two-text calls (if anything slower than its like) fails; as fast, it waits
    (the old rule compared all misses and passed it: the two-text calls are no evidence it is as fast)."""
    calls = np.r_[np.full(50, 74.0), np.full(3000, 80.0)]
    prod = {**_side(5000, 0, np.r_[calls, np.full(1950, 0.3)], calls), "missed_items": 6050,
            "one_miss_latencies": calls[:50], "miss_pair_latencies": calls,
            "miss_pair_texts": np.r_[np.full(50, 1), np.full(3000, 2)]}  # fmt: skip

    def canary(latency, n=1000):
        lat = np.full(n, latency)
        return {**_side(n, 0, lat), "missed_items": n, "one_miss_latencies": lat, "miss_pair_latencies": lat,
                "miss_pair_texts": np.full(n, 1)}  # fmt: skip

    slow = g.live_gate(canary(160.0), prod, S)  # over 1.5 × 80 + 10 ms
    assert slow.status == "fail" and slow.values["p99_basis"] == "misses", slow.detail
    assert "over all of production's misses" in slow.detail
    assert slow.values["p99_matched"]["p99_basis"] == "single misses"  # 50 production ones: too few to match
    same = g.live_gate(canary(74.0), prod, S)  # nor to pass it
    assert same.status == "wait" and same.values["p99_basis"] == "single misses", same.detail
    # a canary answering (nearly) everything from its cache: too few misses to match, compared as before
    warm = {**_side(1000, 0, np.full(1000, 0.3), np.full(5, 74.0)), "missed_items": 5,
            "miss_pair_latencies": np.full(5, 74.0), "miss_pair_texts": np.full(5, 1)}  # fmt: skip
    r = g.live_gate(warm, prod, S)
    assert r.status == "pass" and r.values["p99_basis"] == "all", r.detail


def test_matched_misses_weigh_production_by_the_canary_s_missed_texts():
    """Production's one-text calls are fast, its two-text calls slow; a canary whose requests all miss two
    texts is held to production's two-text calls (its single-miss requests: none, so it used to wait)."""
    prod = {**_side(5000, 0, np.r_[np.full(3000, 10.0), np.full(300, 50.0), np.full(1700, 0.3)],
                    np.r_[np.full(3000, 10.0), np.full(300, 50.0)]),
            "missed_items": 3600, "one_miss_latencies": np.full(3000, 10.0),
            "miss_pair_latencies": np.r_[np.full(3000, 10.0), np.full(300, 50.0)],
            "miss_pair_texts": np.r_[np.full(3000, 1), np.full(300, 2)]}  # fmt: skip

    def canary(latency, texts=2, n=1000):
        lat = np.full(n, latency)
        return {**_side(n, 0, lat), "missed_items": n * texts, "one_miss_latencies": lat if texts == 1 else lat[:0],
                "miss_pair_latencies": lat, "miss_pair_texts": np.full(n, texts)}

    r = g.live_gate(canary(50.0), prod, S)
    assert r.status == "pass" and r.values["p99_basis"] == "matched misses", r.detail
    assert r.values["production_p99_ms"] == 50.0 and r.values["p99_match"]["outside"] == 0.0
    assert g.live_gate(canary(100.0), prod, S).status == "fail"  # over 1.5 × 50 + 20 ms
    # production's 300 two-text calls stand for the canary's 1,000 requests: its bounds are those of 300
    assert r.values["p99_match"]["production_effective"] == pytest.approx(300.0)
    # a canary missing three texts a request: production never did (outside its bins), single misses: none
    r = g.live_gate(canary(50.0, texts=3), prod, S)
    assert r.status == "wait" and r.values["p99_basis"] == "single misses", r.detail
    # without the pairs (an older reader), the rules before them
    old = {k: v for k, v in canary(50.0).items() if not k.startswith("miss_pair")}
    assert g.live_gate(old, prod, S).values["p99_basis"] == "single misses"


def test_a_matched_p99_resting_on_a_few_tail_requests_passes_nothing():
    """Sim (32 items, canary at 75 % hits): production's weighted p99 leans on its thin 9–16-text bin, and its
    few tail requests there made it high in some looks, passing 0.4 % of 2× slower canaries. Weighted, a pass
    also needs the canary under the bound from the p99's lower confidence limit."""
    calls = np.r_[np.full(3000, 50.0), np.full(197, 50.0), np.full(3, 400.0)]  # 3 of 200 two-text calls slow
    prod = {**_side(5000, 0, np.r_[calls, np.full(1800, 0.3)], calls), "missed_items": 3400,
            "one_miss_latencies": calls[:3000], "miss_pair_latencies": calls,
            "miss_pair_texts": np.r_[np.full(3000, 1), np.full(200, 2)]}  # fmt: skip

    def canary(latency, n=1000):
        lat = np.full(n, latency)
        return {**_side(n, 0, lat), "missed_items": 2 * n, "one_miss_latencies": lat[:0], "miss_pair_latencies": lat,
                "miss_pair_texts": np.full(n, 2)}  # fmt: skip

    slower = g.live_gate(canary(100.0), prod, S)  # under 1.5 × 400 + 10 ms, but 2× production's usual 50 ms
    assert slower.status == "wait" and slower.values["production_p99_ms"] == 400.0, slower.detail
    assert "not passed until production's p99 is surely that high" in slower.detail, slower.detail
    r = g.live_gate(canary(55.0), prod, S)  # under 1.5 × 50 + 10 ms as well
    assert r.status == "pass" and r.values["p99_basis"] == "matched misses", r.detail


def test_a_regression_does_not_hide_behind_a_small_production_sample():
    """Review: with 200 production latencies, none over the bound, the limit became 1.79 % and a canary
    with 3 % of its requests over it passed 70 % of looks; now it needs to be under what production showed."""
    canary = _side(5000, 0, np.r_[np.full(4850, 10.0), np.full(150, 60.0)])
    r = g.live_gate(canary, _side(200, 0, FAST[:200]), S)
    assert r.status == "fail", r.detail
    assert g.live_gate(_side(5000, 0, np.r_[np.full(4925, 10.0), np.full(75, 60.0)]), _side(200, 0, FAST[:200]),
                       S).status == "wait"  # 1.5 %: over 1 %, not provably over production's 1.8 % bound  # fmt: skip


def test_the_hour_before_stands_in_test_by_test():
    """Review: a warm production (few model calls in the window) had its current error rate replaced too."""
    from promotion.evidence import _production_from

    now = {**_side(20_000, 160, FAST[:1000], np.full(50, 20.0))}
    before = {**_side(100_000, 0, FAST, np.full(1500, 20.0))}
    errors, latency, note = _production_from(now, before, S)
    assert errors is now and latency is before and "production's latencies from the hour before" in note
    thin = _side(40, 0, FAST[:40], np.full(40, 20.0))
    errors, latency, note = _production_from(thin, before, S)
    assert errors is before and latency is before and "error rate and latencies" in note
    assert _production_from(before, now, S) == (before, None, "")


@pytest.mark.parametrize(
    ("canary", "prod", "status", "basis"),
    [
        # a cold canary (half its requests model calls) against a production answering from its cache: the
        # overall latencies compared model calls with cache hits; over misses it passes
        (_side(1000, 0, np.r_[np.full(500, 24.0), np.full(500, 0.3)], np.full(500, 24.0)),
         _side(5000, 0, np.r_[np.full(400, 22.0), np.full(4600, 0.3)], np.full(400, 22.0)), "pass", "misses"),
        (_side(1000, 0, np.r_[np.full(500, 60.0), np.full(500, 0.3)], np.full(500, 60.0)),
         _side(5000, 0, np.r_[np.full(400, 22.0), np.full(4600, 0.3)], np.full(400, 22.0)), "fail", "misses"),
        # too few production misses to stand for its model calls, and the canary misses far more often: the
        # overall latencies would fail a healthy cold canary, so it waits (for production's calls, or to warm)
        (_side(1000, 0, np.r_[np.full(500, 24.0), np.full(500, 0.3)], np.full(500, 24.0)),
         _side(5000, 0, np.r_[np.full(50, 22.0), np.full(4950, 0.3)], np.full(50, 22.0)), "wait", "misses"),
        # ... but with the same share of misses they are
        (_side(2000, 0, np.r_[np.full(10, 60.0), np.full(1990, 0.3)], np.full(10, 60.0)),
         _side(5000, 0, np.r_[np.full(50, 22.0), np.full(4950, 0.3)], np.full(50, 22.0)), "pass", "all"),
        (_side(2000, 0, np.r_[np.full(60, 60.0), np.full(1940, 0.3)], np.full(60, 60.0)),
         _side(5000, 0, np.r_[np.full(50, 22.0), np.full(4950, 0.3)], np.full(50, 22.0)), "fail", "all"),
    ],
)
def test_live_gate_compares_model_calls_when_production_has_enough(canary, prod, status, basis):
    r = g.live_gate(canary, prod, S)
    assert r.status == status and r.values["p99_basis"].startswith(basis), r.detail


def test_drift_gate():
    t0 = datetime.now(UTC) - timedelta(minutes=10)

    def row(minutes, detected, status=None):
        return {"ts": t0 + timedelta(minutes=minutes), "drift_detected": detected, "drift_share": 0.5,
                "n_current": 300, "details": json.dumps({"status": status} if status else {})}

    assert g.drift_gate([], "2", t0, S).status == "wait"
    unrequired = g.drift_gate([], "2", t0, S.model_copy(update={"require_drift_report": False}))
    assert unrequired.status == "pass"  # a pass with no report behind it says so, in the recorded evidence
    assert "not required" in unrequired.detail and unrequired.values["required"] is False
    assert g.drift_gate([row(-5, True)], "2", t0, S).status == "wait"  # before the canary started
    assert g.drift_gate([row(1, True), row(2, False, "no_drift")], "2", t0, S).status == "pass"  # latest wins
    assert g.drift_gate([row(2, True), row(1, False)], "2", t0, S).status == "fail"
    assert g.drift_gate([row(1, False, "insufficient_data")], "2", t0, S).status == "wait"


def test_golden_gate_is_recorded_once():
    calls = []

    def check():
        calls.append(1)
        return False, 0.93, "min cosine 0.93"

    r = g.golden_gate({}, check)
    assert (r.status, r.values["min_cosine"]) == ("fail", 0.93)
    stored = {g.GOLDEN_TAG: json.dumps(r.to_json())}
    assert g.golden_gate(stored, check).status == "fail" and len(calls) == 1


def test_golden_gate_fails_a_bad_bundle_but_waits_out_an_outage():
    def refused():
        raise BundleError("sha256 mismatch for head/model.onnx")

    def outage():
        raise ConnectionError("registry unreachable")

    assert (r := g.golden_gate({}, refused)).status == "fail" and "sha256 mismatch" in r.detail
    assert (r := g.golden_gate({}, outage)).status == "wait" and "ConnectionError" in r.detail


def test_summarize():
    p, w, f = (g.GateResult("x", s, "") for s in ("pass", "wait", "fail"))
    assert (g.summarize([p, p]), g.summarize([p, w]), g.summarize([w, f])) == ("pass", "wait", "fail")


PIN_A, PIN_B = "a" * 64, "b" * 64
PROD_ANN = {"motlens.io/production-version": "1", "motlens.io/production-storage-uri": "s3://a"}


def _isvc(percent=None, ann=None, digest=""):
    """An InferenceService; ``digest=None`` is one created before bundle digests were pinned (no env[1])."""
    env = [{"name": "STORAGE_URI", "value": "s3://a"}]
    if digest is not None:
        env.append({"name": DIGEST_ENV, "value": digest})
    env.append({"name": "OTHER", "value": "1"})
    pred = {"containers": [{"name": "kserve-container", "image": "x", "env": env}]}
    if percent is not None:
        pred["canaryTrafficPercent"] = percent
    meta = {"name": "mot-defects", "annotations": {"keep": "me", **(ann or {})}}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": meta,
            "spec": {"predictor": pred}}


def _env(isvc):
    return isvc["spec"]["predictor"]["containers"][0]["env"]


def test_merge_patch_round_trip():
    live = _isvc(percent=100, ann={**PROD_ANN, ANN_PROD_SHA: PIN_A}, digest=PIN_A)
    state = state_from_isvc(live)
    assert (state.production_version, state.canary_active, state.percent) == ("1", False, 100)
    assert state.bundle_sha256 == state.serving_production_sha256 == PIN_A
    canary = state.with_canary("2", "s3://b", 10, PIN_B)
    patch = merge_patch(live, canary)
    assert patch["spec"]["predictor"]["containers"][0]["env"] == [  # the full list, two values changed
        {"name": "STORAGE_URI", "value": "s3://b"},
        {"name": DIGEST_ENV, "value": PIN_B},
        {"name": "OTHER", "value": "1"},
    ]
    after = apply_merge_patch(live, patch)
    assert state_from_isvc(after) == canary and after["metadata"]["annotations"]["keep"] == "me"
    assert after["metadata"]["annotations"][ANN_PROD_SHA] == PIN_A  # production's digest kept for a rollback
    back = apply_merge_patch(after, merge_patch(after, canary.with_percent(0).rolled_back()))
    restored = RolloutState("s3://a", "1", "s3://a", percent=0, bundle_sha256=PIN_A, production_sha256=PIN_A)
    assert state_from_isvc(back) == restored and _env(back)[1] == {"name": DIGEST_ENV, "value": PIN_A}
    # without the field KServe routes all traffic to the latest *ready* revision: the rejected canary's
    assert back["spec"]["predictor"]["canaryTrafficPercent"] == 0 and restored.describe() == "production v1 at 100%"
    settled = apply_merge_patch(back, merge_patch(back, state_from_isvc(back).settled()))
    assert "canaryTrafficPercent" not in settled["spec"]["predictor"] and _env(settled) == _env(back)
    promoted = apply_merge_patch(after, merge_patch(after, canary.promoted()))
    assert state_from_isvc(promoted).serving_production_sha256 == PIN_B == _env(promoted)[1]["value"]
    assert promoted["metadata"]["annotations"][ANN_PROD_SHA] == PIN_B
    assert merge_patch(after, canary) == {}


@pytest.mark.parametrize(
    ("created", "ready", "expected"),
    [
        (None, None, None),  # no status (a rendered manifest): not known
        ("p-3", "p-2", False),  # the restored revision still loading
        ("p-2", "p-2", False),  # a status from before the restored revision existed: the canary's, ready
        ("p-3", "p-3", True),
    ],
)
def test_the_restored_revision_is_ready_by_name_not_generation(created, ready, expected):
    """KServe's ``status.observedGeneration`` is the Knative Service's, not the InferenceService's: the
    revision names decide, against the one the canary served (p-2, recorded by the rollback)."""
    live = _isvc(ann=PROD_ANN)
    live["metadata"]["generation"] = 7
    live["status"] = {"observedGeneration": 3}  # another object's counter
    if created is not None:
        live["status"]["components"] = {"predictor": {"latestCreatedRevision": created, "latestReadyRevision": ready}}
    assert state_from_isvc(live).restored_ready("p-2") is expected


def test_a_digest_change_alone_is_a_new_revision():
    live = _isvc(ann=PROD_ANN)
    pinned = state_from_isvc(live).deployed("1", "s3://a", PIN_A)
    patch = merge_patch(live, pinned)
    assert _env(apply_merge_patch(live, patch))[1] == {"name": DIGEST_ENV, "value": PIN_A}
    assert patch["metadata"]["annotations"] == {ANN_PROD_SHA: PIN_A}


def test_an_inferenceservice_from_before_digests_gets_its_entry():
    live = _isvc(ann=PROD_ANN, digest=None)
    state = state_from_isvc(live)
    assert state.bundle_sha256 is None and state.serving_production_sha256 is None
    canary = state.with_canary("2", "s3://b", 10, PIN_B)
    after = apply_merge_patch(live, merge_patch(live, canary))
    assert [e["name"] for e in _env(after)] == ["STORAGE_URI", DIGEST_ENV, "OTHER"] and _env(after)[1]["value"] == PIN_B
    assert state_from_isvc(after) == canary
    back = apply_merge_patch(after, merge_patch(after, canary.with_percent(0).rolled_back()))
    assert _env(back)[1] == {"name": DIGEST_ENV, "value": ""}  # production was never pinned: it stays so
    assert state_from_isvc(back) == RolloutState("s3://a", "1", "s3://a", percent=0)


@pytest.mark.parametrize("bad", [-1, 101, 12.5, "10", True])
def test_percent_is_checked(bad):
    with pytest.raises(RolloutError, match="0 to 100"):
        RolloutState("s3://a", "1", "s3://a").with_canary("2", "s3://b", bad)


def test_describe_names_what_serves():
    assert RolloutState(None).describe() == "nothing serving"  # a server with no model yet
    assert RolloutState("s3://a").describe() == "production v? at 100%"  # serving, version unknown
    prod = RolloutState("s3://a", "1", "s3://a")
    assert prod.describe() == "production v1 at 100%"
    assert prod.with_canary("2", "s3://b", 10).describe() == "production v1 at 90%, canary v2 at 10%"


def test_contract_violations_are_named():
    isvc = _isvc()
    isvc["spec"]["predictor"]["containers"][0]["env"].reverse()
    with pytest.raises(RolloutError, match="env\\[0\\] must be STORAGE_URI"):
        state_from_isvc(isvc)
    isvc["spec"]["predictor"]["containers"][0]["name"] = "sidecar"
    with pytest.raises(RolloutError, match="containers\\[0\\] must be 'kserve-container'"):
        state_from_isvc(isvc)


def test_settings_reject_bad_steps():
    with pytest.raises(ValueError, match="steps"):
        PromoteSettings(steps="50,10")
    with pytest.raises(ValueError, match="unknown target"):
        PromoteSettings(target="helm")
    assert PromoteSettings(steps="5, 20,100").steps == [5, 20, 100]


def test_a_non_finite_metric_fails_its_floor_and_the_comparison():
    """NaN compares False against any floor or bound: it passed both (fail open)."""
    nan = {**REAL, "section_macro_f1": float("nan")}
    r = g.offline_gate(nan, None, FLOORED, candidate_params=None, production_params=None)
    assert r.status == "fail" and "section_macro_f1 nan" in r.detail, r.detail
    unfloored = PromoteSettings(floors=False)
    compared = g.offline_gate(nan, REAL, unfloored, candidate_params=SPLIT, production_params=SPLIT)
    assert compared.status == "fail" and "worse than production: section_macro_f1 nan" in compared.detail


def test_weighted_quantile_is_numpys_inverted_cdf_without_needing_numpy_2() -> None:
    """The matched test's weighted p99: the smallest value whose cumulative weight reaches q (numpy ≥ 2's
    ``inverted_cdf`` with weights, computed by hand because the package allows numpy 1.26)."""
    rng = np.random.default_rng(7)
    for n in (1, 2, 5, 50, 2000):
        values = rng.lognormal(4.3, 0.4, n)
        weights = rng.random(n) * (rng.random(n) > 0.3)
        weights[0] += 0.1  # at least one weight
        for q in (0.0, 0.01, 0.5, 0.9, 0.99, 1.0):
            want = float(np.quantile(values, q, weights=weights, method="inverted_cdf"))
            assert g._quantile(values, q, weights) == want, (n, q)
    assert g._quantile(np.array([10.0, 20.0, 30.0]), 0.5, np.array([0.0, 0.0, 1.0])) == 30.0
