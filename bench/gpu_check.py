"""GPU host check (driven by ``bench/gpu_check.sh``): fp16 consistency, throughput, latency, memory.

1. fp16 golden-set consistency in-process (cosine to the fp32 CPU references, label agreement) and
   the GPU offline batch ceiling (``TorchEmbedder.encode`` + head at batch 128, 512 and 2,048).
2. ``motlens serve --backend torch --device cuda --dtype float16`` on a free port (micro-batcher
   limits from ``--batch-max-items`` / ``--batch-max-tokens`` / ``--queue-capacity`` when given), then:
   batched closed-loop loads (64 texts/request) at several concurrencies; single-text closed loop;
   open-loop single-text at a fixed request rate (default 1,000 req/s); 100k requests while GPU
   memory is read before and after (nvidia-smi for the server process, and the server's gauges).
3. JSON + text summary into ``--out`` (``$OUT`` in the script).

Runs on CPU too for a smoke test: ``--device cpu --dtype float32 --requests 2000 --duration 3``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.loadgen import LoadResult, run, run_load, run_load_procs, tree_cpu_s
from bench.mixes import make_mix
from bench.run_all import Service, free_port


def golden_check(bundle_dir: Path, device: str, dtype: str, n_texts: int = 8192) -> dict:
    """Golden set on this device/dtype vs the bundle's fp32 references, plus the offline ceiling."""
    import torch

    from motlens.bundle import Bundle, check_golden
    from motlens.embedder import TorchEmbedder

    bundle = Bundle.open(bundle_dir)
    head, golden = bundle.head(), bundle.golden()
    emb = TorchEmbedder(bundle.embedder_dir, device=device, dtype=dtype)
    got = emb.encode(golden.texts)
    res = check_golden(golden, got, head)
    texts = make_mix("novel", seed=4242).take(n_texts)
    head.predict(emb.encode(texts[:256], batch_size=256))
    ceiling = {}
    for batch in (128, 512, 2048):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        head.predict(emb.encode(texts, batch_size=batch))
        ceiling[str(batch)] = len(texts) / (time.perf_counter() - t0)
    shapes = new_shape_calls(emb)
    del emb
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "device": device, "dtype": dtype, "golden_passed": bool(res.passed), "golden_min_cosine": float(res.min_cosine),
        "golden_label_agreement": float(res.label_agreement), "golden_max_score_delta": res.max_score_delta,
        "detail": res.detail,
        "offline_ceiling_texts_per_s": max(ceiling.values()), "offline_ceiling_by_batch": ceiling,
        "new_shape_calls_ms": shapes, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }  # fmt: skip


#: (batch, tokens) shapes the embedder has not run before: odd lengths no tokenised text above produced
NEW_SHAPES = [(b, 7 + 6 * i) for i, b in enumerate((3, 5, 9, 2, 17, 7, 4, 13, 1, 6, 11, 15))]


def new_shape_calls(emb: Any) -> dict | None:
    """Milliseconds of the traced forward's first and second call on each of :data:`NEW_SHAPES`, as the
    server runs it (``served``) and then with the JIT executor's optimisations on (``optimizing``,
    one token longer each: shapes new to it too) — on CUDA that executor compiles fused kernels per new
    shape. None when the forward is not traced."""
    import torch

    if emb._traced is None:
        return None
    cuda = emb.device.startswith("cuda")
    gen = torch.Generator().manual_seed(0)

    def timed(run: Callable[[Any, Any], Any], b: int, n: int) -> float:
        ids = torch.randint(1000, 20000, (b, n), generator=gen).to(emb.device)
        mask = torch.ones_like(ids)
        t0 = time.perf_counter()
        run(ids, mask)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1000

    def optimizing(ids: Any, mask: Any) -> Any:
        with torch.jit.optimized_execution(True):
            return emb._traced(ids, mask)

    out: dict = {}
    with torch.inference_mode():
        for label, run, extra in (("served", lambda i, m: emb._run_traced(emb._traced, i, m), 0),
                                  ("optimizing", optimizing, 1)):  # fmt: skip
            try:
                calls = [(timed(run, b, n + extra), timed(run, b, n + extra)) for b, n in NEW_SHAPES]
            except Exception as e:  # noqa: BLE001 - e.g. a fuser without its compiler: recorded, the check goes on
                out[label] = {"error": f"{type(e).__name__}: {e}"[:300]}
                continue
            out[label] = {"first": [round(f, 2) for f, _ in calls], "second": [round(x, 2) for _, x in calls],
                          "first_sum": round(sum(f for f, _ in calls), 1),
                          "second_sum": round(sum(x for _, x in calls), 1)}  # fmt: skip
    return out


def gpu_memory(pid: int, metrics_url: str) -> dict:
    """Server GPU memory: nvidia-smi per process (MiB) and the server's own torch gauges (bytes)."""
    out: dict = {"nvidia_smi_mib": None, "allocated_bytes": None, "reserved_bytes": None}
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
        pids = _tree_pids(pid)
        out["nvidia_smi_mib"] = sum(
            float(mem) for line in smi.strip().splitlines() if line
            for p, mem in [line.split(",")] if int(p) in pids
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as r:
            text = r.read().decode()
        for key, name in (("allocated_bytes", "allocated"), ("reserved_bytes", "reserved")):
            m = re.search(rf"^motlens_gpu_memory_{name}_bytes(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
            if m:
                out[key] = float(m.group(1))
    except OSError:
        pass
    return out


def served_items(metrics_url: str) -> float:
    """Items a server has answered so far (``motlens_items_total`` over all its series)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(r"^motlens_items_total(?:{[^}]*})? (\S+)$", text, re.MULTILINE))


def _tree_pids(pid: int) -> set[int]:
    import psutil

    proc = psutil.Process(pid)
    return {pid, *(c.pid for c in proc.children(recursive=True))}


Load = Callable[..., LoadResult]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``LABEL=ARGS``: a server variant measured on the batched loads (ARGS split like a shell would)."""
    label, sep, args = text.partition("=")
    if not sep or not label.strip() or not args.strip():
        raise argparse.ArgumentTypeError(f"expected LABEL=SERVE ARGS, got {text!r}")
    return label.strip(), shlex.split(args)


def measure_server(
    a: argparse.Namespace, report: dict, save: Callable[[], None], bundle_dir: Path, home: Path,
    variant: str, serve_args: list[str], loads: Callable[[Load, int, str], None], servers: int = 1,
) -> None:  # fmt: skip
    """Start ``servers`` × ``motlens serve`` with ``serve_args`` on the same device (each its own port
    and ``MOTLENS_HOME``: one prediction log per process), run ``loads`` against them (given the first
    server's pid and metrics URL), record each load, stop them. With several servers every load runs
    in client processes spread over them, and the server cores add up over all of them."""
    log_dir = a.out / variant if variant else a.out
    log_dir.mkdir(parents=True, exist_ok=True)
    services: list[Service] = []
    try:
        for k in range(servers):
            port = free_port()
            where = log_dir / f"server-{k}" if servers > 1 else log_dir
            where.mkdir(parents=True, exist_ok=True)
            launcher = ([sys.executable, "-m", "bench.stack_sampler", "--out", str(where / "stacks.txt"), "--"]
                        if a.profile_server else [str(Path(sys.executable).parent / "motlens")])  # fmt: skip
            argv = [*launcher, "serve", "--model", str(bundle_dir),
                    "--http-port", str(port), "--grpc-port", str(free_port()), *serve_args]  # fmt: skip
            server_home = home / f"server-{k}" if servers > 1 else home
            svc = Service("motlens", argv, f"http://127.0.0.1:{port}/v2/models/mot-defects/ready",
                          f"http://127.0.0.1:{port}", "v2", env={"MOTLENS_HOME": str(server_home)})  # fmt: skip
            services.append(svc)
            svc.start(where)
        for svc in services:
            svc.wait_ready(150)  # a load on the GPU host takes ≈ 20 s; a refused model never gets ready
        pids = [svc.proc.pid for svc in services if svc.proc is not None]
        urls = [svc.url for svc in services]

        def server_cpu_s() -> float:
            return sum(tree_cpu_s(pid) for pid in pids)

        def load(label: str, mix: str, **kw: Any) -> LoadResult:
            kw.setdefault("duration_s", a.duration)
            kw.setdefault("warmup_s", a.warmup)
            label = f"{label} [{variant}]" if variant else label
            seed = sum(x["variant"] == (variant or None) for x in report["loads"])  # same texts per server
            procs = min(a.client_procs, kw["concurrency"])
            procs = max(servers, procs - procs % servers)  # an even split over the servers
            items0 = [served_items(f"{url}/metrics") for url in urls]
            server_cpu0, t0 = server_cpu_s(), time.perf_counter()
            if procs > 1:
                r = run_load_procs(urls, mix, procs=procs, seed=seed,
                                   system="motlens", pid=pids[0], **kw)  # fmt: skip
            else:
                r = run(run_load(urls[0], make_mix(mix, 0.1, seed=seed), system="motlens",
                                 mix_name=mix, pid=pids[0], **kw))  # fmt: skip
            wall = time.perf_counter() - t0
            by_server = [served_items(f"{u}/metrics") - i for u, i in zip(urls, items0, strict=True)]
            cores = {"server_cores": (server_cpu_s() - server_cpu0) / wall, "servers": servers,
                     "client_cores": (r.client_cpu_s or 0.0) / wall, "client_procs": procs,
                     "items_by_server": by_server}  # fmt: skip
            report["loads"].append({"label": label, "variant": variant or None, "serve_args": serve_args,
                                    **r.to_json(), **cores})  # fmt: skip
            print(f"  {label}: {r.items_per_s:,.0f} items/s ({r.requests_per_s:,.0f} req/s), "
                  f"p50 {r.p50_ms:.1f} p99 {r.p99_ms:.1f} ms, errors {r.errors}; cores: server "
                  f"{cores['server_cores']:.1f}, load generator {cores['client_cores']:.1f} "
                  f"({cores['client_procs']} process(es))", flush=True)  # fmt: skip
            save()
            return r

        loads(load, pids[0], f"{urls[0]}/metrics")
    finally:
        for svc in services:
            svc.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="bundle directory (default: build one under --out)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per load")
    p.add_argument("--ceiling-texts", type=int, default=8192, help="novel texts for the offline ceiling")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--batched-concurrency", default="4,16,32")
    p.add_argument("--batch-items", type=int, default=64)
    p.add_argument("--single-concurrency", default="32,128")
    p.add_argument("--rate", type=float, default=1000.0, help="open-loop single-text requests/s")
    p.add_argument("--requests", type=int, default=100_000, help="requests for the memory-flatness run")
    p.add_argument("--requests-max-s", type=float, default=150.0, help="time cap for the memory-flatness run")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/results/gpu"))
    p.add_argument("--batch-max-items", type=int, help="server micro-batch size limit (default: the server's)")
    p.add_argument("--batch-max-tokens", type=int, help="server padded tokens per bucket (default: the server's)")
    p.add_argument("--queue-capacity", type=int, help="server queued texts before 429 (default: the server's)")
    p.add_argument("--client-procs", type=int, default=1,
                   help="load-generator processes per load (one event loop saturates a core; default 1)")  # fmt: skip
    p.add_argument("--profile-server", action="store_true",
                   help="run each server under bench.stack_sampler (stacks.txt beside its log)")  # fmt: skip
    p.add_argument("--serve-arg", action="append", default=[], help="extra `motlens serve` argument (repeat)")
    p.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="LABEL=ARGS",
                   help="also measure the batched loads on a server started with these extra arguments "
                   "(repeat), e.g. 'workers2=--model-workers 2'")  # fmt: skip
    p.add_argument("--servers", type=int, default=1,
                   help="also measure N servers sharing the device (after the main server, before the "
                   "variants): the batched load at the middle concurrency, the single-text closed loops and "
                   "the open loop, clients spread over them; 1 = not")  # fmt: skip
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop our servers on the way out
    a.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": {k: str(v) for k, v in vars(a).items()}, "loads": []}

    def save() -> None:
        (a.out / "gpu_check.json").write_text(json.dumps(report, indent=2))

    bundle_dir = a.model
    if bundle_dir is None:
        from bench.bundle import build_bench_bundle

        print("building the bundle …", flush=True)
        # outside --out: the device host returns only a few files from $OUT, and the weights exceed its size limit
        bundle_dir = build_bench_bundle(Path(tempfile.gettempdir()) / "motlens-gpu-bundle", onnx=False).root
    print("fp16 golden consistency + offline ceiling …", flush=True)
    report["golden"] = golden_check(bundle_dir, a.device, a.dtype, a.ceiling_texts)
    ceiling = ", ".join(f"{v:,.0f}/s at {k}" for k, v in report["golden"]["offline_ceiling_by_batch"].items())
    print(f"  {report['golden']['detail']}; ceiling {ceiling}")
    save()
    if not report["golden"]["golden_passed"]:
        # the server would refuse this model and retry its load forever: stop here, not at the ready timeout
        print("golden set not reproduced on this device: no server measurements", file=sys.stderr)
        (a.out / "gpu_check.txt").write_text(f"golden REFUSED: {report['golden']['detail']}\n")
        return 1

    base_serve = ["--backend", "torch", "--device", a.device, "--dtype", a.dtype, *a.serve_arg]
    for flag, value in (("--batch-max-items", a.batch_max_items), ("--batch-max-tokens", a.batch_max_tokens),
                        ("--queue-capacity", a.queue_capacity)):  # fmt: skip
        if value is not None:
            base_serve += [flag, str(value)]
    batched = [int(x) for x in a.batched_concurrency.split(",")]

    def batched_only(load: Load, pid: int, metrics_url: str) -> None:
        for c in batched:
            load(f"batched {a.batch_items}×{c} novel", "novel", concurrency=c, items=a.batch_items)

    def full(load: Load, pid: int, metrics_url: str) -> None:
        batched_only(load, pid, metrics_url)
        for c in [int(x) for x in a.single_concurrency.split(",")]:
            load(f"single-text ×{c} realistic", "realistic", concurrency=c, items=1)
        for mix in ("realistic", "novel"):
            load(f"open loop {a.rate:.0f} req/s {mix}", mix, concurrency=512, items=1, rate=a.rate)
        report["gpu_memory_before"] = gpu_memory(pid, metrics_url)
        load(f"{a.requests} requests (memory)", "realistic", concurrency=64, items=1,
             max_requests=a.requests, duration_s=a.requests_max_s, warmup_s=0.0)  # fmt: skip
        report["gpu_memory_after"] = gpu_memory(pid, metrics_url)
        print(f"  GPU memory before {report['gpu_memory_before']}, after {report['gpu_memory_after']}")

    def shared(load: Load, pid: int, metrics_url: str) -> None:
        c = batched[len(batched) // 2]
        load(f"batched {a.batch_items}×{c} novel", "novel", concurrency=c, items=a.batch_items)
        for c in [int(x) for x in a.single_concurrency.split(",")]:
            load(f"single-text ×{c} realistic", "realistic", concurrency=c, items=1)
        load(f"open loop {a.rate:.0f} req/s realistic", "realistic", concurrency=512, items=1, rate=a.rate)

    with tempfile.TemporaryDirectory(prefix="motlens-gpu-home-") as home:
        measure_server(a, report, save, bundle_dir, Path(home), "", base_serve, full)
        if a.servers > 1:
            print(f"{a.servers} servers on one device", flush=True)
            measure_server(a, report, save, bundle_dir, Path(home) / "shared", f"servers{a.servers}", base_serve,
                           shared, servers=a.servers)  # fmt: skip
        for label, args in a.variant:
            print(f"variant {label}: {' '.join(args)}", flush=True)
            measure_server(a, report, save, bundle_dir, Path(home), label, [*base_serve, *args], batched_only)
    save()
    lines = [f"golden: {report['golden']['detail']} on {report['golden']['gpu'] or a.device} ({a.dtype})",
             f"offline ceiling: {ceiling} (texts/s at batch size)"]  # fmt: skip
    for label, calls in (report["golden"]["new_shape_calls_ms"] or {}).items():
        lines.append(f"traced forward, {len(NEW_SHAPES)} new shapes, {label}: " + (
            f"first calls {calls['first_sum']} ms, second calls {calls['second_sum']} ms in all"
            if "error" not in calls else f"failed: {calls['error']}"))  # fmt: skip
    lines += [
        f"{x['label']}: {x['items_per_s']:,.0f} items/s, {x['requests_per_s']:,.0f} req/s, p50 {x['p50_ms']:.1f} "
        f"p95 {x['p95_ms']:.1f} p99 {x['p99_ms']:.1f} ms, errors {x['errors']} {x['error_kinds'] or ''}; "
        f"cores: server {x['server_cores']:.1f} ({x['servers']} proc), load generator {x['client_cores']:.1f} "
        f"({x['client_procs']} proc)"
        for x in report["loads"]
    ]
    lines += [f"GPU memory before: {report.get('gpu_memory_before')}", f"after: {report.get('gpu_memory_after')}"]
    (a.out / "gpu_check.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
