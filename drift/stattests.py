"""A proper two-sample chi-square test, registered with Evidently as ``chi2_two_sample``.

Evidently's own ``chisquare`` is a goodness-of-fit test that treats the reference proportions as
exact; with a reference window as small and noisy as the current one its p-values are too small
(about twice the statistic under no drift), so windows of equal size would "drift" far too often.
This one tests the 2 × k contingency table of category counts (``scipy.stats.chi2_contingency``).
"""

from __future__ import annotations

import pandas as pd

NAME = "chi2_two_sample"


def _chi2_two_sample(
    reference_data: pd.Series, current_data: pd.Series, feature_type: object, threshold: float
) -> tuple[float, bool]:
    from scipy.stats import chi2_contingency

    ref = reference_data.dropna().value_counts()
    cur = current_data.dropna().value_counts()
    table = pd.concat([ref, cur], axis=1).fillna(0).to_numpy().T
    if table.shape[1] < 2:
        return 1.0, False
    p_value = float(chi2_contingency(table, correction=False).pvalue)
    return p_value, p_value < threshold


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
