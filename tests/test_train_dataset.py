from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from motlens.embedder import normalise_text
from motlens.head import HeadOutput
from training.dataset import DataError, build_training_set, group_holdout, split_groups
from training.evaluate import evaluate, expected_calibration_error


def _rows() -> pd.DataFrame:
    rows = []
    for i in range(40):
        rows += [(f"Nearside Front Brake pipe corroded type {i} (1.1.11 (c))", 1, "major", "PE", 5.0, 40000.0)] * 3
        rows += [(f"Offside Rear Tyre worn close to legal limit {i} (5.2.3 (e))", 5, "advisory", "DI", 9.0, 90000.0)]
    # one text with mixed labels and irregular whitespace: majority wins, whitespace is normalised
    rows += [("Horn  not working (7.5 (a))", 7, "minor", "PE", 4.0, 20000.0)] * 2
    rows += [("Horn not working (7.5 (a)) ", 7, "major", "DI", 6.0, None)]
    rows += [("Unlabelled text", None, "major", "PE", 1.0, 1.0), ("Bad severity (1.1 (a))", 1, "fatal", None, 1, 1)]
    df = pd.DataFrame(rows, columns=["text", "section", "severity", "fuel_type", "vehicle_age_years", "odometer_miles"])
    df["make"], df["model"] = "FORD", "FOCUS"
    return df


def test_distinct_texts_majority_labels_and_context():
    ts = build_training_set(_rows(), seed=1, holdout_fraction=0.3)
    t = ts.texts.set_index("text")
    horn = t.loc["Horn not working (7.5 (a))"]
    assert horn["count"] == 3 and horn["section"] == 7 and horn["severity"] == "minor"
    assert horn["severity_purity"] == pytest.approx(2 / 3) and horn["fail_fraction"] == pytest.approx(1 / 3)
    assert horn["fuel_type"] == "PE" and horn["vehicle_age_years"] == pytest.approx(14 / 3)
    assert horn["odometer_miles"] == pytest.approx(20000.0, rel=1e-4)  # missing odometer ignored
    assert len(t) == 81 and t["count"].sum() == 163
    fp = ts.fingerprint
    assert fp["rows_read"] == 165 and fp["rows_unlabelled"] == 2 and fp["rows_labelled"] == 163
    assert fp["rows_severity"] == {"advisory": 40, "minor": 2, "major": 121, "dangerous": 0}
    assert fp["train_texts"] + fp["holdout_texts"] == 81 and fp["holdout_texts"] > 0


def test_blank_texts_are_counted_with_the_unlabelled():
    """Rows whose text is only whitespace were dropped uncounted: rows_read 175, accounted for 165."""
    columns = ["text", "section", "severity", "fuel_type", "vehicle_age_years", "odometer_miles"]
    blank = pd.DataFrame([("   ", 1, "major", "PE", 1.0, 1.0), ("\t", 5, "minor", "PE", 1.0, 1.0)] * 5, columns=columns)
    blank["make"], blank["model"] = "FORD", "FOCUS"
    fp = build_training_set(pd.concat([_rows(), blank], ignore_index=True), seed=1).fingerprint
    assert (fp["rows_read"], fp["rows_unlabelled"], fp["rows_labelled"]) == (175, 12, 163)


def test_split_is_by_text_seeded_and_order_independent():
    df = _rows()
    a = build_training_set(df, seed=3)
    b = build_training_set(df.sample(frac=1.0, random_state=0), seed=3, chunk_rows=17)
    c = build_training_set(df, seed=4)
    assert set(a.train["text"]).isdisjoint(a.holdout["text"])
    pd.testing.assert_frame_equal(a.texts, b.texts)
    assert a.fingerprint["sha256"] == b.fingerprint["sha256"]
    assert set(a.holdout["text"]) != set(c.holdout["text"])
    keys = [f"text {i}" for i in range(4000)]
    assert 0.17 < group_holdout(keys, 0, 0.2).mean() < 0.23
    # the reference sample holds labelled rows of both sides, each pointing at its text
    assert len(a.reference_rows) > 0
    assert a.texts.loc[a.reference_rows["text_index"], "holdout"].nunique() == 2


def test_split_keeps_case_and_location_variants_of_one_defect_on_one_side(tmp_path):
    """The split hashed each distinct text: 84 % of held-out texts had a location (or case) variant
    on the training side, so a lookup with no model scored section macro-F1 1.000 on them."""
    from training.dataset import LOCATION_WORDS, split_key
    from training.synth import _LOCATIONS

    # the vocabulary is the location lookup's (training/synth.py generates DVSA's columns)
    assert {w.casefold() for loc in _LOCATIONS for w in loc if w} <= LOCATION_WORDS
    variants = [
        "Nearside Front Brake pipe corroded (1.1.11 (c))",
        "Offside Rear brake pipe corroded (1.1.11 (c))",
        "BRAKE PIPE CORRODED (1.1.11 (C))",
        "Central Lower Inner Brake pipe corroded (1.1.11 (c))",
    ]
    assert {split_key(v) for v in variants} == {"brake pipe corroded (1.1.11 (c))"}
    assert split_key("Nearside Front") == "nearside front"  # a location alone stays a key
    assert split_key("Brake pipe corroded nearside") == "brake pipe corroded nearside"  # only leading words
    assert split_groups(variants).nunique() == 1
    # on generated data (45 locations): no split key on both sides, the exact texts still apart
    from training.synth import generate

    generate(tmp_path / "bulk", rows=1500, seed=7)
    ts = build_training_set(tmp_path / "bulk", seed=0)
    train_keys = set(ts.train["text"].map(split_key))
    held_keys = set(ts.holdout["text"].map(split_key))
    assert train_keys.isdisjoint(held_keys) and held_keys
    assert set(ts.train["text"]).isdisjoint(ts.holdout["text"])
    share = len(held_keys) / (len(held_keys) + len(train_keys))  # the fraction is one of split keys
    assert 0.1 < share < 0.3


def test_fingerprint_changes_with_labels_and_max_rows():
    df = _rows()
    base = build_training_set(df).fingerprint["sha256"]
    changed = df.copy()
    changed.loc[0, "severity"] = "dangerous"
    assert build_training_set(changed).fingerprint["sha256"] != base
    assert build_training_set(df, max_rows=50, chunk_rows=20).fingerprint["rows_read"] == 50


def test_bad_data_is_refused_clearly(tmp_path):
    with pytest.raises(DataError, match=r"lacks column\(s\) \['severity'\]"):
        build_training_set(pd.DataFrame({"text": ["x"], "section": [1]}))
    with pytest.raises(DataError, match="no labelled defect rows"):
        build_training_set(pd.DataFrame({"text": ["x"], "section": [None], "severity": ["major"]}))
    with pytest.raises(DataError, match="too few"):
        build_training_set(pd.DataFrame({"text": ["x"], "section": [1], "severity": ["major"]}))
    with pytest.raises(DataError, match="no such file"):
        build_training_set(tmp_path / "missing")


def test_tidy_parquet_and_raw_bulk_dirs_give_the_same_training_set(tmp_path):
    from training.dvsa_reader import read_bulk
    from training.synth import generate
    from training.tidy import write_tidy

    generate(tmp_path / "bulk", rows=600, seed=5)
    write_tidy(read_bulk([tmp_path / "bulk"]), tmp_path / "tidy")
    raw = build_training_set(tmp_path / "bulk", seed=2)
    tidy = build_training_set(tmp_path / "tidy", seed=2)
    assert raw.fingerprint == tidy.fingerprint
    assert raw.fingerprint["rows_labelled"] > 500


def test_calibration_and_metrics():
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    ece, table = expected_calibration_error(p, (rng.random(20000) < p).astype(float))
    assert ece < 0.02 and len(table) == 10
    ece_bad, _ = expected_calibration_error(np.full(1000, 0.9), np.zeros(1000))
    assert ece_bad == pytest.approx(0.9)
    sec = np.array([0, 1, 1, 2])
    sev_scores = np.eye(4, dtype=np.float32)[[0, 2, 3, 1]]
    out = HeadOutput(sec, np.eye(9, dtype=np.float32)[sec], sev_scores, sev_scores[:, 2:].sum(axis=1))
    ev = evaluate(out, sec, np.array([0, 2, 3, 0]), np.array([1, 1, 1, 1]))
    assert ev.metrics["section_macro_f1"] == 1.0  # 3 of 9 sections present, all right
    assert ev.metrics["section_classes_present"] == 3
    assert ev.metrics["severity_accuracy"] == 0.75
    assert ev.metrics["fail_auc"] == 1.0 and ev.metrics["fail_brier"] == 0.0


def test_clickhouse_distinct_table_gives_the_same_texts_and_split():
    from training.chload import distinct_texts_from_tidy
    from training.dataset import training_set_from_distinct

    df = _rows()
    labelled = df[df["section"].notna() & df["severity"].isin(["advisory", "minor", "major", "dangerous"])]
    rows = build_training_set(df, seed=5)
    labelled = labelled.assign(text=labelled["text"].str.split().str.join(" "))
    dist = training_set_from_distinct(distinct_texts_from_tidy(labelled), seed=5, reference_rows=50)
    cols = ["text", "count", "section", "severity", "section_purity", "severity_purity", "fail_fraction", "holdout"]
    pd.testing.assert_frame_equal(rows.texts[cols], dist.texts[cols])
    assert dist.texts["vehicle_age_years"].isna().all()
    assert len(dist.reference_rows) == 50
    assert dist.texts.loc[dist.reference_rows["text_index"], "holdout"].nunique() == 2
    fp_rows, fp_dist = rows.fingerprint, dist.fingerprint
    for k in ("rows_labelled", "distinct_texts", "holdout_texts", "rows_section", "rows_severity"):
        assert fp_rows[k] == fp_dist[k], k
    majority_only = distinct_texts_from_tidy(labelled)[["text", "section", "severity", "n"]]
    assert training_set_from_distinct(majority_only, seed=5).texts["section"].equals(dist.texts["section"])


def test_a_raw_directory_with_api_json_trains_on_both(tmp_path):
    """JSON lines beside bulk tables were once dropped without a word by `train --data DIR`."""
    import json

    from test_data_api import VEHICLE

    from motlens.cli import main
    from training.dataset import build_training_set

    raw = tmp_path / "raw"
    assert main(["data", "synth", "--rows", "300", "--seed", "3", "--out", str(raw)]) == 0
    bulk_only = build_training_set(raw, seed=1)
    (raw / "api.jsonl").write_text(json.dumps(VEHICLE) + "\n")
    both = build_training_set(raw, seed=1)
    assert both.fingerprint["rows_read"] == bulk_only.fingerprint["rows_read"] + 3


def test_split_groups_join_texts_through_a_shared_defect_or_split_key_whatever_the_order():
    keys = ["pipe corroded", "nearside pipe corroded", "pipe corroded badly", "hose split", "lamp out", "wiper torn"]
    pairs = pd.DataFrame(
        {
            "key": ["pipe corroded badly", "hose split", "hose split", "lamp out", "wiper torn", "not a kept text"],
            "group": ["rfr:1:defect", "rfr:1:defect", "rfr:2:defect", "rfr:2:defect", None, "rfr:9:defect"],
        }
    )
    g = split_groups(keys, pairs)
    # split key links the first two; defect 1 the third and fourth (a comment variant); defect 2 the fifth
    assert g["pipe corroded"] == g["nearside pipe corroded"] == "pipe corroded"
    assert g["pipe corroded badly"] == g["hose split"] == g["lamp out"] == "rfr:1:defect"  # the smallest defect
    assert g["wiper torn"] == "wiper torn"
    shuffled = split_groups(keys[::-1], pairs.sample(frac=1.0, random_state=1))
    pd.testing.assert_series_equal(shuffled.sort_index(), g.sort_index())
    assert split_groups(keys).tolist() == ["pipe corroded", "pipe corroded", "pipe corroded badly", "hose split",
                                           "lamp out", "wiper torn"]  # fmt: skip
    # a new comment variant (a new split key, smaller than every defect label) does not rename its
    # defect's group: named by the smallest split key, 20 of 40 defects changed side with one variant each
    more = pd.concat([pairs, pd.DataFrame({"key": ["a hose split comment"], "group": ["rfr:1:defect"]})])
    again = split_groups([*keys, "a hose split comment"], more)
    assert again["a hose split comment"] == again["hose split"] == g["hose split"]
    assert again.drop("a hose split comment").equals(g.reindex(again.index.drop("a hose split comment")))


def test_split_by_defect_keeps_a_defects_comment_variants_on_one_side(tmp_path):
    """The split by key keeps a tester's comment in the key: on 20,000 generated rows every held-out
    text had a comment-only variant on the training side, and a lookup with no model (strip the
    comment, take the training side's label) scored macro-F1 1.0 on them. ``split_by="defect"``
    holds out whole defects; both record each text's defect group for the paired gate."""
    from training.dataset import SPLIT_SCHEME_DEFECT, SPLIT_SCHEME_TEXT, split_key
    from training.dvsa_reader import read_bulk
    from training.synth import _COMMENTS, generate

    generate(tmp_path / "bulk", rows=6000, seed=7)
    ts = build_training_set(tmp_path / "bulk", seed=0, split_by="defect")
    assert ts.split_scheme == SPLIT_SCHEME_DEFECT

    def without_comment(text: str) -> str:
        key = split_key(text)
        for c in _COMMENTS:
            key = key.replace(" " + c.casefold(), "")
        return key

    def crossing(t) -> float:  # the share of held-out texts with a comment variant on the training side
        return t.holdout["text"].map(without_comment).isin(set(t.train["text"].map(without_comment))).mean()

    assert len(ts.holdout) > 100 and crossing(ts) == 0
    assert any(c.casefold() in t for t in ts.holdout["text"] for c in _COMMENTS)  # variants were held out
    rows = pd.concat(read_bulk([tmp_path / "bulk"]))  # every defect's rows on one side
    side = rows["text"].map(normalise_text).map(ts.texts.set_index("text")["holdout"])
    assert side.groupby(rows["split_group"]).nunique().max() == 1
    # the default split is by key: new wordings of defects seen in training are held out
    default = build_training_set(tmp_path / "bulk", seed=0)
    assert default.split_scheme == SPLIT_SCHEME_TEXT and crossing(default) > 0.5
    assert default.texts["holdout"].tolist() == group_holdout(default.texts["text"].map(split_key), 0, 0.2).tolist()
    assert default.texts["split_group"].tolist() == ts.texts["split_group"].tolist()
    assert default.fingerprint["sha256"] == ts.fingerprint["sha256"]  # the same data, split otherwise
    # rows without a defect (a hand-made frame, API rows, a motlens-tidy/1 table) split by key
    plain = build_training_set(rows.drop(columns="split_group"), seed=0, split_by="defect")
    assert plain.split_scheme == SPLIT_SCHEME_TEXT
    assert plain.texts["holdout"].tolist() == default.texts["holdout"].tolist()
    with pytest.raises(DataError, match="split_by must be one of"):
        build_training_set(rows, split_by="rfr")
