"""The registry's download cache (``MOTLENS_HOME/models``) kept a full copy of every version ever fetched:
each download now prunes it, never taking a version in use, named by an alias or a last-known-good
record, nor one of the ``MOTLENS_MODEL_CACHE_KEEP`` most recently used others."""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import threading
import time

import pytest

from motlens.bundle import write_manifest
from training.registry import RegistryUnreachable, _hold, _lease_path, _take


@pytest.fixture
def versions(registry, tmp_path):
    """Seven registered versions of a small bundle (verification reads only its hashes), no alias."""
    root = tmp_path / "small-bundle"
    (root / "head").mkdir(parents=True)
    (root / "head" / "weights.safetensors").write_bytes(b"a stand-in of 90 MB")  # hashed, never loaded here
    (root / "head" / "config.json").write_text("{}")
    write_manifest(root)
    for _ in range(7):
        registry.register_bundle(root, metrics={}, params={}, alias=None)
    registry.state.model_cache_keep = 1
    return registry


def cached(registry) -> list[str]:
    return sorted((p.name for p in (registry.cache_dir / "mot-defects").iterdir() if p.name.isdigit()), key=int)


def fetched(registry, version: str) -> None:
    """Fetch ``version`` and let its bundle go at once (a past use), a little apart, so recency is clear."""
    registry.fetch(version)
    gc.collect()
    time.sleep(0.05)


def test_a_download_prunes_what_nothing_needs(versions, caplog):
    registry = versions
    registry.set_alias("production", 1)
    registry.set_alias("canary", 2)
    registry.record_lkg("models:/mot-defects/3", registry.fetch("3"))
    (registry.cache_dir / ".lkg" / "mot-defects@broken.json").write_text("{not json")  # names nothing
    fetched(registry, "1")
    fetched(registry, "2")
    held = registry.fetch("4")  # loaded by this process
    folder = registry.cache_dir / "mot-defects"
    staging = folder / ".5-downloading"  # another process's download in progress
    staging.mkdir()
    leftover = folder / ".pruned-x"  # a prune stopped before it deleted what it set aside
    (leftover / "6").mkdir(parents=True)
    fetched(registry, "5")
    fetched(registry, "6")
    assert cached(registry) == ["1", "2", "3", "4", "5", "6"]  # 5: the one other kept beside the fetched 6
    with caplog.at_level(logging.INFO, logger="training.registry"):
        fetched(registry, "7")  # a download: 5 is no longer the most recently used other
    assert cached(registry) == ["1", "2", "3", "4", "6", "7"]
    assert "mot-defects version 5 removed" in caplog.text
    assert not _lease_path(folder / "5").exists() and not leftover.exists() and staging.is_dir()
    fetched(registry, "1")  # a cache hit prunes nothing (6 would go)
    assert cached(registry) == ["1", "2", "3", "4", "6", "7"]
    fetched(registry, "6")  # a cache hit: 6 is the most recently used now
    del held
    gc.collect()  # unloaded: 4 goes too, least recently used
    assert registry.prune_cache() == ["7", "4"]
    assert cached(registry) == ["1", "2", "3", "6"]
    registry.state.model_cache_keep = 0
    assert registry.prune_cache() == ["6"]
    assert registry.fetch("6").version == "6"  # downloaded again when needed


def test_a_version_another_process_holds_is_never_pruned(versions):
    registry = versions
    registry.state.model_cache_keep = 0
    fetched(registry, "1")
    # what another process's fetch holds while it reads the bundle: a shared flock on its lease file (an
    # open file description of its own, which is what a flock belongs to)
    other = _take(_lease_path(registry.cache_dir / "mot-defects" / "1"), fcntl.LOCK_SH)
    assert other is not None
    fetched(registry, "2")  # its download prunes: 1 is held, 2 is the fetch's own
    assert cached(registry) == ["1", "2"]
    assert registry.prune_cache() == ["2"]  # no longer held by anyone
    assert cached(registry) == ["1"]
    os.close(other)  # that process is done with it
    assert registry.prune_cache() == ["1"]


def test_an_unknown_alias_state_prunes_nothing_and_the_fetch_stands(versions, monkeypatch, caplog):
    registry = versions
    registry.state.model_cache_keep = 0
    fetched(registry, "1")

    def unreachable() -> dict[str, str]:
        raise RegistryUnreachable("model registry is unreachable")

    monkeypatch.setattr(registry, "aliases", unreachable)
    with caplog.at_level(logging.WARNING, logger="training.registry"):
        assert registry.fetch("2").version == "2"
    assert "not pruned: model registry is unreachable" in caplog.text
    assert cached(registry) == ["1", "2"]


def test_a_fetch_waiting_on_a_prune_leases_the_file_the_prune_left(tmp_path):
    """A prune removes a version's lease file under its exclusive lock: a fetch that waited on that lock
    must end up holding the new file, or the next prune would take the version it is reading."""
    version = tmp_path / "mot-defects" / "7"
    path = _lease_path(version)
    path.parent.mkdir(parents=True)
    prune = _take(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert prune is not None
    got: list[int | None] = []
    waiting = threading.Thread(target=lambda: got.append(_hold(version)))
    waiting.start()
    time.sleep(0.2)
    path.unlink()
    os.close(prune)
    waiting.join(10)
    assert got and got[0] is not None
    assert _take(path, fcntl.LOCK_EX | fcntl.LOCK_NB) is None  # the file in place is the one held
    os.close(got[0])


def test_a_loaded_model_stays_cached_until_it_is_unloaded(registry, tiny_bundle, embedder, monkeypatch):
    """The server's loader kept only the fetched bundle's path: its version was unheld while it served."""
    from predictor.backend import load_backend

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MOTLENS_HOME", str(registry.state.home))
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")
    backend = load_backend("models:/mot-defects@production", embedder=embedder)
    registry.delete_alias("production")  # nothing names it now but the process serving it
    registry.state.model_cache_keep = 0
    gc.collect()
    assert registry.prune_cache() == []
    backend.close()
    del backend
    gc.collect()
    assert registry.prune_cache() == ["1"]
