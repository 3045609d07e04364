"""Large windows whose columns or embeddings hold few values: the test is chosen by the values a
column actually has, not by the window's rows, so effect sizes on a few hundred values (noise) do not
read as drift, while a real shift there is still caught."""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import pytest

from drift.columns import collapse_rare, drift_frame
from drift.evaluate import data_drift, embedding_drift
from drift.settings import DriftSettings
from drift.simulate import traffic

CONTEXT = ["vehicle_age_years", "odometer_miles"]


def _settings(tmp_path, **kw) -> DriftSettings:
    return DriftSettings(output=tmp_path, progress=False, html=False, **kw)


def _sparse(df: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    """Only ``share`` of the requests carry the vehicle's age and mileage (the rest: NaN, as logged)."""
    df = df.copy()
    df.loc[np.random.default_rng(seed).random(len(df)) >= share, CONTEXT] = np.nan
    return df


@pytest.mark.parametrize("reference_share", [0.015, 1.0], ids=["both-sparse", "reference-full"])
def test_sparse_context_in_large_windows_is_not_drift(tmp_path, reference_share):
    """10,000 rows a side, 1.5 % with context: normed Wasserstein on ~150 values flagged the context
    columns in 6 of 6 same-distribution seeds (0.13-0.31 against 0.1)."""
    s = _settings(tmp_path)
    for seed in range(4):
        ref = _sparse(traffic(10_000, 100 + 2 * seed), reference_share, seed)
        cur = _sparse(traffic(10_000, 101 + 2 * seed), 0.015, seed + 50)
        result = data_drift(drift_frame(ref), drift_frame(cur), s)
        by = {c.column: c for c in result.columns}
        assert not [c.column for c in result.columns if c.drifted], result.columns
        for column in CONTEXT:  # a few hundred values: tested by p-value, at the Bonferroni level
            assert by[column].method == "ks" and by[column].threshold == pytest.approx(0.01 / 9), by[column]
            assert by[column].regime == "p-value" and by[column].rows_current < 500, by[column]
        assert by["text_length"].method == "wasserstein" and by["text_length"].regime == "effect size"
        assert result.regime == "mixed"


def test_a_shift_in_a_sparse_context_column_is_still_drift(tmp_path):
    s = _settings(tmp_path)
    ref = _sparse(traffic(10_000, 120), 0.015, 1)
    cur = _sparse(traffic(10_000, 121, age_shift=4.0, odometer_shift=30_000), 0.015, 2)
    result = data_drift(drift_frame(ref), drift_frame(cur), s)
    drifted = {c.column for c in result.columns if c.drifted}
    assert set(CONTEXT) <= drifted and result.detected, result.columns
    assert drifted.isdisjoint({"section", "severity", "text_length"})


@pytest.mark.parametrize("carried", [1, 20, 1_000])
def test_make_and_fuel_type_on_a_few_requests_are_compared_on_those(tmp_path, carried):
    """Once any request carried context, "(missing)" was a category tested against a reference with context on
    every row: mostly text-only traffic was drift for ever. Like the numbers, they compare present values."""
    ref, cur = traffic(2_000, 130), traffic(2_000, 131)
    cur.loc[carried:, ["make", "fuel_type", *CONTEXT]] = None
    result = data_drift(*collapse_rare(drift_frame(ref), drift_frame(cur)), _settings(tmp_path))
    by = {c.column: c for c in result.columns}
    assert not [c.column for c in result.columns if c.drifted], result.columns
    rows = (by["make"].rows_reference, by["make"].rows_current, by["fuel_type"].rows_current)
    assert rows == (2_000, carried, carried)


def test_a_shift_in_sparse_makes_is_still_drift(tmp_path):
    ref, cur = traffic(2_000, 132), traffic(2_000, 133)
    cur.loc[:299, "make"] = "FORD"
    cur.loc[300:, ["make", "fuel_type"]] = None
    result = data_drift(*collapse_rare(drift_frame(ref), drift_frame(cur)), _settings(tmp_path))
    assert [c.column for c in result.columns if c.drifted] == ["make"], result.columns


def _embeddings(df: pd.DataFrame, dim: int = 384, shift: float = 0.0) -> np.ndarray:
    """One fixed random unit vector per distinct text (texts repeat, as logged); ``shift`` moves the
    first 40 % of the components by that many of their standard deviations."""
    vec = {}
    for t in sorted(set(df["text"])):
        v = np.random.default_rng(zlib.crc32(t.encode())).normal(size=dim)
        vec[t] = v / np.linalg.norm(v)
    emb = np.stack([vec[t] for t in df["text"]])
    emb[:, : int(0.4 * dim)] += shift / np.sqrt(dim)
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def test_ratio_method_small_windows_are_not_drift_but_a_shift_is(tmp_path):
    """300 embeddings a side: Evidently's ratio method (normed Wasserstein ≥ 0.1 per component) called
    about half the components drifted between same-distribution windows (0.44-0.53 vs 0.2), 4 of 4."""
    s = _settings(tmp_path, embedding_method="ratio")
    for seed in range(4):
        ref = _embeddings(traffic(300, 10 + 2 * seed))
        same = embedding_drift(ref, _embeddings(traffic(300, 11 + 2 * seed)), s)
        assert not same.detected and same.score < 0.05, same
        assert same.detail["component_test"] == "ks"
        assert same.detail["component_threshold"] == pytest.approx(0.01 / 384)
        moved = embedding_drift(ref, _embeddings(traffic(300, 11 + 2 * seed), shift=1.0), s)
        assert moved.detected and moved.score > 0.3, moved
