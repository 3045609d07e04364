"""Canary vs production on the same texts: prediction agreement, score shift and embedding consistency."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from drift.checks import Check, CheckStatus
from drift.columns import SCORES
from drift.settings import DriftSettings
from drift.sources import Side
from motlens.embedder import cosine_rows
from motlens.stats import wilson


def _shared(production: Side, canary: Side, per_text: Callable[[pd.DataFrame], pd.DataFrame]) -> pd.DataFrame:
    """``per_text`` of each side (indexed by ``text_hash``) joined on the texts both saw; columns suffixed
    ``_production`` / ``_canary``."""
    if production.frame.empty or canary.frame.empty:
        return pd.DataFrame()
    return per_text(production.frame).join(per_text(canary.frame), how="inner", lsuffix="_production",
                                            rsuffix="_canary")  # fmt: skip


def _first_per_text(df: pd.DataFrame) -> pd.DataFrame:
    return df[["text_hash", "section", "severity"]].drop_duplicates("text_hash").set_index("text_hash")


def agreement(production: Side, canary: Side, settings: DriftSettings) -> tuple[Check, dict[str, Any]]:
    """Share of shared texts (joined on ``text_hash``) where both versions predict the same
    section and severity."""
    shared = _shared(production, canary, _first_per_text)
    n = len(shared)
    detail: dict[str, Any] = {"shared_texts": n}
    if n < settings.min_shared_texts:
        msg = (f"only {n} texts were predicted by both versions in the window "
               f"(need {settings.min_shared_texts}); prediction agreement not measured")  # fmt: skip
        return Check("canary_agreement", "insufficient", msg, None, settings.canary_min_agreement), detail
    same_section = shared["section_production"] == shared["section_canary"]
    same_severity = shared["severity_production"] == shared["severity_canary"]
    agreed = int((same_section & same_severity).sum())
    both = agreed / n
    need, conf = settings.canary_min_agreement, settings.canary_confidence
    high = wilson(agreed, n, conf)[1]
    detail |= {"section_agreement": float(same_section.mean()), "severity_agreement": float(same_severity.mean()),
               "agreement": both, "agreement_upper_bound": high}  # fmt: skip
    msg = f"canary and production agree on {both:.1%} of {n} shared texts (need {need:.0%})"
    status: CheckStatus
    if both >= need:
        status = "pass"
    elif high < need:  # below the limit with confidence, not by the luck of a few texts
        status, msg = "drift", f"{msg}; upper {conf:.0%} bound {high:.1%}"
    else:
        status = "insufficient"
        msg += f"; not conclusive: the upper {conf:.0%} bound is {high:.1%}, so more shared texts are needed"
    return Check("canary_agreement", status, msg, both, need), detail


def score_shift(production: Side, canary: Side, settings: DriftSettings) -> tuple[Check, dict[str, Any]]:
    """Mean absolute difference of each model score (``SCORES``) between the two versions on the same
    texts, one value per text and side (its mean there); the larger mean is gated."""
    shared = _shared(production, canary, _mean_scores)
    n = len(shared)
    detail: dict[str, Any] = {"shared_scored_texts": n}
    limit = settings.canary_max_score_shift
    if n < settings.min_shared_texts:
        msg = (f"only {n} texts were scored by both versions in the window "
               f"(need {settings.min_shared_texts}); score shift not measured")  # fmt: skip
        return Check("canary_score_shift", "insufficient", msg, None, limit), detail
    diff = {c: (shared[f"{c}_production"] - shared[f"{c}_canary"]).abs() for c in SCORES}
    detail |= {"score_shift": {c: float(d.mean()) for c, d in diff.items()},
               "score_shift_max": {c: float(d.max()) for c, d in diff.items()}}  # fmt: skip
    worst = max(detail["score_shift"].values())
    shifts = ", ".join(f"{c} {v:.4g}" for c, v in detail["score_shift"].items())
    msg = f"mean |canary − production| per shared text: {shifts} over {n} texts (allowed ≤ {limit})"
    return Check("canary_score_shift", "pass" if worst <= limit else "drift", msg, worst, limit), detail


def _mean_scores(df: pd.DataFrame) -> pd.DataFrame:
    return df.groupby("text_hash")[list(SCORES)].mean()


def embedding_consistency(production: Side, canary: Side, settings: DriftSettings) -> tuple[Check, dict[str, Any]]:
    """Cosine between the two versions' embeddings of the same texts (mean gated, min reported)."""
    p_idx, c_idx = _index(production.embedding_hashes), _index(canary.embedding_hashes)
    # one pair per distinct text both embedded (a text logged 20 times by the canary is one text, not 20)
    pairs = [(p_idx[h], i) for h, i in c_idx.items() if h in p_idx]
    detail: dict[str, Any] = {"shared_embedded_texts": len(pairs)}
    if len(pairs) < settings.min_shared_texts:
        msg = (f"only {len(pairs)} texts carry embeddings from both versions "
               f"(need {settings.min_shared_texts}); embedding consistency not measured")  # fmt: skip
        return Check("canary_embedding_cosine", "insufficient", msg, None, settings.canary_min_cosine), detail
    a = production.embeddings[[p for p, _ in pairs]]
    b = canary.embeddings[[c for _, c in pairs]]
    cos = cosine_rows(a, b)
    mean = float(cos.mean())
    detail |= {"cosine_mean": mean, "cosine_min": float(cos.min()), "cosine_p01": float(np.quantile(cos, 0.01))}
    ok = mean >= settings.canary_min_cosine
    msg = (f"mean cosine {mean:.5f} (min {cos.min():.5f}) over {len(pairs)} shared texts "
           f"(need mean ≥ {settings.canary_min_cosine})")  # fmt: skip
    return Check("canary_embedding_cosine", "pass" if ok else "drift", msg, mean, settings.canary_min_cosine), detail


def _index(hashes: np.ndarray) -> dict[int, int]:
    out: dict[int, int] = {}
    for i, h in enumerate(hashes.tolist()):
        out.setdefault(h, i)
    return out
