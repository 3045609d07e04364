"""The core installs MLflow's client only (``mlflow-skinny``); its database store is the ``local`` extra.

The predictor and jobs images talk to an MLflow server, so they leave out the full ``mlflow`` (its
SQLAlchemy store, Flask server, UI and their dependencies). A ``sqlite:///`` registry without them is
refused naming the extra, before anything is created; a server registry works without them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from child_helpers import hiding_env
from conftest import free_port
from test_reliability_faults import _mlflow_server
from test_reliability_shutdown import motlens_bin, wait_ready

from motlens.cli import main
from training.registry import Registry, RegistryError

#: top-level modules that the full ``mlflow`` brings and ``mlflow-skinny`` does not
FULL_MLFLOW_ONLY = (
    "sqlalchemy", "alembic", "flask", "flask_cors", "gunicorn", "graphene", "graphql", "docker", "huey",
    "matplotlib", "skops", "werkzeug", "mako",
)  # fmt: skip
HINT = "which needs the full mlflow package (sqlalchemy is not installed): pip install 'motlens[local]'"


@pytest.fixture
def no_sqlalchemy(registry, monkeypatch):
    """This process as an install without the full mlflow: ``import sqlalchemy`` fails. MLflow registers
    its stores once per process, the database ones only where it finds SQLAlchemy: that happens first
    (reading the ``registry`` fixture's store), or the other tests of this process would lose them."""
    registry.aliases()
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)


def test_a_sqlite_registry_without_the_database_store_names_the_extra_and_creates_nothing(
    no_sqlalchemy, tiny_bundle, tmp_path
):
    home = tmp_path / "home"
    reg = Registry(f"sqlite:///{home}/mlflow.db")
    for call in (reg.versions, reg.aliases, lambda: reg.resolve("production"), reg.create_store,
                 lambda: reg.register_bundle(tiny_bundle.root, metrics={}, params={}, alias=None)):  # fmt: skip
        with pytest.raises(RegistryError) as info:
            call()
        assert str(info.value) == f"registry sqlite:///{home}/mlflow.db is an MLflow database store, {HINT}, or " \
            "set MLFLOW_TRACKING_URI to an MLflow server"  # fmt: skip
    assert not home.exists()  # no empty database file left for a later install to trip over
    with pytest.raises(RegistryError, match=re.escape(HINT)):
        Registry("postgresql+psycopg2://mlflow@db.example/mlflow").versions()
    Registry(f"http://127.0.0.1:{free_port()}").check_store_support()  # a server needs the client only


def test_serve_refuses_the_default_local_registry_without_the_database_store(
    no_sqlalchemy, tmp_path, monkeypatch, capsys
):
    for k in list(os.environ):
        if k.startswith(("MOTLENS_", "MLFLOW_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path / "home"))
    assert main(["serve", "--no-predlog", "--model", "models:/mot-defects@production"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("motlens serve: bad setting: --model: registry sqlite:///") and HINT in err, err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "home" / "mlflow.db").exists()


def test_an_install_without_the_database_store_from_its_start_names_the_extra(tmp_path):
    """MLflow registers no database store at all in such a process: the URI scheme check read a sqlite or
    postgresql URI as one no store serves and hid the install hint (the fixture above registers first)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOTLENS_", "MLFLOW_"))}
    env, block_log = hiding_env(env, tmp_path / "blocker", FULL_MLFLOW_ONLY)
    env["MOTLENS_HOME"] = str(tmp_path / "home")
    for uri in (None, "postgresql+psycopg2://mlflow@db.example/mlflow"):
        child = {**env, **({"MLFLOW_TRACKING_URI": uri} if uri else {})}
        proc = subprocess.run(
            [motlens_bin(), "train", "versions"], env=child, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2 and HINT in proc.stderr, proc.stderr
    assert block_log.read_text().splitlines()[0] == "active"
    assert not (tmp_path / "home" / "mlflow.db").exists()


@pytest.mark.slow
def test_the_predictor_serves_from_an_mlflow_server_without_the_full_mlflow(registry, tiny_bundle, tmp_path):
    """What the predictor image does: resolve the alias on a tracking server, fetch, verify, serve."""
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")
    mlflow_port, http_port = free_port(), free_port()
    mlflow_proc = _mlflow_server(registry.state.home / "mlflow.db", mlflow_port, tmp_path / "mlflow.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOTLENS_", "MLFLOW_"))}
    env, block_log = hiding_env(env, tmp_path / "blocker", FULL_MLFLOW_ONLY)
    env.update(
        MOTLENS_HOME=str(tmp_path / "serve-home"),  # its own bundle cache: the bundle comes over the server
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}",
    )
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [motlens_bin(), "serve", "--model", "models:/mot-defects@production", "--http-port", str(http_port),
             "--no-grpc", "--no-predlog", "--device", "cpu", "--threads", "1"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_ready(proc, base, log_path)
        r = httpx.post(f"{base}/v1/models/mot-defects:predict", json={"instances": ["Horn not working"]}, timeout=60)
        assert r.status_code == 200 and r.json()["model_version"] == "1", r.text
    finally:
        proc.terminate()
        proc.wait(60)
        mlflow_proc.terminate()
        mlflow_proc.wait(60)
    lines = block_log.read_text().splitlines()
    assert lines[0] == "active", lines  # the blocker was loaded in the server process
    print(f"\nhidden from the predictor, looked up: {sorted(set(lines[1:]))}")
    assert Path(tmp_path / "serve-home" / "models").is_dir()  # fetched from the server into its own cache
