"""bench.bench_log_reads: the bounded tail and the projection count against their full scans, same answers."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package

from bench import bench_log_reads  # noqa: E402


def test_bench_log_reads_compares_each_read_with_its_full_scan(tmp_path):
    rows = bench_log_reads.run(tmp_path / "db", requests=3000, days=8, tail_n=(5,))
    assert [r["read"] for r in rows] == [
        "tail 5, whole table (before)", "tail 5, reader.tail",
        "count, every row (before)", "count, reader.counts (projection)",
    ]  # fmt: skip
    total = rows[0]["table_rows"]
    assert total > 3000 and all(r["table_rows"] == total for r in rows)
    assert rows[0]["SelectedRows"] >= total and rows[2]["SelectedRows"] >= total  # the full scans
    assert rows[1]["same_answer"] and rows[3]["same_answer"]
    assert rows[1]["SelectedRows"] < total / 2 and rows[3]["SelectedRows"] < total / 20
    assert rows[1]["result_rows"] == 5 and rows[3]["result_rows"] >= 4  # versions × slots
