"""`motlens data synth` and `motlens data load --out` end to end through the console entry point."""

from __future__ import annotations

import json

from motlens.cli import main
from training.tidy import load_tidy


def test_synth_then_load(tmp_path, capsys):
    assert main(["data", "synth", "--rows", "1500", "--seed", "2", "--out", str(tmp_path / "raw"),
                 "--delimiter", "comma", "--zip"]) == 0  # fmt: skip
    counts = json.loads(capsys.readouterr().out)
    assert counts["test_item"] == 1500
    api = tmp_path / "raw" / "api.jsonl"
    api.write_text(json.dumps({"make": "FORD", "motTests": [{"completedDate": "2022-01-01T00:00:00Z",
        "defects": [{"text": "Horn not working (7.5 (a))", "type": "MAJOR"}]}]}) + "\n")  # fmt: skip
    rc = main(["data", "load", str(tmp_path / "raw"), "--out", str(tmp_path / "tidy"),
               "--report", str(tmp_path / "report.json")])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    expected = 1500 - report["duplicate_items"] + 1  # identical defect rows within a test count once
    assert f"rows_out: {expected}" in out and "severities:" in out
    df = load_tidy(tmp_path / "tidy")
    assert len(df) == expected and set(df["source"]) == {"dvsa_bulk", "mot_history_api"}
    assert report["bad_rows"] == 0 and report["duplicate_items"] < 100


def test_load_error_names_file(tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("nothing to see\n")
    assert main(["data", "load", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "t")]) == 1
    assert "bad.csv:1:" in capsys.readouterr().err


def test_load_needs_a_destination(tmp_path, capsys):
    assert main(["data", "load", str(tmp_path)]) == 2


def test_load_takes_one_destination(tmp_path, capsys):
    assert main(["data", "load", str(tmp_path), "--out", str(tmp_path / "t"), "--clickhouse"]) == 2
    assert "either" in capsys.readouterr().err


def test_a_failed_load_leaves_the_previous_table(tmp_path, capsys):
    """A load that failed part-way once deleted the old table and left a partial one that looked complete."""
    raw, out = tmp_path / "raw", tmp_path / "tidy"
    assert main(["data", "synth", "--rows", "300", "--seed", "3", "--out", str(raw)]) == 0
    assert main(["data", "load", str(raw), "--out", str(out)]) == 0
    before = len(load_tidy(out))
    from test_data_api import VEHICLE

    good, bad = tmp_path / "good.jsonl", tmp_path / "zbad.jsonl"
    good.write_text(json.dumps(VEHICLE) + "\n")
    bad.write_bytes(b"\x00\x01garbage\n")  # read after good.jsonl's rows are written
    capsys.readouterr()
    for dest in (out, tmp_path / "fresh"):
        assert main(["data", "load", str(good), str(bad), "--out", str(dest), "--chunk-rows", "1"]) == 1
        assert "zbad.jsonl:1: binary data" in capsys.readouterr().err
    assert len(load_tidy(out)) == before
    assert list((tmp_path / "fresh").glob("*.parquet")) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_a_load_that_reads_no_rows_leaves_the_previous_table(tmp_path, capsys):
    """A directory without MOT tables, or an empty API file, once replaced the table with an empty one (exit 0)."""
    raw, out = tmp_path / "raw", tmp_path / "tidy"
    assert main(["data", "synth", "--rows", "300", "--seed", "3", "--out", str(raw)]) == 0
    assert main(["data", "load", str(raw), "--out", str(out)]) == 0
    manifest = (out / "_tidy.manifest").read_text()
    before = len(load_tidy(out))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("no tables here\n")
    (tmp_path / "empty.jsonl").write_text("")
    capsys.readouterr()
    cases = (
        (tmp_path / "docs", "no MOT tables (DVSA bulk files or MOT History API JSON) found"),
        (tmp_path / "empty.jsonl", f"no rows were read from the inputs; {out} is left as it was"),
    )
    for source, message in cases:
        assert main(["data", "load", str(source), "--out", str(out)]) == 1
        assert message in capsys.readouterr().err
    assert len(load_tidy(out)) == before and (out / "_tidy.manifest").read_text() == manifest


def test_a_ch_path_that_is_a_file_is_named(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")  # was FileExistsError naming the path but not the flag
    assert main(["data", "load", str(tmp_path), "--clickhouse", "--ch-path", str(tmp_path / "afile")]) == 2
    assert f"--ch-path {tmp_path / 'afile'} exists and is not a directory" in capsys.readouterr().err


def test_bad_arguments_are_exit_2_before_any_work(tmp_path, capsys):
    """Each of these once ended in a traceback (one of them after the Parquet output was written)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["data", "synth", "--rows", "-1", "--out", str(tmp_path / "s")], "--rows: must be 0 or more"),
        (["data", "synth", "--rows", "5", "--out", str(afile)], "exists and is not a directory"),
        (["data", "load", str(tmp_path), "--out", str(afile)], "exists and is not a directory"),
        (["data", "load", str(tmp_path), "--out", str(tmp_path / "t"), "--chunk-rows", "0"], "must be 1 or more"),
        (["data", "load", str(tmp_path), "--out", str(tmp_path / "t"), "--report", str(tmp_path / "no" / "r.json")],
         "does not exist"),
        (["data", "load", str(tmp_path), "--out", str(tmp_path / "t"), "--report", str(tmp_path)],
         f"--report {tmp_path} exists and is not a file"),
    ]  # fmt: skip
    for argv, message in cases:
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own refusal
            rc = e.code
        assert rc == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "t").exists()


def test_synth_into_a_used_directory_replaces_the_earlier_tables(tmp_path):
    out = tmp_path / "raw"
    assert main(["data", "synth", "--rows", "50", "--seed", "1", "--out", str(out)]) == 0
    assert main(["data", "synth", "--rows", "50", "--seed", "2", "--out", str(out), "--delimiter", "comma"]) == 0
    tables = sorted(p.suffix for p in out.iterdir() if not p.name.startswith("."))
    assert tables == [".csv"] * 5  # no .txt tables of seed 1 left to mix in
