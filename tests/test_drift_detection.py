"""Drift detection on generated traffic: no false alarms on same-distribution windows, injected
shifts caught (section mix, paraphrased vocabulary through the embeddings only, vehicle context)."""

from __future__ import annotations

import numpy as np
import pytest

from drift.checks import verdict
from drift.job import compare
from drift.settings import DriftSettings
from drift.simulate import BASE_SECTION_WEIGHTS, texts, traffic
from drift.sources import Side

N = 300


@pytest.fixture(scope="module")
def vectors(embedder) -> dict[str, np.ndarray]:
    """Real MiniLM embeddings of every catalogue wording and paraphrase (encoded once)."""
    all_texts = texts() + texts(paraphrased=True)
    return dict(zip(all_texts, embedder.encode(all_texts), strict=True))


def _side(label: str, df, vectors: dict[str, np.ndarray], dims: int | None = None) -> Side:
    emb = np.stack([vectors[t] for t in df["text"]]) if len(df) else np.zeros((0, 384), np.float32)
    if dims is not None:  # a fixed orthonormal projection of the real embeddings (cheap windows)
        q, _ = np.linalg.qr(np.random.default_rng(7).normal(size=(emb.shape[1], dims)))
        emb = emb @ q
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return Side.from_frame(label, df.assign(embedding=list(emb.astype(np.float32))))


def _settings(tmp_path, **kw) -> DriftSettings:
    kw.setdefault("html", False)
    return DriftSettings(output=tmp_path, progress=False, **kw)


def _checks(ref_df, cur_df, vectors, settings, dims=None):
    ref, cur = _side("reference", ref_df, vectors, dims), _side("current", cur_df, vectors, dims)
    checks, detail = compare(ref, cur, settings)
    return {c.name: c for c in checks}, detail, verdict(checks)


@pytest.mark.slow
def test_same_distribution_no_drift_in_at_least_19_of_20_seeds(tmp_path, vectors):
    s = _settings(tmp_path)
    outcomes = []
    for seed in range(20):
        _, detail, (status, code) = _checks(
            traffic(N, 1000 + 2 * seed), traffic(N, 1001 + 2 * seed), vectors, s, dims=32
        )
        assert detail["embedding_drift"]["detail"]["dim"] == 32
        outcomes.append(status)
    assert set(outcomes) <= {"drift", "no_drift"}
    assert outcomes.count("no_drift") >= 19, outcomes


def test_section_mix_change_detected(tmp_path, vectors):
    shifted = np.array(BASE_SECTION_WEIGHTS)
    shifted[1] *= 3.0  # brakes triple
    shifted[5] /= 3.0  # tyres and suspension fall
    checks, detail, (status, code) = _checks(
        traffic(N, 1), traffic(N, 2, section_weights=shifted), vectors, _settings(tmp_path), dims=32
    )
    assert (status, code) == ("drift", 1)
    drifted = {c["column"] for c in detail["data_drift"]["columns"] if c["drifted"]}
    assert "section" in drifted


def test_context_shift_age_and_odometer_detected(tmp_path, vectors):
    checks, detail, (status, code) = _checks(
        traffic(N, 3), traffic(N, 4, age_shift=4.0, odometer_shift=30_000), vectors, _settings(tmp_path), dims=32
    )
    assert code == 1
    drifted = {c["column"] for c in detail["data_drift"]["columns"] if c["drifted"]}
    assert {"vehicle_age_years", "odometer_miles"} <= drifted
    assert drifted.isdisjoint({"section", "severity", "make", "fuel_type"})


def test_paraphrase_shift_caught_by_embeddings_only_at_384_dims(tmp_path, vectors):
    """Same sections, severities, lengths and context; new wording. Only EmbeddingsDrift sees it."""
    checks, detail, (status, code) = _checks(traffic(N, 5), traffic(N, 6, paraphrase=0.7), vectors, _settings(tmp_path))
    assert detail["embedding_drift"]["detail"]["dim"] == 384
    assert checks["data_drift"].status == "pass", checks["data_drift"].message
    assert checks["embedding_drift"].status == "drift", checks["embedding_drift"].message
    assert (status, code) == ("drift", 1)


@pytest.mark.slow
def test_paraphrase_score_same_with_and_without_html(tmp_path, vectors):
    """The scores-only path runs the same Evidently drift method as the full report (+ t-SNE plot)."""
    from drift.evaluate import embedding_drift

    ref = _side("r", traffic(100, 7), vectors, dims=16).embeddings
    cur = _side("c", traffic(100, 8, paraphrase=0.6), vectors, dims=16).embeddings
    s = _settings(tmp_path, min_embedding_rows=50)
    plain = embedding_drift(ref, cur, s)
    html = tmp_path / "emb.html"
    full = embedding_drift(ref, cur, s, html=html)
    assert full.score == pytest.approx(plain.score, abs=1e-12)
    assert full.detected == plain.detected
    assert "Drift in embeddings" in html.read_text()


@pytest.mark.parametrize("n_cur", [40, 0])
def test_insufficient_rows_is_never_a_pass(tmp_path, vectors, n_cur):
    cur = traffic(max(n_cur, 1), 9).iloc[:n_cur]
    checks, detail, (status, code) = _checks(traffic(N, 10), cur, vectors, _settings(tmp_path))
    assert (status, code) == ("insufficient_data", 2)
    assert checks["data_drift"].status == "insufficient"
    assert f"current has {n_cur} rows" in checks["data_drift"].message
    assert "need at least 200" in checks["data_drift"].message


def test_too_few_embeddings_alone_is_insufficient(tmp_path, vectors):
    ref, cur = traffic(N, 11), traffic(N, 12)
    cur_side = _side("current", cur, vectors)
    cur_side.embeddings = cur_side.embeddings[:30]
    checks, _ = compare(_side("reference", ref, vectors), cur_side, _settings(tmp_path))
    by = {c.name: c for c in checks}
    assert by["data_drift"].status == "pass"
    assert by["embedding_drift"].status == "insufficient"
    assert "30 rows with embeddings" in by["embedding_drift"].message
    assert verdict(checks) == ("insufficient_data", 2)


def test_large_windows_switch_to_effect_sizes(tmp_path):
    from drift.evaluate import column_tests

    s = _settings(tmp_path)
    small = column_tests(s, 300, 300, 9)
    large = column_tests(s, 50_000, 8_000, 9)
    assert small["regime"] == "p-value" and small["num_method"] == "ks"
    assert small["cat_threshold"] == pytest.approx(0.01 / 9)
    assert (large["cat_method"], large["num_method"], large["num_threshold"]) == ("jensenshannon", "wasserstein", 0.1)
    assert large["cat_threshold"] == 0.05


def test_an_overridden_method_comes_with_its_own_threshold(tmp_path):
    """cat_method/num_method replaced the test but kept the regime's threshold: a distance judged against
    the p-value level alpha/9 (every column drifts), a p-value against the distance threshold 0.1."""
    from drift.evaluate import column_tests

    small = column_tests(_settings(tmp_path, num_method="wasserstein", cat_method="psi"), 300, 300, 9)
    assert (small["num_method"], small["num_threshold"]) == ("wasserstein", 0.1)
    assert (small["cat_method"], small["cat_threshold"]) == ("psi", 0.1)
    large = column_tests(_settings(tmp_path, num_method="ks", cat_method="psi"), 8_000, 8_000, 9)
    assert (large["num_method"], large["num_threshold"], large["cat_threshold"]) == ("ks", 0.05, 0.1)
    same = column_tests(_settings(tmp_path, num_method="ks"), 300, 300, 9)  # the regime's own test: its level
    assert same["num_threshold"] == pytest.approx(0.01 / 9)
    given = column_tests(_settings(tmp_path, num_method="wasserstein", column_threshold=0.2), 300, 300, 9)
    assert given["num_threshold"] == given["cat_threshold"] == 0.2


def test_same_distribution_with_wasserstein_overridden_is_not_drift(tmp_path):
    from drift.columns import drift_frame
    from drift.evaluate import data_drift

    s = _settings(tmp_path, num_method="wasserstein")
    result = data_drift(drift_frame(traffic(2_000, 21)), drift_frame(traffic(2_000, 22)), s)
    numerical = [c for c in result.columns if c.method == "wasserstein"]
    assert len(numerical) == 5 and {c.threshold for c in numerical} == {0.1}
    assert not [c.column for c in result.columns if c.drifted], result.columns


@pytest.mark.parametrize("n", [4_999, 5_000, 20_000])
def test_a_section_share_shift_is_drift_on_either_side_of_the_effect_size_switch(n, tmp_path):
    """Brakes from 20 % to 29 % of the traffic: the p-value test flagged it at 4,999 rows a side, and
    Jensen-Shannon's 0.1 (0.073 here) let it pass from 5,000 on: more data, less detection."""
    from drift.columns import drift_frame
    from drift.evaluate import data_drift

    weights = np.array(BASE_SECTION_WEIGHTS)
    weights[1] = 0.32
    s = _settings(tmp_path)
    moved = data_drift(drift_frame(traffic(n, 1)), drift_frame(traffic(n, 2, section_weights=weights)), s)
    assert "section" in [c.column for c in moved.columns if c.drifted], moved.columns
    same = data_drift(drift_frame(traffic(n, 3)), drift_frame(traffic(n, 4)), s)
    assert not [c.column for c in same.columns if c.drifted], same.columns


def test_two_sample_chi_square_matches_scipy_contingency():
    import pandas as pd
    from scipy.stats import chi2_contingency

    from drift.stattests import _chi2_two_sample

    ref = pd.Series(["a"] * 50 + ["b"] * 30 + ["c"] * 20)
    cur = pd.Series(["a"] * 30 + ["b"] * 30 + ["c"] * 30 + ["d"] * 10)  # every expected count ≥ 5
    p, drifted = _chi2_two_sample(ref, cur, None, 0.01)
    expected = chi2_contingency([[50, 30, 20, 0], [30, 30, 30, 10]], correction=False).pvalue
    assert p == pytest.approx(expected) and drifted == (expected < 0.01)
    assert _chi2_two_sample(ref, ref, None, 0.01) == (pytest.approx(1.0), False)


def test_traffic_without_context_skips_those_columns(tmp_path, vectors):
    """Text-only requests (no make or fuel type) drifted `make` and `fuel_type` on every run: their
    "(missing)", absent from the reference, was pooled into "(other)" before the empty-side check."""
    cur = traffic(N, 14).assign(make=None, fuel_type=None, vehicle_age_years=np.nan, odometer_miles=np.nan)
    checks, detail, (status, code) = _checks(traffic(N, 13), cur, vectors, _settings(tmp_path), dims=32)
    skipped = detail["data_drift"]["skipped_columns"]
    assert set(skipped) == {"make", "fuel_type", "vehicle_age_years", "odometer_miles"}
    assert skipped["fuel_type"] == "no values in the current data"
    assert len(detail["data_drift"]["columns"]) == 5 and (status, code) == ("no_drift", 0)


def test_reference_without_context_skips_those_columns(tmp_path, vectors):
    """A ClickHouse-path bundle's reference sample has null context: skipped, not 'drifted'."""
    ref = traffic(N, 13).assign(make=None, fuel_type=None, vehicle_age_years=np.nan, odometer_miles=np.nan)
    checks, detail, (status, code) = _checks(ref, traffic(N, 14), vectors, _settings(tmp_path), dims=32)
    skipped = detail["data_drift"]["skipped_columns"]
    assert set(skipped) == {"make", "fuel_type", "vehicle_age_years", "odometer_miles"}
    assert skipped["make"] == "no values in the reference data"
    assert len(detail["data_drift"]["columns"]) == 5 and (status, code) == ("no_drift", 0)


def test_what_the_model_reads_the_same_is_not_drift(tmp_path):
    """The log holds the raw text and the client's spelling; a reference sample stores the normalised
    text's length. A trailing space on every text (KS p 1.9e-17) or a lower-cased fuel type was
    drift, with the model's inputs unchanged."""
    from drift.columns import drift_frame
    from drift.evaluate import data_drift

    reference = traffic(2000, 31)
    reference = reference.assign(text_length=reference["text"].str.len())  # as a bundle's reference sample
    current = traffic(3000, 32)
    current = current.assign(text=current["text"] + " ", fuel_type=current["fuel_type"].str.lower())
    result = data_drift(drift_frame(reference), drift_frame(current), _settings(tmp_path))
    assert not [c.column for c in result.columns if c.drifted], result.columns


def test_a_fuel_logged_by_name_is_its_code():
    """Rows logged before the server passed fuel codes on hold the client's ``Petrol``: the same fuel as
    the reference's ``PE``, as the head reads it."""
    import pandas as pd

    from drift.columns import drift_frame

    frame = traffic(4, 33).assign(fuel_type=["Petrol", " pe ", "Hybrid Electric (Clean)", "Rocket"])
    assert list(drift_frame(frame)["fuel_type"]) == ["PE", "PE", "HY", "ROCKET"]
    assert drift_frame(pd.DataFrame(frame).assign(fuel_type=[None, "", "DI", "di"]))["fuel_type"].tolist() == [
        None,
        None,
        "DI",
        "DI",
    ]


def test_many_categories_at_the_switch_are_not_drift_by_chance(tmp_path):
    """Jensen-Shannon 0.05 flagged a same-distribution make column of 50 categories at 5,000 rows a
    side in about half the windows (noise ≈ √((k − 1) / 4n)); the threshold now grows with k / n."""
    import numpy as np

    from drift.columns import drift_frame
    from drift.evaluate import data_drift, js_threshold

    makes = [f"MAKE{i:02d}" for i in range(80)]
    drifted = []
    for seed in range(3):
        ref, cur = traffic(5_000, 40 + 2 * seed), traffic(5_000, 41 + 2 * seed)
        rng = np.random.default_rng(seed)
        ref["make"], cur["make"] = rng.choice(makes, len(ref)), rng.choice(makes, len(cur))
        result = data_drift(drift_frame(ref), drift_frame(cur), _settings(tmp_path))
        make = next(c for c in result.columns if c.column == "make")
        assert make.threshold == pytest.approx(js_threshold(0.05, 80, 5_000)) and make.threshold > 0.05
        drifted += [c.column for c in result.columns if c.drifted]
    assert not drifted
    assert js_threshold(0.05, 17, 5_000) == 0.05  # the generated sections: the floor applies
