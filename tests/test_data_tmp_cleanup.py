"""The bulk reader's temporary partition directories: removed on SIGTERM as on Ctrl-C, and a read
removes those that reads killed outright left (their process gone), never a live one's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from child_helpers import ROOT
from test_data_reader import write_fixture

from training.dvsa_reader import OWNER_FILE, TMP_PREFIX, BulkReader, sweep_stale
from training.tidy import MANIFEST

#: ``motlens data load RAW --out OUT --tmp-dir TMP`` that sends itself SIGTERM at ``sys.argv[4]``: in the
#: reader (partition files on disk) or in the writer (the reader suspended between two chunks)
SIGTERMED = """
import os, signal, sys
import pyarrow.parquet as pq
import training.dvsa_reader as reader
where = {"reader": (reader.BulkReader, "_join"), "writer": (pq.ParquetWriter, "write_table")}[sys.argv[4]]
real = getattr(*where)
def terminated(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
setattr(*where, terminated)
from motlens.cli import main
sys.exit(main(["data", "load", sys.argv[1], "--out", sys.argv[2], "--tmp-dir", sys.argv[3]]))
"""


@pytest.mark.parametrize("where", ["reader", "writer"])
def test_sigterm_stops_a_load_with_143_and_removes_its_temporary_files(tmp_path, where):
    """SIGTERM (a pod or a systemd unit stopped, `kill`) left /tmp/motlens-bulk-* of the input's size."""
    raw, out, tmp = write_fixture(tmp_path / "in"), tmp_path / "tidy", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", SIGTERMED, raw, out, tmp, where]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "motlens data load: stopped by SIGTERM" in proc.stderr
    assert list(tmp.iterdir()) == [] and not (out / MANIFEST).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left either


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)  # waited for: gone, not a zombie


def test_a_read_removes_the_temporary_directories_of_reads_whose_process_is_gone(tmp_path):
    """A load killed outright (SIGKILL, OOM) left its directory, which no later load removed."""
    host = socket.gethostname()
    tmp = tmp_path / "tmp"
    owners = {
        "dead": f"{_dead_pid()} {host}",
        "live": f"{os.getpid()} {host}",
        "other-host": f"{_dead_pid()} elsewhere.example",
        "unmarked": None,
    }
    for name, owner in owners.items():
        (tmp / f"{TMP_PREFIX}{name}").mkdir(parents=True)
        (tmp / f"{TMP_PREFIX}{name}" / "result-0000.arrow").write_bytes(b"partition")
        if owner is not None:
            (tmp / f"{TMP_PREFIX}{name}" / OWNER_FILE).write_text(owner + "\n")
    mine: dict[str, str] = {}
    for _ in BulkReader([write_fixture(tmp_path / "in")], tmp_dir=tmp):
        mine = {p.name: (p / OWNER_FILE).read_text() for p in tmp.iterdir() if p.name[len(TMP_PREFIX) :] not in owners}
    assert list(mine.values()) == [f"{os.getpid()} {host}\n"]  # its own, marked while in use
    left = sorted(p.name[len(TMP_PREFIX) :] for p in tmp.iterdir())
    assert left == ["live", "other-host", "unmarked"]


def test_a_directory_of_a_live_process_is_kept_whoever_owns_it(tmp_path, monkeypatch):
    """A process of another user (kill(pid, 0): EPERM) is alive too."""

    def not_permitted(pid: int, sig: int) -> None:
        raise PermissionError

    marked = tmp_path / f"{TMP_PREFIX}other-user"
    marked.mkdir()
    (marked / OWNER_FILE).write_text(f"1 {socket.gethostname()}\n")
    monkeypatch.setattr(os, "kill", not_permitted)
    assert sweep_stale(tmp_path) == [] and marked.is_dir()
