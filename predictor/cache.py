"""Embedding cache keyed by (model version, normalised text), LRU-bounded in bytes.

Only embeddings are cached (the head is cheap and depends on per-request context), so a hit returns
exactly what the embedder returned for that text under that version. Versions never mix: the
version is part of the key, and a version that stops being served can be purged.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from predictor import metrics

_ENTRY_OVERHEAD = 200  # dict slot, key tuple, ndarray header: rough but stable


class EmbeddingCache:
    """Thread-safe LRU of float32 embeddings with a byte budget (0 disables it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._data: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _size(key: tuple[str, str], value: np.ndarray) -> int:
        return value.nbytes + sys.getsizeof(key[1]) + _ENTRY_OVERHEAD

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)

    def get_many(self, version: str, keys: Sequence[str]) -> list[np.ndarray | None]:
        """Cached embedding per normalised text (``None`` for a miss); counts hits and misses."""
        if self.max_bytes <= 0:
            metrics.CACHE_MISSES.inc(len(keys))
            return [None] * len(keys)
        out: list[np.ndarray | None] = []
        with self._lock:
            for k in keys:
                v = self._data.get((version, k))
                if v is not None:
                    self._data.move_to_end((version, k))
                out.append(v)
        hits = sum(v is not None for v in out)
        metrics.CACHE_HITS.inc(hits)
        metrics.CACHE_MISSES.inc(len(keys) - hits)
        return out

    def put_many(self, version: str, keys: Sequence[str], values: np.ndarray) -> None:
        if self.max_bytes <= 0:
            return
        with self._lock:
            for k, v in zip(keys, values, strict=True):
                key = (version, k)
                if key in self._data:
                    continue
                row = np.array(v, dtype=np.float32, copy=True)
                row.setflags(write=False)
                self._data[key] = row
                self._bytes += self._size(key, row)
            while self._bytes > self.max_bytes and self._data:
                old_key, old = self._data.popitem(last=False)
                self._bytes -= self._size(old_key, old)
            metrics.CACHE_BYTES.set(self._bytes)

    def purge_version(self, version: str) -> int:
        """Drop every entry of ``version`` (called when a version stops being served)."""
        with self._lock:
            keys = [k for k in self._data if k[0] == version]
            for k in keys:
                self._bytes -= self._size(k, self._data.pop(k))
            metrics.CACHE_BYTES.set(self._bytes)
        return len(keys)
