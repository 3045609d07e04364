"""`motlens train` at scale: featurising without copies, one meaning for each row/text cap."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest

from motlens.cli import main
from motlens.head import DefectHead, FeatureSpec
from motlens.labels import SEVERITIES
from training.dataset import build_training_set, training_set_from_distinct


def _context(n: int) -> dict:
    rng = np.random.default_rng(1)
    return {"vehicle_age_years": rng.uniform(0, 20, n).tolist(), "odometer_miles": rng.uniform(0, 2e5, n).tolist(),
            "fuel_type": ["PE", "DI", None, "XX"] * (n // 4)}  # fmt: skip


def _peak(fn):  # noqa: ANN001, ANN202
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_featurize_writes_one_array_without_copies_of_the_embeddings():
    """featurize held three copies (``emb[mask]``, ``astype``, ``concatenate``): ≈ 6 KB a text at 1M texts."""
    n, dim = 40_000, 384
    emb = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    head = DefectHead(weights={}, features=FeatureSpec())
    ctx = _context(n)
    expected = np.concatenate([emb, head.features.context_features(n, ctx)], axis=1)

    x, peak = _peak(lambda: head.featurize(emb, ctx))
    np.testing.assert_array_equal(x, expected)
    assert x.dtype == np.float32 and peak < 1.2 * x.nbytes, f"peak {peak / x.nbytes:.2f} × the features"
    del x

    rows = np.flatnonzero(np.arange(n) % 5 != 0)  # a training mask's rows
    sub = {k: [v[i] for i in rows] for k, v in ctx.items()}
    x, peak = _peak(lambda: head.featurize(emb, sub, rows=rows))
    np.testing.assert_array_equal(x, expected[rows])
    assert peak < 1.2 * x.nbytes, f"peak {peak / x.nbytes:.2f} × the features"


def _rows() -> pd.DataFrame:
    rows = []
    for i in range(30):  # text i occurs i + 1 times
        rows += [(f"Brake pipe corroded type {i:02d} (1.1.11 (c))", 1, "major", "PE", 5.0, 40000.0)] * (i + 1)
    df = pd.DataFrame(rows, columns=["text", "section", "severity", "fuel_type", "vehicle_age_years", "odometer_miles"])
    df["make"], df["model"] = "FORD", "FOCUS"
    return df


def test_max_texts_keeps_the_most_frequent_texts_on_both_paths():
    """``--max-rows`` meant the first N rows with ``--data`` but the N most frequent texts with
    ``--clickhouse``; ``max_texts`` is the latter on both."""
    from training.chload import distinct_texts_from_tidy

    df = _rows()
    ts = build_training_set(df, seed=3, max_texts=10, reference_rows=500)
    assert sorted(ts.texts["count"]) == list(range(21, 31))
    assert ts.fingerprint["distinct_texts"] == 10 and ts.fingerprint["rows_labelled"] == sum(range(21, 31))
    assert ts.fingerprint["rows_read"] == len(df)
    kept = set(ts.texts.index)
    assert set(ts.reference_rows["text_index"]) <= kept and len(ts.reference_rows) > 0

    dist = training_set_from_distinct(distinct_texts_from_tidy(df), seed=3, max_texts=10)
    cols = ["text", "count", "section", "severity", "holdout"]
    pd.testing.assert_frame_equal(ts.texts[cols], dist.texts[cols])
    assert build_training_set(df, seed=3, max_texts=100).fingerprint == build_training_set(df, seed=3).fingerprint


def test_train_cli_caps_mean_what_they_say(registry, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    monkeypatch.setenv("MOTLENS_HOME", str(registry.state.home))
    assert main(["train", "--clickhouse", "--ch-path", str(tmp_path / "ch"), "--max-rows", "5"]) == 2
    err = capsys.readouterr().err
    assert "--max-texts" in err and "Traceback" not in err
    assert not (tmp_path / "ch").exists()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max-texts" in help_text and "whole input has been read" in help_text


def _many_texts(n_rows: int = 12_000, n_texts: int = 4_000) -> pd.DataFrame:
    """Zipf-distributed texts, each row with its own odometer (so a reference row names its source row)."""
    rng = np.random.default_rng(0)
    ids = np.minimum(rng.zipf(1.3, n_rows), n_texts) - 1
    return pd.DataFrame({"text": [f"defect text number {i} (1.{i % 9}.1 (a))" for i in ids],
                         "section": (ids % 9).astype(int), "severity": np.asarray(SEVERITIES, dtype=object)[ids % 4],
                         "fuel_type": "PE", "vehicle_age_years": 5.0, "odometer_miles": np.arange(n_rows, dtype=float),
                         "make": "F", "model": "X"})  # fmt: skip


@pytest.mark.parametrize("source", ["frame", "tidy"])
def test_max_texts_keeps_a_full_drift_reference_on_data(source, tmp_path):
    """The reference was drawn from every held-out row while streaming, then cut to the kept texts:
    with --max-texts far fewer than ``reference_rows`` remained (the --clickhouse path kept them all).
    Now it holds ``reference_rows`` rows of the kept texts whenever that many exist."""
    from training.chload import distinct_texts_from_tidy
    from training.tidy import write_tidy

    df = _many_texts()
    data = df
    if source == "tidy":
        write_tidy([df.iloc[:5000], df.iloc[5000:]], tmp_path / "tidy", rows_per_file=4000)
        data = tmp_path / "tidy"
    ts = build_training_set(data, seed=3, max_texts=300, reference_rows=400, chunk_rows=3000)
    assert ts.fingerprint["distinct_texts"] == 300 and ts.fingerprint["rows_labelled"] > 400
    assert len(ts.reference_rows) == 400
    ch = training_set_from_distinct(distinct_texts_from_tidy(df), seed=3, max_texts=300, reference_rows=400)
    assert len(ch.reference_rows) == len(ts.reference_rows)
    # each reference row is a real input row of its text, with that row's own context
    picked = df.set_index("odometer_miles").loc[ts.reference_rows["odometer_miles"].astype(float), "text"]
    named = ts.texts.loc[ts.reference_rows["text_index"], "text"]
    assert picked.str.lower().tolist() == named.str.lower().tolist()
    assert ts.reference_rows["odometer_miles"].is_unique


def test_max_texts_with_max_rows_draws_the_reference_from_the_rows_read():
    df = _many_texts()
    ts = build_training_set(df, seed=3, max_rows=6000, max_texts=300, reference_rows=400, chunk_rows=2500)
    assert ts.fingerprint["rows_read"] == 6000
    assert len(ts.reference_rows) == min(400, ts.fingerprint["rows_labelled"])
    assert (ts.reference_rows["odometer_miles"] < 6000).all()  # only from the first 6000 rows
    # a fixed seed gives the same sample
    again = build_training_set(df, seed=3, max_rows=6000, max_texts=300, reference_rows=400, chunk_rows=2500)
    pd.testing.assert_frame_equal(ts.reference_rows, again.reference_rows)


def _tv(ts, rows: pd.DataFrame, col: str) -> float:
    """Total-variation distance between ``col``'s distribution over the reference and over ``rows``."""
    ref = ts.texts.iloc[ts.reference_rows["text_index"].to_numpy()][col].value_counts(normalize=True)
    return float(0.5 * rows[col].value_counts(normalize=True).subtract(ref, fill_value=0).abs().sum())


@pytest.mark.parametrize("path", ["data", "clickhouse", "max_texts"])
def test_the_drift_reference_is_uniform_over_all_labelled_rows(path):
    """The reference held held-out rows only, and the split is by text: on Zipf texts a few texts
    carry a third of the rows and only some of them are held out, so its section/severity mix was
    0.23-0.62 (total variation) away from the rows' and a drift job flagged drift on traffic of the
    very population the model was trained on. Now it is a uniform sample of every labelled row."""
    from training.chload import distinct_texts_from_tidy

    df = _many_texts()
    for seed in range(5):
        if path == "clickhouse":
            ts = training_set_from_distinct(distinct_texts_from_tidy(df), seed=seed, reference_rows=1000)
        else:
            cap = 300 if path == "max_texts" else None
            ts = build_training_set(df, seed=seed, reference_rows=1000, chunk_rows=3000, max_texts=cap)
        rows = df[df["text"].isin(set(ts.texts["text"]))]
        for col in ("section", "severity"):
            assert _tv(ts, rows, col) < 0.08, (seed, col, _tv(ts, rows, col))
        assert len(ts.reference_rows) == 1000, seed
        assert ts.texts.loc[ts.reference_rows["text_index"], "holdout"].nunique() == 2, seed


def test_max_texts_on_a_one_shot_stream_keeps_what_it_drew_and_says_so(caplog):
    """Chunks that cannot be read twice: the streamed sample, cut to the kept texts, with a warning."""
    df = _many_texts()
    ts = build_training_set(iter([df.iloc[:6000], df.iloc[6000:]]), seed=3, max_texts=300, reference_rows=400)
    assert 0 < len(ts.reference_rows) < 400
    assert any("cannot be read twice" in r.getMessage() for r in caplog.records)


def test_a_capped_raw_read_removes_its_partitions_before_the_second_read(tmp_path, monkeypatch):
    """--max-rows with --max-texts on a raw directory: the first read stopped inside the bulk reader,
    whose temporary partitions stayed on disk while the second read partitioned the input again."""
    import tempfile

    import training.dataset as dataset
    from training.synth import generate

    raw = tmp_path / "raw"
    generate(raw, rows=6000, seed=1)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    live: list[int] = []
    resample = dataset._Aggregator._resample_reference

    def spy(self, chunks, keys):  # noqa: ANN001, ANN202
        def counted():
            for chunk in chunks:
                live.append(len([p for p in tmp.iterdir() if p.name.startswith("motlens-bulk-")]))
                yield chunk

        return resample(self, counted(), keys)

    monkeypatch.setattr(dataset._Aggregator, "_resample_reference", spy)
    ts = build_training_set(raw, seed=3, max_rows=3000, max_texts=30, reference_rows=150, chunk_rows=1000)
    assert live and max(live) == 1, live  # the second read's partitions only
    assert len(ts.reference_rows) > 0 and not list(tmp.iterdir())
