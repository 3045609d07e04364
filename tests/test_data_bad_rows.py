"""Bad rows of the DVSA bulk files: a table most of whose rows are bad is refused on every path, each
bad row is counted with its record number, and the counts reconcile (rows read = kept + bad)."""

from __future__ import annotations

import json
import logging
import zipfile

import pandas as pd
import pytest
from test_data_api import VEHICLE, _test
from test_data_reader import HEADERS, ROWS, read_all, write_fixture

from motlens.cli import main
from training.chload import ChdbStore, load_bulk, table_counts
from training.dataset import build_training_set, iter_source
from training.dvsa_reader import BulkReader
from training.dvsa_report import BulkFormatError, BulkReport, FileReport
from training.history_api import read_jsonl

UNDATED = r"tr2020\.csv: record 2: 150 of 150 rows have no readable test_date"


def _results(n: int, date: str) -> list[str]:
    return [f"{5000 + i}|1|{date}|4|NT|P|{i}|B|FORD|FOCUS|BLUE|PE|1|2010-01-01" for i in range(n)]


def _undated_year(d):
    """A year's test_result file whose dates are all in a form not read (20200304)."""
    (d / "tr2020.csv").write_text("\n".join([HEADERS["test_result"], *_results(150, "20200304")]) + "\n")
    return d


def test_a_file_whose_dates_are_all_unreadable_is_refused_naming_it_and_the_column(tmp_path, capsys):
    """It was dropped with exit 0 (rows=591 bad=591, its defects counted as orphans): the rule that
    refuses a file of mostly wrong-shape rows did not count rows that failed typing."""
    d = _undated_year(write_fixture(tmp_path / "in"))
    with pytest.raises(BulkFormatError, match=UNDATED):
        list(BulkReader([d]))
    assert main(["data", "load", str(d), "--out", str(tmp_path / "tidy")]) == 1
    err = capsys.readouterr().err
    assert "tr2020.csv: record 2: 150 of 150 rows have no readable test_date" in err and err.count("\n") == 1


def test_a_file_with_some_unreadable_dates_is_read_and_they_are_counted(tmp_path):
    d = write_fixture(tmp_path / "in")
    rows = _results(120, "20200304") + _results(130, "2020-03-04")
    (d / "tr2020.csv").write_text("\n".join([HEADERS["test_result"], *rows]) + "\n")
    _, rep = read_all([d])
    year = next(f for f in rep["files"] if f["name"].endswith("tr2020.csv"))
    assert (year["rows"], year["bad_rows"], year["bad_values"]) == (250, 120, {"test_date": 120})


@pytest.mark.parametrize("native", [True, False])
def test_clickhouse_refuses_it_before_inserting_its_rows(tmp_path, native):
    d = _undated_year(write_fixture(tmp_path / "in"))
    with ChdbStore(tmp_path / "db") as store:
        with pytest.raises(BulkFormatError, match=UNDATED):
            load_bulk(store, [d], native=native)
        assert table_counts(store)["test_result"] == len(ROWS["test_result"])  # test_result.csv's, none of tr2020's


@pytest.mark.parametrize("native", [None, True, False])
def test_a_test_result_without_test_date_is_refused_naming_file_and_column(tmp_path, native):
    """It read as `no rows were read from the inputs`, without the file; on the ClickHouse path as
    ~10 KB of SQL at `:0:`."""
    d = write_fixture(tmp_path / "in")
    keep = [i for i, c in enumerate(HEADERS["test_result"].split("|")) if c != "test_date"]
    lines = [HEADERS["test_result"], *ROWS["test_result"]]
    (d / "test_result.csv").write_text("\n".join("|".join(ln.split("|")[i] for i in keep) for ln in lines) + "\n")
    no_date = r"test_result\.csv:1: the test_result table has no test_date column"
    with pytest.raises(BulkFormatError, match=no_date) as e:
        if native is None:
            list(BulkReader([d]))
        else:
            with ChdbStore(tmp_path / "db") as store:
                load_bulk(store, [d], native=native)
    assert len(str(e.value)) < 400 and "SELECT" not in str(e.value)


def test_training_on_raw_files_refuses_them_too_and_logs_the_counts(tmp_path, caplog):
    """`motlens train --data RAW` dropped the read's report: bad rows and orphans went unseen."""
    d = write_fixture(tmp_path / "in", extra={"test_item": ["notanumber|502|A|1|"]})
    with caplog.at_level(logging.INFO, logger="training.dataset"):
        assert sum(len(c) for c in iter_source(d)) == 6
    (record,) = [r for r in caplog.records if r.name == "training.dataset"]
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "bad_rows=1," in message and "orphan_items=1," in message and "rows_out=6" in message
    assert "test_item.csv: 1 of 8 rows bad {'test_id': 1}, first bad records [9]" in message
    with pytest.raises(BulkFormatError, match=UNDATED):
        build_training_set(_undated_year(d))


def test_rows_failing_typing_are_numbered_and_the_counts_reconcile(tmp_path):
    """Rows that failed typing had no numbers, and `rows` counted them but not the rows of the wrong
    field count."""
    extra = {
        "test_result": [
            "1004|1|20210304|4|NT|P|1|B|FORD|KA|RED|PE|1|2010-01-01",  # record 5: no date read
            "10x5|1|2021-03-04|4|NT|P|1|B|FORD|KA|RED|PE|1|2010-01-01",  # record 6: no test_id
            "1006|1|2021-03-04|4",  # record 7: too few fields
        ]
    }
    _, rep = read_all([write_fixture(tmp_path / "in", extra=extra)])
    result = next(f for f in rep["files"] if f["kind"] == "test_result")
    assert result["bad_records"] == [5, 6, 7]
    assert result["bad_values"] == {"test_date": 1, "test_id": 1}
    assert (result["rows"], result["bad_rows"]) == (3 + 3, 3)  # read = kept + bad


def test_both_clickhouse_reads_count_bad_rows_as_the_python_reader(tmp_path):
    extra = {"test_result": ["1004|1|20210304|4|NT|P|1|B|FORD|KA|RED|PE|1|2010-01-01", "1006|1|2021-03-04|4"]}
    d = write_fixture(tmp_path / "in", extra=extra)
    counts = []
    for native in (True, False):
        with ChdbStore(tmp_path / f"db-{native}") as store:
            files = load_bulk(store, [d], native=native).report.files
        counts.append([(f.kind, f.rows, f.bad_rows, f.bad_values) for f in files if f.kind == "test_result"])
    assert counts[0] == counts[1] == [("test_result", 5, 2, {"test_date": 1})]


@pytest.mark.parametrize("clickhouse", [False, True])
def test_item_detail_rows_without_a_usable_rfr_id_are_counted(tmp_path, clickhouse):
    """They were dropped uncounted."""
    d = write_fixture(tmp_path / "in", extra={"item_detail": ["5O5|4|11|N|Brake pipe corroded|Y|1.1.11 (a)||1|Major"]})
    if clickhouse:
        with ChdbStore(tmp_path / "db") as store:
            files = load_bulk(store, [d]).report.to_dict()["files"]
    else:
        files = read_all([d])[1]["files"]
    detail = next(f for f in files if f["kind"] == "item_detail")
    assert (detail["rows"], detail["bad_rows"], detail["bad_records"]) == (5, 1, [6])
    assert detail["bad_values"] == {"rfr_id": 1}


def test_bad_rows_are_numbered_by_record_after_blank_lines_and_multiline_fields(tmp_path, capsys):
    """The numbers, reported as lines, were the CSV parser's records: a blank line is none, a quoted
    field spanning lines is in one. They are called what they are."""
    d = write_fixture(tmp_path / "in", ",")
    items = (d / "test_item.csv").read_bytes().split(b"\r\n")[:-1]
    items = [*items[:2], b"", b"", *items[2:], b"1002,502,A,1,,x"]  # the bad row: line 11, record 9
    (d / "test_item.csv").write_bytes(b"\r\n".join(items) + b"\r\n")
    detail = (d / "item_detail.csv").read_text(encoding="latin-1")
    detail = detail.replace("Brake disc significantly", '"Brake disc\nsignificantly', 1).replace(" worn,", ' worn",', 1)
    (d / "item_detail.csv").write_text(detail + "999,4\r\n", encoding="latin-1")  # the bad row: line 7, record 6
    assert main(["data", "load", str(d), "--out", str(tmp_path / "tidy"), "--report", str(tmp_path / "r.json")]) == 0
    files = {f["kind"]: f for f in json.loads((tmp_path / "r.json").read_text())["files"]}
    assert files["test_item"]["bad_records"] == [9] and files["item_detail"]["bad_records"] == [6]
    assert "first bad records [9]" in capsys.readouterr().out


def test_a_mileage_beyond_float32_is_missing_not_infinite(tmp_path):
    """4e41 is finite as float64 and became inf in the float32 column."""
    d = write_fixture(tmp_path / "in")
    text = (d / "test_result.csv").read_text(encoding="latin-1").replace("|45000|", "|4" + "0" * 41 + "|")
    (d / "test_result.csv").write_text(text, encoding="latin-1")
    df, _ = read_all([d])
    assert df.loc[df.test_id == 1001, "odometer_miles"].isna().all()
    assert df.loc[df.test_id == 1002, "odometer_miles"].eq(80000).all()


def test_an_api_odometer_beyond_float32_is_missing_not_infinite(tmp_path):
    p = tmp_path / "api.jsonl"
    p.write_text(json.dumps({**VEHICLE, "motTests": [_test(odometerValue="4e41", odometerUnit="mi")]}) + "\n")
    df = pd.concat(list(read_jsonl([p], report=BulkReport())), ignore_index=True)
    assert len(df) and df["odometer_miles"].isna().all()


def test_a_damaged_table_starting_like_json_is_refused_naming_it(tmp_path):
    """A ``.csv`` whose bytes start with ``{`` is still a table: refused by name, not read as API JSON."""
    d = write_fixture(tmp_path / "in")
    data = (d / "test_item.csv").read_bytes()
    (d / "test_item.csv").write_bytes(b"{" + data[1:])
    with pytest.raises(BulkFormatError, match=r"test_item\.csv:1: header matches no DVSA table"):
        list(BulkReader([d]))


def test_a_damaged_table_in_a_zip_is_refused_naming_it(tmp_path):
    """In a zip too: it was refused as zipped API JSON (`unzip it`), which the unzipped file is not."""
    d = write_fixture(tmp_path / "in")
    damaged = b"{" + (d / "test_item.csv").read_bytes()[1:]
    (d / "test_item.csv").unlink()
    with zipfile.ZipFile(d / "items.zip", "w") as zf:
        zf.writestr("test_item.csv", damaged)
    with pytest.raises(BulkFormatError, match=r"items\.zip!test_item\.csv:1: header matches no DVSA table"):
        list(BulkReader([d]))


def test_the_logged_summary_names_a_files_bad_rows_without_a_stray_gap():
    """A file whose bad rows were all of the wrong shape (no ``bad_values``) read ``rows bad , first …``."""
    report = BulkReport(files=[FileReport("tr.csv", "test_result", "|", rows=8)])
    report.files[0].skip(9)
    assert report.summary().endswith("rows_out=0 (tr.csv: 1 of 9 rows bad, first bad records [9])")
