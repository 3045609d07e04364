"""Embedding cache keyed by (model version, normalised text), LRU-bounded in bytes.

Only embeddings are cached (the head is cheap and depends on per-request context), so a hit returns
exactly what the embedder returned for that text under that version. Versions never mix: the
version is part of the key, and a version that stops being served can be purged.

The rows live in one preallocated float32 slab ``[capacity, dim]``, allocated and written once at
construction so that its pages are resident from the start: filling the cache does not grow the
process beyond its bound. A text is keyed by its 16-byte BLAKE2b digest, so every entry costs the same
whatever the text's length (``_ENTRY_OVERHEAD`` bytes of key besides its row), and the slab's
capacity is the true bound: slab + keys ≤ ``max_bytes``. Evicted or purged slots are reused. Hits
are returned as read-only copies, so a row handed to a request never changes when its slot is reused
afterwards.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from motlens import EMBEDDING_DIM
from predictor import metrics

# Per entry besides its row: the OrderedDict slot and link (~107 bytes on CPython 3.12), the
# (version, digest) tuple (56), the slot int (28) and the digest (a 16-byte bytes object).
_ENTRY_OVERHEAD = 200 + sys.getsizeof(bytes(16))


def _digest(text: str) -> bytes:
    """The key of a normalised text: fixed-size whatever its length (a 2,000-character text once held
    its whole text as the key, outside the slab's bound); 128 bits make a collision a non-event."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class EmbeddingCache:
    """Thread-safe LRU of float32 embeddings in a preallocated slab, bounded in bytes (0 disables it).

    ``dim`` is the embedding width the slab is shaped for; a put of another width re-shapes the slab
    if the cache is empty (the only version of the old width was purged) and is not cached otherwise.
    """

    def __init__(self, max_bytes: int, dim: int = EMBEDDING_DIM) -> None:
        self.max_bytes = max_bytes
        self._slots: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._allocate(dim)

    def _allocate(self, dim: int) -> None:
        self.dim = dim
        self.entry_bytes = dim * 4 + _ENTRY_OVERHEAD
        self.capacity = max(0, self.max_bytes) // self.entry_bytes
        self._slab = np.empty((self.capacity, dim), dtype=np.float32)
        self._slab.fill(0.0)  # touch every page now: resident from the start, not as the cache fills
        self._free = list(range(self.capacity - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def nbytes(self) -> int:
        """Bytes in use by the cached entries (rows and keys), at most ``max_bytes``."""
        return self._bytes

    @property
    def slab_bytes(self) -> int:
        """Bytes of the preallocated row slab (resident whether or not it is filled)."""
        return self._slab.nbytes

    def __len__(self) -> int:
        return len(self._slots)

    def get_many(self, version: str, keys: Sequence[str]) -> list[np.ndarray | None]:
        """Cached embedding per normalised text (``None`` for a miss). The caller counts hits and
        misses once the request is served (:mod:`predictor.pipeline`): a refused one counts neither.

        Hits are read-only copies taken under the lock, never views of the slab.
        """
        if self.capacity == 0:
            return [None] * len(keys)
        found: list[int] = []
        slots: list[int] = []
        with self._lock:
            for i, k in enumerate(keys):
                key = (version, _digest(k))
                slot = self._slots.get(key)
                if slot is not None:
                    self._slots.move_to_end(key)
                    found.append(i)
                    slots.append(slot)
            rows = self._slab[slots]  # fancy indexing: a copy
        rows.setflags(write=False)
        out: list[np.ndarray | None] = [None] * len(keys)
        for i, row in zip(found, rows, strict=True):
            out[i] = row
        return out

    def put_many(self, version: str, keys: Sequence[str], values: np.ndarray) -> None:
        if self.max_bytes <= 0 or len(keys) == 0:
            return
        values = np.asarray(values, dtype=np.float32)
        with self._lock:
            if values.ndim != 2 or values.shape[1] != self.dim:
                if self._slots or values.ndim != 2:
                    return
                self._allocate(values.shape[1])
            for k, v in zip(keys, values, strict=True):
                key = (version, _digest(k))
                if key in self._slots:
                    continue
                if not self._free and self._slots:
                    self._evict_lru()
                if not self._free:
                    continue
                slot = self._free.pop()
                self._slab[slot] = v
                self._slots[key] = slot
                self._bytes += self.entry_bytes
            metrics.CACHE_BYTES.set(self._bytes)

    def _evict_lru(self) -> None:
        _, slot = self._slots.popitem(last=False)
        self._free.append(slot)
        self._bytes -= self.entry_bytes

    def purge_version(self, version: str) -> int:
        """Drop every entry of ``version`` (called when a version stops being served); frees its slots."""
        with self._lock:
            keys = [k for k in self._slots if k[0] == version]
            for k in keys:
                self._free.append(self._slots.pop(k))
                self._bytes -= self.entry_bytes
            metrics.CACHE_BYTES.set(self._bytes)
        return len(keys)
