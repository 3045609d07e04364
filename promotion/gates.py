"""Promotion gates. Each returns a :class:`GateResult` that is recorded (MLflow tags, promotion_events).

``pass`` lets a step happen; ``fail`` blocks it (and makes ``auto`` roll back); ``wait`` means not
enough evidence yet (too few canary samples, no drift report), so ``auto`` holds.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from statistics import NormalDist
from typing import Any

import numpy as np

from motlens.bundle import BundleError
from motlens.stats import wilson
from promotion.paired_check import PairedComparison
from promotion.settings import PromoteSettings
from training.floors import check_floors

log = logging.getLogger(__name__)

PASS, FAIL, WAIT = "pass", "fail", "wait"
GOLDEN_TAG = "promotion.gate.golden"
#: how much more often the canary may miss the cache than production for their overall latencies to compare
MISS_SHARE_SLACK = 0.05
#: how many more texts a canary request with a miss may miss than production's for their latencies to compare
CALLS_RATIO = 1.25
#: production requests a bin of missed texts (1, 2, 3–4, 5–8, 9–16, …) needs at least to stand for the
#: canary's in it (and min_samples × the canary's share in the bin: :func:`_matched`)
MATCH_MIN_REQUESTS = 20
#: the share of the canary's requests with a miss that may fall in bins production holds too few of
MATCH_MAX_OUTSIDE = 0.05


@dataclass
class GateResult:
    name: str
    status: str  # pass | fail | wait
    detail: str
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == PASS

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(results: list[GateResult]) -> str:
    """``fail`` if any failed, else ``wait`` if any waits, else ``pass``."""
    statuses = {r.status for r in results}
    return FAIL if FAIL in statuses else WAIT if WAIT in statuses else PASS


def gates_json(results: list[GateResult]) -> str:
    return json.dumps([r.to_json() for r in results], sort_keys=True, default=str)


#: the run params that name a version's held-out split; equal on both sides = the same held-out texts
SPLIT_PARAMS = ("split.seed", "split.scheme", "split.holdout_fraction", "split.max_texts")


def split_of(params: Mapping[str, Any] | None) -> dict[str, str] | None:
    """The run's held-out split (:data:`SPLIT_PARAMS`), or ``None`` when the run does not record it."""
    params = params or {}
    if not all(k in params for k in SPLIT_PARAMS):
        return None
    return {k: str(params[k]).strip() for k in SPLIT_PARAMS}


def offline_gate(
    candidate: dict[str, float],
    production: dict[str, float] | None,
    settings: PromoteSettings,
    *,
    candidate_params: Mapping[str, Any] | None,
    production_params: Mapping[str, Any] | None,
    paired: PairedComparison | None = None,
) -> GateResult:
    """The candidate's quality floors (``FLOORS``), and a comparison with production.

    With ``paired`` metrics (both heads scored on the candidate's held-out texts,
    :mod:`promotion.paired_check`): a metric fails only when its whole bootstrap interval of
    candidate − production lies below −tolerance. Otherwise, when production's run metrics come from
    the same held-out split (equal :data:`SPLIT_PARAMS`): every configured run metric production has,
    candidate ≥ production − tolerance. Without production, or with production evaluated on another
    split (or one a run does not record), the comparison would be noise: floors only, and the detail
    says so."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    notes: list[str] = []
    if settings.floors:
        floors = check_floors(candidate, settings.offline_metrics, settings.floor_margin, settings.floor_auc_margin)
        values["floors"] = floors.values
        (problems if floors.failed else notes).append(floors.describe())
    cand_split, prod_split = split_of(candidate_params), split_of(production_params)
    values["split"] = {"candidate": cand_split, "production": prod_split}
    only = "floors only" if settings.floors else "nothing checked (MOTLENS_PROMOTE_FLOORS=false)"
    same = cand_split is not None and cand_split == prod_split
    if production is None:
        compare = f"no production version to compare with: {only}"
    elif paired is not None and paired.metrics:
        values["paired"] = {"n_texts": paired.n_texts, "embeddings": paired.embeddings}
        compare = _compare_paired(paired, candidate, production if same else None, settings, values, problems)
    elif not same:
        compare = (
            f"production's metrics come from another held-out split ({_split_text(prod_split)}; the candidate's: "
            f"{_split_text(cand_split)}), so a difference is no evidence: not compared, {only}"
        )
    else:
        compare = _compare(candidate, production, settings, values, problems)
    if production is not None and paired is not None and paired.missing:
        compare += f" (no paired comparison: {paired.missing})"
    if problems:
        return GateResult("offline", FAIL, "; ".join(problems + ([compare] if compare else [])), values)
    return GateResult("offline", PASS, "; ".join(([compare] if compare else []) + notes), values)


def _compare(
    candidate: dict[str, float],
    production: dict[str, float],
    settings: PromoteSettings,
    values: dict[str, Any],
    problems: list[str],
) -> str:
    """candidate ≥ production − tolerance for each configured metric production has; appends the
    failures to ``problems`` and returns what passed (or ``""``)."""
    compared = [m for m in settings.offline_metrics if m in production]
    if not compared:
        return f"production has none of {settings.offline_metrics}; nothing to compare"
    worse, missing = [], []
    for m in compared:
        if m not in candidate:
            missing.append(m)
            continue
        values[m] = {"candidate": candidate[m], "production": production[m]}
        if not math.isfinite(candidate[m]) or candidate[m] < production[m] - settings.offline_tolerance:
            worse.append(f"{m} {candidate[m]:.4f} < {production[m]:.4f} − {settings.offline_tolerance}")
    if missing:
        problems.append(f"candidate run lacks metrics {missing}")
    if worse:
        problems.append("worse than production: " + "; ".join(worse))
    if missing or worse:
        return ""
    return f"{', '.join(compared)} within {settings.offline_tolerance} of production (same held-out split)"


def _compare_paired(
    paired: PairedComparison,
    candidate: dict[str, float],
    production: dict[str, float] | None,
    settings: PromoteSettings,
    values: dict[str, Any],
    problems: list[str],
) -> str:
    """Each configured metric from ``paired``; one it could not score falls back to the run metrics
    when ``production`` (same split) is given, else is named as not compared."""
    tol, level = settings.offline_tolerance, f"{settings.paired_confidence:.0%}"
    worse: list[str] = []
    seen: list[str] = []
    rest: list[str] = []
    for m in settings.offline_metrics:
        p = paired.metrics.get(m)
        if p is None:
            rest.append(m)
            continue
        values[m] = {**p.to_json(), "paired": True}
        text = (
            f"{m} {p.candidate:.4f} vs {p.production:.4f}, difference {p.difference:+.4f} "
            f"({level} interval {p.low:+.4f} … {p.high:+.4f})"
        )
        (worse if not p.high >= -tol else seen).append(text)
    where = f"on {paired.n_texts} held-out texts of the candidate's run, {paired.embeddings}"
    if worse:
        problems.append(f"worse than production {where}: " + "; ".join(worse) + f": interval below −{tol}")
    notes = [f"paired {where}: " + "; ".join(seen) + f" (fails only with the interval below −{tol})"] if seen else []
    if rest:
        if production is not None:
            notes.append(_compare(candidate, production, _only(settings, rest), values, problems))
        else:
            notes.append(
                f"{', '.join(rest)}: not scored on the held-out texts, and the runs' splits differ: not compared"
            )
    return "; ".join(n for n in notes if n)


def _only(settings: PromoteSettings, metrics: list[str]) -> PromoteSettings:
    return settings.model_copy(update={"offline_metrics": metrics})


def _split_text(split: dict[str, str] | None) -> str:
    if split is None:
        return "no " + "/".join(SPLIT_PARAMS) + " recorded"
    return ", ".join(f"{k}={v}" for k, v in split.items())


def golden_gate(tags: dict[str, str], check: Callable[[], tuple[bool, float, str]]) -> GateResult:
    """The bundle verifies (every sha256) and reproduces its golden set here (cosine ≥ 0.999, same labels).

    A verdict (pass, or fail on a mismatch or a :class:`~motlens.bundle.BundleError`) is stored as a
    version tag (:data:`GOLDEN_TAG`), so the model is loaded once per version. Any other error (registry
    or artifact store unreachable) means the check did not run: ``wait``, which is not stored.
    """

    if GOLDEN_TAG in tags:
        stored = json.loads(tags[GOLDEN_TAG])
        return GateResult(
            "golden", stored["status"], stored["detail"] + " (recorded)", stored.get("values", {})
        )
    try:
        passed, min_cosine, detail = check()
    except BundleError as e:
        return GateResult("golden", FAIL, f"bundle refused: {e}")
    except Exception as e:  # noqa: BLE001 - an outage is no verdict on the version: hold and retry later
        return GateResult("golden", WAIT, f"golden check could not run: {type(e).__name__}: {e}")
    return GateResult("golden", PASS if passed else FAIL, detail, {"min_cosine": min_cosine})


def drift_gate(
    reports: list[dict[str, Any]], version: str, since: datetime | None, settings: PromoteSettings
) -> GateResult:
    """The latest drift verdict for the canary version (slot canary), from ``drift_reports``.

    The drift job's status (``details.status``: drift / no_drift / insufficient_data / error) decides;
    a report without a conclusive verdict counts as no report yet.
    """
    rows = [r for r in reports if since is None or _aware(r["ts"]) >= since]
    latest = max(rows, key=lambda r: _aware(r["ts"])) if rows else None
    status = drift_status(latest) if latest else None
    if latest and (status == "drift" or latest.get("drift_detected")):
        return GateResult(
            "drift",
            FAIL,
            f"drift detected at {latest['ts']} (share {latest.get('drift_share')})",
            _drift_values(latest),
        )
    if latest and status in (None, "no_drift"):
        return GateResult(
            "drift", PASS, f"no drift at {latest['ts']} (n={latest.get('n_current')})", _drift_values(latest)
        )
    why = f"last drift run was {status}" if latest else "no drift report"
    values = {**(_drift_values(latest) if latest else {}), "required": settings.require_drift_report}
    return GateResult(
        "drift",
        WAIT if settings.require_drift_report else PASS,
        f"{why} for version {version} since the canary started"
        + ("" if settings.require_drift_report else " (not required: MOTLENS_PROMOTE_REQUIRE_DRIFT_REPORT=false)"),
        values,
    )


def drift_status(row: dict[str, Any]) -> str | None:
    """A drift report's verdict (``details.status``: drift / no_drift / insufficient_data / error)."""
    details = row.get("details")
    if isinstance(details, str):
        try:
            details = json.loads(details) if details else {}
        except ValueError:
            details = {}
    return (details or {}).get("status")


def _drift_values(row: dict[str, Any]) -> dict[str, Any]:
    return {"ts": str(row["ts"]), "drift_share": row.get("drift_share"), "n_current": row.get("n_current")}


def live_gate(
    canary: dict[str, Any] | None,
    production: dict[str, Any] | None,
    settings: PromoteSettings,
    *,
    production_latency: dict[str, Any] | None = None,
    production_note: str = "",
) -> GateResult:
    """Canary health from the prediction log since the last step, counted by request
    (:meth:`predlog.reader.PredictionLogReader.live_requests` rows): at least ``min_samples`` canary
    requests, then two tests at one-sided level ``live_confidence`` (continuity-corrected Wilson bounds
    of a proportion):

    - errors: the share of failed canary requests against its limit, the lower of ``max_error_rate``
      and production's share + ``error_rate_margin``;
    - latency: the share of ok canary requests slower than production's p99 × ``max_p99_ratio`` +
      ``p99_slack_ms`` — more than 1 % is a p99 above that — against 1 % or, when higher, the upper bound
      of production's own share over that bound (its p99 from a few hundred requests may miss its tail);
      over at least ``min_samples`` canary and production latencies (:func:`_latencies` picks which).

    ``production_latency``: production's row for the latency test when it is not ``production`` (the
    workflow takes it from before the step when the step's window holds too few model calls).

    A test fails when its lower bound is above the limit (evidence of a regression), passes when its
    upper bound is at or below it, and otherwise waits for more traffic — except that a latency sample
    at the reader's cap decides on its share, and a limit of 0 passes only without a failure."""
    canary = canary or {}
    n = int(_num(canary.get("requests")) or 0)
    if n < max(settings.min_samples, 1):
        return GateResult(
            "live", WAIT, f"{n} canary requests since the last step, need {settings.min_samples}", {"n": n}
        )
    production = production or {}
    conf = settings.live_confidence
    values: dict[str, Any] = {"n": n, "items": int(_num(canary.get("items")) or 0), "confidence": conf}
    verdicts: dict[str, list[str]] = {FAIL: [], WAIT: [], PASS: []}

    k = int(_num(canary.get("failed_requests")) or 0)
    pn, pk = int(_num(production.get("requests")) or 0), int(_num(production.get("failed_requests")) or 0)
    margin = settings.error_rate_margin
    limit, which = settings.max_error_rate, f"max {settings.max_error_rate:.2%}"
    if pn and pk / pn + margin < limit:
        limit, which = pk / pn + margin, f"production {pk / pn:.2%} + {margin:.2%}"
    low, high = wilson(k, n, conf)
    values.update(
        requests=n,
        failed_requests=k,
        error_rate=k / n,
        error_rate_bounds=[low, high],
        error_rate_limit=limit,
        production_requests=pn,
        production_error_rate=pk / pn if pn else None,
    )
    text = f"error rate {k}/{n} requests = {k / n:.2%} (bounds {low:.2%}–{high:.2%}; limit {which})"
    verdicts[(FAIL if k else PASS) if limit <= 0 else _verdict(low, high, limit)].append(text)

    cmp = _latencies(canary, production_latency or production, settings.min_samples)
    verdict, text, found = _latency_test(cmp, canary, settings)
    if verdict != FAIL and cmp.backstop is not None:
        # the canary's requests miss fewer texts each than production's, whose model calls are then if anything
        # slower: slower even than all of production's misses is a regression, whatever the matched test says
        also, also_text, also_found = _latency_test(cmp.backstop, canary, settings)
        if also == FAIL:
            verdict, found = also, {**also_found, "p99_matched": found}
            prod_calls = _calls_per_miss(production_latency or production)
            text = also_text + (
                f" (over all of production's misses: its requests miss {prod_calls:.2g} texts each, the "
                f"canary's {_calls_per_miss(canary):.2g}, so its model calls are if anything slower)"
            )
    values.update(found)
    verdicts[verdict].append(text)
    level = f"{conf:.0%} one-sided bounds" + (f"; {production_note}" if production_note else "")
    if verdicts[FAIL]:
        return GateResult("live", FAIL, "; ".join(verdicts[FAIL]) + f" ({level})", values)
    if verdicts[WAIT]:
        return GateResult(
            "live", WAIT, "inconclusive, more canary traffic needed: " + "; ".join(verdicts[WAIT]) + f" ({level})",
            values,
        )  # fmt: skip
    return GateResult("live", PASS, f"n={n} requests, " + "; ".join(verdicts[PASS]) + f" ({level})", values)


def _latency_test(cmp: _Compared, canary: dict[str, Any], settings: PromoteSettings) -> tuple[str, str, dict]:
    """The latency test of :func:`live_gate` over one comparison: (verdict, text, values)."""
    basis, lat, prod_lat, conf = cmp.basis, cmp.canary, cmp.production, settings.live_confidence
    values: dict[str, Any] = {"p99_basis": basis}
    if cmp.match:
        values["p99_match"] = cmp.match
    need = max(settings.min_samples, 1)
    # production's requests as many as they stand for: weighted (matched), those of its thinnest bins count more
    prod_n = len(prod_lat) if cmp.weights is None else _effective(cmp.weights)
    prod_count = f"{prod_n:.0f} (weighted)" if cmp.weights is not None else str(len(prod_lat))
    if prod_n < need:
        # nothing like for like from production: with too few requests at all, not compared; with too few
        # of the kind the canary's must be compared with (model calls), wait for them or the canary to warm
        return (
            PASS if basis == "all" else WAIT,
            f"p99 {'not compared' if basis == 'all' else 'waits'}: {prod_count} production and {len(lat)} "
            f"canary requests{_basis_label(basis)}",
            values,
        )
    if len(lat) < need:
        return WAIT, f"p99: {len(lat)} canary requests{_basis_label(basis)}, need {need}", values
    prod_p99, p99 = _quantile(prod_lat, 0.99, cmp.weights), float(np.quantile(lat, 0.99))
    bound = prod_p99 * settings.max_p99_ratio + settings.p99_slack_ms
    slow = int((lat > bound).sum())
    low, high = wilson(slow, len(lat), conf)
    # production's own share over the bound: its p99 from a few hundred requests may fall short of its
    # tail. Failing needs the canary above 1 % and above all production's share may be; passing needs
    # it under 1 % or what production showed (a noisy production neither fails nor passes a canary)
    if cmp.weights is None:
        prod_slow: float = int((prod_lat > bound).sum())
        prod_share, prod_text = prod_slow / len(prod_lat), f"{prod_slow}/{len(prod_lat)}"
    else:  # as a share of its effective size (a sum of weights over the bound)
        prod_share = float(cmp.weights[prod_lat > bound].sum())
        prod_slow, prod_text = prod_share * prod_n, f"{prod_share:.2%} of {prod_count}"
    fail_above = max(0.01, wilson(prod_slow, prod_n, conf)[1])
    pass_below = max(0.01, prod_share)
    values.update(p99_ms=p99, production_p99_ms=prod_p99, p99_bound_ms=bound, slower=slow, compared=len(lat),
                  slower_bounds=[low, high], production_slower=prod_slow,
                  slower_limits=[pass_below, fail_above])  # fmt: skip
    text = (
        f"p99{_basis_label(basis)} {p99:.1f} ms (production {prod_p99:.1f} ms): {slow}/{len(lat)} requests "
        f"over {settings.max_p99_ratio} × production + {settings.p99_slack_ms:g} ms = {bound:.1f} ms "
        f"(bounds {low:.2%}–{high:.2%}; production's {prod_text}: passes under "
        f"{pass_below:.2%}, fails over {fail_above:.2%})"
    )
    verdict = FAIL if low > fail_above else PASS if high <= pass_below else WAIT
    if verdict == PASS and cmp.weights is not None:
        # weighted, production's p99 leans on its thinner bins' few tail requests and may come out high, which
        # would pass a slower canary: passing also needs the canary under the bound from its lower confidence
        # limit (the quantile at 0.99 − z·√(0.99·0.01/n), n the effective size)
        q_low = max(0.5, 0.99 - NormalDist().inv_cdf(conf) * math.sqrt(0.99 * 0.01 / prod_n))
        bound_low = _quantile(prod_lat, q_low, cmp.weights) * settings.max_p99_ratio + settings.p99_slack_ms
        slow_low = int((lat > bound_low).sum())
        high_low = wilson(slow_low, len(lat), conf)[1]
        below_low = max(0.01, float(cmp.weights[prod_lat > bound_low].sum()))
        values["p99_pass_bound_ms"] = bound_low
        if high_low > below_low:
            verdict = WAIT
            text += (
                f"; not passed until production's p99 is surely that high: {slow_low}/{len(lat)} requests over "
                f"{bound_low:.1f} ms, from its p{100 * q_low:.1f} (upper bound {high_low:.2%}, passes under "
                f"{below_low:.2%})"
            )
    if verdict == WAIT and cmp.capped(canary):
        verdict, text = (FAIL if slow / len(lat) > fail_above else PASS), text + ", decided on the capped sample"
    return verdict, text, values


def _verdict(low: float, high: float, limit: float) -> str:
    return FAIL if low > limit else WAIT if high > limit else PASS


@dataclass
class _Compared:
    """What the latency test compares: the canary's latencies with production's (``weights``: production's,
    matched to the canary's mix of missed texts; ``None``: as sampled)."""

    basis: str
    canary: np.ndarray
    production: np.ndarray
    weights: np.ndarray | None = None
    match: dict[str, Any] = field(default_factory=dict)
    sampled: int = -1  # how many the canary's sample held before any was left out (-1: ``canary``)
    backstop: _Compared | None = None  # also failed on: all misses, where production's miss more texts each

    def capped(self, side: dict[str, Any]) -> bool:
        """Whether the canary's sample is at the reader's cap (there was more traffic than it holds)."""
        cap = int(_num(side.get("latency_cap")) or 0)
        return cap > 0 and (len(self.canary) if self.sampled < 0 else self.sampled) >= cap


def _latencies(canary: dict[str, Any], production: dict[str, Any], min_samples: int) -> _Compared:
    """The canary's and production's latencies, compared like for like. With ``min_samples`` production
    requests with a cache miss (model calls): over those, when the canary's miss about as many texts each
    (within ``CALLS_RATIO`` either way); else — more texts each, or fewer with ``min_samples`` canary
    misses — over the misses matched by missed texts per request (``matched misses``, :func:`_matched`)
    where production covers the canary's; else over the requests that missed exactly one text on both
    sides (``single misses``: a cold canary's 8-text requests miss 4 texts where production's miss 1);
    the canary's few are then waited for, not passed. When the canary's requests miss fewer texts each,
    production's misses are if anything slower (a model call's time grows with its texts): a canary
    slower even than all of them also fails (``backstop``). Without ``min_samples`` production misses
    (or canary misses, at fewer texts each), over every ok request when the canary misses the cache at
    most ``MISS_SHARE_SLACK`` more often than production; else over its misses (too few: the gate waits
    for them)."""
    need = max(min_samples, 1)
    c_miss, p_miss = (np.asarray(side.get("miss_latencies", []), float) for side in (canary, production))
    c_share, p_share = (_miss_share(side) for side in (canary, production))
    c_all, p_all = (np.asarray(side.get("latencies", []), float) for side in (canary, production))
    if not int(_num(production.get("requests")) or 0):  # no production traffic: nothing to compare with
        return _Compared("all", c_all, p_all)
    if len(p_miss) >= need:
        c_calls, p_calls = _calls_per_miss(canary), _calls_per_miss(production)
        fewer = c_calls * CALLS_RATIO < p_calls and len(c_miss) >= need
        if c_calls > p_calls * CALLS_RATIO or fewer:
            matched = _matched(canary, production, need)
            if matched.basis != "matched misses":
                c_one, p_one = (np.asarray(side.get("one_miss_latencies", []), float) for side in (canary, production))
                matched = _Compared("single misses", c_one, p_one, match=matched.match)
            if fewer:  # production's calls are if anything slower: failing against them is a regression
                matched.backstop = _Compared("misses", c_miss, p_miss)
            return matched
        if len(c_miss) >= need or c_share > p_share + MISS_SHARE_SLACK:
            return _Compared("misses", c_miss, p_miss)
    if c_share > p_share + MISS_SHARE_SLACK:
        return _Compared("misses", c_miss, p_miss)
    return _Compared("all", c_all, p_all)


def _texts_bin(texts: np.ndarray) -> np.ndarray:
    """The bin of a request's missed texts: 1 → 0, 2 → 1, 3–4 → 2, 5–8 → 3, 9–16 → 4, 17–32 → 5, …"""
    return np.ceil(np.log2(np.maximum(texts, 1))).astype(int)


def _bin_label(b: int) -> str:
    low, high = (1 << (b - 1)) + 1 if b else 1, 1 << b
    return str(high) if low == high else f"{low}–{high}"


def _matched(canary: dict[str, Any], production: dict[str, Any], need: int) -> _Compared:
    """The canary's misses against production's weighted to the canary's mix of missed texts per request
    (``miss_pair_latencies``/``miss_pair_texts``), by bin (:func:`_texts_bin`: a model call's time grows
    with its texts, and a 32-text request's misses spread over many counts). Only bins where production
    holds ``MATCH_MIN_REQUESTS`` requests, and ``need`` × the canary's share in the bin, count; the
    canary's requests in other bins (more missed texts than production makes often enough) are left out,
    and when they are more than ``MATCH_MAX_OUTSIDE`` of them there is no match (basis ``none``, ``match``
    says why). Each of production's requests in bin b weighs (canary's share in b) / (production's
    requests in b): weighting, not resampling, so a re-run decides the same on the same rows; its
    bounds are those of the weighted sample's effective size (about ``need`` at least)."""
    pairs = [
        (np.asarray(side.get("miss_pair_latencies", []), float), np.asarray(side.get("miss_pair_texts", []), int))
        for side in (canary, production)
    ]
    (c_lat, c_texts), (p_lat, p_texts) = pairs
    if not len(c_texts) or not len(p_texts) or len(c_lat) != len(c_texts) or len(p_lat) != len(p_texts):
        return _Compared("none", c_lat, p_lat, match={"why": "no (latency, missed texts) pairs"})
    c_bin, p_bin = _texts_bin(c_texts), _texts_bin(p_texts)
    p_count = np.bincount(p_bin, minlength=int(max(c_bin.max(), p_bin.max())) + 1)
    # no production request may stand for more than 1/need of the canary's: weighted, production's sample is
    # then worth at least ``need`` requests, as an unweighted one must be (its p99 no noisier)
    c_all = np.bincount(c_bin, minlength=len(p_count))
    covered = (p_count >= MATCH_MIN_REQUESTS) & (p_count >= c_all / len(c_bin) * need)
    inside = covered[c_bin]
    c_count = np.bincount(c_bin[inside], minlength=len(p_count))
    outside = float(1.0 - inside.mean())
    match: dict[str, Any] = {  # requests with a miss per bin: [canary's, production's]; bins left out
        "bins": {_bin_label(int(b)): [int(c_all[b]), int(p_count[b])] for b in np.flatnonzero(c_all + p_count)},
        "left_out": [_bin_label(int(b)) for b in np.flatnonzero(c_all * ~covered)],
        "outside": outside,
    }
    if outside > MATCH_MAX_OUTSIDE:
        match["why"] = (
            f"{outside:.1%} of the canary's requests with a miss fall in bins of missed texts where production "
            f"holds too few requests (limit {MATCH_MAX_OUTSIDE:.0%})"
        )
        return _Compared("none", c_lat, p_lat, match=match)
    share = c_count / c_count.sum()
    weights = (share / np.maximum(p_count, 1))[p_bin] * covered[p_bin]
    keep = weights > 0
    weights = weights[keep]
    match["production_effective"] = _effective(weights)
    return _Compared("matched misses", c_lat[inside], p_lat[keep], weights / weights.sum(), match, len(c_lat))


def _effective(weights: np.ndarray) -> float:
    """Kish's effective sample size of a weighted sample: (Σw)² / Σw²."""
    total = float(weights.sum())
    return total * total / float((weights * weights).sum()) if total > 0 else 0.0


def _quantile(values: np.ndarray, q: float, weights: np.ndarray | None) -> float:
    """The ``q`` quantile; weighted: the smallest value whose cumulative weight reaches ``q`` of the total
    (numpy's ``inverted_cdf``, whose ``weights=`` needs numpy 2, which the package does not require)."""
    if weights is None:
        return float(np.quantile(values, q))
    values, weights = values[weights > 0], weights[weights > 0]
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    i = int(np.searchsorted(cumulative, q * cumulative[-1], side="left"))
    return float(values[order][min(i, len(values) - 1)])


def _calls_per_miss(side: dict[str, Any]) -> float:
    misses = int(_num(side.get("miss_requests")) or 0)
    return int(_num(side.get("missed_items")) or 0) / misses if misses else 0.0


def _miss_share(side: dict[str, Any]) -> float:
    ok = int(_num(side.get("requests")) or 0) - int(_num(side.get("failed_requests")) or 0)
    return int(_num(side.get("miss_requests")) or 0) / ok if ok > 0 else 0.0


def _basis_label(basis: str) -> str:
    return {
        "misses": " of cache misses",
        "matched misses": " of cache misses matched by missed texts",
        "single misses": " missing one text",
        "all": "",
    }[basis]


def _num(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) else f


def _aware(ts: Any) -> datetime:
    from datetime import UTC

    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
