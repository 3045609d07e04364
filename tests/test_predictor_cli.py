"""``motlens serve`` as a real process: flags, JSON logs, and SIGTERM with traffic — no failed request, no lost row."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from motlens.cli import main

MODEL = "mot-defects"
ROOT = Path(__file__).resolve().parents[1]  # the checkout under test, for `python -m motlens.cli`


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--http-port", "--grpc-port", "--follow-alias", "--json-logs", "--canary-percent"):
        assert flag in out


@pytest.mark.slow
def test_sigterm_drains_traffic_and_flushes_the_prediction_log(tiny_bundle, tmp_path):
    import predlog
    from predlog.settings import PredlogSettings

    http_port = _port()
    env = {**os.environ, "MOTLENS_HOME": str(tmp_path), "MOTLENS_SERVE_GRACE_PERIOD_S": "20"}
    log_path = tmp_path / "serve.log"
    log_file = log_path.open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "motlens.cli",
            "serve",
            "--model",
            str(tiny_bundle.root),
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(_port()),
            "--json-logs",
            "--device",
            "cpu",
            "--threads",
            "1",
        ],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{http_port}"
    answered: list[tuple[int, int]] = []  # (status, items)
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            i = 0
            while not stop.is_set():
                i += 1
                texts = [f"Offside Rear Brake disc worn, record {threading.get_ident()}-{i}", "Horn not working"]
                try:
                    r = client.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": texts})
                except httpx.TransportError:
                    return  # the server has closed its socket: no response means nothing was accepted
                answered.append((r.status_code, len(texts)))

    workers: list[threading.Thread] = []
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{base}/v2/models/{MODEL}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 120
        while len(answered) < 20:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert any(w.is_alive() for w in workers), f"every load thread stopped after {len(answered)} answers"
            assert time.monotonic() < deadline, f"only {len(answered)} answers: {log_path.read_text()[-3000:]}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    for w in workers:
        w.join(60)
    log_file.close()
    stderr = log_path.read_text()
    assert rc == 0, stderr[-3000:]
    assert answered and {s for s, _ in answered} == {200}, [s for s, _ in answered if s != 200][:5]
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any("shutting down" in doc["message"] for doc in lines)

    reader = predlog.open_reader(PredlogSettings(dir=tmp_path / "predlog"))
    try:
        rows = reader.query("SELECT count() AS n FROM predictions", {})
    finally:
        reader.close()
    assert int(rows["n"][0]) == sum(n for _, n in answered)  # every answered item logged, none lost


@pytest.mark.parametrize("follow", [False, True], ids=["load", "follow-alias"])
def test_sigterm_while_the_registry_hangs_exits_without_waiting_for_it(tiny_bundle, tmp_path, follow):
    """A load or a registry lookup cannot be interrupted: one stuck on a registry that accepts and never
    answers held the stopped process until it ended (here 10 minutes; in a pod, past its grace period
    until SIGKILL) — the load in its thread, the alias follower's lookup in asyncio.run's executor."""
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(8)  # the kernel accepts; nothing ever answers
    env = {
        **_serve_env(tmp_path),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{hanging.getsockname()[1]}",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "600",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }
    http_port = _port()
    # following: production from a local bundle (it becomes ready); the follower's lookups hang
    model = ["--model", str(tiny_bundle.root), "--follow-alias", "production"] if follow else []
    proc = _serve_popen(
        env,
        [*(model or ["--model", "models:/mot-defects@production"]), "--http-port", str(http_port), "--no-grpc"],
    )
    try:
        lines: list[str] = []
        assert proc.stderr is not None
        awaited = "model ready" if follow else "model not ready: loading models:/mot-defects@production"
        while not any(awaited in line for line in lines):
            line = proc.stderr.readline()
            assert line, "".join(lines)[-3000:]
            lines.append(line)
        time.sleep(1.0)  # the load thread or the follower is in its registry request
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        hanging.close()
    assert rc == 0, rest[-3000:]
    assert "exiting without waiting for 1 model load(s) or registry lookup(s) still running" in rest, rest[-3000:]


@pytest.mark.parametrize("token", ["", "   ", "short-token"])
def test_an_empty_or_short_admin_token_is_refused_at_start(monkeypatch, token):
    """A blank Secret key gave SecretStr(''): 'Authorization: Bearer ' then opened the admin API to anyone."""
    from pydantic import ValidationError

    from predictor.settings import ServeSettings

    monkeypatch.setenv("MOTLENS_SERVE_ADMIN_TOKEN", token)
    with pytest.raises(ValidationError, match="admin_token must be at least 16 characters") as info:
        ServeSettings()
    assert not token.strip() or token not in str(info.value)  # the value is not echoed
    monkeypatch.setenv("MOTLENS_SERVE_ADMIN_TOKEN", "0123456789abcdef")
    assert ServeSettings().admin_token is not None


def test_model_workers_split_the_model_threads():
    from predictor.settings import ServeSettings

    assert ServeSettings(threads=4, model_workers=2).resolved_threads() == 2
    assert ServeSettings(threads=2, model_workers=4).resolved_threads() == 1
    assert ServeSettings(threads=3).resolved_threads() == 3


def test_single_thread_tokens_setting_reaches_the_loader(monkeypatch):
    from pydantic import ValidationError

    from predictor.server import PredictorServer
    from predictor.settings import ServeSettings

    assert ServeSettings().single_thread_tokens == 128
    monkeypatch.setenv("MOTLENS_SERVE_SINGLE_THREAD_TOKENS", "0")
    settings = ServeSettings()
    assert settings.single_thread_tokens == 0
    with pytest.raises(ValidationError, match="single_thread_tokens"):
        ServeSettings(single_thread_tokens=-1)
    server = PredictorServer(ServeSettings(model="unused", single_thread_tokens=64), host="127.0.0.1")
    assert server.slots._loader.keywords["single_thread_tokens"] == 64


def test_torch_eager_flag_and_variable_reach_the_loader(monkeypatch):
    from predictor.cli import register
    from predictor.server import PredictorServer
    from predictor.settings import ServeSettings

    assert ServeSettings().torch_trace is True
    monkeypatch.setenv("MOTLENS_SERVE_TORCH_TRACE", "false")
    assert ServeSettings().torch_trace is False
    monkeypatch.delenv("MOTLENS_SERVE_TORCH_TRACE")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["serve", "--torch-eager"]).torch_trace is False
    assert parser.parse_args(["serve"]).torch_trace is None  # unset: the variable or the default decides
    server = PredictorServer(ServeSettings(model="unused", torch_trace=False), host="127.0.0.1")
    assert server.slots._loader.keywords["torch_trace"] is False


def test_a_port_out_of_range_is_refused_at_start(capsys, tmp_path):
    """Port 99999 used to start gRPC only, log "serving … on http :99999" and never listen on REST."""
    from pydantic import ValidationError

    from predictor.settings import ServeSettings

    for field in ("http_port", "grpc_port"):
        with pytest.raises(ValidationError, match=field):
            ServeSettings(**{field: 99999})
    assert main(["serve", "--http-port", "99999", "--model", str(tmp_path), "--no-predlog"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad setting: --http-port" in err and "65535" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--batch-max-wait-ms", "nan"], {}, "--batch-max-wait-ms"),  # was ready, then every request hung
        ([], {"MOTLENS_SERVE_BATCH_MAX_WAIT_MS": "inf"}, "MOTLENS_SERVE_BATCH_MAX_WAIT_MS"),  # killed the batcher
        ([], {"MOTLENS_SERVE_DRAIN_S": "inf"}, "MOTLENS_SERVE_DRAIN_S"),  # SIGTERM never finished
        ([], {"MOTLENS_SERVE_HEADER_TIMEOUT_S": "0"}, "MOTLENS_SERVE_HEADER_TIMEOUT_S"),  # every connection closed
        (["--follow-alias", "production", "--follow-interval-s", "0"], {}, "--follow-interval-s"),  # a busy loop
        (["--max-body-bytes", "-1"], {}, "--max-body-bytes"),  # every request a 413
        (["--max-items-per-request", "0"], {}, "--max-items-per-request"),
        (["--max-text-chars", "-1"], {}, "--max-text-chars"),
        (["--backend", "bogus"], {}, "--backend"),  # these three: never ready, the reason in the log only
        (["--dtype", "bogus"], {}, "--dtype"),
        (["--device", "bogus"], {}, "--device"),
        (["--backend", "onnx", "--dtype", "float16"], {}, "--dtype: the onnx backend runs float32, fp32, int8"),
        (["--model-sha256", "0" * 63], {}, "--model-sha256"),  # a pin no bundle has: never ready
        (
            ["--model-sha256", "0" * 64, "--follow-alias", "production"],
            {},
            "bad setting: --follow-alias: model_sha256 (--model-sha256, MOTLENS_SERVE_MODEL_SHA256) pins one bundle",
        ),
        ([], {"MOTLENS_SERVE_THREADS": "100000"}, "MOTLENS_SERVE_THREADS: Input should be less than or equal to 1024"),
    ],
)
def test_settings_a_server_cannot_work_with_are_refused_at_start(capsys, tmp_path, monkeypatch, args, env, named):
    """Each of these started a server that reported ready (or retried forever) and then could not serve."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["serve", "--model", str(tmp_path), "--no-predlog", *args]) == 2
    err = capsys.readouterr().err
    assert "bad setting" in err and named in err and "Traceback" not in err, err


def test_a_refused_backend_is_the_only_problem_named(capsys):
    """`--backend foo --dtype int8` also said "--dtype: the torch backend runs …", a backend never asked for."""
    assert main(["serve", "--backend", "foo", "--dtype", "int8", "--no-predlog"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("motlens serve: bad setting: --backend: "), lines


def test_the_settings_backends_and_dtypes_are_the_loaders():
    from motlens.embedder import DTYPES
    from predictor.backend import _ONNX_VARIANTS, EMBEDDER_FACTORIES
    from predictor.settings import ONNX_DTYPES, TORCH_DTYPES, ServeSettings

    assert set(ServeSettings.model_fields["backend"].annotation.__args__) == set(EMBEDDER_FACTORIES)
    assert TORCH_DTYPES == DTYPES and set(ONNX_DTYPES) == set(_ONNX_VARIANTS)


def test_a_prediction_log_another_server_owns_is_one_line_exit_2(tiny_bundle, capsys, tmp_path, monkeypatch):
    """A second `motlens serve` on one MOTLENS_HOME said "RuntimeError: another prediction-log writer owns
    the spool … (-v for details)"."""
    from predlog import PredlogSettings
    from predlog.spool import Spool

    monkeypatch.delenv("MOTLENS_PREDLOG_DIR", raising=False)
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path))
    held = Spool(PredlogSettings().spool_dir, 1 << 20)  # the running server's
    try:
        model = str(tiny_bundle.root)
        assert main(["serve", "--model", model, "--http-port", str(_port()), "--grpc-port", str(_port())]) == 2
    finally:
        held.close()
    assert capsys.readouterr().err == (
        f"motlens serve: another motlens process (a running `motlens serve`?) owns the prediction-log spool "
        f"{tmp_path / 'predlog' / 'spool'}; stop it, or give each writer process its own MOTLENS_PREDLOG_DIR\n"
    )


def _serve_env(tmp_path) -> dict[str, str]:
    return {**os.environ, "MOTLENS_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}


def _serve_proc(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "motlens.cli", "serve", "--no-predlog", *flags],
        env=_serve_env(tmp_path), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _serve_popen(env: dict[str, str], flags: list[str]) -> subprocess.Popen:
    """A `motlens serve --no-predlog` process whose log (stderr) the test reads line by line."""
    return subprocess.Popen(
        [sys.executable, "-m", "motlens.cli", "serve", "--no-predlog", *flags],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_serve_exits_1_naming_a_rest_port_that_is_taken(tiny_bundle, tmp_path):
    """uvicorn's bind failure (it calls sys.exit) used to end the process with 3 and no line of ours."""
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = _serve_proc(
            tmp_path, "--model", str(tiny_bundle.root), "--http-port", str(port), "--grpc-port", str(_port())
        )
    assert proc.returncode == 1, proc.stderr
    assert f"REST server on :{port} failed" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_warns_about_an_unknown_variable_in_its_json_log(tiny_bundle, tmp_path, monkeypatch):
    """The warning came before `serve` switched to JSON logs: a plain line a log pipeline drops."""
    import json

    typo = "MOTLENS_SERVE_DEVICE" + "E"  # spelled apart: tests/test_envcheck.py checks the names the repo uses
    monkeypatch.setenv("MOTLENS_SERVE_JSON_LOGS", "true")
    monkeypatch.setenv(typo, "cpu")
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = _serve_proc(
            tmp_path, "--model", str(tiny_bundle.root), "--http-port", str(port), "--grpc-port", str(_port())
        )
    lines = [line for line in proc.stderr.splitlines() if typo in line]
    assert len(lines) == 1, proc.stderr
    record = json.loads(lines[0])
    assert record["level"].lower() == "warning" and "did you mean MOTLENS_SERVE_DEVICE?" in record["message"]


def test_serve_names_an_unknown_variable_when_it_refuses_to_start(tmp_path, monkeypatch):
    """A misspelt setting is the likeliest reason for a refusal at start: its hint comes before it."""
    typo = "MOTLENS_" + "SERVE_MODLE"  # spelled apart: tests/test_envcheck.py checks the names the repo uses
    monkeypatch.setenv(typo, str(tmp_path))
    proc = _serve_proc(tmp_path, "--model", str(tmp_path / "nonexistent"))
    assert proc.returncode == 2, proc.stderr
    assert f"{typo} is set but no motlens setting reads it (did you mean MOTLENS_SERVE_MODEL?)" in proc.stderr
    assert proc.stderr.index(typo) < proc.stderr.index("bad setting")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread reports it too
def test_a_server_whose_port_is_taken_stops_with_the_reason(tmp_path):
    """serve() waited only for a stop request: a REST server that could not listen went unnoticed."""
    from conftest import free_port

    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        settings = ServeSettings(model=str(tmp_path / "missing"), http_port=port, grpc_port=free_port())
        server = PredictorServer(settings, host="127.0.0.1")
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=rf"REST server on :{port} failed: .*in use"):
            asyncio.run(asyncio.wait_for(server.serve(), 30))
        settings = ServeSettings(model=str(tmp_path / "missing"), http_port=port, grpc_port=free_port())
        thread = ServerThread(PredictorServer(settings, host="127.0.0.1")).start()
        with pytest.raises(RuntimeError, match=rf"REST server on :{port} failed"):
            thread.wait_ready(timeout=30)
        thread.stop()
    assert time.monotonic() - started < 20


def test_a_server_whose_grpc_port_is_taken_stops_with_the_reason(tmp_path):
    """gRPC binds with SO_REUSEPORT by default: a second server on a taken gRPC port started silently
    and the two split the traffic."""
    from concurrent import futures

    from conftest import free_port
    from grpc import aio

    from predictor.server import PredictorServer, ServerFailed
    from predictor.settings import ServeSettings

    async def main() -> None:
        held = aio.server(futures.ThreadPoolExecutor(1))  # another server with gRPC's default options
        port = held.add_insecure_port("[::]:0")
        await held.start()
        try:
            settings = ServeSettings(model=str(tmp_path / "missing"), http_port=free_port(), grpc_port=port)
            with pytest.raises(ServerFailed, match=rf"gRPC server on :{port} failed"):
                await asyncio.wait_for(PredictorServer(settings, host="127.0.0.1").serve(), 30)
        finally:
            await held.stop(0)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "models:/mot-defects@"], "--model: cannot read model reference 'models:/mot-defects@'"),
        (["--model", "models:/other@production"], "--model: model reference 'models:/other@production' names 'other'"),
        (["--model", "{tmp}/nope"], "--model: model path {tmp}/nope does not exist"),
        (["--model", "{bundle}", "--canary", "models:/mot-defects/x"], "--canary: cannot read model reference"),
        (["--model", "{bundle}", "--follow-alias", "production/3"], "--follow-alias: cannot read model reference"),
        (["MOTLENS_SERVE_MODEL={tmp}/nope"], "MOTLENS_SERVE_MODEL: model path {tmp}/nope does not exist"),
        (
            ["--model", "{bundle}", "MOTLENS_SERVE_FOLLOW_ALIAS=bad alias"],
            "MOTLENS_SERVE_FOLLOW_ALIAS: invalid alias 'bad alias'",
        ),
        (["--model", "{bundle}", "--canary", "models:/mot-defects@@"], "--canary: invalid alias '@'"),
        (
            ["--model", "{bundle}", "--device", "cpu", "--dtype", "float16"],
            "--dtype: float16 is not native on this CPU",
        ),
        (
            ["--model", "{bundle}", "MOTLENS_SERVE_DEVICE=cuda:64"],
            "MOTLENS_SERVE_DEVICE: cuda:64 asked for, but torch sees",
        ),
        (
            ["--model", "{bundle}", "MOTLENS_SERVE_CANARY=models:/x/1"],
            "MOTLENS_SERVE_CANARY: model reference 'models:/x/1'",
        ),
        (["--model", "{tmp}"], "--model: {tmp}: no bundle.json found (not a motlens bundle)"),
        (["--model", "models:/mot-defects/0"], "--model: version 0 of registered model 'mot-defects' does not exist"),
        (["--model", "models:/mot-defects/1", "MLFLOW_TRACKING_URI=file://{tmp}/mlruns"], "--model: registry file://"),
        (
            ["--model", "models:/mot-defects@production", "MLFLOW_TRACKING_URI=bogus://u:pw@h"],
            "--model: registry bogus://h: no MLflow registry store serves this URI scheme",
        ),
        (["--model", "{bundle}", "--model-sha256", "0" * 64], "--model: {bundle}: bundle.json has sha256"),
        (["--model", "{bundle}", "--backend", "onnx", "--dtype", "int8"], "--model: {bundle}: no int8 ONNX model"),
        (["--model", "{bundle}", "--backend", "onnx", "--device", "cuda"], "--device: the onnx backend runs on cpu"),
    ],
)
def test_a_model_reference_that_can_never_load_is_refused_at_start(tiny_bundle, tmp_path, monkeypatch, flags, message):
    """Such a reference was retried every second for ever: never ready, and exit 0 on SIGINT. The line
    names the flag or variable that set it (README "bad setting")."""
    places = {"tmp": tmp_path, "bundle": tiny_bundle.root}
    flags = [f.format(**places) for f in flags]
    for assignment in [f for f in flags if "=" in f]:
        monkeypatch.setenv(*assignment.split("=", 1))
    flags = [f for f in flags if "=" not in f]
    proc = _serve_proc(tmp_path, *flags, "--http-port", str(_port()), "--grpc-port", str(_port()))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"motlens serve: bad setting: {message.format(**places)}"), proc.stderr
    assert proc.stderr.count("\n") == 1 and "serving" not in proc.stderr


@pytest.mark.parametrize(
    ("model", "storage_uri", "problem"),
    [
        ("", None, "model: no model given and {mount} does not exist (STORAGE_URI is unset;"),
        ("", "s3://bucket/1/abc/artifacts/model", "model: no model given and {mount} does not exist (STORAGE_URI="),
        ("{mount}", "s3://bucket/1/abc/artifacts/model", "model: model path {mount} does not exist"),
        ("", "oci://registry.example/mot-defects:7", None),  # a modelcar sidecar may link the mount later
        ("{mount}", "oci://registry.example/mot-defects:7", None),
    ],
)
def test_an_empty_model_without_kserves_mount_can_never_load(
    tiny_bundle, tmp_path, monkeypatch, model, storage_uri, problem
):
    """KServe's storage initializer is an init container: /mnt/models is filled before the predictor
    starts, or never. `--model ""` without it was retried for ever (live, never ready); a mount without
    one bundle likewise."""
    import predictor.backend
    from predictor.cli import _unloadable_ref
    from predictor.settings import ServeSettings

    mount = tmp_path / "mnt" / "models"
    monkeypatch.setattr(predictor.backend, "KSERVE_MOUNT", mount)
    monkeypatch.delenv("STORAGE_URI", raising=False)
    if storage_uri is not None:
        monkeypatch.setenv("STORAGE_URI", storage_uri)
    found = _unloadable_ref(ServeSettings(model=model.format(mount=mount)))
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem.format(mount=mount)), found
    mount.mkdir(parents=True)
    found = _unloadable_ref(ServeSettings(model=model.format(mount=mount)))
    if problem is None:
        assert found is None
    else:
        assert found == f"model: {mount}: no bundle.json found (not a motlens bundle)"
    shutil.copytree(tiny_bundle.root, mount / "model", copy_function=os.link)  # one level down, as KServe unpacks
    assert _unloadable_ref(ServeSettings(model=model.format(mount=mount))) is None


def test_a_home_the_local_registry_cannot_open_is_named_by_its_variable(tmp_path, monkeypatch):
    """A models:/ reference needs the local registry, whose sqlite:/// URI cannot carry a home holding '?':
    the line blamed --model (`bad setting: model: MOTLENS_HOME …`)."""
    from predictor.cli import _unloadable_ref
    from predictor.settings import ServeSettings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path / "a?b"))
    found = _unloadable_ref(ServeSettings(model="models:/mot-defects@production"), {"model"})
    assert found is not None and found.startswith(f"MOTLENS_HOME: {tmp_path}/a?b holds '?'"), found


@pytest.mark.skipif(Path("/mnt/models").exists(), reason="this machine has a /mnt/models")
def test_serve_with_an_empty_model_and_no_mount_exits_2(tmp_path):
    env = {k: v for k, v in _serve_env(tmp_path).items() if k != "STORAGE_URI"}
    proc = subprocess.run(
        [sys.executable, "-m", "motlens.cli", "serve", "--no-predlog", "--model", "",
         "--http-port", str(_port()), "--grpc-port", str(_port())],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(
        "motlens serve: bad setting: --model: no model given and /mnt/models does not exist (STORAGE_URI is unset;"
    ), proc.stderr
    assert proc.stderr.count("\n") == 1


def test_a_registry_that_is_down_is_still_retried(tmp_path):
    """Only a reference that can never load is refused: an unreachable registry may come back."""
    env = {**_serve_env(tmp_path), "MLFLOW_TRACKING_URI": "http://127.0.0.1:1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    flags = ["--model", "models:/mot-defects@production", "--http-port", str(_port()), "--grpc-port", str(_port())]
    proc = _serve_popen(env, flags)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the load is retried (and logged) until the registry answers
            if "cannot fetch models:/mot-defects@production" in line:
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_serve_following_an_alias_becomes_ready_in_a_fresh_process(registry, tiny_bundle, tmp_path):
    """The alias follower and the loader imported MLflow at once in two threads of a fresh process:
    the import deadlocked, left `mlflow` half-initialised, and every retry failed (never ready)."""
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")
    http = _port()
    env = {**_serve_env(registry.state.home), "MLFLOW_TRACKING_URI": registry.tracking_uri}
    flags = ["--follow-alias", "production", "--http-port", str(http), "--grpc-port", str(_port())]
    proc = _serve_popen(env, flags)
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:  # until the server says it serves, or reports a failed load
            lines.append(line)
            if "cannot fetch" in line or "cannot resolve alias" in line or "Traceback" in line:
                break
            if "model ready" in line:
                break
        ready = httpx.get(f"http://127.0.0.1:{http}/motlens/ready", timeout=10)
        assert ready.status_code == 200, ("".join(lines), ready.text)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
