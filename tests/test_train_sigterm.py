"""`motlens train` stopped by SIGTERM (a Job's pod deleted, a systemd unit stopped) while it registers:
it unwinds as on Ctrl-C and exits 143. Killed by the signal's default action instead, it left a version
tagged incomplete (never resolved, but listed) and its MLflow run RUNNING for ever."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from child_helpers import ROOT

from training.registry import Registry

pytestmark = pytest.mark.slow

#: ``motlens train --data DIR`` that sends itself SIGTERM once the version exists, as it tags it
SIGTERMED = """
import os, signal, sys
from mlflow.tracking.client import MlflowClient
real = MlflowClient.set_model_version_tag
def terminated(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
MlflowClient.set_model_version_tag = terminated
from motlens.cli import main
sys.exit(main(["train", "--data", sys.argv[1], "--epochs", "2", "--alias", "candidate"]))
"""


def test_sigterm_while_registering_takes_the_version_back_and_fails_the_run(tmp_path):
    from training.synth import generate

    generate(tmp_path / "bulk", rows=600, seed=3)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOTLENS_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(ROOT), MOTLENS_HOME=str(home), MOTLENS_TRAIN_GOLDEN_SIZE="16")
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERMED, str(tmp_path / "bulk")], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stderr.endswith("motlens train: stopped by SIGTERM\n"), proc.stderr[-3000:]
    registry = Registry(f"sqlite:///{home / 'mlflow.db'}")
    assert registry.versions() == [] and registry.aliases() == {}
    (run,) = registry.client.search_runs([registry.experiment_id()])
    assert run.info.status == "FAILED"
    assert not registry.client.list_artifacts(run.info.run_id, "model")  # the stored bundle copy deleted
