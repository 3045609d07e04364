"""Last-known-good bundle cache: a predictor (re)started while the MLflow registry is unreachable serves
the last bundle it verified and served for the same reference (re-verified, golden-checked, flagged in
``motlens_model_fallback``); a damaged one is refused; with the setting off, or when the registry answers
that the reference does not exist, nothing falls back."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from test_reliability_faults import metric, not_ready_with, start_server, wait_until

MODEL = "mot-defects"
REF = f"models:/{MODEL}@production"


@pytest.fixture
def registry_home(registry, tiny_bundle, monkeypatch):
    """``tiny_bundle`` registered as version 1 (``production``); servers started by the test use this
    registry (sqlite, reachable) and its bundle cache."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MOTLENS_HOME", str(registry.state.home))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")
    return registry


def registry_down(monkeypatch) -> str:
    """Point new ``Registry()`` instances (the server's) at a closed port; the reason they will give."""
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    return f"model registry http://127.0.0.1:{port} unreachable"


def record_lkg(registry, ref: str = REF) -> Path:
    """The record a served load leaves (the first test checks that the server writes exactly this)."""
    registry.record_lkg(ref, registry.fetch(ref))
    return registry.cache_dir / "mot-defects" / "1"


def fallback(base: str) -> float:
    return metric(base, "motlens_model_fallback", slot="production", reason="registry_unreachable")


def predict(base: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": ["Horn not working"]}, timeout=60)


def load_failures(caplog) -> int:
    return sum("cannot serve" in r.getMessage() for r in caplog.records)


def assert_never_fell_back(thread, base: str, caplog) -> None:
    """Retried and still failing, the last-known-good bundle never mentioned nor served."""
    wait_until(lambda: load_failures(caplog) >= 2)
    assert "last-known-good" not in httpx.get(f"{base}/motlens/ready", timeout=10).json()["reason"]
    assert thread.server.slots.slots["production"].unit is None
    assert predict(base).status_code == 503 and fallback(base) == 0


def test_registry_unreachable_at_restart_serves_the_last_known_good_version(
    registry_home, embedder, monkeypatch, caplog
):
    from motlens.bundle import sha256_file

    registry = registry_home
    thread, base = start_server(REF, embedder)
    try:
        thread.wait_ready()
        assert fallback(base) == 0
    finally:
        thread.stop()
    record = json.loads(registry.lkg_path(REF).read_text())
    cached = registry.cache_dir / "mot-defects" / "1"
    assert registry.lkg_path(REF) == registry.cache_dir / ".lkg" / "mot-defects@production.json"
    run_id = registry.resolve("1").run_id
    assert {k: record[k] for k in ("ref", "name", "version", "run_id", "bundle_path")} == {
        "ref": REF, "name": MODEL, "version": "1", "run_id": run_id, "bundle_path": "mot-defects/1",
    }  # fmt: skip
    assert record["manifest_sha256"] == sha256_file(cached / "bundle.json") and record["recorded_at"]

    registry_down(monkeypatch)
    caplog.set_level("INFO", logger="predictor")
    thread, base = start_server(REF, embedder)
    try:
        thread.wait_ready()
        assert httpx.get(f"{base}/motlens/ready", timeout=10).json() == {"ready": True, "reason": None}
        r = predict(base)
        assert r.status_code == 200 and r.json()["model_version"] == "1"
        assert fallback(base) == 1
        assert metric(base, "motlens_model_not_ready", reason="load_failed") == 0
        assert thread.server.slots.status()["slots"]["production"]["fallback"] == "registry_unreachable"
        warned = [r for r in caplog.records if r.levelname == "WARNING" and "LAST-KNOWN-GOOD" in r.getMessage()]
        assert len(warned) == 1 and "version 1" in warned[0].getMessage()

        monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the registry answers again, naming the same version
        wait_until(lambda: fallback(base) == 0, timeout=120)
        assert thread.server.slots.status()["slots"]["production"]["fallback"] is None
        assert predict(base).json()["model_version"] == "1"  # no reload was needed
    finally:
        thread.stop()


def test_alias_moved_during_the_outage_is_loaded_once_the_registry_answers(
    registry_home, tiny_bundle, embedder, monkeypatch
):
    registry = registry_home
    record_lkg(registry)
    registry_down(monkeypatch)
    thread, base = start_server(REF, embedder)
    try:
        thread.wait_ready()
        assert predict(base).json()["model_version"] == "1" and fallback(base) == 1
        registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")  # → 2
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        wait_until(lambda: predict(base).json()["model_version"] == "2", timeout=120)
        assert fallback(base) == 0
    finally:
        thread.stop()
    assert json.loads(registry.lkg_path(REF).read_text())["version"] == "2"


def _flip_head_byte(root: Path) -> str:
    path = root / "head" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.unlink()  # never write through a link into another copy
    path.write_bytes(bytes(data))
    return "sha256 mismatch for head/weights.safetensors"


def _rehash_manifest(root: Path) -> str:
    """A manifest rewritten (every file hash still matches it): only the recorded manifest hash tells."""
    manifest = json.loads((root / "bundle.json").read_text())
    manifest["created_at"] = "2000-01-01T00:00:00+00:00"
    (root / "bundle.json").unlink()
    (root / "bundle.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return "sha256 mismatch for bundle.json against the last-known-good record"


@pytest.mark.parametrize("damage", [_flip_head_byte, _rehash_manifest], ids=["file", "manifest"])
def test_tampered_last_known_good_bundle_is_refused(registry_home, embedder, monkeypatch, caplog, damage):
    detail = damage(record_lkg(registry_home))
    unreachable = registry_down(monkeypatch)
    caplog.set_level("ERROR", logger="predictor.slots")
    thread, base = start_server(REF, embedder)
    try:
        wait_until(lambda: not_ready_with(base, "load_failed", detail))
        reason = httpx.get(f"{base}/motlens/ready", timeout=10).json()["reason"]
        assert unreachable in reason and "last-known-good bundle not used" in reason
        wait_until(lambda: load_failures(caplog) >= 2)  # retried, refused again
        assert thread.server.slots.slots["production"].unit is None  # never served
        assert predict(base).status_code == 503 and fallback(base) == 0
    finally:
        thread.stop()


def test_setting_off_stays_not_ready_while_the_registry_is_unreachable(registry_home, embedder, monkeypatch, caplog):
    record_lkg(registry_home)  # intact: it would be used with the setting on
    unreachable = registry_down(monkeypatch)
    caplog.set_level("ERROR", logger="predictor.slots")
    thread, base = start_server(REF, embedder, lkg_enabled=False)
    try:
        wait_until(lambda: not_ready_with(base, "load_failed", unreachable))
        assert_never_fell_back(thread, base, caplog)
    finally:
        thread.stop()


def _delete_alias(registry) -> tuple[str, str]:
    registry.delete_alias("production")
    return REF, "alias 'production' is not set"


def _delete_version(registry) -> tuple[str, str]:
    ref = f"models:/{MODEL}/1"
    record_lkg(registry, ref)
    registry.client.delete_model_version(MODEL, "1")
    return ref, "version 1 of registered model 'mot-defects' does not exist"


@pytest.mark.parametrize("remove", [_delete_alias, _delete_version], ids=["alias", "version"])
def test_reference_gone_while_the_registry_is_up_never_falls_back(registry_home, embedder, caplog, remove):
    record_lkg(registry_home)
    ref, detail = remove(registry_home)
    caplog.set_level("ERROR", logger="predictor.slots")
    thread, base = start_server(ref, embedder)
    try:
        wait_until(lambda: not_ready_with(base, "load_failed", detail))
        assert_never_fell_back(thread, base, caplog)
    finally:
        thread.stop()


def test_an_unset_alias_is_retried_until_a_promotion_sets_it(registry_home, embedder):
    """docs/predictor.md: an alias that is not set is no start-up error (`motlens serve` stays live):
    a promotion may set it later, and the retried load then serves it."""
    from predictor.cli import _unloadable_ref
    from predictor.settings import ServeSettings

    registry_home.delete_alias("production")
    assert _unloadable_ref(ServeSettings(model=REF)) is None
    thread, base = start_server(REF, embedder)
    try:
        wait_until(lambda: not_ready_with(base, "load_failed", "alias 'production' is not set"))
        registry_home.set_alias("production", "1")
        wait_until(lambda: httpx.get(f"{base}/v2/models/{MODEL}/ready", timeout=10).status_code == 200)
        assert predict(base).status_code == 200
    finally:
        thread.stop()


@pytest.mark.slow
def test_follow_alias_confirms_the_fallback_once_the_registry_answers(registry_home, embedder, monkeypatch, tmp_path):
    """The follow loop keeps its registry client, so the same URI must come back: a real ``mlflow server``."""
    from test_reliability_faults import _mlflow_server

    record_lkg(registry_home)
    registry_down(monkeypatch)
    port = int(os.environ["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1])
    thread, base = start_server(REF, embedder, follow_alias="production", follow_interval_s=0.5)
    mlflow_proc = None
    try:
        thread.wait_ready()
        assert fallback(base) == 1 and not thread.server.slots._confirming  # left to the follow loop
        mlflow_proc = _mlflow_server(registry_home.state.home / "mlflow.db", port, tmp_path / "mlflow.log")
        wait_until(lambda: fallback(base) == 0, timeout=240)
        assert predict(base).json()["model_version"] == "1"
    finally:
        thread.stop()
        if mlflow_proc is not None:
            mlflow_proc.terminate()
            mlflow_proc.wait(60)


@pytest.fixture(scope="module")
def lkg_versions(tiny_bundle, tmp_path_factory) -> dict[str, str]:
    """Bundle paths by version: the tiny bundle copied as versions 1 and 2 (run ids ``tiny-1``, ``tiny-2``)."""
    import shutil

    from motlens.bundle import write_manifest

    out = {}
    for v in ("1", "2"):
        root = tmp_path_factory.mktemp(f"lkg{v}") / MODEL
        shutil.copytree(tiny_bundle.root, root)
        write_manifest(root, version=v, run_id=f"tiny-{v}")
        out[v] = str(root)
    return out


@pytest.mark.parametrize("names", ["1", "2"], ids=["same_version", "alias_moved"])
async def test_a_fallback_keeps_asking_a_registry_whose_answers_name_no_version(
    lkg_versions, embedder, monkeypatch, caplog, names
):
    """Review (a proxy's 404 page, the alias unset during the outage): the first answer that was not a
    transport failure ended the slot's retries for good, so the fallback flag stayed 1 and a moved alias
    was never loaded. Every answer that names no version is asked again, logged once per kind."""
    from prometheus_client import REGISTRY

    from predictor import slots as slots_module
    from predictor.backend import REGISTRY_UNREACHABLE, ModelLoadError, load_backend
    from predictor.cache import EmbeddingCache
    from predictor.settings import ServeSettings
    from training.registry import ModelVersionInfo, RegistryError, UnknownModelRef

    page = RegistryError("model registry http://127.0.0.1:1 unreachable or failing: API request to endpoint "
                         "/api/2.0/mlflow/registered-models/alias failed with error code 404 != 200. Response "
                         "body: '<html><body>default backend - 404</body></html>'")  # fmt: skip
    unset = UnknownModelRef("alias 'production' is not set")
    named = ModelVersionInfo(MODEL, names, f"tiny-{names}", "")
    answers = [page, page, page, unset, unset]
    asked: list[str] = []

    class Answering:  # the registry as the slot's loop sees it: these answers, then the version for good
        def resolve(self, ref: str) -> ModelVersionInfo:
            asked.append(ref)
            if answers:
                raise answers.pop(0)
            return named

    # the restart's load falls back; reloading the moved alias fails once on a reset download, then works
    loads: list = [("1", REGISTRY_UNREACHABLE), ModelLoadError("download reset", transient=True), ("2", None)]

    def loader(ref: str, **kw: object):
        step = loads.pop(0)
        if isinstance(step, Exception):
            raise step
        backend = load_backend(lkg_versions[step[0]], embedder=embedder)
        backend.fallback = step[1]
        return backend

    monkeypatch.setattr(slots_module, "FALLBACK_RETRY_S", 0.01)
    monkeypatch.setattr("training.registry.Registry", Answering)
    caplog.set_level("DEBUG", logger="predictor.slots")
    slots = slots_module.SlotManager(
        ServeSettings(model=REF, cache_bytes=0, gc_freeze=False, grace_period_s=5), EmbeddingCache(0), loader
    )
    try:
        await slots.load("production", REF)
        assert slots.status()["slots"]["production"]["fallback"] == REGISTRY_UNREACHABLE
        for _ in range(600):
            prod = slots.status()["slots"]["production"]
            if prod["fallback"] is None and prod["version"] == names and not slots._confirming:
                break  # (the loop ends once the replaced version is retired)
            await asyncio.sleep(0.1)
        assert (prod["version"], prod["fallback"]) == (names, None), prod
        assert not slots._confirming and len(asked) >= 6 and set(asked) == {REF}, asked
        labels = {"slot": "production", "reason": REGISTRY_UNREACHABLE}
        assert REGISTRY.get_sample_value("motlens_model_fallback", labels) == 0
        messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        errors = [m for m in messages if "still flagged" in m]
        assert len(errors) == 2 and "404" in errors[0] and "not set" in errors[1], errors  # once per kind
    finally:
        await slots.shutdown()


async def test_a_fallback_promoted_out_of_its_slot_stops_asking_for_its_alias(lkg_versions, embedder, monkeypatch):
    """Review of the retries above: a canary loaded from ``@canary`` during the outage (its last-known-good
    version 1) and then promoted on the server kept asking for ``@canary``; once `canary start 2` set the
    alias again, version 2 was loaded into production. A unit moved out of its slot stops the retries."""
    from predictor import slots as slots_module
    from predictor.backend import REGISTRY_UNREACHABLE, load_backend
    from predictor.cache import EmbeddingCache
    from predictor.settings import ServeSettings
    from training.registry import ModelVersionInfo, RegistryUnreachable, UnknownModelRef

    canary_ref, pinned = f"models:/{MODEL}@canary", f"models:/{MODEL}/9"
    # the outage, then the alias unset (the CLI's promote deleted it), then `canary start 2`
    answers: list[Exception] = [RegistryUnreachable("down"), UnknownModelRef("alias 'canary' is not set")]
    asked: list[str] = []

    class Answering:
        def resolve(self, ref: str) -> ModelVersionInfo:
            asked.append(ref)
            if answers:
                raise answers.pop(0)
            return ModelVersionInfo(MODEL, "2", "tiny-2", "")

    loaded: list[str] = []

    def loader(ref: str, **kw: object):
        loaded.append(ref)
        backend = load_backend(lkg_versions["2" if len(loaded) > 2 else "1"], embedder=embedder)
        backend.fallback = REGISTRY_UNREACHABLE if ref == canary_ref else None
        return backend

    monkeypatch.setattr(slots_module, "FALLBACK_RETRY_S", 0.05)
    monkeypatch.setattr("training.registry.Registry", Answering)
    slots = slots_module.SlotManager(
        ServeSettings(model=pinned, cache_bytes=0, gc_freeze=False, grace_period_s=5), EmbeddingCache(0), loader
    )
    try:
        await slots.load("production", pinned)
        await slots.load("canary", canary_ref, cause="admin")
        assert slots.status()["slots"]["canary"]["fallback"] == REGISTRY_UNREACHABLE
        await slots.promote()
        for _ in range(100):
            if not slots._confirming:
                break
            await asyncio.sleep(0.1)
        assert not slots._confirming
        assert slots.status()["slots"]["production"]["version"] == "1" and loaded == [pinned, canary_ref], loaded
        assert set(asked) <= {canary_ref} and len(asked) <= 1, asked  # at most one question, before the promote
    finally:
        await slots.shutdown()
