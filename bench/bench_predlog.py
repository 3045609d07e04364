"""Prediction-log benchmark: writer throughput, bytes/row on disk, embedding encodings, drift-query cost.

    .venv/bin/python bench/bench_predlog.py                       # defaults (a few minutes on 2 cores)
    .venv/bin/python bench/bench_predlog.py --rows 50000 --scale-rows 1000000 --json out.json

Figures go into docs/predlog.md. ``--parts serving`` measures the serving-throughput overhead of the
log (target < 5%): ``motlens serve`` with and without ``--no-predlog``, alternated, under the same
closed-loop load (bench.loadgen), comparing items/s and the server's CPU seconds per item.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
from rich.console import Console
from rich.table import Table

import predlog
from predlog import PredictionRecord, PredlogSettings, migrate
from predlog.reader import ParquetSource, PredictionLogReader, TableSource
from predlog.schema import records_to_arrow
from predlog.sinks import make_client

ITEMS = ["Brake disc", "Brake pipe", "Tyre", "Coil spring", "Headlamp", "Windscreen", "Exhaust", "Steering rack gaiter"]
DEFECTS = [
    "worn, pitted or scored",
    "corroded",
    "worn close to legal limit",
    "fractured",
    "aim too high",
    "damaged in zone A",
    "leaking",
    "split",
    "excessively deteriorated",
    "not working",
]
LOCATIONS = ["Nearside Front", "Offside Front", "Nearside Rear", "Offside Rear", ""]
SECTIONS = [
    "1 Brakes",
    "5 Axles, wheels, tyres and suspension",
    "4 Lamps, reflectors and electrical equipment",
    "3 Visibility",
    "2 Steering",
    "6 Body, structure and attachments",
]
SEVERITIES = ["advisory", "minor", "major", "dangerous"]
console = Console()


def unit_vectors(n: int, dim: int, real: bool, seed: int) -> np.ndarray:
    if real:
        from motlens.embedder import TorchEmbedder

        rng = random.Random(seed)
        texts = [
            f"{rng.choice(LOCATIONS)} {rng.choice(ITEMS)} {rng.choice(DEFECTS)} "
            f"({rng.randint(1, 8)}.{rng.randint(1, 9)}.{rng.randint(1, 20)})"
            for _ in range(n)
        ]
        return np.asarray(TorchEmbedder(device="cpu").encode(texts), dtype=np.float32)
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _fresh_vector(nrng: np.random.Generator) -> list[float]:
    """A distinct unit vector per row: as incompressible as distinct MiniLM embeddings (see encodings)."""
    v = nrng.standard_normal(384).astype(np.float32)
    return (v / np.linalg.norm(v)).tolist()


def make_records(n: int, emb_rate: float, seed: int = 0) -> list[PredictionRecord]:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    t0 = datetime.now(UTC) - timedelta(hours=1)
    out = []
    for i in range(n):
        text = (
            f"{rng.choice(LOCATIONS)} {rng.choice(ITEMS)} {rng.choice(DEFECTS)} "
            f"({rng.randint(1, 8)}.{rng.randint(1, 9)}.{rng.randint(1, 20)} ({rng.choice('abcde')}))"
        ).strip()
        out.append(
            PredictionRecord(
                request_id=uuid.UUID(int=rng.getrandbits(128)).hex,
                item_index=i % 8,
                model_name="mot-defects",
                model_version=str(10 + i % 2),
                slot=("production", "canary")[int(i % 10 == 0)],
                text=text,
                section=rng.choice(SECTIONS),
                section_score=rng.random(),
                severity=rng.choice(SEVERITIES),
                fail_probability=rng.random(),
                latency_ms=rng.lognormvariate(2, 0.5),
                cache_hit=rng.random() < 0.3,
                backend="torch",
                device="cpu",
                protocol="v2-rest",
                status="ok" if rng.random() > 0.001 else "server_error",
                make=rng.choice(["FORD", "VAUXHALL", "VOLKSWAGEN", "BMW", None]),
                model=rng.choice(["FOCUS", "CORSA", "GOLF"]),
                fuel_type=rng.choice(["PE", "DI", "EL", "HY"]),
                vehicle_age_years=rng.uniform(3, 25),
                odometer_miles=rng.uniform(1e3, 2e5),
                embedding=_fresh_vector(nrng) if rng.random() < emb_rate else None,
                ts=t0 + timedelta(milliseconds=i),
            )
        )
    return out


def bench_writer(settings: PredlogSettings, records: list[PredictionRecord], chunk: int) -> dict:
    writer = predlog.open_writer(settings)
    lat = []
    t0 = time.perf_counter()
    for i in range(0, len(records), chunk):
        s = time.perf_counter()
        writer.submit(records[i : i + chunk])
        lat.append(time.perf_counter() - s)
    submitted = time.perf_counter() - t0
    writer.flush(600)
    writer.close(60)
    total = time.perf_counter() - t0
    st = writer.stats()
    assert st["written"] == len(records) and st["dropped"] == 0, st
    lat_us = np.array(lat) * 1e6
    return {
        "rows": len(records),
        "rows_per_s": len(records) / total,
        "submit_p50_us": float(np.percentile(lat_us, 50)),
        "submit_p99_us": float(np.percentile(lat_us, 99)),
        "submit_phase_s": submitted,
        "total_s": total,
    }


def parquet_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.parquet"))


def mergetree_bytes(client, db: str, table: str = "predictions") -> dict:
    client.command(f"OPTIMIZE TABLE {db}.{table} FINAL")
    rows, on_disk = client.query(
        "SELECT sum(rows), sum(bytes_on_disk) FROM system.parts WHERE database = {d:String} AND table = {t:String} "
        "AND active",
        parameters={"d": db, "t": table},
    ).result_rows[0]
    cols = client.query(
        "SELECT column, sum(column_data_compressed_bytes) AS c, sum(column_data_uncompressed_bytes) "
        "FROM system.parts_columns WHERE database = {d:String} AND table = {t:String} AND active "
        "GROUP BY column ORDER BY c DESC",
        parameters={"d": db, "t": table},
    ).result_rows
    return {
        "rows": int(rows),
        "bytes_per_row": on_disk / max(rows, 1),
        "columns_bytes_per_row": {n: c / max(rows, 1) for n, c, _ in cols},
    }


def bench_storage(records_by_rate: dict[float, list[PredictionRecord]], tmp: Path) -> dict:
    out: dict = {}
    client = make_client(PredlogSettings(clickhouse_url="chdb://memory"))
    for rate, recs in records_by_rate.items():
        d = tmp / f"pq_{rate}"
        settings = PredlogSettings(dir=d, batch_rows=10_000)
        w = predlog.open_writer(settings)
        w.submit(recs)
        w.close(600)
        pq_bpr = parquet_bytes(settings.table_dir("predictions")) / len(recs)
        db = f"bench_{str(rate).replace('.', '_')}"
        s = PredlogSettings(clickhouse_url="chdb://memory", database=db)
        migrate.apply(client, s)
        table = records_to_arrow(recs)
        for i in range(0, table.num_rows, 100_000):
            client.insert_arrow(f"{db}.predictions", table.slice(i, 100_000))
        mt = mergetree_bytes(client, db)
        out[rate] = {
            "parquet_bytes_per_row": pq_bpr,
            "mergetree_bytes_per_row": mt["bytes_per_row"],
            "mergetree_columns": {k: round(v, 2) for k, v in list(mt["columns_bytes_per_row"].items())[:8]},
        }
        client.command(f"DROP DATABASE {db}")
    return out


def bench_encodings(vectors: np.ndarray) -> dict:
    """Bytes per stored embedding in MergeTree (ZSTD(1)) for Float32, BFloat16 and int8+scale."""
    client = make_client(PredlogSettings(clickhouse_url="chdb://memory"))
    client.command("CREATE DATABASE IF NOT EXISTS bench_enc")
    client.command(
        "CREATE TABLE bench_enc.e (id UInt32, f32 Array(Float32) CODEC(ZSTD(1)), "
        "bf16 Array(BFloat16) CODEC(ZSTD(1)), q Array(Int8) CODEC(ZSTD(1)), scale Float32) "
        "ENGINE = MergeTree ORDER BY id SETTINGS min_bytes_for_wide_part = 0"
    )
    from predlog.schema import quantize

    q, scales = quantize(list(vectors))
    tbl = pa.table(
        {
            "id": pa.array(range(len(vectors)), pa.uint32()),
            "f32": pa.array(list(vectors), pa.list_(pa.float32())),
            "bf16": pa.array(list(vectors), pa.list_(pa.float32())),
            "q": pa.array(q, pa.list_(pa.int8())),
            "scale": pa.array(scales, pa.float32()),
        }
    )
    client.insert_arrow("bench_enc.e", tbl)
    sizes = mergetree_bytes(client, "bench_enc", "e")["columns_bytes_per_row"]
    deq = np.stack([a.astype(np.float32) * s for a, s in zip(q, scales, strict=True)])
    bf = np.stack(client.query_df("SELECT arrayMap(x -> toFloat32(x), bf16) AS v FROM bench_enc.e ORDER BY id")["v"])

    def cos(a: np.ndarray) -> float:
        return float(((a * vectors).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(vectors, axis=1)).min())

    client.command("DROP DATABASE bench_enc")
    return {
        "float32_bytes": sizes["f32"],
        "bfloat16_bytes": sizes["bf16"],
        "int8_bytes": sizes["q"] + sizes["scale"],
        "int8_min_cosine": cos(deq),
        "bfloat16_min_cosine": cos(bf),
        "n": len(vectors),
    }


SCALE_INSERT = """
INSERT INTO {db}.predictions
SELECT
    now64(3, 'UTC') - toIntervalMillisecond(intDiv(number * {span_ms:UInt64}, {rows:UInt64})) AS ts,
    'mot-defects', toString(10 + number % 2), if(number % 10 = 0, 'canary', 'production'),
    hex(cityHash64(number, 'r')), toInt32(number % 8),
    concat(['Nearside Front ', 'Offside Rear ', ''][1 + number % 3],
           ['Brake disc worn', 'Tyre worn close to legal limit', 'Coil spring fractured',
            'Headlamp aim too high'][1 + intDiv(number, 3) % 4],
           ' (', toString(number % 97), ')'),
    cityHash64(number % 5000),
    ['1 Brakes', '5 Axles, wheels, tyres and suspension',
     '4 Lamps, reflectors and electrical equipment'][1 + number % 3],
    randCanonical(), ['advisory', 'minor', 'major', 'dangerous'][1 + number % 4], randCanonical(),
    10 + 20 * randCanonical(), number % 3 = 0, 'torch', 'cpu', 'v2-rest', if(number % 1000 = 0, 'server_error', 'ok'),
    ['FORD', 'VAUXHALL', 'BMW'][1 + number % 3], 'FOCUS', ['PE', 'DI', 'EL'][1 + number % 3],
    toFloat32(number % 20), toFloat32(number % 200000),
    if(number % 10 = 0, arrayMap(i -> toInt8(cityHash64(number, i) % 255 - 127), range(384)), []),
    if(number % 10 = 0, toFloat32(0.0008), toFloat32(0))
FROM numbers({rows:UInt64})
"""


def bench_queries(rows: int, days: int) -> dict:
    client = make_client(PredlogSettings(clickhouse_url="chdb://memory"))
    db = "bench_scale"
    s = PredlogSettings(clickhouse_url="chdb://memory", database=db)
    migrate.apply(client, s)
    t = time.perf_counter()
    client.command(SCALE_INSERT.replace("{db}", db), parameters={"rows": rows, "span_ms": days * 86_400_000})
    client.command(f"OPTIMIZE TABLE {db}.predictions FINAL")
    gen_s = time.perf_counter() - t
    parts = client.query(
        f"SELECT count(), uniqExact(partition), sum(bytes_on_disk) FROM system.parts "
        f"WHERE database = '{db}' AND table = 'predictions' AND active"
    ).result_rows[0]
    reader = PredictionLogReader(client, TableSource(client, db), s)
    since = datetime.now(UTC) - timedelta(days=1)
    cases = {
        "live_stats_24h": lambda: reader.live_stats(since=since),
        "live_stats_all": lambda: reader.live_stats(since=datetime.now(UTC) - timedelta(days=days + 1)),
        "live_requests_24h": lambda: reader.live_requests(since=since),
        "live_requests_all": lambda: reader.live_requests(since=datetime.now(UTC) - timedelta(days=days + 1)),
        "window_24h_v10_prod_sample_0.1_limit_50k": lambda: reader.window(
            model_version="10", slot="production", start=since, sample=0.1, limit=50_000
        ),
        "window_24h_canary_embeddings_limit_20k": lambda: reader.window(
            model_version="10", slot="canary", start=since, with_embeddings=True, limit=20_000
        ),
        "counts_all": reader.counts,
    }
    timings = {}
    for name, fn in cases.items():
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            n = len(fn())
            runs.append(time.perf_counter() - t)
        timings[name] = {"median_s": statistics.median(runs), "rows_returned": n}
    client.command(f"DROP DATABASE {db}")
    return {
        "rows": rows,
        "days": days,
        "generate_s": gen_s,
        "parts": parts[0],
        "partitions": parts[1],
        "bytes_on_disk": parts[2],
        "queries": timings,
    }


def parquet_query(records: list[PredictionRecord], tmp: Path) -> dict:
    settings = PredlogSettings(dir=tmp / "pq_query", batch_rows=5_000)
    w = predlog.open_writer(settings)
    w.submit(records)
    w.close(600)
    reader = PredictionLogReader(make_client(settings), ParquetSource(settings.root), settings)
    t = time.perf_counter()
    reader.live_stats(since=datetime.now(UTC) - timedelta(days=1))
    return {
        "rows": len(records),
        "segments": len(list(settings.table_dir("predictions").glob("*.parquet"))),
        "live_stats_s": time.perf_counter() - t,
    }


def bench_serving(tmp: Path, duration: float, rounds: int, mix_name: str, concurrency: int) -> dict:
    """A/B: the predictor with and without the prediction log (embedded Parquet), alternated."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for the bench package
    from bench.bundle import build_bench_bundle
    from bench.loadgen import run, run_load, tree_cpu_s
    from bench.mixes import make_mix

    bundle = build_bench_bundle(Path("bench/results/bundle"), onnx=False)
    runs = []
    for i, arm in enumerate(["off", "on"] * rounds):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        home = tmp / f"serve_{i}"
        cmd = [
            sys.executable,
            "-m",
            "motlens.cli",
            "serve",
            "--model",
            str(bundle.root),
            "--http-port",
            str(port),
            "--no-grpc",
            "--backend",
            "torch",
            "--device",
            "cpu",
        ] + (["--no-predlog"] if arm == "off" else [])
        proc = subprocess.Popen(
            cmd, env={**os.environ, "MOTLENS_HOME": str(home)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{url}/v2/models/mot-defects/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"server ({arm}) did not become ready")
                time.sleep(0.5)
            cpu0 = tree_cpu_s(proc.pid)
            res = run(
                run_load(
                    url,
                    make_mix(mix_name, seed=i),
                    concurrency=concurrency,
                    duration_s=duration,
                    warmup_s=0.0,
                    pid=proc.pid,
                )
            )
            cpu = tree_cpu_s(proc.pid) - cpu0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        logged = None
        if arm == "on":
            reader = predlog.open_reader(PredlogSettings(dir=home / "predlog"))
            logged = int(reader.query("SELECT count() AS n FROM predictions")["n"][0])
            reader.close()
        runs.append(
            {
                "arm": arm,
                "items_per_s": res.items_per_s,
                "errors": res.errors,
                "items": res.items,
                "cpu_s_per_1k_items": 1000 * cpu / max(res.items, 1),
                "p99_ms": res.p99_ms,
                "logged": logged,
            }
        )

    def mean(arm: str, key: str) -> float:
        return statistics.mean(r[key] for r in runs if r["arm"] == arm)

    return {
        "mix": mix_name,
        "concurrency": concurrency,
        "duration_s": duration,
        "runs": runs,
        "throughput_overhead": 1 - mean("on", "items_per_s") / mean("off", "items_per_s"),
        "cpu_per_item_overhead": mean("on", "cpu_s_per_1k_items") / mean("off", "cpu_s_per_1k_items") - 1,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000, help="rows for writer and bytes/row figures")
    ap.add_argument("--scale-rows", type=int, default=2_000_000, help="rows of the generated table for drift queries")
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--real-embeddings", type=int, default=1000, help="MiniLM embeddings to measure (0: random)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--parts", default="writer,storage,encodings,parquet,scale", help="comma-separated subset")
    ap.add_argument("--serve-duration", type=float, default=15.0, help="seconds of load per serving run")
    ap.add_argument("--serve-rounds", type=int, default=2, help="off/on pairs for the serving overhead")
    ap.add_argument("--mix", default="realistic", choices=("realistic", "novel"))
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        recs = make_records(args.rows, 0.1)
        if "writer" in parts:
            with console.status("writer throughput"):
                results["writer_parquet"] = bench_writer(PredlogSettings(dir=tmp / "w1"), recs, chunk=8)
                results["writer_chdb_table"] = bench_writer(
                    PredlogSettings(dir=tmp / "w2", clickhouse_url="chdb://memory", database="bench_w"), recs, chunk=8
                )
        if "storage" in parts:
            with console.status("bytes per row"):
                by_rate = {
                    0.0: make_records(args.rows, 0.0),
                    0.1: recs,
                    1.0: make_records(args.rows, 1.0),
                }
                results["storage"] = bench_storage(by_rate, tmp)
        if "encodings" in parts:
            real = bool(args.real_embeddings)
            results["embedding_encodings"] = bench_encodings(unit_vectors(args.real_embeddings or 2000, 384, real, 0))
        if "parquet" in parts:
            with console.status("parquet live_stats"):
                results["parquet_query"] = parquet_query(recs, tmp)
        if "scale" in parts:
            with console.status(f"drift queries on {args.scale_rows:,} generated rows"):
                results["scale"] = bench_queries(args.scale_rows, args.days)
        if "serving" in parts:
            with console.status("serving overhead (predictor with / without the log)"):
                results["serving"] = bench_serving(tmp, args.serve_duration, args.serve_rounds, args.mix, 32)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


def report(r: dict) -> None:
    t = Table(title="predlog benchmark")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k in ("writer_parquet", "writer_chdb_table"):
        if k in r:
            w = r[k]
            t.add_row(f"{k} rows/s", f"{w['rows_per_s']:,.0f}")
            t.add_row(f"{k} submit p50 / p99 (µs)", f"{w['submit_p50_us']:.1f} / {w['submit_p99_us']:.1f}")
    for rate, s in r.get("storage", {}).items():
        t.add_row(f"bytes/row, {rate:.0%} rows with embeddings: Parquet", f"{s['parquet_bytes_per_row']:.1f}")
        t.add_row(f"bytes/row, {rate:.0%} rows with embeddings: MergeTree", f"{s['mergetree_bytes_per_row']:.1f}")
    if "embedding_encodings" in r:
        e = r["embedding_encodings"]
        t.add_row(
            "embedding bytes: Float32 / BFloat16 / int8+scale",
            f"{e['float32_bytes']:.0f} / {e['bfloat16_bytes']:.0f} / {e['int8_bytes']:.0f}",
        )
        t.add_row("min cosine to fp32: BFloat16 / int8", f"{e['bfloat16_min_cosine']:.5f} / {e['int8_min_cosine']:.5f}")
    if "parquet_query" in r:
        p = r["parquet_query"]
        t.add_row(f"Parquet live_stats, {p['rows']:,} rows in {p['segments']} segments (s)", f"{p['live_stats_s']:.3f}")
    if "scale" in r:
        sc = r["scale"]
        t.add_row(
            "generated table: rows / partitions / bytes on disk",
            f"{sc['rows']:,} / {sc['partitions']} / {sc['bytes_on_disk']:,}",
        )
        for name, q in sc["queries"].items():
            t.add_row(f"{name} (s, rows)", f"{q['median_s']:.3f}, {q['rows_returned']:,}")
    if "serving" in r:
        sv = r["serving"]
        for run_ in sv["runs"]:
            t.add_row(
                f"serving predlog={run_['arm']} items/s, CPU s/1k items, errors, logged",
                f"{run_['items_per_s']:.1f}, {run_['cpu_s_per_1k_items']:.2f}, {run_['errors']}, {run_['logged']}",
            )
        t.add_row(
            "serving overhead: throughput / CPU per item",
            f"{sv['throughput_overhead']:.1%} / {sv['cpu_per_item_overhead']:.1%}",
        )
    console.print(t)
    console.print_json(json.dumps(r, default=str))


if __name__ == "__main__":
    main()
