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
from motlens.errors import describe

EMBEDDINGS_NAME = "embedding"
MIN_PLOT_VECTORS = 3  # distinct embedding vectors the t-SNE plot needs (see embedding_drift)
_DEFAULT_THRESHOLDS = {"model": 0.55, "mmd": 0.015, "ratio": 0.2, "distance": 0.2}


@dataclass
class ColumnDrift:
    column: str
    method: str
    threshold: float
    score: float
    drifted: bool
    regime: str = ""
    rows_reference: int = 0  # the column's values (Evidently drops missing ones before the test)
    rows_current: int = 0


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
    plot_problem: str = ""  # why embeddings.html was not written (the verdict stands)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _present(ref: pd.DataFrame, cur: pd.DataFrame, columns: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """Of ``columns``, those with values on both sides; the others are skipped with a reason (e.g. a
    reference sample built without per-row context has no makes, which is not drift)."""
    cols, skipped = [], {}
    for c in columns:
        sides = (("reference", ref), ("current", cur))
        empty = [name for name, df in sides if (df[c].isna() | df[c].eq(MISSING)).all()]
        if empty:
            skipped[c] = f"no values in the {' or '.join(empty)} data"
        else:
            cols.append(c)
    return cols, skipped


def column_tests(settings: DriftSettings, n_reference: int, n_current: int, n_columns: int) -> dict[str, Any]:
    """Stat tests and thresholds for a column with ``n_reference`` and ``n_current`` values.

    Few values: two-sample p-value tests (chi-square, Kolmogorov-Smirnov) at a Bonferroni-corrected
    level, so the chance that any column drifts by accident stays at ``alpha``. Many values:
    effect sizes (Jensen-Shannon, normed Wasserstein), because there every p-value is tiny. A method
    set in ``cat_method``/``num_method`` other than the regime's own comes with its own default threshold
    (Evidently's registry: a p-value level or a distance, whichever it is), unless ``column_threshold`` is set.
    """
    if min(n_reference, n_current) >= settings.large_window_rows:
        regime, cat, num = "effect size", "jensenshannon", "wasserstein"
        cat_threshold, num_threshold = settings.cat_effect_threshold, settings.effect_threshold
    else:
        regime, cat, num = "p-value", stattests.register(), "ks"
        cat_threshold = num_threshold = settings.alpha / max(n_columns, 1)
    if settings.cat_method not in (None, cat):
        cat, cat_threshold = settings.cat_method, stattests.registered(settings.cat_method, True).default_threshold
    if settings.num_method not in (None, num):
        num, num_threshold = settings.num_method, stattests.registered(settings.num_method, False).default_threshold
    if settings.column_threshold is not None:
        cat_threshold = num_threshold = settings.column_threshold
    return {"regime": regime, "cat_method": cat, "num_method": num, "cat_threshold": cat_threshold,
            "num_threshold": num_threshold}  # fmt: skip


def per_column_tests(
    settings: DriftSettings, reference: pd.DataFrame, current: pd.DataFrame, cols: list[str]
) -> tuple[dict[str, str], dict[str, float], dict[str, str], dict[str, tuple[int, int]]]:
    """Method, threshold, regime and value counts per column, the regime chosen from the column's own
    non-missing values on each side: Evidently drops missing values before testing, so a context column
    that 2 % of 10,000 requests carry is tested on ~200 values, where effect sizes are noise."""
    methods, thresholds, regimes, rows = {}, {}, {}, {}
    for c in cols:
        n_ref, n_cur = int(reference[c].notna().sum()), int(current[c].notna().sum())
        t = column_tests(settings, n_ref, n_cur, len(cols))
        kind = "cat" if c in CATEGORICAL else "num"
        methods[c], thresholds[c] = t[f"{kind}_method"], float(t[f"{kind}_threshold"])
        regimes[c], rows[c] = t["regime"], (n_ref, n_cur)
        if (kind, t["regime"], methods[c], settings.column_threshold) == ("cat", "effect size", "jensenshannon", None):
            k = pd.concat([reference[c], current[c]]).nunique()
            thresholds[c] = js_threshold(settings.cat_effect_threshold, k, min(n_ref, n_cur))
    return methods, thresholds, regimes, rows


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
    methods, thresholds, regimes, rows = per_column_tests(settings, reference, current, cols)
    preset = DataDriftPreset(columns=cols, drift_share=settings.drift_share, per_column_method=methods,
                             per_column_threshold=thresholds)  # fmt: skip
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
            column = m["config"]["column"]
            columns.append(ColumnDrift(
                column=column,
                method=m["config"]["method"],
                threshold=float(m["config"]["threshold"]),
                score=float(m["value"]),
                drifted=status[m["id"]] == "FAIL",
                regime=regimes[column],
                rows_reference=rows[column][0],
                rows_current=rows[column][1],
            ))  # fmt: skip
        elif kind.endswith(":DriftedColumnsCount"):
            count, share = int(m["value"]["count"]), float(m["value"]["share"])
    if count is None or share is None:
        raise RuntimeError("Evidently returned no DriftedColumnsCount")
    kinds = set(regimes.values())
    return DataDriftResult(
        rows_reference=len(reference),
        rows_current=len(current),
        columns=columns,
        skipped_columns=skipped,
        drifted_count=count,
        drifted_share=share,
        drift_share=settings.drift_share,
        detected=share >= settings.drift_share,
        regime=kinds.pop() if len(kinds) == 1 else "mixed",
    )


def random_auc_quantile(n_reference: int, n_current: int, q: float) -> float:
    """Quantile ``q`` of a random scorer's ROC AUC on the held-out half (normal approximation).

    The model method trains on half the rows and scores the other half, so under no drift its AUC
    is distributed like a random scorer's: mean 0.5, sd sqrt((n1 + n2 + 1) / (12 n1 n2)).
    """
    from scipy.stats import norm

    n1, n2 = max(n_reference // 2, 1), max(n_current // 2, 1)
    return 0.5 + float(norm.ppf(q)) * math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))


def _method(settings: DriftSettings, n_reference: int, n_current: int, dim: int) -> tuple[Any, float, dict[str, Any]]:
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
        return ModelDriftMethod(threshold=threshold, bootstrap=False), threshold, {}
    if name == "mmd":
        return MMDDriftMethod(threshold=threshold, bootstrap=False), threshold, {}
    if name == "ratio":
        # Per component, the same regimes as the columns: normed Wasserstein ≥ 0.1 is noise at a few
        # hundred rows (half the components of same-distribution windows), so KS at a Bonferroni level there.
        if min(n_reference, n_current) >= settings.large_window_rows:
            test, level = "wasserstein", settings.effect_threshold
        else:
            test, level = "ks", settings.alpha / max(dim, 1)
        method = RatioDriftMethod(threshold=threshold, component_stattest=test, component_stattest_threshold=level)
        return method, threshold, {"component_test": test, "component_threshold": level}
    return DistanceDriftMethod(threshold=threshold, bootstrap=False), threshold, {}


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

    The score comes from the Evidently drift method alone; with ``html`` the full Evidently report
    (its t-SNE plot costs far more than the test) is rendered afterwards from the same frames. A plot
    that cannot be made is recorded in ``plot_problem`` and the verdict stands: with fewer than
    ``MIN_PLOT_VECTORS`` distinct vectors it is not tried (sklearn's t-SNE crashes the process on one),
    and a failed render (e.g. ``gaussian_kde`` on a side of one repeated vector) is caught.
    """
    reference = cap_rows(reference, settings.embedding_max_rows, settings.seed)
    current = cap_rows(current, settings.embedding_max_rows, settings.seed + 1)
    method, threshold, method_detail = _method(settings, len(reference), len(current), reference.shape[1])
    ref_df, names = embedding_frame(reference)
    cur_df, _ = embedding_frame(current)
    score = float(method(cur_df, ref_df)[0])
    problem = ""
    if html is not None:
        distinct = len(np.unique(np.concatenate([reference, current]), axis=0))
        if distinct < MIN_PLOT_VECTORS:
            problem = f"{distinct} distinct embedding vector(s) in both windows: t-SNE cannot plot them"
        else:
            page, problem = _embeddings_page(ref_df, cur_df, names, method)
            if page is not None:
                atomic_write(html, page)
    return EmbeddingDriftResult(
        rows_reference=len(reference),
        rows_current=len(current),
        method=settings.embedding_method,
        threshold=float(threshold),
        score=score,
        detected=score > threshold,
        detail={"dim": int(reference.shape[1]), **method_detail},
        plot_problem=problem,
    )


def _embeddings_page(
    ref_df: pd.DataFrame, cur_df: pd.DataFrame, names: list[str], method: Any
) -> tuple[str | None, str]:
    """Evidently's EmbeddingsDrift report as HTML, or None and why it could not be rendered."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift

    definition = DataDefinition(numerical_columns=names, embeddings={EMBEDDINGS_NAME: names})
    try:
        snapshot = Report([EmbeddingsDrift(embeddings_name=EMBEDDINGS_NAME, drift_method=method)]).run(
            Dataset.from_pandas(cur_df, data_definition=definition),
            Dataset.from_pandas(ref_df, data_definition=definition),
        )
        return snapshot.get_html_str(as_iframe=False), ""
    except Exception as e:  # noqa: BLE001 - the plot only; the score above stands
        return None, describe(e)
