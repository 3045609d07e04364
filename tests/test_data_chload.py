"""ClickHouse path: real chdb load, de-duplication in SQL, distinct texts with label counts."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from motlens.cli import main
from training.chload import (
    SECTION_COUNT_COLUMNS,
    SEVERITY_COUNT_COLUMNS,
    ChdbStore,
    DataSettings,
    ServerStore,
    distinct_texts,
    distinct_texts_from_tidy,
    load_bulk,
    open_store,
    table_counts,
)
from training.dvsa import BulkFormatError, read_bulk
from training.synth import generate


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chsynth")
    generate(d, rows=2000, seed=5, delimiter=",", zipped=True)
    return d


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, synth_dir):
    """A chdb directory with the synthetic set loaded (closed again: chdb allows one open path)."""
    path = tmp_path_factory.mktemp("chdb") / "db"
    with ChdbStore(path) as store:
        result = load_bulk(store, [synth_dir], chunk_rows=700)
    return path, result


@pytest.fixture
def store(loaded):
    with ChdbStore(loaded[0]) as s:
        yield s


def test_load_reports_rows_and_rate(loaded):
    _, result = loaded
    s = result.summary()
    assert s["inserted"]["test_item"] == 2000
    assert s["inserted"]["test_result"] == result.report.to_dict()["files"][-1]["rows"]
    assert s["rows_per_second"] > 0
    assert result.report.bad_rows == 0


def test_distinct_texts_match_the_parquet_path(store, synth_dir):
    dt = distinct_texts(store)
    assert list(dt.columns[:4]) == ["text", "section", "severity", "n"]
    assert set(SEVERITY_COUNT_COLUMNS) | set(SECTION_COUNT_COLUMNS) <= set(dt.columns)
    assert dt["text"].is_unique
    assert (dt[list(SEVERITY_COUNT_COLUMNS)].sum(axis=1) == dt["n"]).all()
    assert (dt[list(SECTION_COUNT_COLUMNS)].sum(axis=1) == dt["n"]).all()
    tidy = pd.concat(list(read_bulk([synth_dir])), ignore_index=True)
    pd.testing.assert_frame_equal(dt, distinct_texts_from_tidy(tidy))
    assert dt["n"].sum() == len(tidy)


def test_reloading_the_same_files_does_not_double_rows(store, synth_dir):
    before = table_counts(store)
    load_bulk(store, [synth_dir])
    assert table_counts(store) == before
    assert distinct_texts(store)["n"].sum() == before["test_item"]


def test_majority_label_and_counts():
    import numpy as np

    from training.chload import aggregate_texts

    dt = aggregate_texts(
        np.array(["a", "a", "b"], dtype=object),
        np.array([1, 1, 5], dtype=np.int8),
        pd.Series(["major", "dangerous", "advisory"]),
        np.array([3, 5, 2]),
    )
    row = dt.set_index("text").loc["a"]
    assert (
        row["severity"] == "dangerous" and row["n"] == 8 and row["n_major"] == 3 and row["n_section_1"] == 8
    )


def test_api_jsonl_is_refused_with_a_clear_error(tmp_path, store):
    p = tmp_path / "api.jsonl"
    p.write_text('{"motTests": []}\n')
    with pytest.raises(BulkFormatError, match="DVSA bulk files"):
        load_bulk(store, [p])


def test_cli_clickhouse_load(tmp_path, synth_dir, capsys):
    rc = main(["data", "load", str(synth_dir), "--clickhouse", "--ch-path", str(tmp_path / "db"),
               "--report", str(tmp_path / "r.json")])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "rows_per_second" in out and "distinct_texts" in out


def test_settings_pick_server_only_with_url(monkeypatch, tmp_path):
    monkeypatch.setenv("MOTLENS_CLICKHOUSE_URL", "http://user:secret@localhost:1/")
    assert DataSettings().clickhouse_url.startswith("http://")
    monkeypatch.delenv("MOTLENS_CLICKHOUSE_URL")
    with open_store(DataSettings(), tmp_path / "db") as s:
        assert s.kind == "chdb"


@pytest.mark.integration
@pytest.mark.skipif(not os.environ.get("MOTLENS_CLICKHOUSE_URL"), reason="needs a ClickHouse server")
def test_server_load(synth_dir):
    settings = DataSettings(database="motlens_data_test")
    with ServerStore(settings.clickhouse_url, settings.database) as store:
        store.command("DROP DATABASE IF EXISTS motlens_data_test")
        load_bulk(store, [synth_dir])
        dt = distinct_texts(store)
        store.command("DROP DATABASE IF EXISTS motlens_data_test")
    assert dt["n"].sum() > 0
