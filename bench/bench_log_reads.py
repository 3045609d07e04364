"""The prediction log's unwindowed reads at scale: ``log tail`` and ``log count`` against their unbounded
forms (a full ``ORDER BY ts DESC LIMIT n`` and a GROUP BY over every row), in one run on one table.

Builds the real schema with the project's migrations in a chdb database and fills it with synthetic
traffic (``--requests`` requests of 1-32 items over ``--days`` days ending now, versions rolling over with a
10 % canary, 1 % of rows with an embedding), then prints, per read: time, rows and granules read
(``system.events``) and whether the answers agree::

    python -m bench.bench_log_reads --requests 21000000 --days 120 --db /tmp/logreads   # ≈ 90 M rows
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import predlog
from predlog import PredlogSettings, migrate, queries
from predlog.sinks import make_client

_FILL = """
INSERT INTO {db}.predictions (ts, model_name, model_version, slot, request_id, item_index, text, text_hash,
    section, severity, latency_ms, status, embedding_q, embedding_scale)
SELECT
    fromUnixTimestamp64Milli(rts_ms + i, 'UTC'), 'mot-defects', if(canary, cver, pver),
    if(canary, 'canary', 'production'), rid, toInt32(i),
    concat(['Nearside ', 'Offside ', ''][1 + ih % 3], ['Brake disc worn', 'Tyre tread depth below requirements',
           'Coil spring fractured', 'Headlamp aim too high', 'Brake pipe corroded'][1 + intDiv(ih, 3) % 5]),
    ih, ['1 Brakes', '5 Axles, wheels, tyres and suspension', '4 Lamps'][1 + ih % 3],
    ['advisory', 'minor', 'major', 'dangerous'][1 + intDiv(ih, 7) % 4], toFloat32(4 + k * 1.5), 'ok',
    if(ih % 100 = 0, arrayMap(j -> toInt8(toInt32(cityHash64(ih, j) % 255) - 127), range(384)), []),
    toFloat32(if(ih % 100 = 0, 0.0008, 0))
FROM (
    SELECT number AS r, cityHash64(number, 'k') AS h,
           multiIf(h % 100 < 50, 1, h % 100 < 80, 4, h % 100 < 92, 8, h % 100 < 98, 16, 32) AS k,
           toInt64({start_ms:Int64} + intDiv(number * {span_ms:Int64}, {requests:UInt64})) AS rts_ms,
           toUInt32(intDiv(rts_ms - {start_ms:Int64}, 86400000) * 4 / {days:UInt32}) AS quarter,
           toString(7 + quarter) AS pver,
           if(intDiv(rts_ms - {start_ms:Int64}, 86400000) % intDiv({days:UInt32}, 4) < 3,
              toString(8 + quarter), '') AS cver,
           cver != '' AND intDiv(h, 7) % 10 = 0 AS canary,
           toString(generateUUIDv4(number)) AS rid
    FROM numbers({r0:UInt64}, {n:UInt64})
)
ARRAY JOIN range(k) AS i
ARRAY JOIN [cityHash64(r, i)] AS ih
"""


def build(client: Any, settings: PredlogSettings, requests: int, days: int, chunk: int = 1_000_000) -> None:
    if days < 4:
        raise ValueError("days must be at least 4 (four versions roll over)")
    migrate.apply(client, settings)
    end_ms = int(time.time()) * 1000
    span_ms = days * 86_400_000
    for r0 in range(0, requests, chunk):
        client.command(
            _FILL.replace("{db}", settings.database),
            parameters={
                "start_ms": end_ms - span_ms,
                "span_ms": span_ms,
                "requests": requests,
                "days": days,
                "r0": r0,
                "n": min(chunk, requests - r0),
            },  # fmt: skip
        )


def _events(client: Any) -> dict[str, int]:
    q = "SELECT event, value FROM system.events WHERE event IN ('SelectedRows', 'SelectedMarks')"
    return {str(k): int(v) for k, v in client.query(q).result_rows}


def measure(client: Any, label: str, read: Any) -> tuple[dict, Any]:
    before = _events(client)
    t = time.perf_counter()
    df = read()
    wall = time.perf_counter() - t
    after = _events(client)
    row = {"read": label, "seconds": round(wall, 3), "result_rows": len(df)}
    row.update({k: after.get(k, 0) - before.get(k, 0) for k in ("SelectedRows", "SelectedMarks")})
    return row, df


def run(db_dir: Path, requests: int, days: int, tail_n: tuple[int, ...] = (20, 5000)) -> list[dict]:
    settings = PredlogSettings(clickhouse_url=f"chdb://{db_dir}", database="motlens")
    client = make_client(settings)
    table = f"{settings.database}.predictions"
    try:
        if not client.query(f"EXISTS TABLE {table}").result_rows[0][0]:
            build(client, settings, requests, days)
        else:
            migrate.apply(client, settings)
        total = int(client.query(f"SELECT count() FROM {table}").result_rows[0][0])
        reader = predlog.open_reader(settings)
        rows = []
        try:
            for n in tail_n:
                full = f"SELECT {queries.ROW_COLUMNS} FROM {table} ORDER BY ts DESC LIMIT {int(n)}"
                a, old = measure(client, f"tail {n}, whole table (before)", lambda q=full: client.query_df(q))
                b, new = measure(client, f"tail {n}, reader.tail", lambda n=n: reader.tail(n))
                b["same_answer"] = old["ts"].tolist() == new["ts"].tolist()
                rows += [a, b]
            scan = queries.COUNTS.replace("{source}", table) + " SETTINGS optimize_use_projections = 0"
            a, old = measure(client, "count, every row (before)", lambda: client.query_df(scan))
            b, new = measure(client, "count, reader.counts (projection)", reader.counts)
            b["same_answer"] = old.equals(new)
            rows += [a, b]
        finally:
            reader.close()
        for r in rows:
            r["table_rows"] = total
        return rows
    finally:
        client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2_000_000, help="requests to generate (≈ 4.3 rows each)")
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--db", type=Path, help="chdb directory, kept (reused when it holds the table); default temporary")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    db = args.db or Path(tempfile.mkdtemp(prefix="motlens-logreads-"))
    try:
        rows = run(db, args.requests, args.days)
    finally:
        if args.db is None:
            shutil.rmtree(db, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{rows[0]['table_rows']:,} rows (pid {os.getpid()})")
    for r in rows:
        same = "" if "same_answer" not in r else f"  same answer: {r['same_answer']}"
        print(f"{r['read']:<40} {r['seconds']:>8.3f} s  {r['SelectedRows']:>12,} rows  "
              f"{r['SelectedMarks']:>7,} granules{same}")  # fmt: skip
    for before, after in zip(rows[::2], rows[1::2], strict=True):
        print(f"{after['read']}: {before['seconds'] / max(after['seconds'], 1e-6):.0f}× faster, "
              f"{before['SelectedRows'] / max(after['SelectedRows'], 1):.0f}× fewer rows read")  # fmt: skip


if __name__ == "__main__":
    main()
