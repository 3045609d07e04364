"""Data lineage of a training run: what data.sha256 covers, and that both input paths agree on it."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pytest

from training.chload import ChdbStore, distinct_texts, distinct_texts_from_tidy, load_bulk
from training.dataset import CONTEXT_COLUMNS, build_training_set, training_set_from_distinct
from training.dvsa_reader import read_bulk
from training.synth import generate


@pytest.fixture(scope="module")
def bulk(tmp_path_factory):
    d = tmp_path_factory.mktemp("lineage") / "bulk"
    generate(d, rows=1500, seed=9)
    return d


@pytest.fixture(scope="module")
def tidy(bulk) -> pd.DataFrame:
    return pd.concat(list(read_bulk([bulk])), ignore_index=True)


def test_the_hash_covers_the_context_the_head_is_fitted_on(tidy):
    """Two trainings on the same labels but different vehicle context got the same data.sha256."""
    base = build_training_set(tidy, seed=0).fingerprint
    older = tidy.assign(vehicle_age_years=tidy["vehicle_age_years"] + 10)
    electric = tidy.assign(fuel_type="EL")
    for changed in (older, electric):
        fp = build_training_set(changed, seed=0).fingerprint
        assert fp["sha256"] != base["sha256"]
        assert fp["labels_sha256"] == base["labels_sha256"]  # the labels alone did not change
    # order and chunking still do not matter
    shuffled = build_training_set(tidy.sample(frac=1.0, random_state=1), seed=0, chunk_rows=97).fingerprint
    assert shuffled["sha256"] == base["sha256"]


def test_the_same_rows_hash_the_same_on_the_data_and_clickhouse_paths(tmp_path, bulk, tidy):
    """Same rows, --data vs --clickhouse: data.sha256 991afe37… vs 967a57f3… (one hash per layout)."""
    with ChdbStore(tmp_path / "ch") as store:  # the --clickhouse path: chdb in-process, as `train --clickhouse`
        load_bulk(store, [bulk])
        ch = training_set_from_distinct(distinct_texts(store), seed=4)
    data = build_training_set(bulk, seed=4)  # the --data path on the raw files
    # the same rows without context: one training set, one hash, whichever path read them
    bare = tidy.drop(columns=[c for c in CONTEXT_COLUMNS if c in tidy])
    assert build_training_set(bare, seed=4).fingerprint["sha256"] == ch.fingerprint["sha256"]
    assert ch.fingerprint["labels_sha256"] == data.fingerprint["labels_sha256"]
    # the ClickHouse path carries no vehicle context, so it trains on other inputs than rows with context
    assert ch.fingerprint["sha256"] != data.fingerprint["sha256"]
    from_tidy = training_set_from_distinct(distinct_texts_from_tidy(tidy), seed=4).fingerprint
    assert from_tidy["sha256"] == ch.fingerprint["sha256"]
    # the split seed is not part of the data: same hash for another seed
    assert build_training_set(bare, seed=5).fingerprint["sha256"] == ch.fingerprint["sha256"]


def test_the_clickhouse_source_names_the_server_without_credentials(monkeypatch, tmp_path):
    from training.train_cli import clickhouse_source

    monkeypatch.setenv("MOTLENS_CLICKHOUSE_URL", "https://trainer@ch.example:8443/?database=x")
    monkeypatch.setenv("MOTLENS_CLICKHOUSE_PASSWORD", "s3cret-pw")
    src = clickhouse_source()
    assert src["kind"] == "clickhouse" and src["engine"] == "server" and src["database"] == "motlens_data"
    assert src["url"] == "https://ch.example:8443/?database=x"
    assert "s3cret" not in repr(src) and "trainer" not in repr(src)
    chdb = clickhouse_source(tmp_path / "ch")  # --ch-path: chdb, whatever the URL says
    assert chdb["engine"] == "chdb" and chdb["path"] == str(tmp_path / "ch")


def test_a_run_records_its_training_data_as_a_dataset_input(registry, tiny_bundle):
    from training.train import training_input

    fp: dict[str, Any] = {"sha256": "ab" * 32, "labels_sha256": "cd" * 32, "rows_labelled": 10, "distinct_texts": 4}
    src = {"kind": "clickhouse", "engine": "server", "url": "https://user@ch.example:8443", "database": "d"}
    info = registry.register_bundle(
        tiny_bundle.root, metrics={}, params={}, alias=None, dataset=training_input(fp, src)
    )
    (inp,) = registry.client.get_run(info.run_id).inputs.dataset_inputs
    assert inp.dataset.digest == fp["sha256"][:36] and inp.dataset.source_type == "clickhouse"
    assert json.loads(inp.dataset.source)["url"] == "https://ch.example:8443"  # no user part
    assert json.loads(inp.dataset.profile)["sha256"] == fp["sha256"]
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "training"}
