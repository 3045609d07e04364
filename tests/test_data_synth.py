"""Synthetic DVSA generator: determinism, coverage, and round trip through the real reader."""

from __future__ import annotations

import hashlib
import re

import pandas as pd
import pytest
from child_helpers import held, run_killed

from motlens.labels import SEVERITIES
from training.dvsa_files import discover
from training.dvsa_reader import BulkReader, read_bulk
from training.synth import generate


def _digests(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def pipe_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth-pipe")
    return d, generate(d, rows=3000, seed=11)


def test_same_seed_gives_byte_identical_files(tmp_path, pipe_set):
    d, counts = pipe_set
    again = generate(tmp_path / "again", rows=3000, seed=11)
    assert again == counts
    assert _digests(tmp_path / "again") == _digests(d)
    other = generate(tmp_path / "other", rows=3000, seed=12)
    assert _digests(tmp_path / "other")["test_item.txt"] != _digests(d)["test_item.txt"]
    assert other["test_item"] == 3000


def test_zipped_comma_output_is_deterministic(tmp_path):
    a = generate(tmp_path / "a", rows=1000, seed=3, delimiter=",", zipped=True)
    generate(tmp_path / "b", rows=1000, seed=3, delimiter=",", zipped=True)
    assert sorted(a["files"]) == [f"{t}.zip" for t in sorted(
        ["item_detail", "item_group", "mdr_rfr_location", "test_item", "test_result"])]  # fmt: skip
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")


@pytest.mark.parametrize(("delimiter", "zipped"), [("|", False), (",", True)])
def test_round_trip_through_reader(tmp_path, delimiter, zipped, pipe_set):
    d = tmp_path / "data"
    counts = generate(d, rows=3000, seed=11, delimiter=delimiter, zipped=zipped)
    reader = BulkReader([d], chunk_rows=1000)
    df = pd.concat(list(reader), ignore_index=True)
    rep = reader.report.to_dict()
    assert len(df) == counts["test_item"] == 3000
    assert rep["bad_rows"] == 0 and rep["orphan_items"] == 0 and rep["unlabelled"] == 0
    # every manual section and every severity occurs
    assert set(df["section"]) == set(range(9))
    assert set(df["severity"]) == set(SEVERITIES)
    # severity counts agree with the type codes written
    assert (df["severity"] == "advisory").sum() == counts["type_codes"]["A"]
    # realistic content: locations, manual references, tester free text, heavy repetition
    assert df["text"].str.match(r"^(Nearside|Offside|Central) ").any()
    assert df["text"].str.contains(r"\(\d\.\d+(?:\.\d+)* \([a-z]\)").all()
    assert df["text"].str.contains("£").any()
    top = df["text"].value_counts()
    assert top.iloc[0] > 10 * top.median()
    assert df["fuel_type"].isin(["PE", "DI", "HY", "EL", "LP", "OT"]).all()
    assert df["vehicle_age_years"].between(3, 60).mean() > 0.99
    assert df["odometer_miles"].notna().mean() > 0.95


def test_rows_zero_and_bad_delimiter(tmp_path):
    assert generate(tmp_path / "z", rows=0, seed=1)["test_item"] == 0
    with pytest.raises(ValueError, match="delimiter"):
        generate(tmp_path / "x", rows=10, seed=1, delimiter=";")


def test_an_interrupted_run_leaves_no_partial_dataset(tmp_path, monkeypatch):
    """Interrupted part-way, the tables were once left truncated at clean line ends: a smaller
    dataset that loads without complaint. Now a new --out stays empty and an old one unchanged."""
    import training.synth as synth

    generate(tmp_path / "old", rows=1000, seed=5)
    before = _digests(tmp_path / "old")
    real_block, calls = synth._block, []

    def interrupted(*args):  # the real block writer, interrupted (Ctrl-C) on its third block
        calls.append(1)
        if len(calls) % 3 == 0:
            raise KeyboardInterrupt
        return real_block(*args)

    monkeypatch.setattr(synth, "BLOCK_TESTS", 500)
    monkeypatch.setattr(synth, "_block", interrupted)
    for out in (tmp_path / "new", tmp_path / "old"):
        with pytest.raises(KeyboardInterrupt):
            generate(out, rows=5000, seed=6, delimiter=",")
    assert len(calls) == 6
    assert list((tmp_path / "new").iterdir()) == [] and _digests(tmp_path / "old") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old"]  # no staging directory left


def _rows(d):
    return sum(len(chunk) for chunk in read_bulk([d]))


_KILLED_MID_WRITE = """
from pathlib import Path
import training.synth as synth
real_block, calls = synth._block, []
def block(*args):  # SIGKILLed on its 20th block of 100 tests: the staging tables are part-written
    calls.append(1)
    if len(calls) == 20:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_block(*args)
synth._block, synth.BLOCK_TESTS = block, 100
synth.generate(Path(sys.argv[1]), rows=100_000, seed=3)
"""


def test_a_killed_runs_staging_is_not_read_with_the_dataset(tmp_path):
    """A SIGKILLed run leaves its hidden staging directory in out_dir: reading out_dir once took its
    part-written tables too (162,983 rows out of a 300-row dataset, exit 0)."""
    out = tmp_path / "raw"
    generate(out, rows=300, seed=2)
    before = _rows(out)
    run_killed(_KILLED_MID_WRITE, out)
    (staging,) = out.glob(".synth-*")
    assert _rows(out) == before
    assert [s.kind for s in discover([staging])[0]]  # a hidden folder or file named explicitly is read
    assert [s.kind for s in discover([staging / "item_detail.txt"])[0]] == ["item_detail"]


def test_the_next_run_removes_a_killed_runs_staging(tmp_path):
    """Killed after its first table was moved into place, a run left the other four in its staging
    directory; a rerun's dataset then loaded as 600 rows instead of 300."""
    out = tmp_path / "raw"
    run_killed("from pathlib import Path\nfrom training.synth import generate\n"
               "kill_after_replace('.txt', 1)\ngenerate(Path(sys.argv[1]), rows=300, seed=1)", out)  # fmt: skip
    assert len(list(out.glob(".synth-*"))) == 1
    generate(out, rows=300, seed=2)
    assert list(out.glob(".synth-*")) == []
    generate(tmp_path / "fresh", rows=300, seed=2)
    assert _rows(out) == _rows(tmp_path / "fresh")


def test_a_second_run_into_the_same_directory_is_refused_while_one_writes(tmp_path):
    from training.outdir import OutputBusy

    out = tmp_path / "raw"
    code = """
from pathlib import Path
import training.synth as synth
real_block = synth._block
def block(*args):
    synth._block = real_block
    hold()
    return real_block(*args)
synth._block = block
synth.generate(Path(sys.argv[1]), rows=300, seed=1)
"""
    with held(code, out):
        (staging,) = out.glob(".synth-*")
        with pytest.raises(OutputBusy, match=re.escape(f"another process is writing {out}")):
            generate(out, rows=300, seed=2)
        assert staging.is_dir()  # the other run's staging is left alone
    generate(tmp_path / "seed1", rows=300, seed=1)
    assert _digests(out) == _digests(tmp_path / "seed1")  # the first run's tables, nothing else
