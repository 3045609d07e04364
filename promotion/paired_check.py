"""The offline gate's paired comparison: production's head scored on the candidate's held-out texts.

Training keeps its held-out texts with their embeddings (run artifact ``heldout/``,
:mod:`training.heldout`). Both heads are run on them — on the stored embeddings when production's
bundle has the same embedder files, else on the texts embedded anew by production's embedder — and
:func:`training.paired.compare` gives each metric's difference with a bootstrap interval. Only
meaningful when production never trained on those texts, i.e. when both runs used the same split
(scheme, seed, held-out fraction: the split hashes each text's group key, so the data and
``--max-texts`` may differ); the workflow checks that before asking.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promotion.settings import PromoteSettings
from training.paired import PairedMetric

log = logging.getLogger(__name__)

PAIRED_TAG = "promotion.gate.paired"
#: at most this many held-out texts are embedded anew when production's embedder differs (a second
#: MiniLM in the promotion pod: ≈ 2.5 minutes for 20,000 texts on one core, and its memory)
REEMBED_MAX_TEXTS = 5_000
#: the split params that decide which side a text is on (``split.max_texts`` only drops texts)
PAIRED_SPLIT_PARAMS = ("split.seed", "split.scheme", "split.holdout_fraction")
#: schemes that put a text on its group's side, where the whole data set decides the groups (new data
#: can join two, ``split.max_texts`` can part them): the split by defect
#: (``training.dataset.SPLIT_SCHEME_DEFECT``); its runs pair only on the same data
DATA_DEPENDENT_SCHEMES = frozenset({"group-rfr-v2"})
#: the params that must be equal too for such a scheme
DATA_PARAMS = ("data.sha256", "split.max_texts")


class PairedUnavailable(Exception):
    """The comparison could not run (registry or artifact store down): no verdict, try again later."""


@dataclass
class PairedComparison:
    """What the comparison found: ``metrics`` when it ran, else ``missing`` says why not."""

    production: str
    metrics: dict[str, PairedMetric] = field(default_factory=dict)
    n_texts: int = 0
    embeddings: str = ""
    missing: str = ""
    lasting: bool = False  # asking again gives the same answer: kept in the tag

    def to_json(self) -> dict[str, Any]:
        return {
            "production": self.production,
            "metrics": {m: p.to_json() for m, p in self.metrics.items()},
            "n_texts": self.n_texts,
            "embeddings": self.embeddings,
            "missing": self.missing,
            "lasting": self.lasting,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PairedComparison:
        metrics = {
            m: PairedMetric(v["candidate"], v["production"], v["low"], v["high"]) for m, v in d["metrics"].items()
        }
        return cls(
            str(d["production"]),
            metrics,
            int(d["n_texts"]),
            str(d["embeddings"]),
            str(d["missing"]),
            bool(d["lasting"]),
        )


def same_split(candidate: Mapping[str, Any] | None, production: Mapping[str, Any] | None) -> bool:
    """Both runs record :data:`PAIRED_SPLIT_PARAMS`, equal as strings."""
    a, b = candidate or {}, production or {}
    return all(k in a and k in b and str(a[k]).strip() == str(b[k]).strip() for k in PAIRED_SPLIT_PARAMS)


def data_dependence(candidate: Mapping[str, Any] | None, production: Mapping[str, Any] | None) -> str | None:
    """Why two runs on one split of a :data:`DATA_DEPENDENT_SCHEMES` scheme cannot be paired (production
    may have trained on some of the candidate's held-out texts), else None."""
    a, b = candidate or {}, production or {}
    scheme = str(a.get("split.scheme", "")).strip()
    if scheme not in DATA_DEPENDENT_SCHEMES:
        return None
    differ = [k for k in DATA_PARAMS if k not in a or k not in b or str(a[k]).strip() != str(b[k]).strip()]
    if not differ:
        return None
    return (
        f"split {scheme} groups texts by the whole data set and the runs differ in {', '.join(differ)}, so "
        "production may have trained on some of the candidate's held-out texts"
    )


def settings_key(settings: PromoteSettings) -> dict[str, Any]:
    """The settings a stored comparison was made with (another value means computing it again)."""
    return {
        "metrics": list(settings.offline_metrics),
        "resamples": settings.paired_resamples,
        "confidence": settings.paired_confidence,
    }


def cached(tags: Mapping[str, str], production: str, settings: PromoteSettings) -> PairedComparison | None:
    """The comparison stored in the candidate's :data:`PAIRED_TAG` for this production and settings."""
    try:
        stored = json.loads(tags.get(PAIRED_TAG, ""))
        if stored["settings"] != settings_key(settings) or str(stored["result"]["production"]) != production:
            return None
        return PairedComparison.from_json(stored["result"])
    except (ValueError, KeyError, TypeError):
        return None


def tag_value(result: PairedComparison, settings: PromoteSettings) -> str:
    return json.dumps({"settings": settings_key(settings), "result": result.to_json()}, sort_keys=True)


def _seed(candidate: str, production: str) -> int:
    """The same pair always draws the same resamples (a re-run gives the same verdict)."""
    return int.from_bytes(hashlib.sha256(f"{candidate}>{production}".encode()).digest()[:8], "big")


def run(
    registry: Any,
    candidate: str,
    production: str,
    settings: PromoteSettings,
    load_embedder: Callable[[Any], Any],
) -> PairedComparison:
    """Score both heads on the candidate's stored held-out set. Raises :class:`PairedUnavailable` when
    the held-out set or a bundle cannot be fetched (registry, artifact store or its client failing);
    any other problem comes back as ``missing`` — ``lasting`` when asking again cannot change it (no
    held-out set stored, embeddings of another embedder), else retried at the next gate (a download
    that fails its hashes, a head that does not run)."""
    from motlens.bundle import BundleError
    from motlens.credentials import redact
    from training.heldout import HELDOUT_DIR, META, HeldoutError, embedder_files, read_heldout

    try:
        with tempfile.TemporaryDirectory(prefix="motlens-heldout-") as tmp:
            found = registry.fetch_run_dir(candidate, HELDOUT_DIR, Path(tmp))
            if found is None:
                return PairedComparison(
                    production,
                    missing="the candidate's run stores no held-out set (trained by an older motlens, "
                    "registered by hand, or with heldout_max_texts 0)",
                    lasting=True,
                )
            _check_pinned(registry, candidate, found / META)
            held = read_heldout(found)
        cand, prod = registry.fetch(candidate), registry.fetch(production)
    except (BundleError, HeldoutError) as e:
        return PairedComparison(production, missing=f"held-out set or bundle refused: {e}")
    except Exception as e:  # noqa: BLE001 - MLflow, HTTP or the artifact store's client (S3): no verdict
        raise PairedUnavailable(redact(f"{type(e).__name__}: {e}")) from e
    if embedder_files(cand.manifest) != held.embedder_files:
        return PairedComparison(
            production,
            missing="the stored held-out embeddings come from another embedder than the candidate's bundle",
            lasting=True,
        )
    try:
        return _score(held, cand, prod, candidate, production, settings, load_embedder)
    except Exception as e:  # noqa: BLE001 - a head or embedder that does not load or run: say so, retry later
        log.warning("paired comparison of %s with %s could not score: %s", candidate, production, e)
        return PairedComparison(production, missing=redact(f"could not score the heads: {type(e).__name__}: {e}"))


def _check_pinned(registry: Any, version: str, manifest: Path) -> None:
    """The downloaded held-out manifest must be the one registered with ``version`` (its tag
    :data:`~training.registry.HELDOUT_DIGEST_TAG`; versions registered before the tag have none)."""
    from motlens.bundle import sha256_file
    from training.heldout import HeldoutError
    from training.registry import HELDOUT_DIGEST_TAG

    pinned = registry.resolve(version).tags.get(HELDOUT_DIGEST_TAG)
    if not pinned:
        return
    try:
        got = sha256_file(manifest)
    except OSError as e:
        raise HeldoutError(f"{manifest.name} of version {version} unreadable: {e}") from e
    if got != pinned:
        raise HeldoutError(
            f"{manifest.name} of version {version}: sha256 {got} is not the {pinned} registered with it "
            "(the stored held-out set was changed)"
        )


def _score(
    held: Any,
    cand: Any,
    prod: Any,
    candidate: str,
    production: str,
    settings: PromoteSettings,
    load_embedder: Callable[[Any], Any],
) -> PairedComparison:
    import numpy as np

    from training.heldout import embedder_files
    from training.paired import compare

    seed = _seed(candidate, production)
    total = len(held.texts)
    if embedder_files(prod.manifest) == held.embedder_files:
        prod_emb, how = held.embeddings, "both heads on the stored embeddings (same embedder)"
    else:  # a second model in the process: embed a bounded sample, then let it go
        if total > REEMBED_MAX_TEXTS:
            held = held.subset(np.sort(np.random.default_rng(seed).choice(total, REEMBED_MAX_TEXTS, replace=False)))
        embedder = load_embedder(prod)
        try:
            prod_emb = embedder.encode(held.texts["text"].tolist())
        finally:
            del embedder
        how = f"production's embedder differs: {len(held.texts)} of {total} texts embedded anew with it"
    context = held.context()
    metrics = compare(
        cand.head().predict(held.embeddings, context),
        prod.head().predict(prod_emb, context),
        held.labels(),
        settings.offline_metrics,
        resamples=settings.paired_resamples,
        confidence=settings.paired_confidence,
        seed=seed,
        groups=held.groups(),
    )
    return PairedComparison(production, metrics, len(held.texts), how, lasting=True)
