"""MOT History API JSON-lines reader."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from training.dvsa import BulkFormatError, BulkReport
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


def test_reads_defects_with_labels_and_context(tmp_path):
    p = tmp_path / "api.jsonl"
    other = {**VEHICLE, "make": "VAUXHALL", "fuelType": "Petrol"}
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
    p.write_bytes(json.dumps(VEHICLE).encode() + b"\n{not json\n" + json.dumps(VEHICLE).encode() + b"\n")
    report = BulkReport()
    df = pd.concat(list(read_jsonl([p], report=report)))
    assert len(df) == 6
    assert report.files[0].bad_rows == 1 and report.files[0].bad_lines == [2]


def test_latin1_line_is_tolerated(tmp_path):
    p = tmp_path / "api.jsonl"
    p.write_bytes(json.dumps({**VEHICLE, "model": "CITROËN C3"}, ensure_ascii=False).encode("latin-1") + b"\n")
    report = BulkReport()
    df = pd.concat(list(read_jsonl([p], report=report)))
    assert set(df["model"]) == {"CITROËN C3"}
    assert report.files[0].non_utf8_values == 1


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
