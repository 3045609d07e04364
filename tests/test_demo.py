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
        moved = reader.query("SELECT to_version, reason, details FROM promotion_events WHERE action = 'alias_set' "
                             "ORDER BY ts")  # fmt: skip
    finally:
        reader.close()
    assert logged.to_dict("records") == [{"model_version": "1", "n": 3}]  # the sample request, logged
    # both aliases it set are in the audit trail: train's candidate, then the demo's production
    assert [(r["to_version"], r["reason"], json.loads(r["details"])["alias"]) for r in moved.to_dict("records")] == [
        ("1", "motlens train --alias candidate", "candidate"), ("1", "motlens demo", "production")]  # fmt: skip


# --- fast: the demo in-process, with train() replaced by what it does after its fit ---------------------

PASSING = {"section_macro_f1": 0.95, "severity_macro_f1": 0.8, "fail_auc": 0.9,
           "baseline_section_macro_f1": 0.049, "baseline_severity_macro_f1": 0.137}  # fmt: skip
SHUFFLED = {"section_macro_f1": 0.09, "severity_macro_f1": 0.247, "fail_auc": 0.5,
            "baseline_section_macro_f1": 0.049, "baseline_severity_macro_f1": 0.137}  # fmt: skip


@pytest.fixture
def demo(registry, tiny_bundle, monkeypatch):
    """``motlens demo`` on ``registry`` with a stand-in ``train()`` (registers ``tiny_bundle`` with
    ``metrics``, the alias withheld below the floors as train() does) and a stand-in for serving.
    Returns a namespace: ``metrics`` to set, ``trained`` and ``served`` to inspect."""
    from types import SimpleNamespace

    import motlens.demo
    import training.train as train_mod
    from training.floors import check_floors
    from training.train import TrainResult

    for k in list(os.environ):
        if k.startswith(("MOTLENS_", "MLFLOW_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("MOTLENS_HOME", str(registry.state.home))
    monkeypatch.setenv("COLUMNS", "200")  # the aliases line unwrapped
    ns = SimpleNamespace(metrics=PASSING, trained=[], served=[], real_serve_and_ask=motlens.demo._serve_and_ask)

    def fake_train(data, settings, registry, **_):  # noqa: ANN001, ANN003, ANN202
        floors = check_floors(ns.metrics, margin=settings.floor_margin, auc_margin=settings.floor_auc_margin)
        alias = settings.alias if floors.passed or not settings.alias_requires_floors else None
        info = registry.register_bundle(tiny_bundle.root, metrics=ns.metrics, params={}, alias=alias)
        ns.trained.append(info.version)
        fp = {"sha256": "0" * 64, "rows_labelled": 1, "distinct_texts": 1, "train_texts": 1, "holdout_texts": 0}
        withheld = None if alias is not None else settings.alias
        return TrainResult(info, ns.metrics, fp, {"total_s": 1.0}, None, floors, withheld)

    def fake_serve(args, settings, console):  # noqa: ANN001, ANN202
        ns.served.append(args.http_port)
        return {"model_name": "mot-defects"}

    monkeypatch.setattr(train_mod, "train", fake_train)
    monkeypatch.setattr(motlens.demo, "_serve_and_ask", fake_serve)
    return ns


def _demo(*extra: str) -> list[str]:
    return ["demo", "--rows", "20", "--http-port", str(free_port()), "--grpc-port", str(free_port()), *extra]


def test_demo_prints_the_aliases_the_registry_holds(demo, registry, capsys):
    from motlens.cli import main

    assert main(_demo()) == 0
    held = registry.resolve("1").aliases
    assert sorted(held) == ["candidate", "production"] and demo.served
    assert f"mot-defects version 1: aliases {', '.join(held)} (" in capsys.readouterr().out


def test_demo_below_the_quality_floors_never_moves_production_exit_3(demo, registry, tiny_bundle, capsys):
    """Walkthrough: with MOTLENS_TRAIN_FLOOR_MARGIN=0.95 the demo logged "registered WITHOUT alias
    'candidate'", then set `production` on that version anyway, printed "aliases candidate, production"
    (it held only production), served it and exited 0."""
    from motlens.cli import main

    registry.register_bundle(tiny_bundle.root, metrics=PASSING, params={}, alias="production")  # an earlier demo's
    demo.metrics = SHUFFLED
    assert main(_demo()) == 3
    assert registry.aliases() == {"production": "1"} and demo.trained == ["2"] and not demo.served
    out, err = capsys.readouterr()
    assert "mot-defects version 2: aliases none (" in out and "4/4" not in out
    line = err.splitlines()[-1]
    assert line.startswith(
        "motlens demo: version 2 registered without alias 'candidate': below the quality floors (exit 3): "
        "section_macro_f1 0.0900 < 0.2490 (baseline 0.0490 + 0.2); severity_macro_f1 0.2470 < 0.3370 "
        "(baseline 0.1370 + 0.2); fail_auc 0.5000 < 0.6000 (0.5 + 0.1); 'production' not moved, nothing served; "
    )
    assert "--rows" in line and "MOTLENS_TRAIN_FLOOR_MARGIN" in line


def test_demo_refuses_before_training_when_a_server_owns_the_prediction_log(demo, registry, capsys):
    """Walkthrough: a second demo beside a running `motlens serve` trained, registered and moved
    `production` (the server following the alias switched to it), then died on "RuntimeError: another
    prediction-log writer owns the spool … (-v for details)"."""
    from motlens.cli import main
    from predlog import PredlogSettings
    from predlog.spool import Spool

    held = Spool(PredlogSettings().spool_dir, 1 << 20)  # what a running `motlens serve` holds
    try:
        assert main(_demo()) == 2
    finally:
        held.close()
    err = capsys.readouterr().err
    assert err == (
        f"motlens demo: another motlens process (a running `motlens serve`?) owns the prediction log at "
        f"{registry.state.home / 'predlog'}; stop it or set MOTLENS_HOME to another directory\n"
    )
    assert not demo.trained and not demo.served and registry.aliases() == {}
    assert not (registry.state.home / "demo").exists()  # no data generated either
    assert main(_demo()) == 0 and demo.trained == ["1"]  # the lock released: the next demo runs


@pytest.mark.parametrize(
    ("env", "value"), [("MOTLENS_SERVE_BATCH_MAX_ITEMS", "0"), ("MOTLENS_TRAIN_EPOCHS", "x")]
)  # fmt: skip
def test_demo_refuses_a_bad_setting_before_training(env, value, demo, registry, monkeypatch, capsys):
    """A bad MOTLENS_SERVE_* value stopped the demo only at step 3, after it had trained, registered
    and moved `production`."""
    from motlens.cli import main

    monkeypatch.setenv(env, value)
    assert main(_demo()) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"motlens demo: bad setting: {env}: ") and len(err.splitlines()) == 1, err
    assert not demo.trained and not demo.served and registry.aliases() == {}
    assert not (registry.state.home / "demo").exists()


def test_demo_names_every_bad_setting_by_its_flag_or_variable(demo, registry, monkeypatch, capsys):
    """Only the training settings' problems were shown (the serving ones after a fix), a bad --seed as
    `seed` or as a MOTLENS_TRAIN_SEED that held a valid value; a dtype the CPU cannot run trained first."""
    from motlens.cli import main

    monkeypatch.setenv("MOTLENS_TRAIN_SEED", "3")
    monkeypatch.setenv("MOTLENS_SERVE_BATCH_MAX_ITEMS", "0")
    assert main([*_demo(), "--seed", str(2**70)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[2] for line in lines] == ["--seed", "MOTLENS_SERVE_BATCH_MAX_ITEMS"], lines
    monkeypatch.delenv("MOTLENS_SERVE_BATCH_MAX_ITEMS")
    monkeypatch.setenv("MOTLENS_SERVE_DEVICE", "cpu")
    monkeypatch.setenv("MOTLENS_SERVE_DTYPE", "float16")
    assert main(_demo()) == 2
    err = capsys.readouterr().err
    assert err.startswith("motlens demo: bad setting: MOTLENS_SERVE_DTYPE: float16 is not native on this CPU"), err
    assert not demo.trained and not demo.served and registry.aliases() == {}


@pytest.mark.parametrize(
    ("env", "value", "message"),
    [
        ("MOTLENS_HOME", "{tmp}/a?b", "bad setting: MOTLENS_HOME: {tmp}/a?b holds '?'"),
        ("MLFLOW_TRACKING_URI", "bogus://mlflow:5000", "registry bogus://mlflow:5000: no MLflow registry store"),
    ],
)
def test_demo_refuses_a_registry_no_client_can_open_before_generating_data(
    env, value, message, demo, tmp_path, monkeypatch, capsys
):
    """The registry was first opened at step 2, after step 1 had written its bulk files (into the bad home)."""
    from motlens.cli import main

    monkeypatch.setenv(env, value.format(tmp=tmp_path))
    assert main(_demo()) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"motlens demo: {message.format(tmp=tmp_path)}") and len(err.splitlines()) == 1, err
    assert not demo.trained and not (tmp_path / "a?b").exists()
    assert not (Path(os.environ["MOTLENS_HOME"]) / "demo").exists()


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port"])
def test_demo_refuses_before_training_when_a_port_is_taken(flag, demo, registry, capsys):
    import socket

    from motlens.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main([*_demo(), flag, str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"motlens demo: port {port} is in use; ") and f"pick another {flag}\n" in err
    assert len(err.splitlines()) == 1 and not demo.trained and registry.aliases() == {}


def test_a_server_started_while_the_demo_trained_is_one_line_not_a_runtime_error(demo, registry, monkeypatch,
                                                                                   capsys):  # fmt: skip
    """The check before training cannot see a `motlens serve` started during training: the writer's own
    refusal is then a known one-line error, not "RuntimeError: … (-v for details)"."""
    import motlens.demo
    from motlens.cli import main
    from predlog import PredlogSettings
    from predlog.spool import Spool

    monkeypatch.setattr(motlens.demo, "preflight", lambda args: None, raising=False)  # started after the check
    monkeypatch.setattr(motlens.demo, "_serve_and_ask", demo.real_serve_and_ask)
    held = Spool(PredlogSettings().spool_dir, 1 << 20)
    try:
        assert main(_demo()) == 2
    finally:
        held.close()
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("motlens demo: another motlens process (a running `motlens serve`?) owns the prediction-log")
    assert "RuntimeError" not in err and "-v for details" not in err
