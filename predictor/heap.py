"""Keep the cyclic garbage collector off the request path.

A loaded predictor holds 155k (ONNX) to 665k (torch) long-lived, GC-tracked Python objects, nearly
all of them created by importing torch, transformers, ONNX Runtime, FastAPI and kserve; a loaded model
adds only ≈ 3k. CPython's full (generation 2) collection walks all of them: measured on the 2-core
box at ≈ 80 ms per collection (ONNX), ≈ 2 per second at 3,000 req/s, each one stalling the event loop
(the realistic-mix p99, even for cache hits). So the first model load collects once and
``gc.freeze()``\\ s the survivors into the permanent generation, before that model serves; later
collections only walk what was created since.

The heap is frozen once per process. Unfreezing and collecting again at each swap cost 0.3-0.7 s
(≈ 700k objects, torch) with the event loop stalled, twice per swap. Models loaded later are left
unfrozen, so a plain ``gc.collect()`` (:func:`collect_unfrozen`, a few ms) frees a retired model's
reference cycles. Only a model that was loaded before the freeze sits in the permanent generation:
its reference cycles (≈ 2k objects; its weights go by reference counting) stay there, once per
process, unless it ran on a GPU (:meth:`predictor.backend.Backend.close` then pays one full pass, so
that no CUDA memory is kept).
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


_freezes = [0]  # how many times freeze_long_lived ran in this process


def freezes() -> int:
    """How many times :func:`freeze_long_lived` has run: an object created before the latest one is frozen."""
    return _freezes[0]


def heap_frozen() -> bool:
    """Whether the long-lived heap has been frozen (by :func:`freeze_long_lived`)."""
    return gc.get_freeze_count() > 0


def freeze_long_lived() -> None:
    """Collect everything collectable, then exempt the survivors from future collections (a full pass
    over the whole heap: run it before a model serves, not on the request path)."""
    t0 = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    _freezes[0] += 1
    took = time.perf_counter() - t0
    log.info("froze %d long-lived objects out of the cyclic GC (%.0f ms)", gc.get_freeze_count(), took * 1000)


def collect_unfrozen() -> float:
    """Collect the generations the frozen heap is not part of (what was created after the freeze:
    later models, requests); seconds taken."""
    t0 = time.perf_counter()
    gc.collect()
    took = time.perf_counter() - t0
    log.debug("collected the unfrozen generations in %.1f ms", took * 1000)
    return took
