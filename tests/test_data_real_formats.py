"""The DVSA bulk files as DVSA publishes them (2005–2025), where they differ from the earlier fixtures:
the 2024 location column, backslash-escaped quotes, macOS metadata in zips, DVSA's own lookup zip,
Deflate64 archives, top-level group names spelt otherwise."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from test_data_reader import HEADERS, ROWS, read_all, write_fixture

from training import mot_labels
from training.dvsa_files import discover, iter_raw
from training.dvsa_reader import BulkReader
from training.dvsa_report import BulkFormatError, FileReport

#: 2024 on: comma files, the location column renamed, a completion date added
ITEM_2024 = "test_id,rfr_id,rfr_type_code,mot_test_rfr_location_type_id,dangerous_mark,completed_date"


def _csv(line: str) -> str:
    return ",".join(line.split("|"))


def test_the_2024_location_column_gives_the_location_words(tmp_path):
    d = write_fixture(tmp_path / "in")
    items = [_csv(r) + ",2024-01-02 10:00:00" for r in ROWS["test_item"]]
    (d / "test_item.csv").write_text("\n".join([ITEM_2024, *items]) + "\n")
    df, rep = read_all([d])
    assert rep["rows_out"] == 6
    texts = df.set_index("test_id")["text"]
    assert "Nearside Front Brake disc significantly and obviously worn (1.1.14 (a) (ii))" in texts[1001].tolist()


def test_backslash_escaped_quotes_do_not_swallow_the_rows_after_them(tmp_path):
    """DVSA's comma files escape a quote inside a quoted field as \\" (not ""): the reader took the
    rest of the file, up to the next quote, into one field and lost thousands of rows as "1 bad row"."""
    d = write_fixture(tmp_path / "in")
    head = _csv(HEADERS["test_result"])
    rows = [_csv(r) for r in ROWS["test_result"]]
    rows[0] = rows[0].replace("FIESTA", '"STREETZONE 50 2T 12\\""')
    extra = [_csv(ROWS["test_result"][2]).replace("1003", str(2000 + i), 1) for i in range(50)]
    (d / "test_result.csv").write_text("\n".join([head, *rows, *extra]) + "\n")
    _, rep = read_all([d])
    result = next(f for f in rep["files"] if f["kind"] == "test_result")
    assert result["rows"] == 3 + 50 and result["bad_rows"] == 0
    assert rep["orphan_items"] == 1 and rep["rows_out"] == 6
    src = next(s for s in discover([d])[0] if s.kind == "test_result")
    models = pd.concat(list(iter_raw(src, FileReport("x", "test_result", ",")))).set_index("test_id")["model"]
    assert models["1001"] == 'STREETZONE 50 2T 12"'


def test_a_row_whose_quote_runs_on_counts_every_line_it_swallowed(tmp_path):
    """A stray quote the escape rule cannot explain still loses rows: they are counted, not hidden."""
    d = write_fixture(tmp_path / "in")
    head = _csv(HEADERS["test_result"])
    rows = [_csv(r) for r in ROWS["test_result"]]
    rows[0] = rows[0].replace("FIESTA", '"FIESTA')  # never closed until the next quote, in the same column:
    rows[2] = rows[2].replace("ASTRA", 'ASTRA"X')  # three lines read as one row of the right width
    more = [rows[2].replace("1003", str(3000 + i), 1).replace('"X', "") for i in range(10)]
    (d / "test_result.csv").write_text("\n".join([head, *rows, *more]) + "\n")
    reader = BulkReader([d])
    list(reader)
    result = next(f for f in reader.report.files if f.kind == "test_result")
    # rows read: 10 kept + the runaway record 2 and the 2 lines it swallowed
    assert (result.rows, result.bad_rows, result.bad_records) == (13, 3, [2]), vars(result)
    assert reader.report.orphan_items == len(ROWS["test_item"])  # none of 1001–1003 was kept


def test_a_lookup_description_may_span_lines(tmp_path):
    """Only the two big tables treat a line break inside a field as a quote that ran on."""
    d = write_fixture(tmp_path / "in", ",")
    detail = (d / "item_detail.csv").read_bytes()
    (d / "item_detail.csv").write_bytes(detail.replace(b"Brake disc significantly", b'"Brake disc\nsignificantly', 1)
                                        .replace(b"obviously worn,", b'obviously worn",', 1))  # fmt: skip
    df, rep = read_all([d])
    assert rep["unknown_rfr"] == 0 and rep["rows_out"] == 6
    assert any("Brake disc\nsignificantly" in t for t in df["text"])


def test_macos_metadata_and_hidden_members_in_a_zip_are_skipped(tmp_path):
    d = write_fixture(tmp_path / "in")
    with zipfile.ZipFile(d / "failure_item_2024.zip", "w") as zf:
        zf.write(d / "test_item.csv", "test_item_202401.csv")
        zf.writestr("__MACOSX/._test_item_202401.csv", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
        zf.writestr(".hidden/notes.csv", b"\x00binary")
    (d / "test_item.csv").unlink()
    df, rep = read_all([d])
    assert rep["rows_out"] == 6 and len(df) == 6
    assert [f["name"].split("!")[1] for f in rep["files"] if f["kind"] == "test_item"] == ["test_item_202401.csv"]


def test_dvsa_lookup_tables_motlens_does_not_use_are_recognised_and_listed(tmp_path, capsys):
    """DVSA's lookup zip also holds mdr_fuel_types, mdr_test_outcome and mdr_test_type: each stopped the
    load with "header matches no DVSA table"."""
    from motlens.cli import main

    d = write_fixture(tmp_path / "in")
    unused = {
        "mdr_fuel_types.csv": "type_code|fuel_type\nPE|Petrol\nDI|Diesel\n",
        "mdr_test_outcome.csv": "result_code|result\nP|Passed\nF|Failed\n",
        "mdr_test_type.csv": "type_code|test_type\nNT|Normal Test\n",
    }
    with zipfile.ZipFile(d / "lookup_tables.zip", "w") as zf:
        for name in ("item_detail.csv", "item_group.csv", "mdr_rfr_location.csv"):
            zf.write(d / name, name)
            (d / name).unlink()
        for name, text in unused.items():
            zf.writestr(name, text)
    df, rep = read_all([d])
    assert rep["rows_out"] == 6
    assert sorted(n.split("!")[1] for n in rep["unused_tables"]) == sorted(unused)
    assert main(["data", "load", str(d), "--out", str(tmp_path / "t")]) == 0
    assert "not used (DVSA lookups motlens does not need): " in capsys.readouterr().out


def _deflate64_zip(src: Path, out: Path) -> bool:
    """A real Deflate64 archive when 7-Zip is installed (True), else a Deflate archive whose method field
    says 9 — what zipfile reads to refuse the member (False)."""
    seven = shutil.which("7zz") or shutil.which("7z")
    if seven:
        subprocess.run([seven, "a", "-tzip", "-mm=Deflate64", str(out), str(src)], check=True, capture_output=True)
        return True
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(src, src.name)
    data = bytearray(out.read_bytes())
    for sig, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        i = data.find(sig)
        data[i + offset : i + offset + 2] = (9).to_bytes(2, "little")
    out.write_bytes(bytes(data))
    return False


def test_a_deflate64_archive_is_read_with_zipfile_deflate64_or_names_the_ways_to_read_it(tmp_path):
    """DVSA's 2022 and 2023 result archives use Deflate64: zipfile's "That compression method is not
    supported" gave no way out."""
    d = write_fixture(tmp_path / "in")
    real = _deflate64_zip(d / "test_result.csv", d / "dft_test_result_2022.zip")
    (d / "test_result.csv").unlink()
    try:
        import zipfile_deflate64  # noqa: F401
    except ImportError:
        with pytest.raises(BulkFormatError, match=r"Deflate64 .*pip install zipfile-deflate64.*extract the archive"):
            BulkReader([d])
        return
    if not real:
        pytest.skip("zipfile-deflate64 is installed but 7-Zip is not: no real Deflate64 archive to read")
    _, rep = read_all([d])
    assert rep["rows_out"] == 6


@pytest.mark.parametrize(
    ("name", "section"),
    [
        ("Brake performance", 1),
        ("BRAKE PERFORMANCE", 1),
        ("Registration plates and VIN", 0),
        ("Registration Plates & VIN", 0),
        ("Driver’s view of the road", 3),
        ("Drivers view of the road", 3),
        ("Lamps, Reflectors & Electrical Equipment", 4),
        ("Body,chassis,structure", 6),
        ("Something else", None),
    ],
)
def test_group_names_match_without_case_punctuation_or_spacing(name, section):
    assert mot_labels.section_from_group(name) == section


def test_the_clickhouse_load_reads_the_2024_files_as_the_python_reader_does(tmp_path):
    """ClickHouse's CSV reader does not undo \\" escapes (it read none of the file's tests): such a comma
    file is parsed in Python; the 2024 location column and DVSA's unused lookups load as above."""
    from training.chload import ChdbStore, distinct_texts, distinct_texts_from_tidy, load_bulk, table_counts

    d = write_fixture(tmp_path / "in", ",")
    (d / "test_item.csv").write_text(
        "\n".join([ITEM_2024, *(_csv(r) + ",2024-01-02 10:00:00" for r in ROWS["test_item"])]) + "\n"
    )
    head = _csv(HEADERS["test_result"])
    rows = [_csv(r).replace("FIESTA", '"STREETZONE 50 2T 12\\""') for r in ROWS["test_result"]]
    (d / "test_result.csv").write_text("\n".join([head, *rows]) + "\n")
    (d / "mdr_fuel_types.csv").write_text("type_code|fuel_type\nPE|Petrol\n")
    results = {}
    for native in (True, False):
        with ChdbStore(tmp_path / f"db-{native}") as s:
            r = load_bulk(s, [d], native=native)
            results[native] = (r.inserted, r.report.unused_tables, table_counts(s), distinct_texts(s))
    assert results[True][:3] == results[False][:3]
    assert results[True][0]["test_result"] == 3 and len(results[True][1]) == 1
    pd.testing.assert_frame_equal(results[True][3], results[False][3])
    assert "Nearside Front Brake disc significantly and obviously worn (1.1.14 (a) (ii))" in set(
        results[True][3]["text"]
    )
    tidy, _ = read_all([d])
    pd.testing.assert_frame_equal(results[True][3], distinct_texts_from_tidy(tidy))


#: item_detail as DVSA's lookup reads by three independent third-party sources: ``rfr_desc`` a fragment
#: that continues the item's name, ``rfr_insp_manual_desc`` a description without a reference.
REAL_LAYOUT = {
    "item_detail": [
        "601|4|21|N|missing|Y|an obligatory lamp missing|damaged but function not impaired|4|Major",
        "602|4|22|N|across an axle|N|Brakes imbalance across an axle such that the braking effort from any "
        "wheel is less than 70 %||1|Major",
    ],
    "item_group": ["5|4|0|4|Lamps, reflectors and electrical equipment", "21|4|5|4|Position lamp",
                   "22|4|1|1|Brake performance"],  # fmt: skip
    "test_item": ["1001|601|F|1|", "1002|601|A|3|", "1001|602|F|0|"],
}


def test_description_fragments_are_read_after_their_item_name(tmp_path):
    """A fragment (``missing``) is prefixed with its item's name, as a test certificate prints it; the
    whole sentences of the other rows keep their text; both sections come from the top-level group."""
    df, rep = read_all([write_fixture(tmp_path / "in", extra=REAL_LAYOUT)])
    got = df[["test_id", "text", "section", "severity"]].values.tolist()
    assert [1001, "Nearside Front Position lamp missing", 4, "major"] in got
    assert [1002, "Offside Front Inner Position lamp damaged but function not impaired", 4, "advisory"] in got
    assert [1001, "Brake performance across an axle", 1, "major"] in got
    assert "Nearside Front Brake disc significantly and obviously worn (1.1.14 (a) (ii))" in df["text"].tolist()
    assert rep["item_named_rfrs"] == 2 and rep["unknown_rfr"] == 0 and rep["rows_out"] == 9


def test_description_fragments_read_the_same_through_clickhouse(tmp_path):
    from training.chload import ChdbStore, distinct_texts, distinct_texts_from_tidy, load_bulk

    d = write_fixture(tmp_path / "in", extra=REAL_LAYOUT)
    with ChdbStore(tmp_path / "db") as store:
        result = load_bulk(store, [d])
        dt = distinct_texts(store)
    assert result.report.item_named_rfrs == 2
    assert "Nearside Front Position lamp missing" in dt["text"].tolist()
    tidy, _ = read_all([d])
    pd.testing.assert_frame_equal(dt, distinct_texts_from_tidy(tidy))
