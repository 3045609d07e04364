"""The cyclic GC is kept off the request path: long-lived objects frozen after each model load."""

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
    freeze_long_lived()  # as after the next model load: unfreeze, collect, freeze
    assert alive() is None, "a retired model's reference cycles must not outlive the next load"


@pytest.mark.parametrize("enabled", [True, False])
def test_each_model_load_freezes_the_heap_unless_disabled(enabled, tiny_bundle, embedder, monkeypatch):
    import predictor.slots
    from predictor.backend import load_backend
    from predictor.cache import EmbeddingCache
    from predictor.settings import ServeSettings
    from predictor.slots import SlotManager

    calls: list[int] = []
    monkeypatch.setattr(predictor.slots, "freeze_long_lived", lambda: calls.append(1))
    settings = ServeSettings(model=str(tiny_bundle.root), gc_freeze=enabled)
    slots = SlotManager(settings, EmbeddingCache(0), partial(load_backend, backend="torch", embedder=embedder))

    async def load_twice() -> None:
        await slots.load("production", str(tiny_bundle.root))
        await slots.load("production", str(tiny_bundle.root))  # a swap: the old unit is retired first
        await slots.shutdown()

    asyncio.run(load_twice())
    assert len(calls) == (2 if enabled else 0)
