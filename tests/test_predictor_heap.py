"""The cyclic GC is kept off the request path: long-lived objects frozen once, before the first model serves."""

from __future__ import annotations

import asyncio
import gc
import weakref
from functools import partial

import pytest

from predictor.heap import freeze_long_lived


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic GC can free it


def test_freeze_collects_garbage_then_freezes_survivors():
    garbage = _Node()
    gone = weakref.ref(garbage)
    del garbage
    kept = _Node()
    freeze_long_lived()
    assert gone() is None, "cyclic garbage is collected before freezing"
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects()), "survivors leave the collected generations"


def test_a_second_freeze_still_frees_what_died_after_the_first():
    node = _Node()
    alive = weakref.ref(node)
    freeze_long_lived()  # node is now in the permanent generation
    del node
    gc.collect()
    assert alive() is not None, "frozen objects are exempt from collection"
    freeze_long_lived()  # a second full pass: unfreeze, collect, freeze
    assert alive() is None, "what died in the frozen heap is freed by the next full pass"


@pytest.mark.parametrize("enabled", [True, False])
def test_the_first_model_load_freezes_the_heap_unless_disabled(enabled, tiny_bundle, embedder, monkeypatch):
    import predictor.slots
    from predictor.backend import load_backend
    from predictor.cache import EmbeddingCache
    from predictor.settings import ServeSettings
    from predictor.slots import SlotManager

    calls: list[int] = []
    monkeypatch.setattr(predictor.slots, "freeze_long_lived", lambda: calls.append(1))
    monkeypatch.setattr(predictor.slots, "heap_frozen", lambda: bool(calls))
    settings = ServeSettings(model=str(tiny_bundle.root), gc_freeze=enabled)
    slots = SlotManager(settings, EmbeddingCache(0), partial(load_backend, backend="torch", embedder=embedder))

    async def load_twice() -> None:
        await slots.load("production", str(tiny_bundle.root))
        await slots.load("production", str(tiny_bundle.root))  # a swap: the old unit is retired first
        await slots.shutdown()

    asyncio.run(load_twice())
    assert len(calls) == (1 if enabled else 0), "once per process, not at every swap"


def test_a_swap_never_walks_the_frozen_heap_yet_frees_the_retired_model(tiny_bundle, embedder, monkeypatch):
    """Each swap did unfreeze + a full collection (≈ 700k objects, 0.3-0.7 s on the event loop) twice:
    in _settle and in Backend.close. Only the first load may pay the full pass; later swaps collect the
    unfrozen objects only, and a model loaded after the freeze is still freed when it retires."""
    from predictor.backend import load_backend
    from predictor.cache import EmbeddingCache
    from predictor.settings import ServeSettings
    from predictor.slots import SlotManager

    ref = str(tiny_bundle.root)
    slots = SlotManager(ServeSettings(model=ref), EmbeddingCache(0), partial(load_backend, embedder=embedder))
    unfreezes: list[int] = []
    real_unfreeze = gc.unfreeze
    alive: list[weakref.ref] = []

    async def run() -> None:
        await slots.load("production", ref)  # the first load: the one full pass
        assert gc.get_freeze_count() > 0
        monkeypatch.setattr(gc, "unfreeze", lambda: (unfreezes.append(1), real_unfreeze())[1])
        await slots.load("production", ref)  # a model loaded after the freeze …
        unit = slots.slots["production"].unit
        assert unit is not None
        node = _Node()
        unit.backend.info["cycle"] = node  # … holding a reference cycle, like a torch module
        alive.append(weakref.ref(node))
        del node, unit
        await slots.load("production", ref)  # retires it
        await slots.shutdown()

    try:
        asyncio.run(run())
        assert alive[0]() is None, "the retired model's reference cycles are freed"
        assert unfreezes == [], "a swap must not unfreeze (and so walk) the whole long-lived heap"
    finally:
        real_unfreeze()
