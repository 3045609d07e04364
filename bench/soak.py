"""Soak benchmark: a real ``motlens serve`` process held at 70% of its measured maximum throughput.

1. start ``motlens serve`` (own ``MOTLENS_HOME``: embedded prediction log) and wait until ready;
2. measure the maximum throughput with a closed-loop load (``--probe-s``);
3. run an open-loop load at ``--load-share`` (0.7) of it for ``--minutes``, in ``--slice-s`` slices;
   per slice: requests, errors, latency p50/p95/p99, server RSS, embedding-cache bytes, GPU memory;
4. SIGTERM the server and compare the items it answered (``motlens_items_total{outcome="ok"}``)
   with the rows in its prediction log.

Prints a summary and writes JSON (``--out``). The reference run is 30 minutes on a quiet machine::

    python -m bench.soak --minutes 30 --out bench/results/soak-30min.json
    python -m bench.soak --minutes 30 --device cuda --dtype float16   # GPU host: GPU memory per slice
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

MODEL = "mot-defects"


@dataclass
class Slice:
    index: int
    requests: int
    errors: int
    error_kinds: dict[str, int]
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rss_mib: float
    cache_mib: float
    gpu_allocated_mib: float | None


@dataclass
class SoakResult:
    started_at: str
    model: str
    threads: int | None
    concurrency: int
    max_requests_per_s: float
    target_requests_per_s: float
    minutes: float
    slices: list[Slice] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    rss_start_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_growth_pct: float = 0.0
    rss_warm_mib: float = 0.0  # after the first slice: allocator and caches warmed at the soak rate
    rss_growth_after_warm_pct: float = 0.0
    cache_start_mib: float = 0.0
    cache_end_mib: float = 0.0
    gpu_start_mib: float | None = None
    gpu_end_mib: float | None = None
    items_answered: int = 0
    log_rows: int = 0
    rows_lost: int = 0
    exit_code: int | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(base: str) -> dict[str, float]:
    """The server's motlens series summed by name (labels dropped), plus ``items_ok``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {"items_ok": 0.0}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
            if s.name == "motlens_items_total" and s.labels.get("outcome") == "ok":
                out["items_ok"] += s.value
    return out


def tree_rss_mib(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
    return rss / 2**20


def start_server(args: argparse.Namespace, home: Path, port: int) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("motlens")
    cmd = [str(exe) if exe.exists() else "motlens", "serve", "--model", str(args.model), "--http-port", str(port),
           "--grpc-port", str(free_port())]  # fmt: skip
    for flag in ("backend", "threads", "device", "dtype"):
        if getattr(args, flag):
            cmd += [f"--{flag}", str(getattr(args, flag))]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOTLENS_")}
    env["MOTLENS_HOME"] = str(home)
    return subprocess.Popen(cmd, env=env, stdout=(home / "serve.log").open("w"), stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, base: str, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"motlens serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/v2/models/{MODEL}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"motlens serve not ready after {timeout_s}s")


def count_log_rows(home: Path) -> int:
    import predlog
    from predlog.settings import PredlogSettings

    reader = predlog.open_reader(PredlogSettings(dir=home / "predlog"))
    try:
        return int(reader.query("SELECT count() AS n FROM predictions")["n"][0])
    finally:
        reader.close()


def soak(args: argparse.Namespace) -> SoakResult:
    from rich.progress import Progress

    from bench.loadgen import run, run_load
    from bench.mixes import make_mix

    home = Path(tempfile.mkdtemp(prefix="motlens-soak-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, home, port)
    mix = make_mix("realistic", args.novel_share, args.seed)
    try:
        wait_ready(proc, base)
        probe = run(
            run_load(base, mix, concurrency=args.concurrency, duration_s=args.probe_s, warmup_s=3, pid=proc.pid)
        )
        target = probe.requests_per_s * args.load_share
        result = SoakResult(
            started_at=datetime.now(UTC).isoformat(timespec="seconds"), model=str(args.model), threads=args.threads,
            concurrency=args.concurrency, max_requests_per_s=probe.requests_per_s, target_requests_per_s=target,
            minutes=args.minutes,
        )  # fmt: skip
        first = scrape(base)
        result.rss_start_mib = tree_rss_mib(proc.pid)
        result.cache_start_mib = first.get("motlens_cache_bytes", 0.0) / 2**20
        result.gpu_start_mib = _gpu_mib(first)
        n_slices = max(1, round(args.minutes * 60 / args.slice_s))
        with Progress() as progress:
            task = progress.add_task(f"soak at {target:.1f} req/s", total=n_slices)
            for i in range(n_slices):
                r = run(run_load(base, mix, concurrency=args.concurrency * 4, duration_s=args.slice_s, warmup_s=0,
                                 rate=target, pid=None))  # fmt: skip
                m = scrape(base)
                result.slices.append(Slice(
                    i, r.requests, r.errors, r.error_kinds, r.requests_per_s, r.p50_ms, r.p95_ms, r.p99_ms,
                    tree_rss_mib(proc.pid), m.get("motlens_cache_bytes", 0.0) / 2**20, _gpu_mib(m),
                ))  # fmt: skip
                progress.update(task, advance=1, description=f"slice {i + 1}/{n_slices}: p99 {r.p99_ms:.0f} ms")
        last = scrape(base)
        result.items_answered = int(last["items_ok"])
        result.rss_end_mib = result.slices[-1].rss_mib
        result.cache_end_mib = result.slices[-1].cache_mib
        result.gpu_end_mib = result.slices[-1].gpu_allocated_mib
        proc.send_signal(signal.SIGTERM)
        result.exit_code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    result.requests = sum(s.requests for s in result.slices)
    result.errors = sum(s.errors for s in result.slices)
    result.rss_growth_pct = 100.0 * (result.rss_end_mib - result.rss_start_mib) / result.rss_start_mib
    result.rss_warm_mib = result.slices[0].rss_mib
    result.rss_growth_after_warm_pct = 100.0 * (result.rss_end_mib - result.rss_warm_mib) / result.rss_warm_mib
    result.log_rows = count_log_rows(home)
    result.rows_lost = result.items_answered - result.log_rows
    return result


def _gpu_mib(metrics: dict[str, float]) -> float | None:
    """Allocated GPU memory, or None when the server is not on CUDA (no total reported)."""
    if not metrics.get("motlens_gpu_memory_total_bytes"):
        return None
    return metrics.get("motlens_gpu_memory_allocated_bytes", 0.0) / 2**20


def print_summary(r: SoakResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"soak: {r.minutes:g} min at {r.target_requests_per_s:.1f} req/s "
                        f"(70% of {r.max_requests_per_s:.1f})")  # fmt: skip
    for col in (
        "slice",
        "requests",
        "errors",
        "req/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "RSS MiB",
        "cache MiB",
        "GPU MiB",
    ):
        table.add_column(col, justify="right")
    for s in r.slices:
        gpu = "-" if s.gpu_allocated_mib is None else f"{s.gpu_allocated_mib:.0f}"
        table.add_row(str(s.index), str(s.requests), str(s.errors), f"{s.requests_per_s:.1f}", f"{s.p50_ms:.1f}",
                      f"{s.p95_ms:.1f}", f"{s.p99_ms:.1f}", f"{s.rss_mib:.0f}", f"{s.cache_mib:.1f}", gpu)  # fmt: skip
    console = Console()
    console.print(table)
    console.print(
        f"requests {r.requests}, errors {r.errors}; RSS {r.rss_start_mib:.0f} → {r.rss_end_mib:.0f} MiB "
        f"({r.rss_growth_pct:+.2f}%; {r.rss_growth_after_warm_pct:+.2f}% after the first slice; "
        f"cache {r.cache_start_mib:.1f} → {r.cache_end_mib:.1f} MiB); "
        f"items answered {r.items_answered}, log rows {r.log_rows}, lost {r.rows_lost}; exit {r.exit_code}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="bundle directory (default: bench/results/bundle, built if missing)")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--slice-s", type=float, default=60.0, help="seconds per reported time slice")
    p.add_argument("--probe-s", type=float, default=20.0, help="seconds of the maximum-throughput probe")
    p.add_argument("--load-share", type=float, default=0.7, help="target rate as a share of the maximum")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients of the probe")
    p.add_argument("--novel-share", type=float, default=0.1, help="share of never-seen texts in the mix")
    p.add_argument("--backend", choices=("torch", "onnx"), help="server embedder backend (default: the server's)")
    p.add_argument("--threads", type=int, help="model threads of the server (default: its cgroup CPUs)")
    p.add_argument("--device", help="server device: cpu, cuda … (default: cuda when present)")
    p.add_argument("--dtype", help="float32; float16 (GPU); bfloat16 (GPU, or CPU with AVX512-BF16/AMX)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON result (default bench/results/soak-<time>.json)")
    a = p.parse_args(argv)
    if a.minutes <= 0 or a.slice_s <= 0 or not 0 < a.load_share <= 1:
        p.error("--minutes and --slice-s must be > 0 and --load-share in (0, 1]")
    if a.model is None:
        from bench.bundle import build_bench_bundle

        a.model = build_bench_bundle(Path("bench/results/bundle"), onnx=False).root
    result = soak(a)
    print_summary(result)
    out = a.out or Path("bench/results") / f"soak-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(result), indent=2))
    print(f"written {out}")
    ok = result.errors == 0 and result.rows_lost == 0 and result.exit_code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
