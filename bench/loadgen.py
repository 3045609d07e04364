"""Closed-loop load generator: C clients, each sending its next request as soon as the last returns.

Protocols: ``v2`` (Open Inference Protocol JSON to ``/v2/models/<model>/infer``; motlens and the
naive baseline) and ``openai`` (``/embeddings``; Infinity). Reports items/s, requests/s, latency
percentiles, errors by kind, and the server process tree's RSS (psutil), sampled during the run.

Accounting: throughput counts the successes that *complete* inside the measured window (so the
requests in flight at either edge do not bias it); latency and errors cover every request *started*
(open loop: scheduled) inside the window, each followed to its end after the window closes — a
request that never returns is a timeout error, never silently left out. Every response is checked
(status, and one row per text sent).

    python -m bench.loadgen --url http://127.0.0.1:8080 --concurrency 32 --items 1 --duration 20 \
        --mix realistic --novel-share 0.1 --pid <server pid>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from multiprocessing import get_context
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson

from bench.mixes import TextMix, make_mix

MODEL_NAME = "mot-defects"


@dataclass
class LoadResult:
    system: str
    mix: str
    concurrency: int
    items_per_request: int
    duration_s: float
    requests: int
    items: int
    errors: int
    #: requests started (open loop: due) in the window, each followed to its end: latency samples + errors
    window_requests: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    items_per_s: float = 0.0
    requests_per_s: float = 0.0
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    rss_max_mib: float | None = None
    rate: float | None = None
    #: CPU seconds of the load generator's own process(es) over the whole load, warm-up included
    client_cpu_s: float | None = None
    #: the latency samples behind the percentiles (left out of ``to_json``)
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "latencies_ms"}


def request_body(protocol: str, texts: list[str], model: str = MODEL_NAME) -> bytes:
    if protocol == "v2":
        doc = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    elif protocol == "openai":
        doc = {"model": model, "input": texts}
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected 'v2' or 'openai'")
    return json.dumps(doc).encode()


def endpoint(url: str, protocol: str, model: str = MODEL_NAME) -> str:
    base = url.rstrip("/")
    return f"{base}/v2/models/{model}/infer" if protocol == "v2" else f"{base}/embeddings"


def _response_ok(protocol: str, body: bytes, n: int) -> bool:
    """One answer per text: v2 ``section`` and ``fail_probability`` rows, or OpenAI 384-wide embeddings."""
    try:
        doc = orjson.loads(body)
        if protocol == "v2":
            outputs = {o["name"]: o for o in doc["outputs"]}
            return len(outputs["section"]["data"]) == n and len(outputs["fail_probability"]["data"]) == n
        return len(doc["data"]) == n and all(len(d["embedding"]) == 384 for d in doc["data"])
    except (ValueError, KeyError, TypeError, IndexError):
        return False


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its children, threads included."""
    import psutil

    total = 0.0
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _tree_rss(pid: int) -> int:
    import psutil

    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


async def _sample_rss(pid: int, out: list[int], stop: asyncio.Event) -> None:
    import psutil

    while not stop.is_set():
        try:
            out.append(_tree_rss(pid))
        except psutil.Error:
            return
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except TimeoutError:
            pass


class HttpError(Exception):
    """A transport-level failure of one request (connection reset, malformed response, timeout)."""


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client connection: one request at a time, no parsing beyond framing.

    The load generator shares the cores with the server under test, so it must be cheap: this costs a
    fraction of aiohttp's per-request CPU (``--client aiohttp`` remains available).
    """

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = parts.path or "/"
        self.timeout_s = timeout_s
        self._head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._post(body)
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
            IndexError,
            TimeoutError,
        ) as e:
            self.close()
            raise HttpError(type(e).__name__) from e

    async def _post(self, body: bytes) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        assert reader is not None
        writer.write(self._head + str(len(body)).encode() + b"\r\n\r\n" + body)
        try:
            head = await reader.readuntil(b"\r\n\r\n")  # status line and headers in one read
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                raise ConnectionResetError("server closed the connection") from e
            raise
        status_line, *lines = head[:-4].split(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length, chunked, close = None, False, False
        for line in lines:
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif key == b"connection":
                close = b"close" in value.lower()
        if chunked:
            chunks = []
            while size := int((await reader.readline()).split(b";")[0], 16):
                chunks.append(await reader.readexactly(size + 2))
            await reader.readline()
            payload = b"".join(c[:-2] for c in chunks)
        elif length is not None:
            payload = await reader.readexactly(length)
        else:
            payload, close = await reader.read(), True
        if close:
            self.close()
        return status, payload


class AiohttpConnection:
    """The same interface over a shared aiohttp session (for comparison with :class:`RawConnection`)."""

    def __init__(self, session, url: str) -> None:  # noqa: ANN001 - aiohttp.ClientSession
        self.session, self.url = session, url

    async def post(self, body: bytes) -> tuple[int, bytes]:
        import aiohttp

        try:
            async with self.session.post(self.url, data=body, headers={"content-type": "application/json"}) as r:
                return r.status, await r.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise HttpError(type(e).__name__) from e

    def close(self) -> None:
        pass


async def run_load(
    url: str,
    mix: TextMix,
    *,
    system: str = "server",
    mix_name: str = "realistic",
    protocol: str = "v2",
    concurrency: int = 32,
    items: int = 1,
    duration_s: float = 20.0,
    warmup_s: float = 3.0,
    pid: int | None = None,
    model: str = MODEL_NAME,
    timeout_s: float = 30.0,
    rate: float | None = None,
    max_requests: int | None = None,
    client: str = "raw",
) -> LoadResult:
    """Run ``concurrency`` closed-loop clients for ``warmup_s`` + ``duration_s``; measure the latter.

    With ``rate`` (requests/s) the load is open-loop instead: requests start on a fixed schedule,
    at most ``concurrency`` in flight, and latency counts from the scheduled start (no coordinated
    omission). ``max_requests`` ends the measured phase early once that many requests completed.
    Throughput: successes completed in the window; latency and errors: requests started in it,
    followed to their end (see the module docstring).
    ``client``: ``raw`` (minimal keep-alive HTTP/1.1, one connection per client) or ``aiohttp``.
    """
    if client not in ("raw", "aiohttp"):
        raise ValueError(f"unknown client {client!r}; expected 'raw' or 'aiohttp'")
    target = endpoint(url, protocol, model)
    cpu0 = time.process_time()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    counts = {"requests": 0, "items": 0}
    t0 = time.perf_counter()
    measure_from = t0 + warmup_s
    stop_at = measure_from + duration_s
    done = asyncio.Event()
    done_at = [stop_at]

    async def one(conn: RawConnection | AiohttpConnection, start: float) -> str | None:
        body = request_body(protocol, mix.take(items), model)
        kind = None
        try:
            status, payload = await conn.post(body)
            if status != 200:
                kind = f"HTTP {status}"
            elif not _response_ok(protocol, payload, items):
                kind = "malformed response"
        except HttpError as e:
            kind = str(e)
        end = time.perf_counter()
        if measure_from <= start < stop_at:  # started in the window: its outcome is reported
            if kind:
                errors[kind] += 1
            else:
                latencies.append(end - start)
        if not kind and measure_from <= end <= done_at[0] and not done.is_set():  # completed in the window
            counts["requests"] += 1
            counts["items"] += items
            if max_requests and counts["requests"] >= max_requests:
                done_at[0] = end
                done.set()
        return kind

    async def closed_client(conn: RawConnection | AiohttpConnection) -> None:
        while (start := time.perf_counter()) < stop_at and not done.is_set():
            if await one(conn, start):  # do not spin on a refusing or failing server
                await asyncio.sleep(0.01)

    async def open_loop(conns: list) -> None:
        assert rate
        pool: asyncio.Queue = asyncio.Queue()
        for c in conns:
            pool.put_nowait(c)
        tasks: set[asyncio.Task] = set()
        n = 0
        while (due := t0 + n / rate) < stop_at and not done.is_set():
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            conn = await pool.get()

            async def fire(conn=conn, due: float = due) -> None:  # noqa: ANN001
                try:
                    await one(conn, due)
                finally:
                    pool.put_nowait(conn)

            task = asyncio.create_task(fire())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.gather(*tasks)

    async def drive(conns: list) -> None:
        if rate:
            await open_loop(conns)
        else:
            await asyncio.gather(*(closed_client(c) for c in conns))

    rss: list[int] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(pid, rss, stop)) if pid else None
    if client == "raw":
        conns = [RawConnection(target, timeout_s) for _ in range(concurrency)]
        try:
            await drive(conns)
        finally:
            for c in conns:
                c.close()
    else:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
            await drive([AiohttpConnection(s, target) for _ in range(concurrency)])
    measured = done_at[0] - measure_from
    stop.set()
    if sampler:
        await sampler
    lat_ms = np.asarray(latencies) * 1000.0
    return LoadResult(
        system=system,
        mix=mix_name,
        concurrency=concurrency,
        items_per_request=items,
        duration_s=measured,
        requests=counts["requests"],
        items=counts["items"],
        errors=sum(errors.values()),
        window_requests=len(latencies) + sum(errors.values()),
        error_kinds=dict(errors),
        items_per_s=counts["items"] / measured,
        requests_per_s=counts["requests"] / measured,
        rate=rate,
        **_percentiles(lat_ms),
        rss_max_mib=max(rss) / 2**20 if rss else None,
        client_cpu_s=time.process_time() - cpu0,
        latencies_ms=lat_ms.tolist(),
    )


def _percentiles(lat_ms: np.ndarray) -> dict[str, float]:
    if not lat_ms.size:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    p50, p95, p99 = (float(x) for x in np.percentile(lat_ms, [50, 95, 99]))
    return {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": float(lat_ms.max())}


def _load_in_child(url: str, mix_name: str, novel_share: float, seed: int, kw: dict[str, Any]) -> LoadResult:
    return run(run_load(url, make_mix(mix_name, novel_share, seed), mix_name=mix_name, **kw))


def run_load_procs(
    url: str | Sequence[str], mix_name: str, *, procs: int, concurrency: int, novel_share: float = 0.1,
    seed: int = 0, rate: float | None = None, pid: int | None = None, max_requests: int | None = None, **kw: Any,
) -> LoadResult:  # fmt: skip
    """:func:`run_load` split over ``procs`` client processes (one Python event loop saturates a core).

    Clients, ``rate`` and ``max_requests`` are shared out evenly (each process starts its own clock
    once spawned, so the windows overlap but need not coincide), each process draws from its own seed; counts, errors
    and throughput add up, percentiles come from the pooled samples, RSS is sampled by the first.
    With several URLs (servers sharing one device): client process ``i`` sends to ``url[i % len(url)]``,
    so ``procs`` must be a multiple of their number for an even split.
    """
    urls = [url] if isinstance(url, str) else list(url)
    if not 1 <= procs <= concurrency:
        raise ValueError(f"procs must be between 1 and the concurrency ({concurrency}), got {procs}")
    if not urls or procs % len(urls):
        raise ValueError(f"procs ({procs}) must be a multiple of the number of servers ({len(urls)})")
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    with ProcessPoolExecutor(procs, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(_load_in_child, urls[i % len(urls)], mix_name, novel_share, seed * 1000 + i,
                        {**kw, "concurrency": c, "rate": rate * c / concurrency if rate else None,
                         "pid": pid if i == 0 else None,
                         "max_requests": -(-max_requests * c // concurrency) if max_requests else None})
            for i, c in enumerate(shares)
        ]  # fmt: skip
        parts = [f.result() for f in futures]
    lat_ms = np.asarray([x for r in parts for x in r.latencies_ms])
    kinds: Counter[str] = Counter()
    for r in parts:
        kinds.update(r.error_kinds)
    return LoadResult(
        system=parts[0].system, mix=mix_name, concurrency=concurrency, items_per_request=parts[0].items_per_request,
        duration_s=max(r.duration_s for r in parts), requests=sum(r.requests for r in parts),
        items=sum(r.items for r in parts), errors=sum(r.errors for r in parts),
        window_requests=sum(r.window_requests for r in parts), error_kinds=dict(kinds),
        items_per_s=sum(r.items_per_s for r in parts), requests_per_s=sum(r.requests_per_s for r in parts),
        rate=rate, **_percentiles(lat_ms), rss_max_mib=parts[0].rss_max_mib,
        client_cpu_s=sum(r.client_cpu_s or 0.0 for r in parts), latencies_ms=lat_ms.tolist(),
    )  # fmt: skip


def run(coro):  # noqa: ANN001, ANN201 - runs a coroutine on uvloop when installed
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--protocol", choices=("v2", "openai"), default="v2")
    p.add_argument("--model", default=MODEL_NAME, help="v2 model name or OpenAI-style served model name")
    p.add_argument("--mix", choices=("realistic", "novel"), default="realistic")
    p.add_argument("--novel-share", type=float, default=0.1, help="share of novel texts in the realistic mix")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--items", type=int, default=1, help="texts per request")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds (after the warm-up)")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rate", type=float, help="open loop: requests/s on a fixed schedule (default: closed loop)")
    p.add_argument("--max-requests", type=int, help="stop the measured phase after this many requests")
    p.add_argument("--client", choices=("raw", "aiohttp"), default="raw", help="HTTP client implementation")
    p.add_argument("--pid", type=int, help="server PID whose process tree RSS is sampled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = p.parse_args(argv)
    if a.concurrency < 1 or a.items < 1 or a.duration <= 0:
        p.error("--concurrency and --items must be ≥ 1 and --duration > 0")
    result = run(
        run_load(
            a.url, make_mix(a.mix, a.novel_share, a.seed), mix_name=a.mix, protocol=a.protocol,
            concurrency=a.concurrency, items=a.items, duration_s=a.duration, warmup_s=a.warmup, pid=a.pid,
            model=a.model, rate=a.rate, max_requests=a.max_requests, client=a.client,
        )
    )  # fmt: skip
    if a.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(
            f"{result.items_per_s:,.0f} items/s ({result.requests_per_s:,.0f} req/s), p50 {result.p50_ms:.1f} ms, "
            f"p95 {result.p95_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, errors {result.errors} {result.error_kinds}, "
            f"RSS {result.rss_max_mib or float('nan'):.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
