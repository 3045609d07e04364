"""bench.bench_bulk: each case runs in its own process and reports what it read."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package

from bench import bench_bulk  # noqa: E402


@pytest.mark.slow
def test_bench_bulk_reads_every_row_in_each_case(capsys):
    assert bench_bulk.main(["--rows", "3000", "--max-partitions", "2", "1", "--bucket-bytes", "65536"]) == 0
    out = capsys.readouterr().out
    assert out.count("3,000") >= 4 + 1  # the title and the four cases' rows
    assert "nosplit" in out and out.count("split") >= 4
