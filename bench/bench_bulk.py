"""Raw DVSA bulk read: peak memory and time with partitions as large inputs make them, split or not.

Each case reads the same synthetic input in its own process (``BulkReader``, chunks discarded) and
reports the partition count, the read-and-partition phase, the wall time and the peak RSS.
``--max-partitions 4`` on a 565 MB input gives the 141 MiB partitions that 512 partitions of 70 GiB
would hold; ``nosplit`` reads as before the sub-partitioning (``_SPLIT_ABOVE`` = ∞).

    .venv/bin/python -m bench.bench_bulk --rows 8000000 --max-partitions 4 1 --modes split nosplit
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent


def one(data: Path, mode: str, max_partitions: int, bucket_bytes: int, chunk_rows: int, tmp: Path) -> dict:
    """Read ``data`` once in this process; the figures as a dict."""
    import training.dvsa_reader as dvsa_reader

    if mode == "nosplit":
        dvsa_reader._SPLIT_ABOVE = float("inf")
    reader = dvsa_reader.BulkReader(
        [data], chunk_rows=chunk_rows, bucket_bytes=bucket_bytes, max_partitions=max_partitions, tmp_dir=tmp
    )
    phase: dict[str, float] = {}
    partition = reader._partition

    def timed(*a: object) -> None:
        t = time.perf_counter()
        partition(*a)  # type: ignore[arg-type]
        phase["partition_s"] = time.perf_counter() - t

    reader._partition = timed  # type: ignore[method-assign,assignment]
    t0 = time.perf_counter()
    rows = sum(len(chunk) for chunk in reader)
    return {
        "mode": mode,
        "max_partitions": max_partitions,
        "partitions": reader.partitions,
        "rows": rows,
        "partition_s": round(phase["partition_s"], 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="raw DVSA files (default: generate --rows synthetic defects)")
    ap.add_argument("--rows", type=int, default=8_000_000)
    ap.add_argument("--max-partitions", type=int, nargs="+", default=[4, 1])
    ap.add_argument("--bucket-bytes", type=int, default=32 << 20)
    ap.add_argument(
        "--chunk-rows",
        type=int,
        default=200_000,
        help="BulkReader's chunk_rows: the 4 MiB blocks read are gathered up to this many rows per write",
    )
    ap.add_argument("--modes", nargs="+", choices=["split", "nosplit"], default=["split", "nosplit"])
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one case, JSON out
    ap.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.data, a.modes[0], a.max_partitions[0], a.bucket_bytes, a.chunk_rows, a.tmp)))
        return 0
    with tempfile.TemporaryDirectory(prefix="motlens-bench-bulk-") as tmp:
        data = a.data
        if data is None:
            from training.synth import generate

            data = Path(tmp) / "raw"
            generate(data, a.rows, 42)
        results = []
        for parts in a.max_partitions:
            for mode in a.modes:
                cmd = [sys.executable, "-m", "bench.bench_bulk", "--one", "--data", str(data), "--modes", mode,
                       "--max-partitions", str(parts), "--bucket-bytes", str(a.bucket_bytes),
                       "--chunk-rows", str(a.chunk_rows), "--tmp", tmp]  # fmt: skip
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
                results.append(json.loads(out.strip().splitlines()[-1]))
    table = Table(title=f"bulk read of {data if a.data else f'{a.rows:,} synthetic defects'}")
    for col in results[0]:
        table.add_column(col)
    for r in results:
        table.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in r.values()))
    Console(width=140).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
