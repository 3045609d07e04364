"""The embedding cache: bounded in bytes, never crosses versions, results identical with and without it."""

from __future__ import annotations

import asyncio
import shutil
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from motlens.bundle import write_manifest
from predictor.backend import load_backend
from predictor.cache import EmbeddingCache
from predictor.pipeline import ServingUnit
from predictor.settings import ServeSettings

ENTRY = 384 * 4 + 200 + sys.getsizeof(bytes(16))  # a row and its key, whatever the text

TEXTS = [
    "Horn not working (7.5 (a))",
    "Nearside Front Brake pipe corroded (1.1.11 (c))",
    "Windscreen damage in zone A",
]


def test_versions_never_mix():
    cache = EmbeddingCache(1 << 20)
    v1 = np.ones((2, 384), np.float32)
    cache.put_many("1", ["a", "b"], v1)
    assert cache.get_many("2", ["a", "b"]) == [None, None]
    got = cache.get_many("1", ["a", "b", "c"])
    assert got[2] is None
    np.testing.assert_array_equal(got[0], v1[0])
    assert cache.purge_version("1") == 2
    assert cache.get_many("1", ["a"]) == [None] and cache.nbytes == 0


def test_bounded_in_bytes_evicts_least_recently_used():
    cache = EmbeddingCache(5 * (384 * 4 + 300))
    for i in range(20):
        cache.put_many("1", [f"t{i}"], np.full((1, 384), i, np.float32))
        cache.get_many("1", ["t0"])  # keep t0 hot
    assert cache.nbytes <= cache.max_bytes
    assert 1 <= len(cache) <= 5
    assert cache.get_many("1", ["t0"])[0] is not None
    assert cache.get_many("1", ["t1"])[0] is None


def test_cached_rows_are_read_only():
    cache = EmbeddingCache(1 << 20)
    cache.put_many("1", ["a"], np.zeros((1, 384), np.float32))
    (row,) = cache.get_many("1", ["a"])
    assert row is not None
    with pytest.raises(ValueError):
        row[0] = 1.0


def _row(i: float) -> np.ndarray:
    return np.full((1, 384), i, np.float32)


def test_slab_preallocated_and_resident_at_construction():
    cache = EmbeddingCache(1 << 20)
    assert cache.capacity == (1 << 20) // ENTRY and cache.slab_bytes == cache.capacity * 384 * 4
    assert cache._slab.flags.owndata and not cache._slab.any()  # written (touched) once, zeros
    assert len(cache) == 0 and cache.nbytes == 0


def test_slab_pages_are_resident_before_any_put():
    proc = psutil.Process()
    before = proc.memory_info().rss
    cache = EmbeddingCache(64 << 20)
    grown = proc.memory_info().rss - before
    assert cache.slab_bytes > 50 << 20 and grown >= 0.95 * cache.slab_bytes


def test_slots_reused_after_eviction_and_purge():
    cache = EmbeddingCache(3 * ENTRY)
    assert cache.capacity == 3
    for i in range(10):
        cache.put_many("1", [f"t{i}"], _row(i))
    assert len(cache) == 3 and sorted(cache._slots.values()) == [0, 1, 2]
    assert [cache.get_many("1", [f"t{i}"])[0] is not None for i in range(10)] == [False] * 7 + [True] * 3
    assert cache.purge_version("1") == 3 and cache.nbytes == 0 and len(cache._free) == 3
    cache.put_many("2", ["a", "b", "c"], np.concatenate([_row(20), _row(21), _row(22)]))
    assert sorted(cache._slots.values()) == [0, 1, 2]
    np.testing.assert_array_equal(cache.get_many("2", ["c"])[0], _row(22)[0])


def test_eviction_order_is_least_recently_used():
    cache = EmbeddingCache(3 * ENTRY)
    cache.put_many("1", ["a", "b", "c"], np.concatenate([_row(1), _row(2), _row(3)]))
    cache.get_many("1", ["a"])  # order now b, c, a
    cache.put_many("1", ["d"], _row(4))  # evicts b
    assert [g is not None for g in cache.get_many("1", ["a", "b", "c", "d"])] == [True, False, True, True]
    cache.put_many("1", ["e"], _row(5))  # that lookup touched a, c, d in this order: a goes
    assert [g is not None for g in cache.get_many("1", ["a", "c", "d", "e"])] == [False, True, True, True]


def test_memory_stays_within_the_bound_whatever_the_texts_length():
    """Keys were the whole texts: 2,000-character texts took ≈ 1.5× ``cache_bytes`` (the slab plus
    ≈ 2 kB of key per entry). Measured with tracemalloc (numpy reports its buffers to it), the texts
    themselves built and dropped batch by batch."""
    import tracemalloc

    import predictor.cache

    budget = 4 << 20
    rows = np.ones((256, 384), np.float32)
    tracemalloc.start()
    try:
        cache = EmbeddingCache(budget)
        for b in range(2 * cache.capacity // 256 + 1):  # twice what fits: evictions too
            cache.put_many("1", [f"{b:05d}-{i:03d} " + "x" * 1990 for i in range(256)], rows)
        # what the cache module and this test allocated and still hold (the texts are built here): other
        # threads left running by earlier tests allocate meanwhile, and tracemalloc sees every thread
        here = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, predictor.cache.__file__), tracemalloc.Filter(True, __file__)]
        )
        held = sum(stat.size for stat in here.statistics("filename"))
    finally:
        tracemalloc.stop()
    assert len(cache) == cache.capacity and cache.nbytes <= budget
    # within the bound, but for the interpreter's own small allocations on those lines (≈ 10 kB more in the
    # full suite, where metrics and the allocator are warm); whole texts as keys held ≈ 1.4 × it here
    assert held <= 1.05 * budget, (held, budget)


def test_returned_rows_survive_slot_reuse():
    """A hit handed to an in-flight request stays what the embedder returned after its slot is reused."""
    cache = EmbeddingCache(ENTRY)
    assert cache.capacity == 1
    original = np.random.default_rng(0).standard_normal((1, 384)).astype(np.float32)
    cache.put_many("1", ["a"], original)
    (held,) = cache.get_many("1", ["a"])
    cache.put_many("1", ["b"], _row(7))  # evicts "a" and writes "b" into the same slot
    assert cache.get_many("1", ["a"]) == [None]
    assert not np.shares_memory(held, cache._slab)
    np.testing.assert_array_equal(held, original[0])
    np.testing.assert_array_equal(cache.get_many("1", ["b"])[0], _row(7)[0])


def test_identical_to_what_was_put_and_versions_isolated():
    cache = EmbeddingCache(1 << 20)
    rng = np.random.default_rng(1)
    v1, v2 = rng.standard_normal((2, 50, 384)).astype(np.float32)
    keys = [f"text {i}" for i in range(50)]
    cache.put_many("1", keys, v1)
    cache.put_many("2", keys, v2)
    np.testing.assert_array_equal(np.stack(cache.get_many("1", keys)), v1)  # type: ignore[arg-type]
    np.testing.assert_array_equal(np.stack(cache.get_many("2", keys)), v2)  # type: ignore[arg-type]
    assert cache.purge_version("1") == 50 and cache.get_many("1", keys[:1]) == [None]
    np.testing.assert_array_equal(np.stack(cache.get_many("2", keys)), v2)  # type: ignore[arg-type]
    assert cache.nbytes == 50 * ENTRY


def test_other_width_reshapes_an_empty_slab_only():
    cache = EmbeddingCache(1 << 20)
    cache.put_many("1", ["a"], _row(1))
    cache.put_many("2", ["a"], np.ones((1, 768), np.float32))  # not empty: not cached
    assert cache.get_many("2", ["a"]) == [None] and cache.dim == 384
    cache.purge_version("1")
    cache.put_many("2", ["a"], np.ones((1, 768), np.float32))
    assert cache.dim == 768 and cache.capacity == (1 << 20) // (768 * 4 + ENTRY - 384 * 4)
    np.testing.assert_array_equal(cache.get_many("2", ["a"])[0], np.ones(768, np.float32))


def test_disabled_cache_counts_misses_only():
    cache = EmbeddingCache(0)
    cache.put_many("1", ["a"], np.zeros((1, 384), np.float32))
    assert cache.get_many("1", ["a"]) == [None] and len(cache) == 0 and cache.slab_bytes == 0


@pytest.fixture(scope="module")
def backends(tiny_bundle, embedder, tmp_path_factory):
    """Version 1 (the tiny bundle) and a copy of it registered as version 2."""
    v2 = tmp_path_factory.mktemp("v2") / "mot-defects"
    shutil.copytree(tiny_bundle.root, v2)
    write_manifest(v2, version="2", run_id="tiny-2")
    return load_backend(str(tiny_bundle.root), embedder=embedder), load_backend(str(v2), embedder=embedder)


async def test_identical_results_with_and_without_cache(backends):
    v1, _ = backends
    settings = ServeSettings(batch_max_wait_ms=1)
    cached = ServingUnit(v1, settings, EmbeddingCache(1 << 20), "production")
    plain = ServingUnit(v1, settings, EmbeddingCache(0), "production")
    try:
        cold, cold_hits = await cached.predict(TEXTS, None)
        warm, warm_hits = await cached.predict(TEXTS + ["  Horn   not working (7.5 (a))"], None)
        base, base_hits = await plain.predict(TEXTS + [TEXTS[0]], None)
    finally:
        cached.batcher.close()
        plain.batcher.close()
    assert cold_hits == [False] * 3 and warm_hits == [True] * 4 and base_hits == [False] * 4
    np.testing.assert_allclose(warm.embeddings[:3], cold.embeddings, atol=0)
    np.testing.assert_allclose(warm.embeddings, base.embeddings, atol=2e-5)
    assert warm.section == base.section and warm.severity == base.severity
    np.testing.assert_allclose(warm.severity_scores, base.severity_scores, atol=1e-5)


async def test_cache_shared_by_two_versions_never_crosses(backends):
    v1, v2 = backends
    cache = EmbeddingCache(1 << 20)
    settings = ServeSettings(batch_max_wait_ms=1)
    u1, u2 = ServingUnit(v1, settings, cache, "production"), ServingUnit(v2, settings, cache, "canary")
    try:
        r1, h1 = await u1.predict(TEXTS, None)
        r2, h2 = await u2.predict(TEXTS, None)  # same texts, other version: all misses
        _, h1b = await u1.predict(TEXTS, None)
    finally:
        u1.batcher.close()
        u2.batcher.close()
    assert h1 == [False] * 3 and h2 == [False] * 3 and h1b == [True] * 3
    assert r1.model_version == "1" and r2.model_version == "2"
    assert len(cache) == 6


def hold_model_calls(backend) -> tuple[threading.Event, threading.Event]:  # noqa: ANN001
    """Hold ``backend``'s model calls until ``gate`` is set; ``entered`` is set once one is inside."""
    entered, gate = threading.Event(), threading.Event()
    encode = backend.encode_tokens

    def gated(ids):  # noqa: ANN001, ANN202
        entered.set()
        assert gate.wait(60)
        return encode(ids)

    backend.encode_tokens = gated
    return entered, gate


async def test_a_unit_closed_while_model_work_outlasts_the_timeout_keeps_its_model(tiny_bundle, embedder):
    """Freeing the model under queued requests failed them (500) once the drain timeout passed."""
    backend = load_backend(str(tiny_bundle.root), embedder=embedder)
    entered, gate = hold_model_calls(backend)
    unit = ServingUnit(backend, ServeSettings(batch_max_items=2, batch_max_wait_ms=0), EmbeddingCache(0), "production")
    first = asyncio.ensure_future(unit.predict(TEXTS[:2], None))
    assert await asyncio.to_thread(entered.wait, 30)
    queued = asyncio.ensure_future(unit.predict(TEXTS[2:], None))
    await asyncio.sleep(0.05)
    await asyncio.to_thread(unit.close, 0.2)  # the worker is still inside the model call
    assert unit.batcher.workers_alive
    gate.set()
    (a, _), (b, _) = await first, await queued  # both answered, neither failed
    assert a.embeddings.shape == (2, 384) and b.embeddings.shape == (1, 384)
    assert backend.embedder is not None


async def test_a_retired_version_keeps_its_series_until_its_last_request_ends(tiny_bundle, embedder, tmp_path):
    """A drain that timed out closed the unit and removed its series; the request still inside then
    counted, recreating series for a version nobody serves (never removed)."""
    from prometheus_client import REGISTRY

    from predictor.model import MotlensModel
    from predictor.slots import SlotManager

    def series() -> set[str]:
        return {s.name for m in REGISTRY.collect() for s in m.samples if s.labels.get("version") == "4343"}

    root = tmp_path / "mot-defects"
    shutil.copytree(tiny_bundle.root, root)
    write_manifest(root, version="4343", run_id="tiny-4343")  # no other test serves it
    backend = load_backend(str(root), embedder=embedder)
    entered, gate = hold_model_calls(backend)
    gate.set()
    settings = ServeSettings(batch_max_wait_ms=0, retired_series_grace_s=3.0)
    slots = SlotManager(settings, EmbeddingCache(0), load_backend)
    unit = slots.slots["production"].unit = ServingUnit(backend, settings, slots.cache, "production")
    model = MotlensModel(slots, settings)
    await model.predict({"instances": TEXTS[:1]})
    assert "motlens_requests_total" in series()
    entered.clear()
    gate.clear()
    inflight = asyncio.ensure_future(model.predict({"instances": TEXTS[1:2]}))
    assert await asyncio.to_thread(entered.wait, 30)
    slots.slots["production"].unit = None
    assert not await unit.drain(0.1)  # what SlotManager._retire does: the drain times out, the unit
    await asyncio.to_thread(unit.close, 0.2)  # is closed with the request inside
    assert "motlens_requests_total" in series()  # still served: the request is counted when it ends
    gate.set()
    assert (await inflight)["model_version"] == "4343"
    await asyncio.sleep(0.05)
    assert "motlens_requests_total" in series()  # kept for the grace period: the last scrape sees it
    deadline = time.monotonic() + 30
    while series() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert series() == set()
    assert await unit.drain(0)  # idle: drained at once, also with no grace (it had timed out at 0 s)
