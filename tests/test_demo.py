"""``motlens demo`` (the README's first command) as a real process on a small synthetic set:
data → train → register → production alias → serve → a printed answer to the sample request."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from motlens.labels import SECTIONS


@pytest.mark.slow
def test_demo_trains_registers_serves_and_prints_an_answer(tmp_path, _mlflow_template_db):
    import predlog
    from motlens.state import StateSettings
    from predlog import PredlogSettings
    from training.registry import Registry

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(_mlflow_template_db, home / "mlflow.db")  # a migrated, empty registry (saves the migrations)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MOTLENS_", "MLFLOW_")) or k == "MOTLENS_PREDLOG_FLUSH_INTERVAL_S"}  # fmt: skip
    env["MOTLENS_HOME"] = str(home)
    cmd = [sys.executable, "-m", "motlens.cli", "demo", "--rows", "1000",
           "--http-port", str(free_port()), "--grpc-port", str(free_port())]  # fmt: skip
    repo = Path(__file__).resolve().parents[1]  # this checkout's packages, not an installed copy's
    proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]

    state = StateSettings(home=home)
    assert Registry(state.mlflow_uri, state=state).aliases() == {"production": "1", "candidate": "1"}

    marker = proc.stdout.index("4/4 sample request")
    printed = proc.stdout[proc.stdout.index("\n", marker) + 1 :]
    answer = json.loads(printed)
    assert answer["model_name"] == "mot-defects" and answer["model_version"] == "1"
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["section"]["shape"] == [3] and set(outputs["section"]["data"]) <= set(SECTIONS)
    assert outputs["section"]["data"][0] == SECTIONS[1]  # "Nearside Front Brake pipe excessively corroded"
    assert all(0.0 <= p <= 1.0 for p in outputs["fail_probability"]["data"])

    reader = predlog.open_reader(PredlogSettings(dir=home / "predlog"))
    try:
        logged = reader.query("SELECT model_version, count() AS n FROM predictions GROUP BY model_version")
    finally:
        reader.close()
    assert logged.to_dict("records") == [{"model_version": "1", "n": 3}]  # the sample request, logged
