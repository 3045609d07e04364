"""Prometheus series of the predictor (names fixed by docs/architecture.md "Metrics").

Registered in prometheus-client's default registry, which KServe's ``/metrics`` route serves next
to its own request histograms.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import Counter as Counter_
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Summary

REQUESTS = Counter(
    "motlens_requests_total",
    "Inference requests by protocol, outcome and the model version that answered ('' when refused before one)",
    ["protocol", "outcome", "version"],
)
ITEMS = Counter(
    "motlens_items_total", "Predicted items by protocol, outcome and model version", ["protocol", "outcome", "version"]
)
ITEM_LATENCY = Histogram(
    "motlens_item_latency_seconds",
    "Request latency divided by its item count",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
REQUEST_LATENCY = Histogram(
    "motlens_request_latency_seconds",
    "End-to-end model latency of a successful request, by protocol and model version",
    ["protocol", "version"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
HTTP_LATENCY = Histogram(
    "motlens_http_request_duration_seconds",
    "Inference request duration at the HTTP layer (REST: from the request reaching the app to the end of "
    "its answer, event-loop stalls included), by protocol, status class and the model version that "
    "answered ('' when none did)",
    ["protocol", "code", "version"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
BATCH_SIZE = Histogram(
    "motlens_batch_size",
    "Items per micro-batch sent to the embedder",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),  # GPU: --batch-max-items 1024
)
QUEUE_DEPTH = Gauge("motlens_queue_depth", "Items waiting in the micro-batcher queues")
REJECTED = Counter("motlens_rejected_total", "Requests refused before inference, by reason", ["reason"])
MODEL_INFO = Gauge(
    "motlens_model_info",
    "The model served in each slot (=1)",
    ["name", "version", "run_id", "backend", "device", "slot"],
)
MODEL_READY = Gauge("motlens_model_ready", "1 when the slot serves a verified, warm, golden-checked model", ["slot"])
MODEL_NOT_READY = Gauge("motlens_model_not_ready", "1 while the model is not ready, labelled with why", ["reason"])
MODEL_LOAD_FAILURES = Counter(
    "motlens_model_load_failures_total",
    "Loads refused in a slot: load_failed (fetch, verify, warm-up) or golden_failed",
    ["slot", "reason"],
)
MODEL_LOAD_SECONDS = Gauge("motlens_model_load_seconds", "Seconds to load, warm up and golden-check", ["slot"])
GOLDEN_MIN_COSINE = Gauge("motlens_golden_min_cosine", "Lowest golden-set cosine at load", ["slot"])
GOLDEN_PASSED = Gauge("motlens_golden_passed", "1 when the golden set was reproduced at load", ["slot"])
MODEL_FALLBACK = Gauge(
    "motlens_model_fallback",
    "1 while the slot serves its last-known-good bundle instead of the registry's answer, labelled with why",
    ["slot", "reason"],
)
EMBEDDING_NORM = Summary("motlens_embedding_norm", "L2 norm of served embeddings (≈1 when healthy)")
CACHE_HITS = Counter("motlens_cache_hits_total", "Embedding cache hits (texts of served requests)")
CACHE_MISSES = Counter("motlens_cache_misses_total", "Embedding cache misses (texts of served requests)")
CACHE_BYTES = Gauge("motlens_cache_bytes", "Bytes held by the embedding cache")
GPU_ALLOCATED = Gauge("motlens_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated()")
GPU_RESERVED = Gauge("motlens_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved()")
GPU_TOTAL = Gauge("motlens_gpu_memory_total_bytes", "Total memory of the GPU in use (near-limit alert)")

# motlens_requests_total's children exist at 0 before their first request: one first scraped already
# holding a burst adds nothing to rate() (MotlensErrorRateHigh, MotlensRequestsCancelledHigh).
PROTOCOLS = ("v1", "v2-rest", "v2-grpc")
#: outcomes of requests refused before a model took them (version ''): exported from import
REFUSED_OUTCOMES = ("client_error", "unavailable", "cancelled")
#: outcomes of requests a model version took: exported while a unit holds the version
SERVED_OUTCOMES = ("ok", "overloaded", "cancelled", "server_error")
for _protocol in PROTOCOLS:
    for _outcome in REFUSED_OUTCOMES:
        REQUESTS.labels(_protocol, _outcome, "")


_info_refs: Counter_[tuple[str, ...]] = Counter_()
_info_lock = threading.Lock()


def set_model_info(labels: tuple[str, ...]) -> None:
    """Export ``motlens_model_info`` for a served model (reference-counted: several servers may
    share one process and one registry, e.g. in tests)."""
    with _info_lock:
        _info_refs[labels] += 1
        MODEL_INFO.labels(*labels).set(1)


def clear_model_info(labels: tuple[str, ...]) -> None:
    """Drop a served model's ``motlens_model_info``; once no model serves in its slot (the last
    label), the slot's load and golden figures go too (an emptied canary shows none)."""
    with _info_lock:
        _info_refs[labels] -= 1
        if _info_refs[labels] <= 0:
            del _info_refs[labels]
            MODEL_INFO.remove(*labels)
        slot = labels[-1]
        if any(other[-1] == slot for other in _info_refs):
            return
        for gauge in (MODEL_LOAD_SECONDS, GOLDEN_MIN_COSINE, GOLDEN_PASSED):
            with contextlib.suppress(KeyError):
                gauge.remove(slot)


#: series of the per-version metrics, by version, and how many serving units hold each version
_version_series: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}
_version_refs: Counter_[str] = Counter_()
_version_lock = threading.Lock()
#: versions no unit holds any more whose series are kept until their timer removes them
_retiring: dict[str, threading.Timer] = {}


def by_version(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)`` (the version last), remembered so the version's series go when
    the last unit serving it is closed (:func:`release_version`): a month of swaps leaves no
    dead series behind."""
    series = _version_series.get(labels[-1])
    if series is None or (metric, labels) not in series:
        with _version_lock:
            _remember(metric, labels)
    return metric.labels(*labels)


def _remember(metric: Any, labels: tuple[str, ...]) -> None:
    """Note a series of the version ``labels[-1]`` (under ``_version_lock``)."""
    _version_series.setdefault(labels[-1], set()).add((metric, labels))


def hold_version(version: str) -> None:
    """A serving unit of ``version`` exists (reference-counted, like :func:`set_model_info`); a
    version loaded again within its grace period keeps its series. Its request counters exist from
    then (at 0 for a new version), and go with its other series."""
    with _version_lock:
        _version_refs[version] += 1
        timer = _retiring.pop(version, None)
        for protocol in PROTOCOLS:
            for outcome in SERVED_OUTCOMES:
                _remember(REQUESTS, (protocol, outcome, version))
                REQUESTS.labels(protocol, outcome, version)
    if timer is not None:
        timer.cancel()


def release_version(version: str, grace_s: float = 0.0) -> None:
    """A unit of ``version`` was closed; the last one removes the version's request series, after
    ``grace_s`` seconds (``MOTLENS_SERVE_RETIRED_SERIES_GRACE_S``): the outgoing version's last
    requests (errors at the cutover) are still scraped."""
    with _version_lock:
        _version_refs[version] -= 1
        if _version_refs[version] > 0:
            return
        del _version_refs[version]
        if grace_s > 0:
            timer = threading.Timer(grace_s, _expire, (version,))
            timer.daemon = True
            timer.name = f"motlens-series-{version}"[:40]
            previous, _retiring[version] = _retiring.get(version), timer
            if previous is not None:
                previous.cancel()
            timer.start()
            return
        _drop_series(version)


def _expire(version: str) -> None:
    with _version_lock:
        timer = _retiring.get(version)
        if timer is None or timer is not threading.current_thread() or version in _version_refs:
            return  # held again, or replaced by a later retirement's timer
        del _retiring[version]
        _drop_series(version)


def _drop_series(version: str) -> None:
    """Remove the version's series (under ``_version_lock``)."""
    for metric, labels in _version_series.pop(version, ()):
        with contextlib.suppress(KeyError):
            metric.remove(*labels)


def version_known(version: str) -> bool:
    """A unit serves ``version``, or its series are still kept (retired within the grace period)."""
    return version in _version_refs or version in _retiring


#: the model version that answered the current HTTP request, where the HTTP layer asked to know it
#: (set by :func:`note_served`, read by the latency middleware of predictor.rest_edge)
SERVED: ContextVar[dict[str, str] | None] = ContextVar("motlens_served", default=None)


def note_served(version: str) -> None:
    """Tell the HTTP layer's latency middleware which version answered this request."""
    served = SERVED.get()
    if served is not None:
        served["version"] = version


def observe_http(protocol: str, status: int, version: str, seconds: float) -> None:
    """One inference request at the HTTP layer; an unknown (or already retired) version is ''."""
    code = f"{status // 100}xx" if 100 <= status < 600 else "other"
    with _version_lock:  # known and registered at once: a grace timer expiring between them left a series
        labels = (protocol, code, version if version and version_known(version) else "")
        child = HTTP_LATENCY.labels(*labels)
        if labels[-1]:
            _remember(HTTP_LATENCY, labels)
    child.observe(seconds)


#: the CUDA device the model serves on (``watch_cuda_device``); the GPU gauges read this one
_cuda_device = [0]


def watch_cuda_device(device: str) -> None:
    """Read the GPU gauges from ``device`` (``cuda`` or ``cuda:N``), the one a model was loaded on."""
    _cuda_device[0] = int(device.partition(":")[2] or 0)


def _cuda(read: Callable[[Any, int], float]) -> Callable[[], float]:
    """A scrape-time reader of a CUDA memory figure of the served device (0 until CUDA is in use:
    a scrape never initialises CUDA itself)."""

    def value() -> float:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return 0.0
        return float(read(torch.cuda, _cuda_device[0]))

    return value


# Read at every scrape, so the near-limit alert sees memory while serving, not only at load time.
GPU_ALLOCATED.set_function(_cuda(lambda cuda, i: cuda.memory_allocated(i)))
GPU_RESERVED.set_function(_cuda(lambda cuda, i: cuda.memory_reserved(i)))
GPU_TOTAL.set_function(_cuda(lambda cuda, i: cuda.get_device_properties(i).total_memory))
