"""The held-out set a run keeps (training.heldout): written and read back verified, sampled when large,
refused when its files do not match heldout.json or would need pickle."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from training.heldout import EMBEDDINGS, META, TEXTS, HeldoutError, read_heldout, write_heldout

EMBEDDER = {"embedder/model.safetensors": "ab" * 32}


def _holdout(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "text": [f"Brake pipe {i} corroded" for i in range(n)],
            "make": ["FORD"] * n,
            "vehicle_age_years": rng.random(n) * 10,
            "section": rng.integers(0, 9, n),
            "severity": rng.choice(["advisory", "minor", "major", "dangerous"], n),
            "count": rng.integers(1, 9, n),
            "fail_fraction": rng.random(n).astype("float32"),
            "holdout": True,
        },
        index=pd.RangeIndex(100, 100 + n),
    )


def test_round_trip_keeps_rows_in_step_with_their_embeddings(tmp_path):
    ho = _holdout(50)
    emb = np.random.default_rng(1).random((80, 384)).astype(np.float32)
    rows = np.arange(30, 80)  # the held-out texts' rows in the whole embedding array
    meta = write_heldout(tmp_path, ho, emb, rows, embedder=EMBEDDER, max_texts=1000, seed=0)
    held = read_heldout(tmp_path)
    assert meta["n_texts"] == 50 and meta["sample_seed"] is None and held.embedder_files == EMBEDDER
    assert held.texts["text"].tolist() == ho["text"].tolist()
    assert np.array_equal(held.embeddings, emb[30:80]) and held.embeddings.dtype == np.float32
    labels = held.labels()
    assert labels.section.tolist() == ho["section"].tolist() and labels.severity.max() <= 3
    assert set(held.context()) == {"make", "vehicle_age_years"}


def test_a_large_held_out_set_is_sampled_uniformly_and_reproducibly(tmp_path):
    ho = _holdout(500)
    emb = np.tile(np.arange(500, dtype=np.float32)[:, None], (1, 384))  # row i holds i: checks the pairing
    write_heldout(tmp_path / "a", ho, emb, np.arange(500), embedder=EMBEDDER, max_texts=120, seed=3)
    write_heldout(tmp_path / "b", ho, emb, np.arange(500), embedder=EMBEDDER, max_texts=120, seed=3)
    a, b = read_heldout(tmp_path / "a"), read_heldout(tmp_path / "b")
    assert len(a.texts) == 120 and a.meta["heldout_texts"] == 500 and a.meta["sample_seed"] == 3
    assert a.texts["text"].tolist() == b.texts["text"].tolist()
    picked = [int(t.split()[2]) for t in a.texts["text"]]
    assert a.embeddings[:, 0].tolist() == picked  # each text beside its own embedding
    assert min(picked) < 100 and max(picked) > 400  # spread over the set, not its head


@pytest.mark.parametrize("damage", ["texts", "embeddings", "pickled", "format", "labels"])
def test_a_damaged_or_foreign_set_is_refused(tmp_path, damage):
    ho = _holdout(20)
    write_heldout(tmp_path, ho, np.ones((20, 384), np.float32), np.arange(20), embedder=EMBEDDER, max_texts=100,
                  seed=0)  # fmt: skip
    meta = json.loads((tmp_path / META).read_text())
    if damage == "texts":
        ho.iloc[:19].to_parquet(tmp_path / TEXTS)
        match = "sha256"
    elif damage == "embeddings":
        np.save(tmp_path / EMBEDDINGS, np.zeros((20, 384), np.float16))
        match = "sha256"
    else:
        if damage == "pickled":
            np.save(tmp_path / EMBEDDINGS, np.array([object()] * 20), allow_pickle=True)
            match = "unreadable"
        elif damage == "format":
            meta["format"] = 2
            match = "format"
        else:
            bad = ho.assign(severity="fatal")
            bad[["text", "make", "vehicle_age_years", "section", "severity", "count", "fail_fraction"]].to_parquet(
                tmp_path / TEXTS, index=False
            )
            match = "outside the label sets"
        from motlens.bundle import sha256_file

        meta["files"] = {n: sha256_file(tmp_path / n) for n in (TEXTS, EMBEDDINGS)}  # re-signed: hashes agree
        (tmp_path / META).write_text(json.dumps(meta))
    with pytest.raises(HeldoutError, match=match):
        read_heldout(tmp_path)


def test_split_groups_are_kept_for_the_paired_gate_and_read_as_split_keys_from_older_sets(tmp_path):
    """The paired gate resamples split groups whole; a set written before groups were stored gives
    each text's split key (the groups of the split that made it)."""
    ho = _holdout(6).assign(split_group=["rfr:1:defect"] * 3 + ["rfr:2:defect"] * 3)
    emb = np.zeros((6, 4), dtype=np.float32)
    write_heldout(tmp_path / "new", ho, emb, np.arange(6), embedder=EMBEDDER, max_texts=10, seed=0)
    assert read_heldout(tmp_path / "new").groups().tolist() == ho["split_group"].tolist()
    old = ho.drop(columns="split_group").assign(text=["Nearside Brake pipe corroded", "Offside brake pipe corroded",
                                                      "Wiper blade torn", "A", "B", "C"])  # fmt: skip
    write_heldout(tmp_path / "old", old, emb, np.arange(6), embedder=EMBEDDER, max_texts=10, seed=0)
    groups = read_heldout(tmp_path / "old").groups().tolist()
    assert groups[:3] == ["brake pipe corroded", "brake pipe corroded", "wiper blade torn"]
