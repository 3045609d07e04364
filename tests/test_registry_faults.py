"""A registration that fails or is killed part-way never leaves a version that lists or resolves as usable."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
from child_helpers import run_killed

from motlens.bundle import write_manifest
from motlens.cli import main
from training.registry import MODEL_ARTIFACT_PATH, RegistryError


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A small verified bundle directory (registration checks hashes only)."""
    root = tmp_path / "bundle"
    (root / "head").mkdir(parents=True)
    (root / "head" / "config.json").write_text("{}")
    (root / "head" / "weights.safetensors").write_bytes(os.urandom(1 << 20))
    write_manifest(root)
    return root


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _model_logged_then_full(real):
    def log_artifacts(run_id, local_dir, artifact_path=None):
        real(run_id, local_dir, artifact_path)  # every file stored, then the disk is full
        if artifact_path == MODEL_ARTIFACT_PATH:
            _full()

    return log_artifacts


def _failed_runs(registry) -> list:
    runs = registry.client.search_runs([registry.experiment_id()])
    return [r for r in runs if r.info.status == "FAILED"]


@pytest.mark.parametrize("fault", ["final bundle.json", "bundle directory"])
def test_a_failed_registration_leaves_no_version_and_no_stored_bundle(registry, bundle, monkeypatch, fault):
    """The final bundle.json (which names the version) once failed to store after the version was
    created: version 2 was listed, and could never be fetched ('bundle.json says version None')."""
    registry.register_bundle(bundle, metrics={"m": 1.0}, params={}, alias="production")
    if fault == "final bundle.json":
        monkeypatch.setattr(registry.client, "log_artifact", _full)
    else:
        monkeypatch.setattr(registry.client, "log_artifacts", _model_logged_then_full(registry.client.log_artifacts))
    with pytest.raises(OSError, match="No space left"):
        registry.register_bundle(bundle, metrics={"m": 2.0}, params={}, alias="candidate")
    monkeypatch.undo()
    assert [(v.version, v.aliases) for v in registry.versions()] == [("1", ["production"])]
    assert len(registry.client.search_model_versions(f"name = '{registry.model_name}'")) == 1  # deleted, not hidden
    with pytest.raises(RegistryError, match="version 2 .* does not exist"):
        registry.resolve("2")
    (failed,) = _failed_runs(registry)
    assert failed.data.metrics == {"m": 2.0}  # the run stays, as FAILED, with what it logged
    assert not (Path(urlparse(failed.info.artifact_uri).path) / MODEL_ARTIFACT_PATH).exists()  # its bundle copy goes
    assert registry.fetch("production").version == "1"


def test_a_version_whose_registration_was_killed_is_never_served(registry, bundle, capsys):
    """A registration killed after creating its version left a version that listed and resolved
    like any other but could never load."""
    registry.register_bundle(bundle, metrics={"m": 1.0}, params={}, alias="production")
    run_killed(
        """
from pathlib import Path
from motlens.state import StateSettings
from training.registry import Registry
reg = Registry(sys.argv[1], state=StateSettings(home=Path(sys.argv[2])))
reg.client.log_artifact = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
reg.register_bundle(Path(sys.argv[3]), metrics={"m": 2.0}, params={}, alias="candidate")
""",
        registry.tracking_uri, registry.state.home, bundle,
    )  # fmt: skip
    assert [v.version for v in registry.versions()] == ["1"]
    for ref in ("2", "models:/mot-defects/2"):
        with pytest.raises(RegistryError, match="version 2 of registered model 'mot-defects' is incomplete"):
            registry.resolve(ref)
    with pytest.raises(RegistryError, match="is incomplete"):
        registry.fetch("2")
    with pytest.raises(RegistryError, match="is incomplete"):
        registry.set_alias("canary", "2")
    assert registry.aliases() == {"production": "1"}
    (listed, _) = registry.versions(include_incomplete=True)
    assert listed.version == "2" and listed.incomplete

    capsys.readouterr()
    assert main(["train", "versions", "--tracking-uri", registry.tracking_uri, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["incomplete"]) for v in shown] == [("2", True), ("1", False)]
    assert main(["train", "versions", "--tracking-uri", registry.tracking_uri]) == 0
    assert "registration incomplete" in capsys.readouterr().out


def test_a_failed_registration_whose_version_cannot_be_deleted_leaves_it_incomplete(
    registry, bundle, monkeypatch, caplog
):
    registry.register_bundle(bundle, metrics={"m": 1.0}, params={}, alias="production")
    monkeypatch.setattr(registry.client, "log_artifact", _full)
    monkeypatch.setattr(registry.client, "delete_model_version", lambda *a: _full())
    with pytest.raises(OSError, match="No space left"):  # the registration's own error, not the cleanup's
        registry.register_bundle(bundle, metrics={"m": 2.0}, params={}, alias="candidate")
    monkeypatch.undo()
    assert "could not delete version 2" in caplog.text
    assert [v.version for v in registry.versions()] == ["1"]
    (kept, _) = registry.versions(include_incomplete=True)
    assert kept.incomplete and (Path(urlparse(kept.artifact_uri).path) / "bundle.json").is_file()  # its copy stays
    with pytest.raises(RegistryError, match="is incomplete"):
        registry.fetch("2")
    assert [r.info.status for r in _failed_runs(registry)] == ["FAILED"]
