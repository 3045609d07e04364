"""MOT History API JSON-lines reader."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from training.dvsa_report import BulkFormatError, BulkReport
from training.history_api import read_jsonl

VEHICLE = {
    "registration": "AB12CDE",
    "make": "FORD",
    "model": "FOCUS",
    "fuelType": "Diesel",
    "firstUsedDate": "2012-06-01",
    "motTests": [
        {
            "completedDate": "2023-06-02T10:22:45.000Z",
            "testResult": "FAILED",
            "odometerValue": "100000",
            "odometerUnit": "KM",
            "motTestNumber": "123456789012",
            "defects": [
                {"text": "Nearside Front Brake disc worn, pitted or scored (1.1.14 (a) (ii))",
                 "type": "ADVISORY", "dangerous": False},
                {"text": "Offside Rear Tyre tread depth below requirements of 1.6mm (5.2.3 (e))",
                 "type": "MAJOR", "dangerous": True},
                {"text": "Horn control insecure (7.5 (a))", "type": "MINOR", "dangerous": False},
                {"text": "customer advised of oil leak", "type": "USER ENTERED", "dangerous": False},
            ],
        },
        {
            "completedDate": "2017.05.01 09:00:00",
            "odometerValue": "60000",
            "odometerUnit": "mi",
            "motTestNumber": "99",
            "rfrAndComments": [{"text": "Brake pipe corroded (3.6.B.2c)", "type": "FAIL"}],
        },
    ],
}  # fmt: skip


def another(vehicle: dict, n: int) -> dict:
    """``vehicle`` with other test numbers (a different vehicle's tests, as far as de-duplication goes)."""
    tests = [{**t, "motTestNumber": f"{n}{t['motTestNumber']}"} for t in vehicle["motTests"]]
    return {**vehicle, "motTests": tests}


def test_reads_defects_with_labels_and_context(tmp_path):
    p = tmp_path / "api.jsonl"
    other = {**another(VEHICLE, 7), "make": "VAUXHALL", "fuelType": "Petrol"}
    p.write_text(json.dumps(VEHICLE) + "\n\n" + json.dumps([other]) + "\n")
    report = BulkReport()
    df = pd.concat(list(read_jsonl([p], chunk_rows=2, report=report)), ignore_index=True)
    assert len(df) == 6
    first = df.iloc[:3]
    assert first["section"].tolist() == [1, 5, 7]
    assert first["severity"].tolist() == ["advisory", "dangerous", "minor"]
    assert first["fuel_type"].iloc[0] == "DI"
    assert first["odometer_miles"].iloc[0] == pytest.approx(62137.1, rel=1e-4)
    assert first["vehicle_age_years"].iloc[0] == pytest.approx(11.0, abs=0.01)
    assert str(first["test_date"].iloc[0]) == "2023-06-02"
    assert first["test_id"].iloc[0] == 123456789012
    assert set(df["source"]) == {"mot_history_api"}
    assert set(df.iloc[3:]["fuel_type"]) == {"PE"}
    # the user-entered note has no manual reference, the 2017 test predates the 2018 numbering
    assert report.unlabelled == 4
    assert report.rows_out == 6 and report.files[0].rows == 2


def test_bad_json_lines_are_counted(tmp_path):
    p = tmp_path / "api.jsonl"
    p.write_bytes(json.dumps(VEHICLE).encode() + b"\n{not json\n" + json.dumps(another(VEHICLE, 7)).encode() + b"\n")
    report = BulkReport()
    df = pd.concat(list(read_jsonl([p], report=report)))
    assert len(df) == 6
    assert report.files[0].bad_rows == 1 and report.files[0].bad_records == [2]


def test_latin1_line_is_tolerated(tmp_path):
    p = tmp_path / "api.jsonl"
    p.write_bytes(json.dumps({**VEHICLE, "model": "CITROËN C3"}, ensure_ascii=False).encode("latin-1") + b"\n")
    report = BulkReport()
    df = pd.concat(list(read_jsonl([p], report=report)))
    assert set(df["model"]) == {"CITROËN C3"}
    assert report.files[0].non_utf8_values == 1


def test_a_byte_order_mark_is_not_a_bad_line(tmp_path):
    """A file saved with a UTF-8 BOM lost its first vehicle as a bad line (a .json file failed whole)."""
    lines = tmp_path / "api.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + json.dumps(VEHICLE).encode() + b"\n" + json.dumps(another(VEHICLE, 7)).encode())
    report = BulkReport()
    assert len(pd.concat(list(read_jsonl([lines], report=report)))) == 6
    assert report.files[0].bad_rows == 0 and report.files[0].non_utf8_values == 0
    whole = tmp_path / "vehicle.json"
    whole.write_bytes(b"\xef\xbb\xbf" + json.dumps([VEHICLE], indent=2).encode())
    assert len(pd.concat(list(read_jsonl([whole])))) == 3


def test_file_without_json_names_file_and_line(tmp_path):
    p = tmp_path / "api.jsonl"
    p.write_text("\nthis is not json\nnor this\n")
    with pytest.raises(BulkFormatError, match=r"api\.jsonl:2: no line is MOT History API JSON"):
        list(read_jsonl([p]))


def test_pretty_printed_json_file(tmp_path):
    p = tmp_path / "vehicle.json"
    p.write_text(json.dumps([VEHICLE], indent=2))
    assert len(pd.concat(list(read_jsonl([p])))) == 3
    p.write_text('{\n  "make": "FORD",\n  oops\n}')
    with pytest.raises(BulkFormatError, match=r"vehicle\.json:3: not JSON"):
        list(read_jsonl([p]))


def _test(**over) -> dict:
    return {**VEHICLE["motTests"][0], **over}


MALFORMED = [
    {"make": "FORD", "motTests": "abc"},
    {"make": "FORD", "motTests": [1, 2]},
    {"motTests": [{"completedDate": "2023-06-02", "defects": ["x"]}]},
]


def test_structurally_malformed_vehicles_are_counted_not_fatal(tmp_path):
    """Each of these once aborted the whole load with a traceback."""
    good = json.dumps(VEHICLE)
    deep = "[" * 200_000 + "]" * 200_000
    odd_fields = [
        {**another(VEHICLE, 7), "make": 123, "model": {"a": 1}},  # odd types: kept as text or missing, rows kept
        {**VEHICLE, "motTests": [_test(motTestNumber="99999999999999999999999")]},  # beyond int64: no id
    ]
    lines = [good, *map(json.dumps, MALFORMED), deep, *map(json.dumps, odd_fields)]
    p = tmp_path / "api.jsonl"
    p.write_text("\n".join(lines) + "\n")
    report = BulkReport()
    df = pd.concat(list(read_jsonl([p], report=report)), ignore_index=True)
    assert report.files[0].bad_records == [2, 3, 4, 5]
    assert report.files[0].rows == 3 + 4 and len(df) == 9  # rows read: the 3 kept and the 4 bad
    assert df["make"].tolist()[3:6] == ["123"] * 3 and df["model"].iloc[3] is None
    assert df["test_id"].iloc[-1] is pd.NA


@pytest.mark.parametrize("value", [1e400, "Infinity", "NaN", "-5"])
def test_a_reading_that_means_nothing_is_a_missing_odometer(tmp_path, value):
    """An infinite mileage once passed the reader and made training fail after the embedding stage."""
    p = tmp_path / "api.jsonl"
    raw = json.dumps({**VEHICLE, "motTests": [_test(odometerValue="PLACEHOLDER")]}).replace(
        '"PLACEHOLDER"', "1e400" if value == 1e400 else json.dumps(value)
    )
    p.write_text(raw + "\n")
    df = pd.concat(list(read_jsonl([p])), ignore_index=True)
    assert df["odometer_miles"].isna().all()


def test_bulk_numbers_beyond_float_range_are_missing():
    from training.dvsa_columns import _float

    out = _float(pd.Series(["12", "9" * 400, "x", None]))
    assert out.iloc[0] == 12 and out.iloc[1:].isna().all()


def test_feature_normalisation_ignores_non_finite_values():
    import numpy as np

    from training.train import fit_feature_spec

    texts = pd.DataFrame({
        "count": [1, 1, 1], "vehicle_age_years": [2.0, np.inf, 4.0], "odometer_miles": [1000.0, np.inf, np.nan],
        "fuel_type": ["PE", "DI", "PE"],
    })  # fmt: skip
    spec = fit_feature_spec(texts)
    assert spec.age_mean == 3.0 and np.isfinite([spec.age_std, spec.log_odo_mean, spec.log_odo_std]).all()


def test_repeated_vehicles_count_each_test_once(tmp_path):
    """Overlapping API downloads repeat vehicles: their tests were counted (and trained on) twice."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps(VEHICLE) + "\n" + json.dumps(VEHICLE) + "\n")
    b.write_text(json.dumps(VEHICLE) + "\n")
    report = BulkReport()
    df = pd.concat(list(read_jsonl([a, b], report=report)), ignore_index=True)
    assert len(df) == 3 and report.duplicate_tests == 2  # test 123456789012 seen three times


def test_gzipped_json_lines_are_read(tmp_path):
    import gzip

    p = tmp_path / "api.jsonl.gz"
    p.write_bytes(gzip.compress((json.dumps(VEHICLE) + "\n").encode()))
    assert len(pd.concat(list(read_jsonl([p])))) == 3
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress((json.dumps(VEHICLE) + "\n").encode() * 200)[:300])
    with pytest.raises(BulkFormatError, match=r"broken\.jsonl\.gz:\d+: unreadable"):
        list(read_jsonl([broken]))
