"""Odd inputs the review found: no traceback, and the same rows, texts and counts on every load path
(Python reader, ClickHouse with the native read and with the Python parse)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from test_data_reader import read_all, write_fixture

from training.chload import ChdbStore, distinct_texts, distinct_texts_from_tidy, load_bulk, table_counts
from training.dvsa_reader import BulkReader
from training.dvsa_report import BulkFormatError, BulkReport
from training.history_api import read_jsonl

BRAKE = "Nearside Front Brake disc significantly and obviously worn (1.1.14 (a) (ii))"


def same_on_every_path(tmp_path: Path, d: Path) -> tuple[pd.DataFrame, dict, pd.DataFrame, list]:
    """Load ``d`` natively and through the Python parse into ClickHouse and with the Python reader;
    assert they agree (rows inserted, per-file counts, tables, texts); return the tidy rows, the
    reader's report, the texts and the per-file counts."""
    out = {}
    for native in (True, False):
        with ChdbStore(tmp_path / f"db-{native}") as s:
            r = load_bulk(s, [d], native=native)
            files = [(f.kind, f.rows, f.bad_rows, f.header_rows, f.non_utf8_values) for f in r.report.files]
            out[native] = (r.inserted, files, table_counts(s), distinct_texts(s))
    assert out[True][:3] == out[False][:3]
    pd.testing.assert_frame_equal(out[True][3], out[False][3])
    tidy, rep = read_all([d])
    pd.testing.assert_frame_equal(out[True][3], distinct_texts_from_tidy(tidy))
    counts = [(f["kind"], f["rows"], f["bad_rows"], f["header_rows"], f["non_utf8_values"]) for f in rep["files"]]
    assert sorted(counts) == sorted(out[True][1])
    return tidy, rep, out[True][3], out[True][1]


def _with_comments(d: Path, comments: list[bytes], delim: bytes) -> None:
    f = d / "test_item.csv"
    lines = f.read_bytes().split(b"\r\n")[:-1]
    out = [lines[0] + delim + b"rfr_comment"]
    out += [ln + delim + (comments[i] if i < len(comments) else b"") for i, ln in enumerate(lines[1:])]
    f.write_bytes(b"\r\n".join(out) + b"\r\n")


def _file(counts: list, kind: str) -> tuple:
    return next(c for c in counts if c[0] == kind)


# --- crashes and silently wrong values -------------------------------------------------------------


def test_a_plus_sign_in_an_integer_field_is_read_as_the_number(tmp_path):
    d = write_fixture(tmp_path / "in", extra={"test_item": ["1003|+502|A|+2|"]})
    tidy, rep, _, _ = same_on_every_path(tmp_path, d)
    assert "Offside Rear Tyre worn close to legal limit (5.2.3 (e))" in tidy[tidy.test_id == 1003]["text"].tolist()
    assert rep["bad_rows"] == 0


def test_a_test_class_beyond_int16_is_missing_on_both_paths(tmp_path):
    row = "1004|9|2021-03-04|99999|NT|F|45000|LS|FORD|FIESTA|BLUE|PE|1242|2011-03-01"
    d = write_fixture(tmp_path / "in", extra={"test_result": [row], "test_item": ["1004|501|F|1|"]})
    tidy, _, _, _ = same_on_every_path(tmp_path, d)
    assert tidy[tidy.test_id == 1004]["text"].tolist() == [BRAKE]  # read as the default class 4


def test_ids_above_2_to_the_53_stay_distinct(tmp_path):
    big = 2**53
    rows = [f"{big + 1}|9|2021-03-04|4|NT|F|1|LS|FORD|FIESTA|BLUE|PE|1|2011-03-01",
            f"{big}|9|2021-03-05|4|NT|F|1|LS|VW|GOLF|BLUE|PE|1|2011-03-01"]  # fmt: skip
    items = [f"{big + 1}|501|F|1|", f"{big}|502|A|2|"]
    d = write_fixture(tmp_path / "in", extra={"test_result": rows, "test_item": items})
    tidy, rep, _, _ = same_on_every_path(tmp_path, d)
    assert rep["duplicate_tests"] == 0
    assert set(tidy.loc[tidy.test_id >= big, "test_id"]) == {big, big + 1}
    assert tidy.loc[tidy.test_id == big + 1, "make"].tolist() == ["FORD"]


def test_a_zip_with_a_corrupt_central_directory_names_the_file(tmp_path):
    d = write_fixture(tmp_path / "in", zipped=True)
    z = d / "test_item.zip"
    b = bytearray(z.read_bytes())
    b[b.rfind(b"PK\x01\x02") + 2] = 0x09
    z.write_bytes(bytes(b))
    assert zipfile.is_zipfile(z)
    with pytest.raises(BulkFormatError, match=r"test_item\.zip:1: corrupt zip archive"):
        BulkReader([d])


def test_a_file_of_runaway_rows_names_a_record(tmp_path):
    """Runaway multi-line rows once carried no line number (it raised IndexError): the first one's record."""
    d = write_fixture(tmp_path / "in", ",")
    head = (d / "test_item.csv").read_bytes().split(b"\r\n")[0]
    rows = [f'1001,501,F,1,,"multi\nline {i}"'.encode() for i in range(120)]
    (d / "test_item.csv").write_bytes(b"\r\n".join([head + b",rfr_comment", *rows]) + b"\r\n")
    with pytest.raises(BulkFormatError, match=r"test_item\.csv: record 2: 240 of 240 rows are not well-formed"):
        list(BulkReader([d]))


def _api(tmp_path: Path, number: str, dangerous: str = "false") -> tuple[list, BulkReport]:
    line = (
        '{"make":"F","motTests":[{"completedDate":"2023-06-02","motTestNumber":' + number + ',"defects":'
        '[{"text":"Brake disc worn (1.1.14 (a) (ii))","type":"MAJOR","dangerous":' + dangerous + "}]}]}"
    )
    good = json.dumps({"make": "G", "motTests": [{"completedDate": "2023-06-02", "motTestNumber": 7,
                       "defects": [{"text": "Tyre worn (5.2.3 (e))", "type": "ADVISORY"}]}]})  # fmt: skip
    p = tmp_path / "api.jsonl"
    p.write_text(line + "\n" + good + "\n")
    rep = BulkReport()
    df = pd.concat(list(read_jsonl([p], report=rep)), ignore_index=True)
    return [(r.make, None if pd.isna(r.test_id) else int(r.test_id), r.severity) for r in df.itertuples()], rep


@pytest.mark.parametrize("number", ["1e400", "Infinity", "-Infinity", "NaN", "true", "12.9", '"12.5"', '"x"'])
def test_an_api_test_number_that_is_no_integer_gives_no_id(tmp_path, number):
    rows, rep = _api(tmp_path, number)
    assert rows == [("F", None, "major"), ("G", 7, "advisory")] and rep.bad_rows == 0


def test_an_api_integer_literal_beyond_4300_digits_is_a_bad_line(tmp_path):
    rows, rep = _api(tmp_path, "9" * 5000)
    assert rows == [("G", 7, "advisory")]
    assert rep.files[0].bad_records == [1]


@pytest.mark.parametrize(
    ("flag", "severity"),
    [('"false"', "major"), ('"0"', "major"), ('"no"', "major"), ("0", "major"), ("null", "major"),
     ("true", "dangerous"), ('"TRUE"', "dangerous"), ('"y"', "dangerous"), ('"1"', "dangerous"), ("1", "dangerous")],
)  # fmt: skip
def test_the_api_dangerous_flag_is_read_strictly(tmp_path, flag, severity):
    rows, _ = _api(tmp_path, "5", flag)
    assert rows[0] == ("F", 5, severity)


# --- the native read and the Python reader agree ------------------------------------------------


def test_a_backslash_in_a_comma_file_reads_the_same_natively(tmp_path):
    d = write_fixture(tmp_path / "in", ",")
    _with_comments(d, [b"see C:\\temp note"], b",")
    _, _, texts, _ = same_on_every_path(tmp_path, d)
    # docs/data.md: a backslash in a comma file escapes the next character
    assert "Nearside Front Brake disc significantly and obviously worn see C:temp note (1.1.14 (a) (ii))" in set(
        texts["text"]
    )


def test_a_line_break_inside_a_quoted_comma_field_is_skipped_on_both_paths(tmp_path):
    d = write_fixture(tmp_path / "in", ",")
    _with_comments(d, [b'"line one\nline two"'], b",")
    _, _, texts, counts = same_on_every_path(tmp_path, d)
    assert not any("line one" in t for t in texts["text"])
    assert _file(counts, "test_item")[2] == 2  # the row and the line it swallowed


def test_both_paths_read_the_same_date_forms(tmp_path):
    forms = ["4/3/2021", "04/03/2021", " 2021-03-04 ", "2021-03-04T10:00:00Z", "2021-03-04 10:00:00.000",
             "2021-03-04Z", "20210304", "2021-02-30", "2021-3-4", "0001-01-01"]  # fmt: skip
    rows = [f"{2000 + i}|9|{f}|4|NT|F|1|LS|FORD|FIESTA|BLUE|PE|1|2011-03-01" for i, f in enumerate(forms)]
    items = [f"{2000 + i}|501|F|1|" for i in range(len(forms))]
    d = write_fixture(tmp_path / "in", extra={"test_result": rows, "test_item": items})
    tidy, _, _, counts = same_on_every_path(tmp_path, d)
    read = sorted(int(t) - 2000 for t in tidy.loc[tidy.test_id >= 2000, "test_id"])
    assert [forms[i] for i in read] == forms[:5]
    assert _file(counts, "test_result")[2] == 5
    assert set(tidy.loc[tidy.test_id >= 2000, "test_date"]) == {pd.Timestamp("2021-03-04")}


@pytest.mark.parametrize("name", ["mot{2023}", "mot*2023", "mot?x", "mot\\2023", "mot\\nx", "mot\\\\x"])
def test_a_path_with_glob_characters_is_read_natively_too(tmp_path, name):
    d = write_fixture(tmp_path / name)
    _, rep, _, counts = same_on_every_path(tmp_path, d)
    assert _file(counts, "test_result")[1] == 3 and rep["rows_out"] == 6


def test_a_byte_order_mark_and_blank_crlf_lines_count_the_same_natively(tmp_path):
    d = write_fixture(tmp_path / "in")
    for name in ("test_item.csv", "test_result.csv"):
        f = d / name
        f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes().replace(b"\r\n", b"\r\n\r\n", 2))
    _, _, _, counts = same_on_every_path(tmp_path, d)
    assert _file(counts, "test_item")[1:4] == (7, 0, 0) and _file(counts, "test_result")[1:4] == (3, 0, 0)


def test_non_utf8_values_are_counted_the_same_natively(tmp_path):
    d = write_fixture(tmp_path / "in")
    _with_comments(d, [b"caf\xe9 \xa35", b"50\xb0\xb0 angle"], b"|")
    _, _, _, counts = same_on_every_path(tmp_path, d)
    assert _file(counts, "test_item")[4] == 3  # byte sequences, not fields


def test_a_field_mixing_utf8_and_latin1_reads_the_same_natively(tmp_path):
    d = write_fixture(tmp_path / "in")
    _with_comments(d, ["CITROËN".encode() + b" \xa35"], b"|")
    _, _, texts, _ = same_on_every_path(tmp_path, d)
    assert "Nearside Front Brake disc significantly and obviously worn CITROËN £5 (1.1.14 (a) (ii))" in set(
        texts["text"]
    )


def test_a_class_without_its_own_item_detail_row_takes_its_group_on_both_paths(tmp_path):
    """Class 5, pre-2018: rfr 501 has only a class 4 item_detail row; the section comes from the
    class 5 item_group tree (the ClickHouse path knew only the groups item_detail names)."""
    d = write_fixture(
        tmp_path / "in",
        extra={
            "test_result": ["1004|9|2016-03-04|5|NT|F|45000|LS|FORD|FIESTA|BLUE|PE|1242|2011-03-01"],
            "test_item": ["1004|501|F|1|"],
            "item_group": ["1|5|0|1|Brakes", "11|5|1|1|Brake discs"],
        },
    )
    tidy, rep, _, _ = same_on_every_path(tmp_path, d)
    assert tidy.loc[tidy.test_id == 1004, "section"].tolist() == [1] and rep["unlabelled"] == 0


def test_a_plus_before_a_sign_is_no_id_on_every_path(tmp_path):
    row = "+-5|9|2021-03-04|4|NT|F|45000|LS|FORD|FIESTA|BLUE|PE|1242|2011-03-01"
    d = write_fixture(tmp_path / "in", extra={"test_result": [row], "test_item": ["+-5|501|F|1|"]})
    tidy, _, _, counts = same_on_every_path(tmp_path, d)
    assert -5 not in set(tidy.test_id) and _file(counts, "test_result")[2] == 1


def test_the_smallest_int64_id_is_kept_on_every_path(tmp_path):
    low = -(2**63)
    row = f"{low}|9|2021-03-04|4|NT|F|45000|LS|FORD|FIESTA|BLUE|PE|1242|2011-03-01"
    d = write_fixture(tmp_path / "in", extra={"test_result": [row], "test_item": [f"{low}|501|F|1|"]})
    tidy, _, _, _ = same_on_every_path(tmp_path, d)
    assert tidy.loc[tidy.test_id == low, "text"].tolist() == [BRAKE]


def test_defect_groups_of_rfr_ids_near_the_int64_limits_stay_apart():
    from training.dvsa_lookups import defect_groups

    ids = [2**62, -(2**62), 2**63 - 1, -(2**63), 2**62, 5]
    m = pd.DataFrame({"rfr_id": pd.array(ids, dtype="int64"), "rfr_type_code": ["F", "F", "A", "F", "A", "A"]})
    assert defect_groups(m).tolist() == [
        f"rfr:{2**62}:defect",
        f"rfr:{-(2**62)}:defect",
        f"rfr:{2**63 - 1}:advisory",
        f"rfr:{-(2**63)}:defect",
        f"rfr:{2**62}:advisory",
        "rfr:5:advisory",
    ]


def test_rfr_ids_above_2_to_the_53_keep_their_own_text_on_every_path(tmp_path):
    big = 2**53
    details = [
        f"{big + 1}|4|11|N|Wiper blade missing|Y|3.4 (a)||1|Major",
        f"{big}|4|12|N|Horn missing|Y|7.5 (b)||1|Minor",
    ]
    items = [f"1003|{big + 1}|F|0|", f"1002|{big}|F|0|"]
    d = write_fixture(tmp_path / "in", extra={"item_detail": details, "test_item": items})
    tidy, rep, _, _ = same_on_every_path(tmp_path, d)
    texts = set(tidy.loc[tidy.test_id.isin([1002, 1003]), "text"])
    assert {"Wiper blade missing (3.4 (a))", "Horn missing (7.5 (b))"} <= texts


def test_an_lf_line_ending_in_latin1_then_utf8_reads_the_same_natively(tmp_path):
    d = write_fixture(tmp_path / "in")
    _with_comments(d, [b"Espa\xf1" + "é".encode()], b"|")
    for f in d.glob("*.csv"):
        f.write_bytes(f.read_bytes().replace(b"\r\n", b"\n"))
    _, _, texts, _ = same_on_every_path(tmp_path, d)
    assert any("Españé" in t for t in texts["text"])


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_a_bare_carriage_return_inside_a_pipe_field_reads_the_same_natively(tmp_path, ending):
    """The Python reader ends a line at a bare CR (the row splits: a bad row); the native read, which
    splits lines at LF only, kept ``a\\rb`` in the text."""
    d = write_fixture(tmp_path / "in")
    _with_comments(d, [b"worse a\rb"], b"|")
    if ending == b"\n":
        for f in d.glob("*.csv"):
            f.write_bytes(f.read_bytes().replace(b"\r\n", b"\n"))
    _, _, texts, _ = same_on_every_path(tmp_path, d)
    assert not any("\r" in t for t in texts["text"])


def test_a_class_without_its_own_item_detail_row_takes_the_lowest_class_on_both_paths(tmp_path, monkeypatch):
    """rfr 501 listed for class 5 before class 4, a class 7 test: the Parquet path took the first listed
    row (class 5's text), the ClickHouse path ClickHouse's key order (class 4's)."""
    from test_data_reader import ROWS

    first = "501|5|11|N|Brake disc text of class five|Y|1.1.14 (a) (ii)|x|1|Major"
    monkeypatch.setitem(ROWS, "item_detail", [first, *ROWS["item_detail"]])
    d = write_fixture(tmp_path / "in", extra={
        "test_result": ["1004|9|2021-03-04|7|NT|F|45000|LS|FORD|FIESTA|BLUE|PE|1242|2011-03-01"],
        "test_item": ["1004|501|F|1|"],
    })  # fmt: skip
    tidy, _, _, _ = same_on_every_path(tmp_path, d)
    assert tidy.loc[tidy.test_id == 1004, "text"].tolist() == [BRAKE]  # class 4's


@pytest.mark.parametrize(
    ("details", "rfr"),
    [
        (["701|-40000|11|N|Odd text|Y|||1|Major", "701|5|12|N|Five text|Y|||1|Major"], 701),
        (["702|99999|12|N|Only odd|Y|||1|Major"], 702),
    ],
)
def test_an_item_detail_class_beyond_int16_is_class_4_on_both_paths(tmp_path, details, rfr):
    """The ClickHouse path dropped such rows (an Int16 column), the Parquet path kept them: the two
    took different rows for a class without its own, or one knew an rfr the other did not."""
    d = write_fixture(tmp_path / "in", extra={
        "test_result": ["1006|9|2016-03-04|4|NT|F|45000|LS|FORD|FIESTA|BLUE|PE|1242|2011-03-01"],
        "item_detail": details,
        "test_item": [f"1006|{rfr}|F|0|"],
    })  # fmt: skip
    tidy, _, _, _ = same_on_every_path(tmp_path, d)
    assert len(tidy.loc[tidy.test_id == 1006]) == 1
