from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from motlens.bundle import Bundle, BundleError, check_golden
from training.registry import Registry, RegistryError


def _stored_dir(uri: str) -> Path:
    return Path(urlparse(uri).path)


def test_register_resolve_fetch(registry, tiny_bundle, embedder, tmp_path):
    before = (tiny_bundle.root / "bundle.json").read_text()
    v1 = registry.register_bundle(
        tiny_bundle.root,
        metrics={"section_macro_f1": 0.5},
        params={"seed": 1},
        alias="candidate",
        run_name="first",
    )
    v2 = registry.register_bundle(tiny_bundle.root, metrics={"section_macro_f1": 0.7}, params={"seed": 2}, alias=None)
    assert (v1.version, v2.version) == ("1", "2")
    assert (tiny_bundle.root / "bundle.json").read_text() == before  # the local bundle is untouched
    assert v1.aliases == ["candidate"] and v1.metrics == {"section_macro_f1": 0.5}
    for ref in ("models:/mot-defects@candidate", "candidate", "@candidate", "1", "models:/mot-defects/1"):
        assert registry.resolve(ref).version == "1", ref
    assert registry.artifact_uri("2") == v2.artifact_uri
    assert v2.artifact_uri.startswith("file://") and v2.artifact_uri.endswith("/model")

    b = registry.fetch("models:/mot-defects/2", dst=tmp_path / "dl")
    assert b.version == "2" and b.run_id == v2.run_id
    stored = json.loads((_stored_dir(v2.artifact_uri) / "bundle.json").read_text())
    assert stored["version"] == "2" and stored["run_id"] == v2.run_id
    golden = b.golden()
    emb = embedder.encode(golden.texts)
    assert check_golden(golden, emb, b.head()).passed
    # the default cache is keyed by version and reused
    cached = registry.fetch("candidate")
    assert cached.root == registry.cache_dir / "mot-defects" / "1"
    assert registry.fetch("1").root == cached.root
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(RegistryError, match="exists and is not a bundle"):
        registry.fetch("1", dst=tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_aliases_tags_versions(registry, tiny_bundle):
    registry.register_bundle(tiny_bundle.root, metrics={"m": 1.0}, params={}, alias="production")
    registry.register_bundle(tiny_bundle.root, metrics={"m": 2.0}, params={}, alias="candidate")
    registry.set_alias("canary", 2)
    registry.set_tags("2", {"promotion.canary_started_by": "ops", "gates": {"drift": "pass"}})
    assert registry.alias_version("canary") == "2"
    assert registry.alias_version("nothing") is None
    vs = registry.versions()
    assert [v.version for v in vs] == ["2", "1"]
    assert vs[0].aliases == ["canary", "candidate"] and vs[1].aliases == ["production"]
    assert vs[0].tags["gates"] == '{"drift": "pass"}'
    assert registry.run_metrics("1") == {"m": 1.0}
    registry.delete_alias("canary")
    assert registry.alias_version("canary") is None
    registry.delete_alias("canary")  # idempotent


def test_unknown_refs_are_clear(registry, tiny_bundle):
    assert registry.versions() == [] and registry.aliases() == {}
    with pytest.raises(RegistryError, match="alias 'production' is not set.*aliases: none"):
        registry.resolve("models:/mot-defects@production")
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="candidate")
    with pytest.raises(RegistryError, match=r"version 7 of registered model .* not exist.*candidate → 1"):
        registry.resolve("7")
    for huge in ("99999999999999999999", "models:/mot-defects/2147483648"):  # bad input, not an outage
        with pytest.raises(RegistryError, match=r"version \d+ of registered model .* does not exist"):
            registry.resolve(huge)
    with pytest.raises(RegistryError, match="names 'other-model'"):
        registry.resolve("models:/other-model@production")
    with pytest.raises(RegistryError, match="cannot read model reference"):
        registry.resolve("models:/mot-defects")
    with pytest.raises(RegistryError, match="does not exist"):
        registry.set_alias("canary", 9)
    with pytest.raises(RegistryError, match="invalid alias"):
        registry.set_alias("v3", 1)
    # an alias no registry can hold is refused as read, not looked up (a server retried it for ever) …
    for ref in ("models:/mot-defects@bad alias", "models:/mot-defects@@", "models:/mot-defects@V1"):
        with pytest.raises(RegistryError, match="invalid alias"):
            registry.canonical_ref(ref)
    for ref in ("0", "models:/mot-defects/00", "models:/mot-defects/2147483648"):  # versions run from 1
        with pytest.raises(RegistryError, match=r"version \d+ of registered model .* does not exist \(versions run"):
            registry.canonical_ref(ref)
    # … but MLflow reads @latest as the newest version, and holds aliases motlens would not set itself
    for alias in ("latest", "2024-q1", "prüfung", "_x"):
        assert registry.canonical_ref(f"models:/mot-defects@{alias}") == f"models:/mot-defects@{alias}"
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=registry.tracking_uri).set_registered_model_alias("mot-defects", "2024-q1", "1")
    assert registry.resolve("models:/mot-defects@2024-q1").version == "1"


def test_tampered_stored_bundle_refused(registry, tiny_bundle, tmp_path):
    v = registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="candidate")
    stored = _stored_dir(v.artifact_uri)
    weights = stored / "head" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="refused: .*sha256 mismatch for head/weights.safetensors"):
        registry.fetch("candidate", dst=tmp_path / "dl")
    assert not (tmp_path / "dl").exists()


def test_a_stored_bundle_rehashed_into_a_manifest_of_its_own_is_refused(registry, tiny_bundle, tmp_path, caplog):
    """Write access to the artifact store is not enough to swap a version's model: the stored
    manifest's sha256 is a model-version tag set at registration, checked at every fetch."""
    import hashlib

    from motlens.bundle import write_manifest
    from training.registry import DIGEST_TAG

    v = registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="candidate")
    stored = _stored_dir(v.artifact_uri)
    assert v.tags[DIGEST_TAG] == hashlib.sha256((stored / "bundle.json").read_bytes()).hexdigest()
    cached = registry.fetch("candidate")  # a good copy in the cache, rewritten the same way below
    for root in (stored, cached.root):
        weights = root / "head" / "weights.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        manifest = json.loads((root / "bundle.json").read_text())
        write_manifest(root, **{k: val for k, val in manifest.items() if k != "files"})
        assert Bundle.open(root).version == "1"  # consistent with its own manifest
    with pytest.raises(BundleError, match=r"refused: .*bundle.json has sha256 \w+; the registry recorded"):
        registry.fetch("candidate", dst=tmp_path / "dl")
    with pytest.raises(BundleError, match="the registry recorded"):
        registry.fetch("candidate")  # the cached copy is dropped, the download refused likewise
    # a version registered before the tag existed: verified against its own manifest, with a warning once
    registry.client.delete_model_version_tag("mot-defects", "1", DIGEST_TAG)
    with caplog.at_level("WARNING", logger="training.registry"):
        assert registry.fetch("candidate", dst=tmp_path / "old").version == "1"
        registry.fetch("candidate", dst=tmp_path / "old")
    assert [r.getMessage() for r in caplog.records].count(
        f"mot-defects version 1 has no {DIGEST_TAG} tag (registered by a release before 2026-12-01): its "
        "bundle is verified against its own manifest only; `motlens train pin 1` pins it"
    ) == 1


def test_damaged_cache_is_downloaded_again(registry, tiny_bundle):
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="candidate")
    b = registry.fetch("candidate")
    (b.root / "head" / "config.json").write_text("{}")
    again = registry.fetch("candidate")
    assert Bundle.open(again.root).version == "1"


def test_unverifiable_bundle_not_registered(registry, tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, copy)
    (copy / "extra.txt").write_text("x")
    with pytest.raises(BundleError, match="not listed"):
        registry.register_bundle(copy, metrics={}, params={}, alias="candidate")
    assert registry.versions() == []


def test_default_uri_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/x.db")
    assert Registry().tracking_uri == f"sqlite:///{tmp_path}/x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path / "home"))
    assert Registry().tracking_uri == f"sqlite:///{(tmp_path / 'home' / 'mlflow.db').resolve()}"


def test_unreachable_registry_is_named_not_reported_as_a_missing_alias(monkeypatch):
    """MLflow down must read as "registry unreachable", never as "alias not set" (wrong problem)."""
    from conftest import free_port

    from training.registry import Registry, RegistryError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()
    reg = Registry(f"http://user:secret@127.0.0.1:{port}")
    for call in (lambda: reg.resolve("models:/mot-defects@production"), reg.aliases):
        with pytest.raises(RegistryError) as info:
            call()
        message = str(info.value)
        assert "is not set" not in message and f"127.0.0.1:{port}" in message and "unreachable" in message, message
        assert "secret" not in message


def test_reading_a_missing_sqlite_registry_fails_and_creates_nothing(tmp_path):
    """A mistyped tracking URI once created a new, empty registry and read "no aliases" from it."""
    missing = tmp_path / "missing"
    reg = Registry(f"sqlite:///{missing}/mlflow.db")
    for call in (reg.versions, reg.aliases, lambda: reg.resolve("production"), lambda: reg.set_alias("canary", 1)):
        with pytest.raises(RegistryError, match=r"registry sqlite:///.*/missing/mlflow\.db does not exist"):
            call()
    assert not missing.exists()


def test_a_file_store_or_an_empty_file_is_no_registry_to_read(tmp_path, tiny_bundle):
    """`--tracking-uri bogus` gave MLflow's file-store maintenance notice; an existing empty file had
    MLflow's schema written into it by a command that only reads. A write still creates the store."""
    for uri in ("bogus", f"file://{tmp_path}/store"):
        with pytest.raises(RegistryError, match="not a registry URI; use sqlite:///PATH/mlflow.db or http"):
            Registry(uri).versions()
    empty = tmp_path / "empty.db"
    empty.touch()
    reg = Registry(f"sqlite:///{empty}")
    with pytest.raises(RegistryError, match="is an empty file, not an MLflow database"):
        reg.aliases()
    assert empty.stat().st_size == 0
    # a registration (a write) migrates it, as it creates a missing one (also one a killed creation left)
    assert Registry(f"sqlite:///{empty}").register_bundle(tiny_bundle.root, metrics={}, params={}, alias=None)
    assert Registry(f"sqlite:///{empty}").versions()[0].version == "1"


def test_a_uri_scheme_no_registry_store_serves_is_refused_not_read_as_not_found():
    """MLflow answers an unknown scheme with INVALID_PARAMETER_VALUE, which a resolve read as "alias not
    set" (and `motlens serve` retried for ever)."""
    reg = Registry("bogus://mlflow:5000")
    refused = r"registry bogus://mlflow:5000: no MLflow registry store serves this URI scheme \(.*, sqlite"
    for call in (reg.versions, reg.aliases, lambda: reg.resolve("production"), reg.check_uri):
        with pytest.raises(RegistryError, match=refused):
            call()
    for uri in ("HTTP://mlflow:5000", "postgresql+psycopg2://u@db/mlflow", "databricks-uc"):
        Registry(uri).check_uri()  # schemes MLflow serves pass (asks no server)
    with pytest.raises(RegistryError, match=r"^registry postgresqlx://db/mlflow: Invalid database engine"):
        Registry("postgresqlx://u:pw@db/mlflow").check_uri()  # MLflow's own error for it, without the password


def test_a_first_registration_creates_the_local_store(tiny_bundle, tmp_path):
    from motlens.state import StateSettings

    state = StateSettings(home=tmp_path / "fresh")
    reg = Registry(state.mlflow_uri, state=state)
    v = reg.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="candidate")
    assert (state.home / "mlflow.db").is_file() and v.version == "1"
    assert Registry(state.mlflow_uri, state=state).aliases() == {"candidate": "1"}


def test_a_server_that_does_not_answer_fails_after_bounded_retries(monkeypatch):
    """Unset, MLflow retries a closed port 7 times with backoff (over 4 minutes) before failing."""
    from conftest import free_port
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    from training.registry import RegistryUnreachable

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "")  # restored (or removed) after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    reg = Registry(f"http://127.0.0.1:{free_port()}")
    assert (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_TIMEOUT.get()) == (2, 30)
    with pytest.raises(RegistryUnreachable):
        reg.aliases()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the user's own value is kept
    Registry(f"http://127.0.0.1:{free_port()}")
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 0


def test_versions_read_every_page_and_the_runs_in_batches(registry, tiny_bundle, monkeypatch):
    """A page of versions at a time to the last (MLflow stops one search at 10,000 without saying so),
    newest first, and the runs' metrics a batch of runs per search, not one call per version."""
    import training.registry as reg

    v1 = registry.register_bundle(tiny_bundle.root, metrics={"m": 1.0}, params={"p": 1}, alias="production")
    client = registry.client
    ours = client.get_experiment_by_name(registry.experiment).experiment_id
    other = client.create_experiment("elsewhere")
    for i in range(2, 10):  # more versions of the same stored bundle, each with a run of its own
        run = client.create_run(other if i == 5 else ours)  # one run outside the registry's experiment
        client.log_metric(run.info.run_id, "m", float(i))
        client.log_param(run.info.run_id, "p", str(i))
        client.create_model_version(registry.model_name, v1.artifact_uri, run_id=run.info.run_id)
    calls: dict[str, int] = {}
    for name in ("search_model_versions", "search_runs", "get_run"):
        real = getattr(client, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **kw)

        monkeypatch.setattr(client, name, counted)
    monkeypatch.setattr(reg, "VERSIONS_PAGE", 3)
    monkeypatch.setattr(reg, "RUNS_BATCH", 2)

    vs = registry.versions()
    assert [v.version for v in vs] == [str(i) for i in range(9, 0, -1)]
    assert [v.metrics for v in vs] == [{"m": float(i)} for i in range(9, 0, -1)]
    assert [v.params for v in vs] == [{"p": str(i)} for i in range(9, 0, -1)]
    assert vs[-1].aliases == ["production"]
    assert calls == {"search_model_versions": 3, "search_runs": 5, "get_run": 1}  # 9 runs: 8 found, 1 asked for

    calls.clear()
    assert [v.version for v in registry.versions(limit=4)] == ["9", "8", "7", "6"]
    assert calls == {"search_model_versions": 2, "search_runs": 2}


def test_a_locked_sqlite_registry_is_a_busy_error_naming_it(registry, tiny_bundle):
    """Another process holding the store's write lock past the driver's wait: a RegistryUnreachable that
    says so (callers retry or hold), not sqlite's raw OperationalError."""
    import sqlite3

    from training.registry import RegistryUnreachable

    path = registry.sqlite_path
    holder = sqlite3.connect(path)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        locked = Registry(f"sqlite:///{path}?timeout=0.2", state=registry.state)
        with pytest.raises(RegistryUnreachable, match="is busy: another process holds its database locked"):
            locked.versions()
    finally:
        holder.rollback()
        holder.close()
