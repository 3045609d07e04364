"""`motlens train` stopped by SIGTERM (a Job's pod deleted, a systemd unit stopped): it exits 143 saying so,
leaving the registry consistent. Before its registration, it unwinds as on Ctrl-C (nothing registered);
once the registration has begun it finishes it first and names the version (killed by the signal's
default action, it left a version tagged incomplete and its MLflow run RUNNING for ever; rolled back
part-way, a version whose creation was in flight, or a complete one, could be left behind)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from child_helpers import ROOT

from training.registry import Registry

pytestmark = pytest.mark.slow

#: ``motlens train --data DIR`` that sends itself SIGTERM in the call ``sys.argv[2]`` names
SIGTERMED = """
import os, signal, sys
from mlflow.tracking.client import MlflowClient
import shutil
import training.train
from training.registry import Registry
where = {"evaluating": (training.train, "evaluate"), "registering": (MlflowClient, "create_model_version"),
         "cleaning": (shutil, "rmtree")}  # the work directory's removal, once registered
real, registered = getattr(*where[sys.argv[2]]), []
def terminated(*args, **kwargs):
    if sys.argv[2] != "cleaning" or registered:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
setattr(*where[sys.argv[2]], terminated)
register = Registry.register_bundle
def noted(*args, **kwargs):
    info = register(*args, **kwargs)
    registered.append(info)
    return info
Registry.register_bundle = noted
from motlens.cli import main
sys.exit(main(["train", "--data", sys.argv[1], "--epochs", "2", "--alias", "candidate"]))
"""


@pytest.fixture(scope="module")
def bulk(tmp_path_factory):
    from training.synth import generate

    path = tmp_path_factory.mktemp("sigterm") / "bulk"
    generate(path, rows=600, seed=3)
    return path


def _train_until_sigterm(bulk, home, where: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOTLENS_", "MLFLOW_"))}
    (home.parent / "tmp").mkdir(exist_ok=True)
    env.update(
        PYTHONPATH=str(ROOT),
        MOTLENS_HOME=str(home),
        TMPDIR=str(home.parent / "tmp"),  # where the work directory goes
        MOTLENS_TRAIN_GOLDEN_SIZE="16",
        MOTLENS_TRAIN_ALIAS_REQUIRES_FLOORS="false",
    )  # two epochs: the alias whatever the floors say
    args = [sys.executable, "-c", SIGTERMED, str(bulk), where]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)


def test_sigterm_before_the_registration_registers_nothing(bulk, tmp_path):
    proc = _train_until_sigterm(bulk, tmp_path / "home", "evaluating")
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stderr.endswith("motlens train: stopped by SIGTERM\n"), proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["tmp"]  # no registry, no state: MOTLENS_HOME never made
    assert list((tmp_path / "tmp").glob("motlens-*")) == []  # the work directory removed


@pytest.mark.parametrize("where", ["registering", "cleaning"])
def test_sigterm_while_registering_finishes_the_registration_then_says_so(bulk, tmp_path, where):
    """The signal comes as the version is being created, or as the work directory is removed once it is
    registered: the version, its alias and its run end complete, and the message names it."""
    home = tmp_path / "home"
    proc = _train_until_sigterm(bulk, home, where)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stderr.endswith(
        "motlens train: stopped by SIGTERM: it came while version 1 was being registered, which finished first "
        "(alias candidate)\n"
    ), proc.stderr[-3000:]
    registry = Registry(f"sqlite:///{home / 'mlflow.db'}")
    (version,) = registry.versions()
    assert version.version == "1" and registry.aliases() == {"candidate": "1"}
    assert registry.fetch("models:/mot-defects@candidate").manifest["version"] == "1"  # complete, verified
    (run,) = registry.client.search_runs([registry.experiment_id()])
    assert run.info.status == "FINISHED"
    assert list((tmp_path / "tmp").glob("motlens-*")) == []  # the work directory removed
