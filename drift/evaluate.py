"""Evidently runs: DataDriftPreset over the drift columns, EmbeddingsDrift over the 384-d embeddings."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from drift import stattests
from drift.columns import CATEGORICAL, DRIFT_COLUMNS, MISSING, NUMERICAL, dither_scores, embedding_frame
from drift.settings import DriftSettings
from motlens.atomic import atomic_write

EMBEDDINGS_NAME = "embedding"
_DEFAULT_THRESHOLDS = {"model": 0.55, "mmd": 0.015, "ratio": 0.2, "distance": 0.2}


@dataclass
class ColumnDrift:
    column: str
    method: str
    threshold: float
    score: float
    drifted: bool


@dataclass
class DataDriftResult:
    rows_reference: int
    rows_current: int
    columns: list[ColumnDrift]
    skipped_columns: dict[str, str]
    drifted_count: int
    drifted_share: float
    drift_share: float
    detected: bool
    regime: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EmbeddingDriftResult:
    rows_reference: int
    rows_current: int
    method: str
    threshold: float
    score: float
    detected: bool
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _present(ref: pd.DataFrame, cur: pd.DataFrame, columns: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """Of ``columns``, those with values on both sides; the others are skipped with a reason (e.g. a
    reference sample built without per-row context has no makes, which is not drift)."""
    cols, skipped = [], {}
    for c in columns:
        empty = [name for name, df in (("reference", ref), ("current", cur))
                 if (df[c].isna() if c in NUMERICAL else df[c] == MISSING).all()]  # fmt: skip
        if empty:
            skipped[c] = f"no values in the {' or '.join(empty)} data"
        else:
            cols.append(c)
    return cols, skipped


def column_tests(settings: DriftSettings, n_reference: int, n_current: int, n_columns: int) -> dict[str, Any]:
    """Stat tests and thresholds for a pair of windows.

    Small windows: two-sample p-value tests (chi-square, Kolmogorov-Smirnov) at a Bonferroni-corrected
    level, so the chance that any column drifts by accident stays at ``alpha``. Large windows:
    effect sizes (Jensen-Shannon, normed Wasserstein), because there every p-value is tiny.
    """
    if min(n_reference, n_current) >= settings.large_window_rows:
        regime, cat, num = "effect size", "jensenshannon", "wasserstein"
        cat_threshold, num_threshold = settings.cat_effect_threshold, settings.effect_threshold
    else:
        regime, cat, num = "p-value", stattests.register(), "ks"
        cat_threshold = num_threshold = settings.alpha / max(n_columns, 1)
    if settings.column_threshold is not None:
        cat_threshold = num_threshold = settings.column_threshold
    return {
        "regime": regime,
        "cat_method": settings.cat_method or cat,
        "num_method": settings.num_method or num,
        "cat_threshold": cat_threshold,
        "num_threshold": num_threshold,
    }


def js_threshold(floor: float, categories: int, rows: int) -> float:
    """A Jensen-Shannon distance threshold above what chance gives: two samples of ``rows`` from one
    distribution over ``categories`` values lie about √((k − 1) / 4n) apart at the median (simulated,
    natural log: 0.038 for 30 categories and 5,000 rows, 0.070 for 100), so 1.5 × that, never below
    ``floor`` (0.05 would flag a make column of 50 categories as drift in half the windows)."""
    return max(floor, 1.5 * math.sqrt(max(categories - 1, 1) / (4 * max(rows, 1))))


def data_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    settings: DriftSettings,
    html: Path | None = None,
    drift_columns: tuple[str, ...] = DRIFT_COLUMNS,
) -> DataDriftResult:
    """DataDriftPreset over ``drift_columns`` of frames from :func:`drift.columns.drift_frame`, the model
    scores dithered (:func:`drift.columns.dither_scores`)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    cols, skipped = _present(reference, current, drift_columns)
    reference, current = dither_scores(reference, settings.seed), dither_scores(current, settings.seed + 1)
    if not cols:
        raise ValueError("no drift column has values in both windows")
    definition = DataDefinition(
        categorical_columns=[c for c in cols if c in CATEGORICAL],
        numerical_columns=[c for c in cols if c in NUMERICAL],
    )
    tests = column_tests(settings, len(reference), len(current), len(cols))
    regime = tests.pop("regime")
    if regime == "effect size" and tests["cat_method"] == "jensenshannon" and settings.column_threshold is None:
        rows = min(len(reference), len(current))
        tests["per_column_threshold"] = {
            c: js_threshold(settings.cat_effect_threshold, pd.concat([reference[c], current[c]]).nunique(), rows)
            for c in cols
            if c in CATEGORICAL
        }
    preset = DataDriftPreset(columns=cols, drift_share=settings.drift_share, **tests)
    snapshot = Report([preset], include_tests=True).run(
        Dataset.from_pandas(current[cols], data_definition=definition),
        Dataset.from_pandas(reference[cols], data_definition=definition),
    )
    if html is not None:
        atomic_write(html, snapshot.get_html_str(as_iframe=False))
    doc = snapshot.dict()
    status = {t["metric_config"]["metric_id"]: t["status"] for t in doc["tests"]}
    columns: list[ColumnDrift] = []
    count = share = None
    for m in doc["metrics"]:
        kind = m["config"]["type"]
        if kind.endswith(":ValueDrift"):
            columns.append(ColumnDrift(
                column=m["config"]["column"],
                method=m["config"]["method"],
                threshold=float(m["config"]["threshold"]),
                score=float(m["value"]),
                drifted=status[m["id"]] == "FAIL",
            ))  # fmt: skip
        elif kind.endswith(":DriftedColumnsCount"):
            count, share = int(m["value"]["count"]), float(m["value"]["share"])
    if count is None or share is None:
        raise RuntimeError("Evidently returned no DriftedColumnsCount")
    return DataDriftResult(
        rows_reference=len(reference),
        rows_current=len(current),
        columns=columns,
        skipped_columns=skipped,
        drifted_count=count,
        drifted_share=share,
        drift_share=settings.drift_share,
        detected=share >= settings.drift_share,
        regime=regime,
    )


def random_auc_quantile(n_reference: int, n_current: int, q: float) -> float:
    """Quantile ``q`` of a random scorer's ROC AUC on the held-out half (normal approximation).

    The model method trains on half the rows and scores the other half, so under no drift its AUC
    is distributed like a random scorer's: mean 0.5, sd sqrt((n1 + n2 + 1) / (12 n1 n2)).
    """
    from scipy.stats import norm

    n1, n2 = max(n_reference // 2, 1), max(n_current // 2, 1)
    return 0.5 + float(norm.ppf(q)) * math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))


def _method(settings: DriftSettings, n_reference: int, n_current: int) -> tuple[Any, float]:
    from evidently.metrics.embeddings import (
        DistanceDriftMethod,
        MMDDriftMethod,
        ModelDriftMethod,
        RatioDriftMethod,
    )

    name = settings.embedding_method
    threshold = settings.embedding_threshold
    if threshold is None:
        threshold = _DEFAULT_THRESHOLDS[name]
        if name == "model":
            threshold = max(threshold, random_auc_quantile(n_reference, n_current, settings.embedding_quantile))
    if name == "model":
        return ModelDriftMethod(threshold=threshold, bootstrap=False), threshold
    if name == "mmd":
        return MMDDriftMethod(threshold=threshold, bootstrap=False), threshold
    if name == "ratio":
        return RatioDriftMethod(threshold=threshold), threshold
    return DistanceDriftMethod(threshold=threshold, bootstrap=False), threshold


def cap_rows(matrix: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """A uniform random subset of at most ``cap`` rows (order kept)."""
    if len(matrix) <= cap:
        return matrix
    idx = np.sort(np.random.default_rng(seed).choice(len(matrix), cap, replace=False))
    return matrix[idx]


def embedding_drift(
    reference: np.ndarray, current: np.ndarray, settings: DriftSettings, html: Path | None = None
) -> EmbeddingDriftResult:
    """EmbeddingsDrift (method from settings) over [N, D] embedding matrices, each capped in rows.

    With ``html`` the full Evidently report runs (its t-SNE plot costs far more than the test);
    without, the same Evidently drift method runs on the same frames, which gives the same score.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift

    reference = cap_rows(reference, settings.embedding_max_rows, settings.seed)
    current = cap_rows(current, settings.embedding_max_rows, settings.seed + 1)
    method, threshold = _method(settings, len(reference), len(current))
    ref_df, names = embedding_frame(reference)
    cur_df, _ = embedding_frame(current)
    if html is None:
        score = float(method(cur_df, ref_df)[0])
    else:
        definition = DataDefinition(numerical_columns=names, embeddings={EMBEDDINGS_NAME: names})
        snapshot = Report([EmbeddingsDrift(embeddings_name=EMBEDDINGS_NAME, drift_method=method)]).run(
            Dataset.from_pandas(cur_df, data_definition=definition),
            Dataset.from_pandas(ref_df, data_definition=definition),
        )
        atomic_write(html, snapshot.get_html_str(as_iframe=False))
        score = float(snapshot.dict()["metrics"][0]["value"])
    return EmbeddingDriftResult(
        rows_reference=len(reference),
        rows_current=len(current),
        method=settings.embedding_method,
        threshold=float(threshold),
        score=score,
        detected=score > threshold,
        detail={"dim": int(reference.shape[1])},
    )
