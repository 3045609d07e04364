"""`data load --out` and `data synth --out` replace only files motlens wrote: a directory holding
someone else's files is refused (exit 2), never emptied."""

from __future__ import annotations

import pytest
from child_helpers import run_killed
from test_data_tidy import CHUNKS, chunks

from motlens.cli import main
from training.outdir import ForeignOutput
from training.synth import MARK, generate
from training.tidy import MANIFEST, PENDING, load_tidy, tidy_files, write_tidy


def _files(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


def test_load_refuses_a_directory_of_someone_elses_part_files(tmp_path, capsys):
    """A load into a Spark output deleted its part-*.parquet after a successful load (exit 0)."""
    raw, spark = tmp_path / "raw", tmp_path / "sparkout"
    assert main(["data", "synth", "--rows", "200", "--seed", "1", "--out", str(raw)]) == 0
    spark.mkdir()
    (spark / "part-00000-abc.snappy.parquet").write_text("precious")
    (spark / "_SUCCESS").write_text("keep")
    before = _files(spark)
    capsys.readouterr()
    assert main(["data", "load", str(raw), "--out", str(spark)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"motlens data load: --out {spark} holds _SUCCESS and 1 more but no {MANIFEST}")
    assert err.count("\n") == 1 and _files(spark) == before


def test_a_reload_replaces_its_own_parts_and_keeps_the_rest(tmp_path):
    out = tmp_path / "tidy"
    write_tidy(chunks(3, "old"), out, rows_per_file=10)
    old_parts = {p.name for p in out.glob("part-*.parquet")}
    (out / "part-00000-abc.snappy.parquet").write_text("someone else's, put into the table")
    assert write_tidy(chunks(2, "new"), out, rows_per_file=10) == 20
    assert set(load_tidy(out)["source"]) == {"new"}
    left = {p.name for p in out.iterdir()}
    assert "part-00000-abc.snappy.parquet" in left and not old_parts & left and PENDING not in left


def test_a_first_load_killed_after_moving_a_part_in_is_loaded_again(tmp_path):
    """Its part lies in the new directory without a manifest: the record of what it wrote lets the
    next load claim the directory and remove that part."""
    out = tmp_path / "tidy"
    run_killed(CHUNKS + "kill_after_replace('.parquet', 1)\n"
               "write_tidy(chunks(3, 'killed'), Path(sys.argv[1]), rows_per_file=10)", out)  # fmt: skip
    assert not (out / MANIFEST).exists() and len(list(out.glob("part-*.parquet"))) == 1
    assert write_tidy(chunks(2, "next"), out, rows_per_file=10) == 20
    assert sorted(out.glob("*.parquet")) == sorted(tidy_files(out)) and len(tidy_files(out)) == 2


def test_synth_refuses_a_directory_of_dvsa_files(tmp_path, capsys):
    """Pointed at real DVSA files, synth deleted test_result.csv and test_item.zip without a word."""
    dvsa = tmp_path / "dvsa"
    dvsa.mkdir()
    (dvsa / "test_result.csv").write_text("test_id,test_result\n1,P\n")
    (dvsa / "test_item.zip").write_bytes(b"PK not really")
    before = _files(dvsa)
    assert main(["data", "synth", "--rows", "50", "--out", str(dvsa), "--delimiter", "comma"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"motlens data synth: --out {dvsa} holds test_item.zip and 1 more but no {MARK}")
    assert err.count("\n") == 1 and _files(dvsa) == before


def test_synth_reruns_into_its_own_directory_but_never_over_a_file_it_did_not_write(tmp_path):
    out = tmp_path / "raw"
    generate(out, rows=50, seed=1)
    generate(out, rows=50, seed=2, zipped=True)  # its own .txt tables are replaced
    assert sorted(p.suffix for p in out.iterdir() if p.name != MARK) == [".zip"] * 5
    (out / "test_result.csv").write_text("test_id,test_result\n1,P\n")  # someone else's, beside them
    with pytest.raises(ForeignOutput, match="holds test_result.csv, which motlens data synth did not write"):
        generate(out, rows=50, seed=3, delimiter=",")
    assert (out / "test_result.csv").read_text() == "test_id,test_result\n1,P\n"


@pytest.mark.parametrize("zipped", [False, True])
def test_synth_reruns_into_a_directory_an_earlier_version_wrote(tmp_path, zipped):
    """Sets written before the mark (e.g. `motlens demo`'s) are recognised by test_item's own header."""
    out = tmp_path / "raw"
    generate(out, rows=50, seed=1, zipped=zipped)
    (out / MARK).unlink()
    generate(out, rows=50, seed=2, delimiter=",")
    generate(tmp_path / "fresh", rows=50, seed=2, delimiter=",")
    assert _files(out) == _files(tmp_path / "fresh")
    (out / MARK).unlink()
    (out / "test_item.csv").write_text("test_id,rfr_id,rfr_type_code,location_id,dmark\n")  # a DVSA header
    with pytest.raises(ForeignOutput, match=f"but no {MARK}"):
        generate(out, rows=50, seed=3, delimiter=",")
