"""ClickHouse path: real chdb load, de-duplication in SQL, distinct texts with label counts."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
from pydantic import ValidationError
from test_data_reader import read_all, write_fixture

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
from training.dvsa_reader import read_bulk
from training.dvsa_report import BulkFormatError
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
    assert row["severity"] == "dangerous" and row["n"] == 8 and row["n_major"] == 3 and row["n_section_1"] == 8


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


def test_cli_clickhouse_load_reports_the_rows_lost_and_what_it_does_not_count(tmp_path, capsys):
    """orphan_items, unknown_rfr and unlabelled printed 0 though rows were lost; the duplicates, which
    the tables drop as they merge, printed 0 though never counted."""
    # an rfr item_detail lacks, and a type code no rule labels (the fixture has one orphan already)
    d = write_fixture(tmp_path / "in", extra={"test_item": ["1002|777|F|0|", "1002|503|Z|0|"]})
    _, parquet = read_all([d])
    rc = main(["data", "load", str(d), "--clickhouse", "--ch-path", str(tmp_path / "db"),
               "--report", str(tmp_path / "r.json")])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    lost = ("orphan_items", "unknown_rfr", "unlabelled", "rows_out", "bad_rows")
    assert {k: report[k] for k in lost} == {k: parquet[k] for k in lost}
    assert (report["orphan_items"], report["unknown_rfr"], report["unlabelled"]) == (1, 1, 1)
    assert report["duplicate_tests"] is None and report["duplicate_items"] is None
    assert "duplicate_items: not computed" in out and "orphan_items: 1" in out


def test_settings_pick_server_only_with_url(monkeypatch, tmp_path):
    monkeypatch.setenv("MOTLENS_CLICKHOUSE_URL", "http://user@localhost:1/")
    assert DataSettings().clickhouse_url.startswith("http://")
    monkeypatch.setenv("MOTLENS_CLICKHOUSE_URL", "http://user:hunter2@localhost:1/")
    with pytest.raises(ValidationError, match="MOTLENS_CLICKHOUSE_PASSWORD") as e:
        DataSettings()
    assert "hunter2" not in str(e.value)
    monkeypatch.delenv("MOTLENS_CLICKHOUSE_URL")
    with open_store(DataSettings(), tmp_path / "db") as s:
        assert s.kind == "chdb"


@pytest.mark.integration
@pytest.mark.skipif(not os.environ.get("MOTLENS_CLICKHOUSE_URL"), reason="needs a ClickHouse server")
def test_server_load(synth_dir):
    settings = DataSettings(database="motlens_data_test")
    password = settings.password.get_secret_value() if settings.password else ""
    with ServerStore(settings.clickhouse_url, settings.database, password) as store:
        store.command("DROP DATABASE IF EXISTS motlens_data_test")
        load_bulk(store, [synth_dir])
        dt = distinct_texts(store)
        store.command("DROP DATABASE IF EXISTS motlens_data_test")
    assert dt["n"].sum() > 0


@pytest.mark.parametrize("delimiter", ["|", ","])
def test_native_read_matches_python_parse(tmp_path, delimiter):
    """ClickHouse reading the files itself gives the same rows, counts and texts as the Python parser."""
    from test_data_reader import HEADERS, write_fixture

    extra = {
        "test_item": ["1002|502|A", "1002|502|A|1||x|y", HEADERS["test_item"], "notanumber|502|A|1|"],
        "test_result": [HEADERS["test_result"]],
    }
    d = write_fixture(tmp_path / "in", delimiter, extra=extra)
    # a trailing free-text column on CRLF lines: the line end must not stick to the comment
    lines = (d / "test_item.csv").read_bytes().split(b"\r\n")[:-1]
    sep = delimiter.encode()
    lines = [lines[0] + sep + b"rfr_comment", lines[1] + sep + b"both sides", *(ln + sep for ln in lines[2:])]
    (d / "test_item.csv").write_bytes(b"\r\n".join(lines) + b"\r\n")
    results = {}
    for native in (True, False):
        with ChdbStore(tmp_path / f"db-{native}") as s:
            r = load_bulk(s, [d], native=native)
            results[native] = (
                r.inserted,
                [(f.kind, f.rows, f.bad_rows, f.header_rows) for f in r.report.files],
                table_counts(s),
                distinct_texts(s),
            )
    assert results[True][:3] == results[False][:3]
    pd.testing.assert_frame_equal(results[True][3], results[False][3])
    assert "Nearside Front Brake disc significantly and obviously worn both sides (1.1.14 (a) (ii))" in set(
        results[True][3]["text"]
    )
    items = next(f for f in results[True][1] if f[0] == "test_item")
    assert items[2:] == (3, 1)  # 2 wrong-shape rows + 1 unusable key; 1 repeated header
    tidy = pd.concat(list(read_bulk([d])), ignore_index=True)
    pd.testing.assert_frame_equal(results[True][3], distinct_texts_from_tidy(tidy))


def test_native_read_of_crlf_lines_ending_in_a_number(tmp_path):
    """A CRLF pipe file whose last column is numeric: its \\r stayed in the field on the native path
    ('1\\r' is no location id), so every location was lost and the texts differed from Python's."""
    from test_data_reader import write_fixture

    d = write_fixture(tmp_path / "in")
    rows = [line.split(b"|") for line in (d / "test_item.csv").read_bytes().split(b"\r\n")[:-1]]
    (d / "test_item.csv").write_bytes(b"".join(b"|".join([*r[:3], r[4], r[3]]) + b"\r\n" for r in rows))
    texts = {}
    for native in (True, False):
        with ChdbStore(tmp_path / f"db-{native}") as s:
            load_bulk(s, [d], native=native)
            texts[native] = distinct_texts(s)
    pd.testing.assert_frame_equal(texts[True], texts[False])
    assert any(t.startswith(("Nearside", "Offside")) for t in texts[True]["text"])  # locations kept


def test_native_read_of_unreadable_gzip_names_file_and_line(tmp_path):
    import gzip

    from test_data_reader import HEADERS, write_fixture

    d = write_fixture(tmp_path / "in")
    rows = [f"{2000 + i}|1|2021-01-01|4|NT|P|{i}|B|FORD|FOCUS|BLUE|PE|1|2010-01-01" for i in range(3000)]
    data = gzip.compress(("\n".join([HEADERS["test_result"], *rows]) + "\n").encode())
    (d / "test_result.csv").unlink()
    (d / "test_result.csv.gz").write_bytes(data[: len(data) // 2])
    with ChdbStore(tmp_path / "db") as s, pytest.raises(BulkFormatError, match=r"test_result\.csv\.gz:\d+: "):
        load_bulk(s, [d], native=True)
