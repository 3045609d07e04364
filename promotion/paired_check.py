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
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promotion.settings import PromoteSettings
from training.paired import PairedMetric

PAIRED_TAG = "promotion.gate.paired"
#: the split params that decide which side a text is on (``split.max_texts`` only drops texts)
PAIRED_SPLIT_PARAMS = ("split.seed", "split.scheme", "split.holdout_fraction")


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

    def to_json(self) -> dict[str, Any]:
        return {
            "production": self.production,
            "metrics": {m: p.to_json() for m, p in self.metrics.items()},
            "n_texts": self.n_texts,
            "embeddings": self.embeddings,
            "missing": self.missing,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PairedComparison:
        metrics = {
            m: PairedMetric(v["candidate"], v["production"], v["low"], v["high"]) for m, v in d["metrics"].items()
        }
        return cls(str(d["production"]), metrics, int(d["n_texts"]), str(d["embeddings"]), str(d["missing"]))


def same_split(candidate: Mapping[str, Any] | None, production: Mapping[str, Any] | None) -> bool:
    """Both runs record :data:`PAIRED_SPLIT_PARAMS`, equal as strings."""
    a, b = candidate or {}, production or {}
    return all(k in a and k in b and str(a[k]).strip() == str(b[k]).strip() for k in PAIRED_SPLIT_PARAMS)


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
    embedder_for: Callable[[Any], Any],
) -> PairedComparison:
    """Score both heads on the candidate's stored held-out set. Raises :class:`PairedUnavailable` when
    the registry or artifact store does not answer; any other problem (no held-out set stored, one
    that fails its hashes, a bundle that does not verify) comes back as ``missing``."""
    from motlens.bundle import BundleError
    from training.dataset import split_key
    from training.heldout import HELDOUT_DIR, HeldoutError, embedder_files, read_heldout
    from training.paired import compare
    from training.registry import RegistryError, RegistryUnreachable

    try:
        with tempfile.TemporaryDirectory(prefix="motlens-heldout-") as tmp:
            found = registry.fetch_run_dir(candidate, HELDOUT_DIR, Path(tmp))
            if found is None:
                return PairedComparison(
                    production,
                    missing="the candidate's run stores no held-out set (trained by an older motlens, "
                    "registered by hand, or with heldout_max_texts 0)",
                )
            held = read_heldout(found)
        cand, prod = registry.fetch(candidate), registry.fetch(production)
    except RegistryUnreachable as e:
        raise PairedUnavailable(str(e)) from e
    except (RegistryError, BundleError, HeldoutError) as e:
        return PairedComparison(production, missing=f"held-out set or bundle refused: {e}")
    if embedder_files(cand.manifest) != held.embedder_files:
        return PairedComparison(
            production, missing="the stored held-out embeddings come from another embedder than the candidate's bundle"
        )
    context = held.context()
    cand_out = cand.head().predict(held.embeddings, context)
    if embedder_files(prod.manifest) == held.embedder_files:
        prod_emb, how = held.embeddings, "both heads on the stored embeddings (same embedder)"
    else:
        prod_emb = embedder_for(prod).encode(held.texts["text"].tolist())
        how = "production's embedder differs: the texts embedded anew with it"
    metrics = compare(
        cand_out,
        prod.head().predict(prod_emb, context),
        held.labels(),
        settings.offline_metrics,
        resamples=settings.paired_resamples,
        confidence=settings.paired_confidence,
        seed=_seed(candidate, production),
        groups=held.texts["text"].map(split_key).to_numpy(),
    )
    return PairedComparison(production, metrics, len(held.texts), how)
