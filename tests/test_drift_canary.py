"""Canary mode (``motlens drift --canary``) on an embedded prediction log written by the real writer:
float noise in the scores and traffic from before the canary started must not read as drift (and
float noise must not in version mode either)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from drift.columns import drift_frame
from drift.evaluate import data_drift
from drift.job import DriftJob
from drift.settings import DriftSettings
from drift.simulate import BASE_SECTION_WEIGHTS, records, texts, traffic, with_embeddings

NOW = datetime.now(UTC).replace(microsecond=0)
END = NOW + timedelta(seconds=1)
STARTED = NOW - timedelta(minutes=30)  # when the canaries start; the job's window is the hour before END
N = 3_000  # rows a side: under large_window_rows, so the p-value regime


def _encode(ts: list[str]) -> np.ndarray:
    """A fixed random unit vector per text (the checks only need one embedding per text)."""
    v = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=384) for t in ts])
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _zipf(version: str, seed: int) -> pd.DataFrame:
    """``N`` rows since STARTED whose texts repeat Zipf-like (the top text about a fifth of the rows),
    as MOT traffic does; each text has its one set of outputs (``traffic``'s), context stays per row."""
    outputs = traffic(20 * len(texts()), 0).drop_duplicates("text").set_index("text")
    outputs = outputs[["text_hash", "section", "severity", "section_score", "fail_probability"]]
    ranked = np.random.default_rng(0).permutation(outputs.index.to_numpy())
    p = (1 + np.arange(len(ranked))) ** -1.1
    chosen = np.random.default_rng(seed).choice(ranked, N, p=p / p.sum())
    df = traffic(N, seed, model_version=version, end=NOW, span=NOW - STARTED)
    return df.assign(text=chosen, **{c: outputs.loc[chosen, c].to_numpy() for c in outputs.columns})


def _float_noise(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The same model in another process: each text's scores moved by 1-2 float32 ulps (about 1e-7),
    one frozen value per text, as the embedding cache holds it."""
    step = {t: int(k) for t, k in zip(texts(), np.random.default_rng(seed).choice([-2, -1, 1, 2], len(texts())),
                                      strict=True)}  # fmt: skip
    k = df["text"].map(step).to_numpy(np.int32)
    moved = {
        c: (df[c].to_numpy(np.float32).view(np.int32) + k).view(np.float32)
        for c in ("fail_probability", "section_score")
    }
    return df.assign(**moved)


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """v1 production and v2 (the same model, float noise) / v3 (fail probabilities 0.15 higher) canaries,
    Zipf traffic since STARTED; v4 production whose traffic mix changed at STARTED, v5 its canary."""
    import predlog
    from predlog import PredlogSettings

    production = _zipf("1", 1)
    higher = _zipf("3", 3)
    shifted = BASE_SECTION_WEIGHTS[::-1]
    frames = [
        production,
        _float_noise(_zipf("2", 2), 2),
        higher.assign(fail_probability=(higher["fail_probability"] + 0.15).clip(upper=1.0)),
        traffic(N, 4, model_version="4", section_weights=shifted, age_shift=4.0, end=STARTED, span=NOW - STARTED),
        traffic(N, 5, model_version="4", end=NOW, span=NOW - STARTED),
        traffic(N, 6, model_version="5", end=NOW, span=NOW - STARTED),
    ]
    settings = PredlogSettings(dir=tmp_path_factory.mktemp("predlog"), batch_rows=5_000, flush_interval_s=0.05)
    writer = predlog.open_writer(settings)
    for seed, df in enumerate(frames):
        writer.submit(records(with_embeddings(df, _encode, share=0.15, seed=seed)))
    assert writer.flush(60)
    writer.close(60)
    r = predlog.open_reader(settings)
    yield r
    r.close()


def _run(reader, tmp_path, production: str, canary: str) -> dict:
    registry = SimpleNamespace(resolve=lambda ref: SimpleNamespace(
        version={"production": production, "canary": canary}.get(ref, ref), run_id=None))  # fmt: skip
    settings = DriftSettings(canary=True, window="1h", output=tmp_path, html=False, log_artifact=False,
                             progress=False)  # fmt: skip
    result = DriftJob(settings, reader=reader, registry=registry, now=END).run()
    return result.summary


def _checks(summary: dict) -> dict[str, str]:
    return {c["name"]: c["status"] for c in summary["details"]["checks"]}


def test_a_canary_of_the_same_model_is_no_drift_despite_float_noise(reader, tmp_path):
    summary = _run(reader, tmp_path, "1", "2")
    details = summary["details"]
    assert details["status"] == "no_drift", details["checks"]
    assert details["data_drift"]["regime"] == "p-value"
    tested = {c["column"] for c in details["data_drift"]["columns"]}
    assert tested and not tested & {"section", "severity", "fail_probability", "section_score"}  # per text instead
    shift = details["canary"]["score_shift"]
    assert 0 < max(shift.values()) < 1e-6 and details["canary"]["agreement"] == 1.0


def test_a_canary_whose_scores_differ_is_caught(reader, tmp_path):
    summary = _run(reader, tmp_path, "1", "3")
    assert summary["details"]["status"] == "drift"
    assert _checks(summary) == {"data_drift": "pass", "embedding_drift": "pass", "canary_agreement": "pass",
                                "canary_score_shift": "drift", "canary_embedding_cosine": "pass"}  # fmt: skip
    assert summary["details"]["canary"]["score_shift"]["fail_probability"] > 0.1


def test_production_traffic_before_the_canary_started_is_left_out(reader, tmp_path):
    first = reader.window(model_version="5", start=END - timedelta(hours=1), end=END)["ts"].min()
    assert first > STARTED
    summary = _run(reader, tmp_path, "4", "5")
    assert summary["details"]["status"] == "no_drift", summary["details"]["checks"]
    assert pd.Timestamp(summary["window_start"]) == pd.Timestamp(first)
    assert pd.Timestamp(summary["window_end"]) == pd.Timestamp(END)
    assert 0.95 * N < summary["details"]["rows"]["reference_in_source"] <= N  # v4's rows since then, not 2 N
    assert any("compared from the canary's first row" in m for m in summary["details"]["messages"])
    stored = reader.drift_reports(model_version="5", slot="canary", limit=5)
    assert pd.Timestamp(stored.iloc[0]["window_start"]) == pd.Timestamp(first)


def test_version_mode_float_noise_in_the_scores_is_not_drift(tmp_path):
    settings = DriftSettings(output=tmp_path, html=False, progress=False)
    reference, current = _zipf("1", 11), _float_noise(_zipf("1", 12), 12)
    same = data_drift(drift_frame(reference), drift_frame(current), settings)
    assert same.regime == "p-value" and not same.detected, [c for c in same.columns if c.drifted]
    higher = current.assign(fail_probability=current["fail_probability"] + 0.005)  # five times the resolution
    moved = data_drift(drift_frame(reference), drift_frame(higher), settings)
    assert [c.column for c in moved.columns if c.drifted] == ["fail_probability"]
