"""A proper two-sample chi-square test, registered with Evidently as ``chi2_two_sample``.

Evidently's own ``chisquare`` is a goodness-of-fit test that treats the reference proportions as
exact; with a reference window as small and noisy as the current one its p-values are too small
(about twice the statistic under no drift), so windows of equal size would "drift" far too often.
This one tests the 2 × k contingency table of category counts (``scipy.stats.chi2_contingency``).

The chi-square distribution of the statistic is a large-sample approximation, trusted when every
expected count is at least 5 (Cochran's rule). Sparse tables (rare makes pooled only down to 1 %
of the reference, a current window of a few hundred rows: expected counts of 1-2) have heavier
tails than that, and at the Bonferroni-corrected levels the job uses the approximation raised the
false-alarm rate up to about 2.6 × nominal. For those the p-value is a seeded Monte Carlo
permutation p-value instead: the current window's counts redrawn from the pooled counts
(multivariate hypergeometric, i.e. rows shuffled between the windows), ``(1 + #{X* ≥ X}) / (B + 1)``,
which never falls below the test's level under no drift.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

NAME = "chi2_two_sample"
MIN_EXPECTED = 5.0
MIN_DRAWS, MAX_DRAWS = 2_000, 100_000
SEED = 0


def _statistic(cur: np.ndarray, total: np.ndarray, share_cur: float) -> np.ndarray:
    """Pearson's X² of 2 × k tables given the current row (or rows, [B, k]) and the column totals."""
    e_cur = total * share_cur
    e_ref = total - e_cur
    return np.asarray(((cur - e_cur) ** 2 * (1.0 / e_cur + 1.0 / e_ref)).sum(axis=-1))


def draws_for(threshold: float) -> int:
    """Permutation draws: enough that a p-value at the threshold rests on about 100 exceedances."""
    return int(min(MAX_DRAWS, max(MIN_DRAWS, math.ceil(100 / max(threshold, 1e-12)))))


def two_sample_p_value(ref_counts: np.ndarray, cur_counts: np.ndarray, threshold: float, seed: int = SEED) -> float:
    """p-value of the chi-square test of homogeneity of two count vectors over the same categories:
    the asymptotic one when every expected count is ≥ ``MIN_EXPECTED``, else a permutation p-value."""
    from scipy.stats import chi2_contingency

    ref = np.asarray(ref_counts, np.int64)
    cur = np.asarray(cur_counts, np.int64)
    keep = (ref + cur) > 0
    ref, cur = ref[keep], cur[keep]
    if len(ref) < 2 or ref.sum() == 0 or cur.sum() == 0:
        return 1.0
    res = chi2_contingency(np.stack([ref, cur]), correction=False)
    if float(res.expected_freq.min()) >= MIN_EXPECTED:
        return float(res.pvalue)
    total = ref + cur
    share_cur = float(cur.sum()) / float(total.sum())
    observed = float(_statistic(cur.astype(np.float64), total.astype(np.float64), share_cur))
    n = draws_for(threshold)
    sims = np.random.default_rng(seed).multivariate_hypergeometric(total, int(cur.sum()), size=n)
    stats = _statistic(sims.astype(np.float64), total.astype(np.float64), share_cur)
    exceed = int((stats >= observed * (1 - 1e-9)).sum())  # ties count against drift
    return (1 + exceed) / (n + 1)


def _chi2_two_sample(
    reference_data: pd.Series, current_data: pd.Series, feature_type: object, threshold: float
) -> tuple[float, bool]:
    ref = reference_data.dropna().value_counts()
    cur = current_data.dropna().value_counts()
    table = pd.concat([ref, cur], axis=1).fillna(0).to_numpy().T
    if table.shape[1] < 2:
        return 1.0, False
    p_value = two_sample_p_value(table[0], table[1], threshold)
    return p_value, p_value < threshold


def registered(name: str, categorical: bool) -> Any:
    """Evidently's registered stat test ``name`` (``chi2_two_sample`` included) for a categorical or a
    numerical column; a ValueError naming the choices when there is none."""
    from evidently.legacy.calculations.stattests.registry import _registered_stat_tests, get_registered_stattest
    from evidently.legacy.core import ColumnType

    register()
    kind = ColumnType.Categorical if categorical else ColumnType.Numerical
    try:
        return get_registered_stattest(name, kind)
    except ValueError:
        names = ", ".join(sorted(n for n, types in _registered_stat_tests.items() if kind in types))
        what = "categorical" if categorical else "numerical"
        raise ValueError(f"no {what} stat test {name!r} in Evidently; one of: {names}") from None


def register() -> str:
    """Register the test with Evidently (idempotent); returns its name."""
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    register_stattest(
        StatTest(
            name=NAME,
            display_name="chi-square (two-sample)",
            allowed_feature_types=[ColumnType.Categorical],
            default_threshold=0.05,
        ),
        _chi2_two_sample,
    )
    return NAME
