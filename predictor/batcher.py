"""Cross-request micro-batcher: concurrent requests' texts embedded together in a worker thread.

A batch closes when it holds ``max_items`` texts or its oldest request has waited ``max_wait_ms``.
Its texts are tokenised once; the ids serve both the length bucketing and the model. Inside a batch,
texts are sorted by token length and cut into buckets whose padded size
(longest × count) stays within ``max_tokens``, so short texts never pay for a long one's padding.
Buckets run shortest first and each request is answered as soon as its last text is embedded, not
when the whole batch is done.
With ``workers`` > 1 several worker threads take batches from the one queue and run the model at
once (each with its share of the CPU threads): on a small CPU, two single-threaded model calls in
parallel keep both cores busy through each other's serial parts, where one two-threaded call
leaves a core idle.
The queue is bounded (``capacity`` texts): beyond it :class:`Overloaded` is raised at once (HTTP 429
with Retry-After); an empty queue takes any request (the per-request item limit bounds it), so a
request larger than the queue is served when it is its turn rather than refused on every retry.
A request cancelled while queued (client gone, gRPC deadline) is dropped before any model work.
Model work never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from predictor import metrics

log = logging.getLogger(__name__)


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (hands freed heap pages back to the OS), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


#: Called with 0 whenever the queue runs empty: without it, glibc keeps the heap that batches of new
#: shapes grew, and RSS creeps up over hours (docs/reliability.md, "Memory footprint").
MALLOC_TRIM = _find_malloc_trim()

TokenizeFn = Callable[[Sequence[str]], list[list[int]]]
EncodeTokensFn = Callable[[Sequence[Sequence[int]]], np.ndarray]


class Overloaded(Exception):
    """The batcher refuses work: its queue is full (``queue_full``) or it is shutting down (``closed``)."""

    def __init__(self, reason: str, retry_after_s: int) -> None:
        super().__init__(f"server overloaded ({reason}); retry after {retry_after_s}s")
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class _Job:
    texts: list[str]
    enqueued: float
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    dropped_requests: int = 0
    dropped_items: int = 0


class MicroBatcher:
    """Coalesces ``embed`` calls from many requests into bounded, length-bucketed encoder calls."""

    def __init__(
        self,
        tokenize: TokenizeFn,
        encode_tokens: EncodeTokensFn,
        *,
        max_items: int = 64,
        max_tokens: int = 8192,
        max_wait_ms: float = 2.0,
        capacity: int = 4096,
        retry_after_s: int = 1,
        workers: int = 1,
        name: str = "batcher",
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        self._tokenize = tokenize
        self._encode_tokens = encode_tokens
        self.max_items = max_items
        self.max_tokens = max_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.stats = BatcherStats()
        self._queue: deque[_Job] = deque()
        self._pending = 0
        self._closing = False
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._worker, name=f"motlens-{name}-{k}", daemon=True) for k in range(workers)
        ]
        for t in self._threads:
            t.start()

    @property
    def pending_items(self) -> int:
        return self._pending

    @property
    def workers_alive(self) -> int:
        """Worker threads still running (0 once :meth:`close` has finished)."""
        return sum(t.is_alive() for t in self._threads)

    def submit(self, texts: Sequence[str]) -> concurrent.futures.Future:
        """Queue texts; the future resolves to their [N, dim] embeddings. Raises :class:`Overloaded`."""
        job = _Job(list(texts), time.monotonic())
        n = len(job.texts)
        if not n:
            raise ValueError("nothing to embed")
        with self._cond:
            if self._closing:
                raise Overloaded("closed", self.retry_after_s)
            if self._pending and self._pending + n > self.capacity:
                metrics.REJECTED.labels(reason="queue_full").inc()
                raise Overloaded("queue_full", self.retry_after_s)
            self._queue.append(job)
            self._pending += n
            metrics.QUEUE_DEPTH.inc(n)
            self._cond.notify()
        job.future.add_done_callback(functools.partial(self._forget_if_cancelled, job))
        return job.future

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts``; cancelling the awaiting task drops the queued work."""
        return await asyncio.wrap_future(self.submit(texts))

    def _forget_if_cancelled(self, job: _Job, fut: concurrent.futures.Future) -> None:
        if not fut.cancelled():
            return
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return  # the worker already took it off the queue and saw the cancellation
            self._drop(job)

    def _drop(self, job: _Job) -> None:
        n = len(job.texts)
        self._pending -= n
        metrics.QUEUE_DEPTH.dec(n)
        self.stats.dropped_requests += 1
        self.stats.dropped_items += n

    def _take_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            deadline = self._queue[0].enqueued + self.max_wait_s
            while self._pending < self.max_items and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._queue:
                    break
                self._cond.wait(remaining)
            batch: list[_Job] = []
            n = 0
            while self._queue and (n == 0 or n + len(self._queue[0].texts) <= self.max_items):
                job = self._queue.popleft()
                if not job.future.set_running_or_notify_cancel():
                    self._drop(job)
                    continue
                self._pending -= len(job.texts)
                metrics.QUEUE_DEPTH.dec(len(job.texts))
                batch.append(job)
                n += len(job.texts)
            return batch

    def _worker(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)
                if MALLOC_TRIM is not None and not self._queue:
                    MALLOC_TRIM(0)

    def _run(self, batch: list[_Job]) -> None:
        """Embed one batch bucket by bucket, resolving each request once all its texts are done."""
        texts = [t for job in batch for t in job.texts]
        owner = [j for j, job in enumerate(batch) for _ in job.texts]
        starts = np.cumsum([0] + [len(job.texts) for job in batch])
        left = [len(job.texts) for job in batch]
        try:
            for out, bucket in self._buckets(texts):
                for i in bucket:
                    j = owner[i]
                    left[j] -= 1
                    if left[j] == 0:
                        batch[j].future.set_result(out[starts[j] : starts[j + 1]])
        except BaseException as e:  # noqa: BLE001 - every request still waiting gets the failure
            log.exception("embedding batch of %d failed", len(texts))
            for job, n in zip(batch, left, strict=True):
                if n:
                    job.future.set_exception(e)
            return
        with self._cond:
            self.stats.batches += 1
            self.stats.items += len(texts)

    def _buckets(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, list[int]]]:
        """Encode length-sorted buckets (≤ ``max_items`` texts, padded size ≤ ``max_tokens``), shortest first.

        Yields the output array (rows filled so far) and the indices the bucket just filled.
        """
        ids = self._tokenize(texts)
        lengths = [len(x) for x in ids]
        order = [int(i) for i in np.argsort(np.asarray(lengths), kind="stable")]
        buckets: list[list[int]] = [[]]
        for i in order:
            bucket = buckets[-1]
            if bucket and (len(bucket) >= self.max_items or lengths[i] * (len(bucket) + 1) > self.max_tokens):
                buckets.append(bucket := [])
            bucket.append(i)
        out: np.ndarray | None = None
        for bucket in buckets:
            emb = self._encode_tokens([ids[i] for i in bucket])
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[bucket] = emb
            metrics.BATCH_SIZE.observe(len(bucket))
            yield out, bucket

    def encode_bucketed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` computed in the batcher's length buckets (in the caller's thread)."""
        *_, (out, _) = self._buckets(texts)
        return out

    def close(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what is queued, stop the workers (``timeout`` for all of them)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
