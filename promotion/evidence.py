"""The gates' evidence on a version: its run metrics and tags, the golden check, drift reports and live stats."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from motlens import MODEL_NAME
from promotion import gates as g
from promotion import paired_check as pc
from promotion.canary_times import LOOKBACK_S, CanaryTimes, canary_times
from promotion.settings import PromoteSettings
from promotion.tags import STATUS_TAG, VERDICT_ACTIONS, VERDICTS


class Evidence:
    """The gates and verdicts on registry versions: ``info`` reads a version, ``reader`` opens the
    prediction log; ``dry_run`` keeps no golden or paired result in a tag."""

    def __init__(
        self,
        settings: PromoteSettings,
        registry: Any,
        info: Callable[[str], Any],
        reader: Callable[[], Any],
        *,
        golden_check: Callable[[str], tuple[bool, float, str]] | None = None,
        dry_run: bool = False,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.info = info
        self.reader = reader
        self.dry_run = dry_run
        self._golden_check = golden_check or self._check_golden_in_process

    def _check_golden_in_process(self, version: str) -> tuple[bool, float, str]:
        from motlens.bundle import check_golden

        bundle = self.registry.fetch(version)  # verifies every sha256
        golden = bundle.golden()
        embedder = _embedder_for(bundle)
        emb = embedder.encode(golden.texts)
        res = check_golden(golden, emb, bundle.head())
        return res.passed, res.min_cosine, res.detail

    def offline_gates(self, version: str, production: str | None) -> list[g.GateResult]:
        info = self.info(version)
        prod = self.info(production) if production and production != version else None
        try:
            paired = self.paired_comparison(info, prod)
        except pc.PairedUnavailable as e:
            offline = g.GateResult("offline", g.WAIT, f"paired comparison could not run: {e}")
        else:
            offline = g.offline_gate(
                info.metrics,
                prod.metrics if prod else None,
                self.settings,
                candidate_params=info.params,
                production_params=prod.params if prod else None,
                paired=paired,
            )
        return [offline, *self.golden_gates(version)]

    def paired_comparison(self, info: Any, prod: Any) -> pc.PairedComparison | None:
        """Production's head on the candidate's held-out texts (:mod:`promotion.paired_check`), when
        enabled and both runs used the same split; the result is kept in the candidate's tag
        :data:`~promotion.paired_check.PAIRED_TAG` per production version and settings."""
        if prod is None or not self.settings.paired or not pc.same_split(info.params, prod.params):
            return None
        if (why := pc.data_dependence(info.params, prod.params)) is not None:
            return pc.PairedComparison(prod.version, missing=why, lasting=True)
        found = pc.cached(info.tags, prod.version, self.settings)
        if found is None:
            found = pc.run(self.registry, info.version, prod.version, self.settings, _fresh_embedder)
            if found.lasting and not self.dry_run:
                self.registry.set_tags(info.version, {pc.PAIRED_TAG: pc.tag_value(found, self.settings)})
        return found

    def golden_gates(self, version: str) -> list[g.GateResult]:
        """The golden check (run once per version, its verdict kept in a tag), when enabled."""
        if not self.settings.golden_check:
            return []
        tags = self.info(version).tags
        golden = g.golden_gate(tags, lambda: self._golden_check(version))
        if g.GOLDEN_TAG not in tags and golden.status != g.WAIT and not self.dry_run:
            self.registry.set_tags(version, {g.GOLDEN_TAG: _json(golden.to_json())})
        return [golden]

    def verdict(self, version: str) -> tuple[str, str] | None:
        """(status, "version V was S at T: reason") when ``version`` is tagged rejected or retired: one
        rule for ``auto`` (which holds) and ``canary start`` / ``promote V`` (refused unless --force)."""
        tags = self.info(version).tags
        status = tags.get(STATUS_TAG, "")
        if status not in VERDICTS:
            return None
        at = tags.get(f"promotion.{status}_at")
        if not at and tags.get("promotion.last_action") in VERDICT_ACTIONS[status]:  # tagged by an older release
            at = tags.get("promotion.last_at")
        why = tags.get(f"promotion.{status}_reason") or "no reason recorded"
        return status, f"version {version} was {status} {f'at {at}' if at else '(time not recorded)'}: {why}"

    def health_gates(self, version: str, production: str | None) -> list[g.GateResult]:
        times = self.canary_times(version)
        reloaded = ""
        try:
            reader = self.reader()
            reports = reader.drift_reports(model_version=version, slot="canary", limit=20).to_dict("records")
            # A server that loaded the canary again after the step (a restart restoring it) serves it cold
            # from then: its requests before came from another process, and production's after it are cold
            # too, so both sides count from the reload (the old misses against the new would compare times).
            since = times.since
            if (loaded := reader.last_serve_load(version)) is not None and loaded > since:
                since, reloaded = loaded, f"both sides since the canary's reload at {loaded:%H:%M:%S} (a restart)"
            stats = reader.live_requests(since=since, model_name=MODEL_NAME)
            prod = _stats_row(stats, production)
            prod_latency, note = None, ""
            if production and _thin(prod, self.settings.min_samples):
                # at 100 % (or a share near it) production serves almost nothing in the window, and a warm
                # production may make few model calls: the hour before the step stands in for what is
                # thin, test by test (its error rate from the step's window when that holds enough)
                before = reader.live_requests(
                    since=since - timedelta(seconds=LOOKBACK_S), until=since, model_name=MODEL_NAME
                )
                prod, prod_latency, note = _production_from(prod, _stats_row(before, production), self.settings)
        except Exception as e:  # noqa: BLE001 - no evidence is a reason to hold, not to crash or step
            why = f"prediction log unavailable: {type(e).__name__}: {e}"
            return [g.GateResult("drift", g.WAIT, why), g.GateResult("live", g.WAIT, why)]
        drift = g.drift_gate(reports, version, times.started, self.settings)
        live = g.live_gate(
            _stats_row(stats, version), prod, self.settings, production_latency=prod_latency, production_note=note
        )
        for why in (times.source, reloaded):
            if why:
                live.detail = f"{live.detail} ({why})"
        if times.started_source:
            drift.detail = f"{drift.detail} ({times.started_source})"
        # a skewed clock holds the canary, but never hides a failure found in the fallback window
        if times.started_skew and drift.status != g.FAIL:
            drift = g.GateResult("drift", g.WAIT, times.started_skew, drift.values)
        if times.skew and live.status != g.FAIL:
            live = g.GateResult("live", g.WAIT, times.skew, live.values)
        return [drift, live]

    def canary_times(self, version: str) -> CanaryTimes:
        """When the canary of ``version`` started and last stepped (:func:`promotion.canary_times.canary_times`)."""
        return canary_times(version, self.info(version).tags, self.reader, self.settings)


_EMBEDDERS: dict[str, Any] = {}


def _embedder_for(bundle: Any) -> Any:
    """One torch embedder per distinct embedder (by its files' sha256) in this process."""
    from motlens.embedder import TorchEmbedder

    key = "|".join(f"{k}={v}" for k, v in sorted(bundle.manifest["files"].items()) if k.startswith("embedder/"))
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = TorchEmbedder(bundle.embedder_dir, device="cpu")
    return _EMBEDDERS[key]


def _production_from(
    now: dict[str, Any] | None, before: dict[str, Any] | None, settings: PromoteSettings
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str]:
    """(production for the error test, for the latency test, a note): the hour before the step replaces
    the step's window for a test it holds too little for and the hour holds more."""
    need, took = settings.min_samples, []
    errors, latency = now, None
    if _count(now, "requests") < need and _count(before, "requests") > _count(now, "requests"):
        errors = before
        took.append("error rate")
    if _count(now, "miss_requests") < need and _count(before, "miss_requests") > _count(now, "miss_requests"):
        latency = before
        took.append("latencies")
    if not took:
        return now, None, ""
    note = (
        f"production's {' and '.join(took)} from the hour before this step ({_count(now, 'requests')} requests, "
        f"{_count(now, 'miss_requests')} with a cache miss, since it)"
    )
    return errors, latency, note


def _thin(row: dict[str, Any] | None, min_samples: int) -> bool:
    """Too few production requests, or too few with a cache miss, to stand for production."""
    return min(_count(row, "requests"), _count(row, "miss_requests")) < min_samples


def _count(row: dict[str, Any] | None, key: str) -> int:
    return int((row or {}).get(key) or 0)


def _fresh_embedder(bundle: Any) -> Any:
    """A torch embedder of ``bundle`` that is not kept (production's, once, for the paired comparison)."""
    from motlens.embedder import TorchEmbedder

    return TorchEmbedder(bundle.embedder_dir, device="cpu")


def _stats_row(stats: Any, version: str | None) -> dict[str, Any] | None:
    """The live stats of one version, whichever slot its servers call themselves (by version, not slot:
    a KServe canary revision's pods log ``production``, as every pod serves its own model)."""
    if version is None or stats is None or len(stats) == 0:
        return None
    rows = stats[stats["model_version"] == str(version)]
    return None if rows.empty else rows.iloc[0].to_dict()


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
