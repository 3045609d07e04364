"""The two-sample chi-square test on sparse tables: a permutation p-value where the chi-square
approximation is not trusted (expected counts < 5), the asymptotic one elsewhere."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency

from drift.stattests import _chi2_two_sample, two_sample_p_value

THRESHOLD = 0.01 / 5  # the job's per-column level for five columns at alpha 0.01


def _exact_p(ref: np.ndarray, cur: np.ndarray) -> float:
    """Exact conditional p-value of Pearson's X² by enumerating every current row with the same margins."""
    total, n_cur = ref + cur, int(cur.sum())

    def x2(b: np.ndarray) -> float:
        return float(chi2_contingency(np.stack([total - b, b]), correction=False).statistic)

    observed = x2(cur)
    p = 0.0
    for b in itertools.product(*(range(int(t) + 1) for t in total)):
        if sum(b) != n_cur:
            continue
        prob = math.prod(math.comb(int(t), int(k)) for t, k in zip(total, b, strict=True))
        if x2(np.array(b)) >= observed * (1 - 1e-9):
            p += prob
    return p / math.comb(int(total.sum()), n_cur)


def test_dense_tables_keep_the_asymptotic_p_value():
    ref, cur = np.array([120, 80, 60, 40]), np.array([30, 25, 10, 15])
    expected = chi2_contingency(np.stack([ref, cur]), correction=False).pvalue
    assert two_sample_p_value(ref, cur, THRESHOLD) == expected


def test_sparse_tables_get_the_exact_conditional_p_value():
    ref, cur = np.array([30, 3, 2, 1]), np.array([4, 3, 0, 2])  # expected counts well under 5
    exact = _exact_p(ref, cur)
    assert abs(two_sample_p_value(ref, cur, 0.01) - exact) < 0.01, exact


def test_sparse_same_distribution_rarely_drifts_and_a_real_shift_is_flagged():
    """Many rare categories (1-3 %) and a small current window: no more false alarms than the level
    allows over 200 seeded draws; a shift of a fifth of the rows onto rare categories is still caught."""
    rng = np.random.default_rng(20261129)
    shares = np.concatenate([rng.uniform(0.01, 0.03, 25), [0.4]])
    shares /= shares.sum()
    cats = np.array([f"make-{i}" for i in range(len(shares))])
    alarms = 0
    for seed in range(200):
        r = np.random.default_rng(seed)
        ref = pd.Series(r.choice(cats, 2000, p=shares))
        cur = pd.Series(r.choice(cats, 100, p=shares))
        alarms += _chi2_two_sample(ref, cur, None, THRESHOLD)[1]
    assert alarms <= 4, alarms  # ≤ 2 % of 200 draws (the level is 0.2 %)

    shifted = shares.copy()
    shifted[:5] += 0.04
    shifted[-1] -= 0.2
    caught = 0
    for seed in range(20):
        r = np.random.default_rng(1000 + seed)
        ref = pd.Series(r.choice(cats, 2000, p=shares))
        cur = pd.Series(r.choice(cats, 100, p=shifted))
        p_value, drifted = _chi2_two_sample(ref, cur, None, THRESHOLD)
        caught += drifted
    assert caught >= 18, caught
