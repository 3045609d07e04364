"""The embedding cache: bounded in bytes, never crosses versions, results identical with and without it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from motlens.bundle import write_manifest
from predictor.backend import load_backend
from predictor.cache import EmbeddingCache
from predictor.pipeline import ServingUnit
from predictor.settings import ServeSettings

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
    with pytest.raises(ValueError):
        cache.get_many("1", ["a"])[0][0] = 1.0


def test_disabled_cache_counts_misses_only():
    cache = EmbeddingCache(0)
    cache.put_many("1", ["a"], np.zeros((1, 384), np.float32))
    assert cache.get_many("1", ["a"]) == [None] and len(cache) == 0


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
