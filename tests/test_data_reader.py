"""DVSA bulk reader on small hand-written fixtures: delimiters, zip, latin-1, bad rows, errors."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training.dvsa_reader import BulkReader, read_bulk
from training.dvsa_report import BulkFormatError
from training.tidy import TIDY_COLUMNS, load_tidy, write_tidy

HEADERS = {
    "test_result": "test_id|vehicle_id|test_date|test_class_id|test_type|test_result|test_mileage|"
    "postcode_area|make|model|colour|fuel_type|cylinder_capacity|first_use_date",
    "test_item": "test_id|rfr_id|rfr_type_code|location_id|dmark",
    "item_detail": "rfr_id|test_class_id|test_item_id|minor_item|rfr_desc|rfr_loc_marker|"
    "rfr_insp_manual_desc|rfr_advisory_text|test_item_set_section_id|rfr_deficiency_category",
    "item_group": "test_item_id|test_class_id|parent_id|test_item_set_section_id|item_name",
    "mdr_rfr_location": "location_id|lateral|longitudinal|vertical",
}
ROWS = {
    "test_result": [
        "1001|9|2021-03-04|4|NT|F|45000|LS|FORD|FIESTA|BLUE|PE|1242|2011-03-01",
        "1002|8|2019-07-01|4|NT|P|80000|B|CITROËN|C3|RED|DI|1560|2010-01-01",
        "1003|7|2016-02-02|4|NT|F|120000|G|VAUXHALL|ASTRA|SILVER|PE|1598|2004-05-05",
    ],
    "test_item": [
        "1001|501|F|1|",
        "1001|502|A|2|",
        "1001|503|F|0|D",
        "1002|504|M|0|",
        "1002|501|P|3|",
        "1003|501|F|1|",  # pre-2018: section from the item_group name
        "9999|501|F|1|",  # no such test: orphan
    ],
    "item_detail": [
        "501|4|11|N|Brake disc significantly and obviously worn|Y|1.1.14 (a) (ii)|Brake disc worn, pitted "
        "or scored|1|Major",
        "502|4|12|N|Tyre tread depth below requirements of 1.6mm|Y|5.2.3 (e)|Tyre worn close to legal limit|5|Major",
        "503|4|13|N|Steering gear casing fractured|N|2.1.3 (b)|Steering gear leaking|2|Dangerous",
        "504|4|14|Y|Horn control insecure|N|7.5 (a)||7|Minor",
    ],
    "item_group": [
        "1|4|0|1|Brakes",
        "11|4|1|1|Brake discs",
        "2|4|0|2|Tyres",
        "12|4|2|5|Tread depth",
        "3|4|0|3|Steering",
        "13|4|3|2|Steering box",
        "4|4|0|4|Body, chassis, structure",
        "14|4|4|7|Horn",
    ],
    "mdr_rfr_location": ["1|Nearside|Front|", "2|Offside|Rear|", "3|Offside|Front|Inner"],
}


def write_fixture(
    d: Path, delimiter: str = "|", zipped: bool = False, extra: dict[str, list[str]] | None = None
) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, header in HEADERS.items():
        lines = [header, *ROWS[name], *(extra or {}).get(name, [])]
        if delimiter == ",":
            lines = [",".join(f'"{v}"' if "," in v else v for v in line.split("|")) for line in lines]
        data = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        if zipped:
            with zipfile.ZipFile(d / f"{name}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(f"{name}.csv", data)
        else:
            (d / f"{name}.csv").write_bytes(data)
    return d


def read_all(paths) -> tuple[pd.DataFrame, dict]:
    reader = BulkReader(paths, chunk_rows=3)
    df = pd.concat(list(reader), ignore_index=True)
    return df, reader.report.to_dict()


@pytest.mark.parametrize("delimiter", ["|", ","])
@pytest.mark.parametrize("zipped", [False, True])
def test_reader_reads_both_delimiters_plain_and_zipped(tmp_path, delimiter, zipped):
    df, rep = read_all([write_fixture(tmp_path / "in", delimiter, zipped)])
    assert list(df.columns) == list(TIDY_COLUMNS)
    assert {f["delimiter"] for f in rep["files"]} == {delimiter}
    assert rep["orphan_items"] == 1 and rep["rows_out"] == 6 and len(df) == 6
    by_test = df.groupby("test_id")["text"].apply(list).to_dict()
    assert by_test[1001] == [
        "Nearside Front Brake disc significantly and obviously worn (1.1.14 (a) (ii))",
        "Offside Rear Tyre worn close to legal limit (5.2.3 (e))",
        "Steering gear casing fractured (2.1.3 (b))",
    ]
    first = df[df.test_id == 1001]
    assert first["section"].tolist() == [1, 5, 2]
    assert first["severity"].tolist() == ["major", "advisory", "dangerous"]
    second = df[df.test_id == 1002].set_index("text")
    assert second.loc["Horn control insecure (7.5 (a))", "severity"] == "minor"
    assert second.loc["Horn control insecure (7.5 (a))", "section"] == 7
    # PRS keeps the failure severity; latin-1 make decoded.
    assert second.loc["Offside Front Inner Brake disc significantly and obviously worn (1.1.14 (a) (ii))",
                      "severity"] == "major"  # fmt: skip
    assert set(second["make"]) == {"CITROËN"}
    assert first["fuel_type"].iloc[0] == "PE"
    assert first["vehicle_age_years"].iloc[0] == pytest.approx(10.01, abs=0.01)
    assert first["odometer_miles"].iloc[0] == 45000


def test_pre_2018_section_comes_from_item_group_not_reference(tmp_path):
    df, _ = read_all([write_fixture(tmp_path / "in")])
    old = df[df.test_id == 1003]
    # The pre-2018 reference is not trusted; the top-level group "Brakes" gives section 1.
    assert old["section"].tolist() == [1]


def test_group_name_is_not_used_when_a_2018_reference_disagrees(tmp_path):
    df, _ = read_all([write_fixture(tmp_path / "in")])
    # rfr 504 sits under "Body, chassis, structure" (section 6) but its reference says 7.
    assert df[df.text.str.startswith("Horn")]["section"].tolist() == [7]


def test_malformed_rows_and_repeated_headers_are_counted_not_fatal(tmp_path):
    extra = {
        "test_item": [
            "1002|502|A",  # too few fields
            "1002|502|A|1||x|y",  # too many
            HEADERS["test_item"],  # header repeated by concatenation
            "notanumber|502|A|1|",  # unusable key
            "1002|502|A|1|",
        ],
        "test_result": [HEADERS["test_result"]],
    }
    df, rep = read_all([write_fixture(tmp_path / "in", extra=extra)])
    items = next(f for f in rep["files"] if f["kind"] == "test_item")
    assert items["bad_rows"] == 3
    assert items["header_rows"] == 1
    assert items["bad_records"] == [9, 10, 12]  # the unusable key's record too
    assert items["bad_values"] == {"test_id": 1}
    assert items["rows"] == 7 + 4  # rows read: the kept and the bad ones
    assert next(f for f in rep["files"] if f["kind"] == "test_result")["header_rows"] == 1
    assert rep["rows_out"] == 7  # the one good extra row is read


def test_mixed_utf8_and_latin1_bytes(tmp_path):
    d = write_fixture(tmp_path / "in")
    raw = (d / "test_result.csv").read_bytes().replace(b"FORD", "FÖRD".encode())  # one UTF-8 value
    (d / "test_result.csv").write_bytes(raw)
    df, rep = read_all([d])
    assert set(df["make"]) == {"FÖRD", "CITROËN", "VAUXHALL"}
    assert next(f for f in rep["files"] if f["kind"] == "test_result")["non_utf8_values"] >= 1


def test_unrecognised_file_names_file_and_line(tmp_path):
    d = write_fixture(tmp_path / "in")
    (d / "junk.csv").write_text("hello world\nno delimiters here\n")
    with pytest.raises(BulkFormatError, match=r"junk\.csv:1: "):
        BulkReader([d])


def test_file_of_wrong_shape_names_first_bad_line(tmp_path):
    d = write_fixture(tmp_path / "in")
    body = "\n".join(f"{i}|501" for i in range(300))
    (d / "test_item.csv").write_text(HEADERS["test_item"] + "\n" + body + "\n")
    wrong = r"test_item\.csv: record 2: 300 of 300 rows are not well-formed rows of the header's 5 fields"
    with pytest.raises(BulkFormatError, match=wrong):
        list(BulkReader([d]))


def test_corrupt_zip_names_the_file(tmp_path):
    d = write_fixture(tmp_path / "in", zipped=True)
    data = (d / "test_item.zip").read_bytes()
    (d / "test_item.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(BulkFormatError, match=r"test_item\.zip"):
        list(BulkReader([d]))


def test_unterminated_quote_is_a_bad_row(tmp_path):
    d = write_fixture(tmp_path / "in", delimiter=",")
    text = (d / "test_result.csv").read_text(encoding="latin-1")
    (d / "test_result.csv").write_text(text + '1004,1,2021-01-01,4,NT,P,1,B,"FORD,FOCUS,X,PE,1,2010-01-01\n')
    _, rep = read_all([d])
    assert next(f for f in rep["files"] if f["kind"] == "test_result")["bad_rows"] == 1


def test_truncated_gzip_names_file_and_line(tmp_path):
    import gzip

    d = write_fixture(tmp_path / "in")
    rows = [f"{2000 + i}|1|2021-01-01|4|NT|P|{i}|B|FORD|FOCUS|BLUE|PE|1|2010-01-01" for i in range(3000)]
    data = gzip.compress(("\n".join([HEADERS["test_result"], *rows]) + "\n").encode())
    (d / "test_result.csv").unlink()
    (d / "test_result.csv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(BulkFormatError, match=r"test_result\.csv\.gz:\d+: unreadable") as err:
        list(BulkReader([d]))
    line = int(str(err.value).split(".gz:")[1].split(":")[0])
    assert 100 < line <= 3001  # located inside the file, not at its start


def test_missing_tables_are_named(tmp_path):
    d = write_fixture(tmp_path / "in")
    (d / "item_detail.csv").unlink()
    with pytest.raises(BulkFormatError, match="no item_detail table"):
        BulkReader([d])


def test_many_partitions_give_the_same_rows(tmp_path):
    d = write_fixture(tmp_path / "in")
    one = pd.concat(list(BulkReader([d])), ignore_index=True)
    many = pd.concat(list(BulkReader([d], bucket_bytes=64)), ignore_index=True)
    key = ["test_id", "text"]
    pd.testing.assert_frame_equal(
        one.sort_values(key).reset_index(drop=True), many.sort_values(key).reset_index(drop=True)
    )


def test_tidy_round_trip(tmp_path):
    d = write_fixture(tmp_path / "in")
    n = write_tidy(read_bulk([d], chunk_rows=2), tmp_path / "tidy")
    df = load_tidy(tmp_path / "tidy")
    assert n == len(df) == 6
    assert str(df["section"].dtype) == "int8"
    assert df["test_date"].iloc[0].isoformat() == "2021-03-04"


def test_malformed_row_with_latin1_bytes_is_counted(tmp_path):
    d = write_fixture(tmp_path / "in")
    raw = (d / "test_item.csv").read_bytes() + "1001|502|A|2||quote £85\r\n".encode("latin-1")
    (d / "test_item.csv").write_bytes(raw)
    df, rep = read_all([d])
    items = next(f for f in rep["files"] if f["kind"] == "test_item")
    assert items["bad_rows"] == 1 and items["bad_records"] == [9]
    assert len(df) == 6


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=4)), min_size=1, max_size=6))
def test_corrupted_bytes_never_crash_the_reader(tmp_path_factory, edits):
    """Random byte damage to test_item gives counted bad rows or a BulkFormatError — nothing else."""
    d = write_fixture(tmp_path_factory.mktemp("fuzz"))
    data = bytearray((d / "test_item.csv").read_bytes())
    for pos, junk in edits:
        p = pos % len(data)
        data[p : p + len(junk)] = junk
    (d / "test_item.csv").write_bytes(bytes(data))
    try:
        reader = BulkReader([d])
        rows = sum(len(c) for c in reader)
    except BulkFormatError as e:
        assert "test_item.csv:" in str(e)
        return
    assert rows == reader.report.rows_out <= 14  # 7 defect lines, each split at most once


def _header_only(d: Path, name: str, header: str | None = None) -> None:
    (d / f"{name}.csv").write_text((header or HEADERS[name]) + "\n")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: _header_only(d, "item_detail"), r"item_detail\.csv:2: the item_detail table holds no rows"),
        (lambda d: (d / "mdr_rfr_location.csv").write_text("lateral|longitudinal|vertical|code\nNearside|Front||1\n"),
         r"mdr_rfr_location\.csv:1: the rfr_location table has no location_id column"),
        (lambda d: (d / "test_item.csv").write_text(HEADERS["test_item"] + "|test_id\n1001|501|F|1||1001\n"),
         r"test_item\.csv:1: the header names test_id more than once"),
        (lambda d: (d / "test_result.csv.gz").write_bytes(b"not gzip at all"), r"test_result\.csv\.gz:1: cannot open"),
    ],  # fmt: skip
)
def test_damaged_tables_name_file_and_line_not_a_traceback(tmp_path, damage, message):
    d = write_fixture(tmp_path / "in")
    damage(d)
    with pytest.raises(BulkFormatError, match=message):
        list(BulkReader([d]))


def test_item_group_without_parents_makes_every_group_its_own_root(tmp_path):
    d = write_fixture(tmp_path / "in")
    cols = HEADERS["item_group"].split("|")
    keep = [i for i, c in enumerate(cols) if c != "parent_id"]
    lines = [HEADERS["item_group"], *ROWS["item_group"]]
    (d / "item_group.csv").write_text("\n".join("|".join(line.split("|")[i] for i in keep) for line in lines) + "\n")
    df, _ = read_all([d])
    assert len(df) > 0


def test_gzipped_tables_are_partitioned_by_their_uncompressed_size(tmp_path):
    """Partitions were sized by the compressed bytes, so a .gz input took ≈ 1.5× the memory."""
    import gzip

    from training.dvsa_files import discover

    d = write_fixture(tmp_path / "in")
    rows = [f"{2000 + i}|1|2021-01-01|4|NT|P|{i}|B|FORD|FOCUS|BLUE|PE|1|2010-01-01" for i in range(5000)]
    text = ("\n".join([HEADERS["test_result"], *rows]) + "\n").encode()
    (d / "test_result.csv").unlink()
    (d / "test_result.csv.gz").write_bytes(gzip.compress(text))
    sources, _ = discover([d])
    (gz,) = [s for s in sources if s.kind == "test_result"]
    assert gz.size == len(text) > (d / "test_result.csv.gz").stat().st_size * 5
