"""Slot operations racing a slow load, on real bundles: what a rollback, a promote and a new canary
version do to the traffic split while a canary load holds the slot (docs/predictor.md, admin API)."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections import Counter

import pytest

from motlens.bundle import write_manifest


@pytest.fixture(scope="module")
def versions(tiny_bundle, tmp_path_factory) -> dict[str, str]:
    """Bundle paths by version: the tiny bundle copied as versions 1, 7 and 8."""
    out = {}
    for v in ("1", "7", "8"):
        root = tmp_path_factory.mktemp(f"v{v}") / "mot-defects"
        shutil.copytree(tiny_bundle.root, root)
        write_manifest(root, version=v, run_id=f"tiny-{v}")
        out[v] = str(root)
    return out


def _slots(versions, embedder, gate: threading.Event | None = None, rows: list | None = None):
    """A slot manager on the real loader; loading version 8 waits for ``gate`` (a slow download)."""
    from predictor.backend import load_backend
    from predictor.cache import EmbeddingCache
    from predictor.settings import ServeSettings
    from predictor.slots import SlotManager

    def loader(ref, **kw):
        if gate is not None and ref == versions["8"]:
            assert gate.wait(60)
        return load_backend(ref, embedder=embedder)

    settings = ServeSettings(model=versions["1"], cache_bytes=0, gc_freeze=False, grace_period_s=5)
    slots = SlotManager(settings, EmbeddingCache(0), loader)
    slots.on_event = rows.append if rows is not None else None
    return slots


async def _canary_at(slots, versions, version: str, percent: float) -> None:
    await slots.load("production", versions["1"])
    await slots.load("canary", versions[version])
    slots.set_canary_percent(percent)


def _served(slots, n: int = 400) -> Counter:
    """Which versions the next ``n`` requests would go to."""
    seen: Counter = Counter()
    for _ in range(n):
        unit = slots.acquire(None)
        seen[unit.version] += 1
        unit.release()
    return seen


async def test_a_rollback_stops_the_canarys_traffic_at_once_while_a_canary_load_runs(versions, embedder):
    """Rollback waited for a canary load (seconds to minutes) before it set the share to 0: the canary
    being rolled back kept its traffic all that time."""
    gate = threading.Event()
    slots = _slots(versions, embedder, gate)
    await _canary_at(slots, versions, "7", 50)
    load = asyncio.create_task(slots.load("canary", versions["8"], cause="admin"))
    await asyncio.sleep(0.2)
    rollback = asyncio.create_task(slots.rollback())
    await asyncio.sleep(0.2)
    assert not rollback.done() and slots.slots["canary"].unit.version == "7"
    assert _served(slots) == Counter({"1": 400})
    gate.set()
    await load
    await rollback
    assert slots.slots["canary"].unit is None and slots.canary_percent == 0.0
    await slots.shutdown()


async def test_promote_refuses_while_a_canary_load_runs(versions, embedder):
    """Promote waited for the canary load and then made production the version it brought, which had
    never had traffic of its own to judge."""
    from predictor.slots import SlotError

    gate = threading.Event()
    slots = _slots(versions, embedder, gate)
    await _canary_at(slots, versions, "7", 50)
    load = asyncio.create_task(slots.load("canary", versions["8"], cause="admin"))
    await asyncio.sleep(0.2)
    with pytest.raises(SlotError, match="canary load .* is in progress"):
        await slots.promote()
    gate.set()
    await load
    assert slots.slots["production"].unit.version == "1" and slots.slots["canary"].unit.version == "8"
    await slots.shutdown()


async def test_promote_refuses_a_canary_that_changed_while_it_waited(versions, embedder):
    from predictor.slots import SlotError

    gate = threading.Event()
    slots = _slots(versions, embedder, gate)
    await _canary_at(slots, versions, "7", 50)
    production = asyncio.create_task(slots.load("production", versions["8"], cause="admin"))  # holds production
    await asyncio.sleep(0.2)
    promote = asyncio.create_task(slots.promote())  # waits for the production slot
    await asyncio.sleep(0.1)
    canary = asyncio.create_task(slots.load("canary", versions["1"], cause="admin"))  # the canary changes meanwhile
    await asyncio.sleep(0.1)
    gate.set()
    await production
    await canary
    with pytest.raises(SlotError, match="canary slot changed while promote waited"):
        await promote
    assert slots.slots["production"].unit.version == "8" and slots.slots["canary"].unit.version == "1"
    await slots.shutdown()


async def test_another_version_loaded_into_a_running_canary_starts_with_no_traffic(versions, embedder):
    """An admin load of version 8 over canary 7 at 50 % gave 8 half the traffic at once, with no call
    to set its share; reloading the same version keeps the share."""
    rows: list = []
    slots = _slots(versions, embedder, rows=rows)
    await _canary_at(slots, versions, "7", 50)
    await slots.load("canary", versions["7"], cause="admin")
    assert slots.canary_percent == 50.0
    await slots.load("canary", versions["8"], cause="admin")
    assert slots.canary_percent == 0.0 and _served(slots) == Counter({"1": 400})
    await slots.flush_records()
    percent = [r for r in rows if r["action"] == "serve_percent"][-1]
    assert percent["to_version"] == "8" and percent["canary_percent"] == 0.0
    assert "starts with no traffic" in percent["reason"]
    slots.set_canary_percent(25)
    assert set(_served(slots)) == {"1", "8"}
    await slots.shutdown()


async def test_a_canary_request_failing_during_a_promote_is_logged_as_the_canarys(versions, embedder, tmp_path):
    """The failure row read the unit's slot when the request failed; a promote meanwhile relabels the
    unit, so canary failures at the cut-over were blamed on production."""
    import predlog
    from predictor.model import MotlensModel
    from predlog.settings import PredlogSettings

    settings = PredlogSettings(dir=tmp_path / "predlog", compact_interval_s=0, flush_interval_s=0.05)
    writer = predlog.open_writer(settings)
    slots = _slots(versions, embedder)
    await _canary_at(slots, versions, "7", 100)
    model = MotlensModel(slots, slots.settings, writer)
    entered, gate = threading.Event(), threading.Event()
    batcher = slots.slots["canary"].unit.batcher

    def failing(*args, **kwargs):  # the canary's model call, held across the promote, then failing
        entered.set()
        assert gate.wait(60)
        raise RuntimeError("model failed")

    batcher._encode_tokens = failing
    request = asyncio.create_task(model.predict({"instances": ["brake pipe corroded"]}, {"x-request-id": "r-fail"}))
    assert await asyncio.to_thread(entered.wait, 30)
    await slots.promote()
    gate.set()
    with pytest.raises(RuntimeError):
        await request
    await slots.shutdown()
    writer.close(10)
    reader = predlog.open_reader(settings)
    try:
        got = reader.query("SELECT model_version, slot, status FROM predictions WHERE request_id = 'r-fail'", {})
    finally:
        reader.close()
    assert got.to_dict("records") == [{"model_version": "7", "slot": "canary", "status": "server_error"}]
