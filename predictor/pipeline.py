"""One served model: backend + micro-batcher + shared embedding cache, with in-flight accounting.

``ServingUnit.predict`` is the whole inference path of a request: normalise texts, look them up in
the cache, embed the misses (deduplicated) through the batcher, run the head, and return a
:class:`~predictor.codec.PredictResult`. The unit counts requests in flight so a slot swap can
drain it before freeing the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from motlens.embedder import normalise_text
from predictor import metrics
from predictor.backend import Backend
from predictor.batcher import MicroBatcher
from predictor.cache import EmbeddingCache
from predictor.codec import PredictResult
from predictor.settings import ServeSettings

log = logging.getLogger(__name__)


class ServingUnit:
    """A loaded backend ready to serve one slot."""

    def __init__(self, backend: Backend, settings: ServeSettings, cache: EmbeddingCache, slot: str) -> None:
        self.backend = backend
        self.cache = cache
        self.slot = slot
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self.retired_series_grace_s = settings.retired_series_grace_s
        self._holds_version = True
        self._lock = threading.Lock()  # close() runs in a worker thread, release() on the event loop
        self.batcher = MicroBatcher(
            backend.tokenize,
            backend.encode_tokens,
            max_items=settings.batch_max_items,
            max_tokens=settings.resolved_batch_max_tokens(backend.device, backend.packs),
            max_wait_ms=settings.batch_max_wait_ms,
            capacity=settings.queue_capacity,
            retry_after_s=settings.retry_after_s,
            workers=settings.model_workers,
            name=f"{slot}-v{backend.version}",
        )
        metrics.hold_version(backend.version)

    @property
    def version(self) -> str:
        return self.backend.version

    def acquire(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def release(self) -> None:
        with self._lock:
            self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()
        self._release_version()

    def _release_version(self) -> None:
        """Drop the version's hold (and so its series) once, when closed and no request is inside."""
        with self._lock:
            if not self._closed or self.inflight or not self._holds_version:
                return
            self._holds_version = False
        metrics.release_version(self.version, self.retired_series_grace_s)

    async def drain(self, timeout: float) -> bool:
        """Wait until no request uses this unit; False if ``timeout`` passed first."""
        if self._idle.is_set():  # at once: ``wait_for(…, 0)`` cancels the wait before it runs
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool], list[str]]:
        """Embeddings of ``texts`` (cache first, misses batched), which ones were cache hits, and the
        normalised texts (the cache keys). Hits and misses are counted once the misses are embedded:
        a request refused (429) or abandoned in the queue counts neither, so the hit rate is that of
        the texts served."""
        keys = [normalise_text(t) for t in texts]
        cached = self.cache.get_many(self.version, keys)
        hits = [c is not None for c in cached]
        misses = list(dict.fromkeys(k for k, c in zip(keys, cached, strict=True) if c is None))
        fresh: dict[str, np.ndarray] = {}
        if misses:
            emb = await self.batcher.embed(misses)
            self.cache.put_many(self.version, misses, emb)
            fresh = dict(zip(misses, emb, strict=True))
        rows = [c if c is not None else fresh[k] for k, c in zip(keys, cached, strict=True)]
        n_hits = sum(hits)
        metrics.CACHE_HITS.inc(n_hits)
        metrics.CACHE_MISSES.inc(len(keys) - n_hits)
        return np.stack(rows).astype(np.float32, copy=False), hits, keys

    async def predict(
        self, texts: Sequence[str], context: Mapping[str, Sequence[Any]] | None
    ) -> tuple[PredictResult, list[bool]]:
        slot = self.slot  # the slot that took the request (a promote may relabel this unit meanwhile)
        emb, hits, keys = await self.embed(texts)
        out = self.backend.predict(emb, context)
        for norm in np.linalg.norm(emb, axis=1):
            metrics.EMBEDDING_NORM.observe(float(norm))
        result = PredictResult(
            section=out.section,
            section_score=out.section_score,
            severity=out.severity,
            severity_scores=out.severity_scores,
            fail_probability=out.fail_probability,
            embeddings=emb,
            model_name=self.backend.name,
            model_version=self.version,
            slot=slot,
            keys=keys,
        )
        return result, hits

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued work, stop the batcher, free the model.

        If model work is still running after ``timeout``, the model is left to the worker threads
        (freed with them) rather than pulled from under queued requests, which would fail them."""
        self.batcher.close(timeout=timeout)
        with self._lock:
            self._closed = True
        self._release_version()  # else the last request still inside releases it
        if self.batcher.workers_alive:
            log.warning("slot %s v%s: model work still running after %.0f s; the model is freed when it ends",
                        self.slot, self.version, timeout)  # fmt: skip
            return
        self.backend.close()
