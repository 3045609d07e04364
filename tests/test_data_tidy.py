"""The tidy table's switch from one load to the next: atomic under SIGKILL, one writer at a time."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from child_helpers import held, run_killed

from motlens.cli import main
from training.dataset import DataError, iter_source
from training.tidy import MANIFEST, load_tidy, to_table, write_tidy

CHUNKS = "from pathlib import Path\nfrom test_data_tidy import chunks\nfrom training.tidy import write_tidy\n"


def chunks(n: int, tag: str):
    """``n`` tidy chunks of 10 rows, each row's ``source`` set to ``tag`` (here and in child processes)."""
    for i in range(n):
        yield pd.DataFrame({"text": [f"{tag} brake pipe corroded {i} {j}" for j in range(10)],
                            "section": [1] * 10, "severity": ["major"] * 10, "source": [tag] * 10})  # fmt: skip


def _sources(out) -> list[pd.DataFrame]:
    return [load_tidy(out), pd.concat(iter_source(out))]  # what `data load`'s readers and `train --data` read


def test_a_load_killed_while_switching_leaves_the_previous_table(tmp_path):
    """write_tidy once deleted the old parts, then renamed the new ones in one by one: SIGKILLed
    after two renames, the table read as 20 rows of the new load, without an error."""
    out = tmp_path / "tidy"
    assert write_tidy(chunks(5, "old"), out, rows_per_file=10) == 50
    run_killed(CHUNKS + "kill_after_replace('.parquet', 2)\n"
               "write_tidy(chunks(5, 'new'), Path(sys.argv[1]), rows_per_file=10)", out)  # fmt: skip
    for df in _sources(out):
        assert len(df) == 50 and set(df["source"]) == {"old"}
    assert write_tidy(chunks(3, "new"), out, rows_per_file=10) == 30
    for df in _sources(out):
        assert len(df) == 30 and set(df["source"]) == {"new"}
    assert [p.name for p in tmp_path.iterdir()] == ["tidy"]  # the killed load's staging is removed
    assert len(list(out.glob("*.parquet"))) == 3  # and so are the parts it had moved in


def test_a_table_without_a_complete_manifest_is_refused(tmp_path):
    out, legacy = tmp_path / "tidy", tmp_path / "legacy"
    write_tidy(chunks(3, "x"), out, rows_per_file=10)
    legacy.mkdir()
    pq.write_table(to_table(next(chunks(1, "x"))), legacy / "part-00000.parquet")
    with pytest.raises(ValueError, match="no manifest .* load it again"):
        load_tidy(legacy)
    with pytest.raises(DataError, match="no manifest .* load it again"):
        list(iter_source(legacy))
    first, second, _ = sorted(out.glob("*.parquet"))
    assert len(load_tidy(first)) == 10  # a part file named explicitly is read as it is
    second.unlink()
    with pytest.raises(DataError, match=re.escape(f"{second.name} is missing")):
        list(iter_source(out))
    pq.write_table(to_table(next(chunks(1, "y")).head(5)), first)
    with pytest.raises(ValueError, match=re.escape(f"{first.name} does not match")):
        load_tidy(out)


def test_a_second_load_into_the_same_table_is_refused_while_one_writes(tmp_path, capsys):
    out = tmp_path / "tidy"
    code = """
def held_chunks():
    yield from chunks(2, "first")
    hold()
write_tidy(held_chunks(), Path(sys.argv[1]), rows_per_file=10)
"""
    raw = tmp_path / "raw"
    assert main(["data", "synth", "--rows", "50", "--out", str(raw)]) == 0
    capsys.readouterr()
    with held(CHUNKS + code, out):
        assert main(["data", "load", str(raw), "--out", str(out)]) == 2
        assert f"another process is writing {out}" in capsys.readouterr().err
    assert set(load_tidy(out)["source"]) == {"first"}


def test_the_manifest_is_as_readable_as_the_parts(tmp_path):
    """The manifest came out 0600 (mkstemp's mode) beside 0644 parts: other users could no longer
    read the table, and the error told them to load it again, which wrote another 0600 manifest."""
    old = os.umask(0o022)
    try:
        write_tidy(chunks(2, "x"), tmp_path / "tidy", rows_per_file=10)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "tidy").iterdir() if not p.name.startswith(".")]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o644}, modes


def test_an_unreadable_manifest_says_permissions_not_load_again(tmp_path, monkeypatch):
    write_tidy(chunks(1, "x"), tmp_path / "tidy", rows_per_file=10)
    real = Path.read_text

    def read_text(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - EACCES (root ignores chmod)
        if self.name == MANIFEST:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(ValueError, match=r"read the manifest \(Permission denied\): check the file.s permission"):
        load_tidy(tmp_path / "tidy")


def test_a_motlens_tidy_1_table_without_split_groups_is_still_read(tmp_path):
    """Format 2 added the ``split_group`` column; a table loaded before reads with it missing (its texts
    split by split key alone, as they were), and an unknown format is refused."""
    import json

    from training.dataset import SPLIT_SCHEME_TEXT, build_training_set

    old = tmp_path / "old"
    old.mkdir()
    rows = pd.concat(chunks(4, "v1"))
    part = old / "part-0.parquet"
    pq.write_table(to_table(rows).drop_columns(["split_group"]), part)
    doc = {"format": "motlens-tidy/1", "rows": 40, "parts": [{"file": part.name, "rows": 40,
                                                              "bytes": part.stat().st_size}]}  # fmt: skip
    (old / MANIFEST).write_text(json.dumps(doc))
    for df in _sources(old):
        assert len(df) == 40 and df["split_group"].isna().all()
    assert build_training_set(old, split_by="defect").split_scheme == SPLIT_SCHEME_TEXT
    (old / MANIFEST).write_text(json.dumps({**doc, "format": "motlens-tidy/3"}))
    with pytest.raises(ValueError, match="format 'motlens-tidy/3', not 'motlens-tidy/2'"):
        load_tidy(old)
