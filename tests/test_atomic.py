"""motlens.atomic: the modes of the files it writes, and the temp files a killed write leaves."""

from __future__ import annotations

import os
import stat

import pytest

from motlens.atomic import atomic_write, remove_stale_temps


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:  # noqa: ANN001
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_file_gets_the_umasks_mode_not_0600(tmp_path, umask_022):
    """The temp file came from mkstemp (0600) and a new file kept that: a tidy table's manifest or a
    drift summary could then be read by its writer only."""
    target = tmp_path / "summary.json"
    atomic_write(target, "{}")
    assert mode(target) == 0o644
    assert target.read_text() == "{}"


def test_an_existing_file_keeps_its_mode(tmp_path, umask_022):
    target = tmp_path / "private.json"
    target.write_text("old")
    target.chmod(0o600)
    atomic_write(target, "new")
    assert mode(target) == 0o600 and target.read_text() == "new"


def test_a_failed_write_leaves_no_temp_file_and_the_old_content(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write(target, "\udcff")  # a lone surrogate cannot be written as UTF-8
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_remove_stale_temps_takes_only_this_files_temps(tmp_path):
    target = tmp_path / "rollout.yaml"
    stale = tmp_path / ".rollout.yaml.ab12cd34.tmp"
    others = [tmp_path / ".rollout.yaml.original", tmp_path / ".other.yaml.ab12cd34.tmp"]
    for p in (stale, *others):
        p.write_text("x")
    assert remove_stale_temps(target) == [stale]
    assert all(p.exists() for p in others) and not stale.exists()
