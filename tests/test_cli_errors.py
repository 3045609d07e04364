"""Operator-facing failures of the real ``motlens`` CLI: one line naming the problem, exit 2, no
traceback (unless -v), no credentials; each verb keeps its own documented codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import free_port

from motlens.cli import main

SECRET = "s3cr3tPW"
REFUSED = "http://bob@127.0.0.1:1/db"  # nothing listens on port 1: connection refused at once
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    for k in list(os.environ):
        if k.startswith(("MOTLENS_", "MLFLOW_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _fails(argv: list[str], capsys, lines: int = 1) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and SECRET not in err
    assert len(err.splitlines()) == lines, err
    return err


@pytest.mark.parametrize(
    ("env", "value", "argv", "expected"),
    [
        ("MOTLENS_CLICKHOUSE_URL", f"http://bob:{SECRET}@localhost:8123/db", ["log", "count"],
         "motlens log count: bad setting: MOTLENS_CLICKHOUSE_URL: put the ClickHouse password in "
         "MOTLENS_CLICKHOUSE_PASSWORD"),
        ("MOTLENS_PREDLOG_BATCH_ROWS", "garbage", ["log", "count"],
         "motlens log count: bad setting: MOTLENS_PREDLOG_BATCH_ROWS: Input should be a valid integer"),
        ("MOTLENS_CLICKHOUSE_URL", REFUSED, ["log", "count"],
         "motlens log count: cannot reach ClickHouse at http://127.0.0.1:1: [Errno 111] Connection refused"),
        ("MOTLENS_SERVE_HTTP_PORT", "garbage", ["serve", "--no-predlog"],
         "motlens serve: bad setting: MOTLENS_SERVE_HTTP_PORT: Input should be a valid integer"),
        ("MOTLENS_CLICKHOUSE_URL", f"http://bob:{SECRET}@localhost:8123/db", ["data", "load", "{tmp}", "--clickhouse"],
         "motlens data load: bad setting: MOTLENS_CLICKHOUSE_URL: put the ClickHouse password in "
         "MOTLENS_CLICKHOUSE_PASSWORD"),
        ("MOTLENS_CLICKHOUSE_URL", REFUSED, ["data", "load", "{tmp}", "--clickhouse"],
         "motlens data load: cannot reach ClickHouse at http://127.0.0.1:1: [Errno 111] Connection refused"),
        ("MLFLOW_TRACKING_URI", f"mysql://u:{SECRET}@127.0.0.1:1/db", ["train", "versions"],
         "motlens train versions: ModuleNotFoundError: No module named 'MySQLdb' (-v for details)"),
    ],
)  # fmt: skip
def test_bad_configuration_is_one_line_and_exit_2(env, value, argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(env, value)
    err = _fails([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert err.startswith(expected), err


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MOTLENS_CLICKHOUSE_URL": "http://u@127.0.0.1:1/motlens", "MOTLENS_PREDLOG_DATABASE": "other"},
         "motlens log count: bad setting: MOTLENS_PREDLOG_DATABASE: 'other' disagrees with the database 'motlens' in "
         "MOTLENS_CLICKHOUSE_URL; set one of them\n"),
        ({"MOTLENS_PREDLOG_CLICKHOUSE_URL": "http://u@127.0.0.1:1/motlens", "MOTLENS_PREDLOG_DATABASE": "other"},
         "motlens log count: bad setting: MOTLENS_PREDLOG_DATABASE: 'other' disagrees with the database 'motlens' in "
         "MOTLENS_PREDLOG_CLICKHOUSE_URL; set one of them\n"),
        ({"MOTLENS_CLICKHOUSE_URL": "http://u@127.0.0.1:1/a-b"},
         "motlens log count: bad setting: MOTLENS_CLICKHOUSE_URL: the URL's database 'a-b' is not a plain "
         "identifier\n"),
    ],
)  # fmt: skip
def test_a_database_setting_problem_names_its_variables(env, expected, monkeypatch, capsys):
    """README: each problem line names the variable set (these once said only "database 'other' …")."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _fails(["log", "count"], capsys) == expected


def test_one_line_per_settings_problem(monkeypatch, capsys):
    monkeypatch.setenv("MOTLENS_PREDLOG_BATCH_ROWS", "garbage")
    monkeypatch.setenv("MOTLENS_PREDLOG_QUEUE_ROWS", "0")
    err = _fails(["log", "count"], capsys, lines=2)
    assert "MOTLENS_PREDLOG_QUEUE_ROWS: Input should be greater than or equal to 1" in err


def test_whole_stderr_is_one_line_and_verbose_shows_the_traceback(tmp_path):
    """As a process: the client libraries' retry warnings do not precede the line; -v adds the traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOTLENS_", "MLFLOW_"))}
    env.update(MOTLENS_HOME=str(tmp_path), MOTLENS_CLICKHOUSE_URL=REFUSED, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "motlens.cli"]
    quiet = subprocess.run([*cmd, "log", "count"], env=env, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2
    assert quiet.stderr.splitlines() == [
        "motlens log count: cannot reach ClickHouse at http://127.0.0.1:1: [Errno 111] Connection refused "
        "(-v for details)"
    ]
    loud = subprocess.run([*cmd, "-v", "log", "count"], env=env, capture_output=True, text=True, timeout=120)
    assert loud.returncode == 2 and "Traceback" in loud.stderr


def test_verbose_logs_keep_url_credentials_out(tmp_path):
    """`-v drift` logged the traceback of a registry error quoting MLFLOW_TRACKING_URI, password and all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOTLENS_", "MLFLOW_"))}
    env.update(MOTLENS_HOME=str(tmp_path), PYTHONPATH=str(REPO),
               MLFLOW_TRACKING_URI="http://bob:SECRET-XYZZY@127.0.0.1:1")  # fmt: skip
    cmd = [sys.executable, "-m", "motlens.cli", "-v", "drift", "--no-html", "--output", str(tmp_path / "out")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    both = run.stdout + run.stderr
    assert run.returncode == 2 and "Traceback" in run.stderr and "http://127.0.0.1:1" in both, both[-2000:]
    assert "SECRET-XYZZY" not in both and "bob:" not in both


def test_json_log_lines_keep_url_credentials_out():
    import logging

    from predictor.logs import JsonFormatter

    try:
        raise RuntimeError("GET https://alice:pa/ss@ch:8443/db failed")
    except RuntimeError:
        info = sys.exc_info()
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "to %s", ("http://u:pw@mlflow:5000",), info)
    doc = json.loads(JsonFormatter().format(record))
    assert doc["message"] == "to http://mlflow:5000" and "https://ch:8443/db failed" in doc["exception"]
    assert "pw" not in json.dumps(doc) and "pa/ss" not in json.dumps(doc)


def test_log_lines_carry_utc_times(tmp_path):
    """The text log's times had no zone (the host's local time) beside UTC everywhere else (prediction
    rows, promotion events, tags): an SRE lining them up was off by the host's offset."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOTLENS_", "MLFLOW_"))}
    env.update(MOTLENS_HOME=str(tmp_path), MOTLENS_NO_SUCH_SETTING="1", PYTHONPATH=str(REPO), TZ="America/New_York")
    run = subprocess.run(
        [sys.executable, "-m", "motlens.cli", "log", "count"], env=env, capture_output=True, text=True, timeout=120
    )
    [line] = [ln for ln in run.stderr.splitlines() if "MOTLENS_NO_SUCH_SETTING" in ln]
    stamp = line.split(" ", 1)[0]
    assert stamp.endswith("Z"), line
    logged = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - logged).total_seconds()) < 120


def test_train_clickhouse_without_loaded_data_neither_fails_badly_nor_creates_the_path(tmp_path, home, capsys):
    missing = tmp_path / "nonexistent" / "x"
    err = _fails(["train", "--clickhouse", "--ch-path", str(missing)], capsys)
    assert err == f"motlens train: no ClickHouse training data at {missing}: run motlens data load --clickhouse first\n"
    assert not (tmp_path / "nonexistent").exists()
    err = _fails(["train", "--clickhouse"], capsys)  # the default $MOTLENS_HOME/chdb-data
    assert f"no ClickHouse training data at {home / 'chdb-data'}" in err and not home.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _fails(["train", "--clickhouse", "--ch-path", str(empty)], capsys)
    assert f"no ClickHouse training data at {empty} (database motlens_data)" in err


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT nosuchcol FROM predictions", "Unknown expression identifier `nosuchcol` (UNKNOWN_IDENTIFIER)"),
        ("SELECT {v:String}", "Substitution `v` is not set (UNKNOWN_QUERY_PARAMETER)"),
    ],
)
def test_log_query_refused_by_clickhouse_is_its_message_and_exit_2(sql, expected, capsys):
    err = _fails(["log", "query", sql], capsys)
    assert err == f"motlens log query: ClickHouse: {expected}\n"


@pytest.mark.parametrize(("rows", "expected"), [("-5", "must be 1 or more, got -5"), ("0", "must be 1 or more, got 0"),
                                                ("abc", "expected a whole number (1 or more), got 'abc'")])  # fmt: skip
def test_demo_rows_must_be_positive(rows, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--rows", rows])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --rows: {expected}" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["demo"], ["data", "synth", "--rows", "10", "--out"]])
def test_seeds_must_not_be_negative(argv, tmp_path, capsys):
    """A negative seed was numpy's 'expected non-negative integer', after creating the output directory."""
    if argv[-1] == "--out":
        argv = [*argv, str(tmp_path / "unused")]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--seed", "-1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --seed: must be 0 or more, got -1" in err and "Traceback" not in err
    assert not (tmp_path / "unused").exists()


def test_a_reserved_alias_says_it_is_reserved():
    from training.registry import RegistryError, check_alias

    for alias in ("latest", "LATEST", "v3", "V3"):  # MLflow compares case-insensitively
        with pytest.raises(RegistryError, match="MLflow reserves 'latest' and v<number>"):
            check_alias(alias)
    with pytest.raises(RegistryError, match="starting with a letter"):
        check_alias("3v")


@pytest.mark.parametrize(("port", "expected"), [("0", "must be 1 or more, got 0"),
                                               ("70000", "must be 65535 or less, got 70000")])  # fmt: skip
def test_demo_ports_must_be_ports(port, expected, capsys):
    """Port 0 or 70000 failed only when serving, after training and moving `production`."""
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--http-port", port])
    assert exc.value.code == 2
    assert f"argument --http-port: {expected}" in capsys.readouterr().err


def test_demo_training_data_error_is_one_line(capsys):
    ports = ["--http-port", str(free_port()), "--grpc-port", str(free_port())]  # 8080 may be taken here
    assert main(["demo", "--rows", "1", *ports]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "motlens demo: 1 distinct texts are too few for a train/held-out split"
    assert "Traceback" not in err


@pytest.mark.parametrize(("module", "extra"), [("kserve", "serve"), ("sklearn", "train")])
def test_demo_without_an_extra_refuses_before_doing_any_work(module, extra, home, monkeypatch, capsys):
    """Without the serve extra the demo synthesised, trained and registered (~39 s), then failed on
    ``import httpx``."""
    monkeypatch.setitem(sys.modules, module, None)  # not installed
    assert main(["demo", "--rows", "1"]) == 2
    assert capsys.readouterr().err == f"motlens: {module} is not installed: pip install 'motlens[{extra}]'\n"
    assert not home.exists()  # no state directory, no data, no registry


def test_help_says_what_motlens_is_for(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "embeddings and defect predictions" in out and "console script" not in out


def test_log_root_that_is_a_file_is_an_error_a_missing_one_an_empty_log(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0\n")
    monkeypatch.setenv("MOTLENS_HOME", str(a_file))
    err = _fails(["log", "count"], capsys)
    assert f"{a_file} is not a directory" in err
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path / "missing"))
    assert main(["log", "count"]) == 0
    assert "0 row(s)" in capsys.readouterr().out
    assert not (tmp_path / "missing").exists()


def test_drift_checks_its_settings_before_importing_evidently(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOTLENS_", "MLFLOW_"))}
    env.update(MOTLENS_HOME=str(tmp_path), PYTHONPATH=str(REPO))
    code = "import sys; from motlens.cli import main; rc = main(['drift', '--window', 'garbage']); "
    code += "print(rc, 'evidently' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stderr
    assert proc.stderr.startswith("motlens drift: bad setting: --window: not a duration")


def test_drift_reports_a_predlog_settings_problem_on_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOTLENS_PREDLOG_BATCH_ROWS", "garbage")
    rc = main(["drift", "--no-html", "--no-progress", "--no-artifact", "--output", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("motlens drift: bad setting: MOTLENS_PREDLOG_BATCH_ROWS: Input should be a valid integer")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()  # refused before the job, not a verdict error


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["data", "synth", "--rows", "5", "--out", ""], "--out"),
        (["data", "load", ""], "PATH"),
        (["data", "load", "x", "--out", ""], "--out"),
        (["data", "load", "x", "--clickhouse", "--ch-path", ""], "--ch-path"),
        (["data", "load", "x", "--out", "y", "--tmp-dir", ""], "--tmp-dir"),
        (["data", "load", "x", "--out", "y", "--report", ""], "--report"),
        (["log", "replay", "--under", ""], "--under"),
        (["log", "replay", ""], "DIR"),
        (["train", "--clickhouse", "--ch-path", ""], "--ch-path"),
        (["train", "versions", "--tracking-uri", ""], "--tracking-uri"),
        (["train", "--tracking-uri", "", "pin", "1"], "--tracking-uri"),
    ],
)
def test_an_empty_flag_is_refused_not_read_as_the_working_directory(argv, flag, tmp_path, monkeypatch, capsys):
    """`data synth --out ""` wrote its files into the working directory; `--tracking-uri ""` meant the default."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"argument {flag}: an empty " in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["data", "synth", "--rows", "abc", "--out", "x"],
         "argument --rows: expected a whole number (0 or more), got 'abc'"),
        (["data", "load", "x", "--out", "y", "--chunk-rows", "abc"],
         "argument --chunk-rows: expected a whole number (1 or more), got 'abc'"),
    ],
)  # fmt: skip
def test_argparse_errors_name_no_internal_function(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "_count" not in err and "_positive" not in err


def test_mlflow_download_bar_is_off_when_stderr_is_no_terminal(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "unset")
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    main(["log", "count"])  # any verb; stderr is captured here, as in a pod's log
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")  # the operator's choice stands
    main(["log", "count"])
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "true"


@pytest.mark.parametrize(
    ("env", "argv", "want"),
    [
        ({"MOTLENS_DRIFT_WINDOW": "abc", "MOTLENS_DRIFT_MIN_ROWS": "-3"}, ["drift"],
         ["motlens drift: bad setting: MOTLENS_DRIFT_WINDOW: not a duration",
          "motlens drift: bad setting: MOTLENS_DRIFT_MIN_ROWS: Input should be greater than or equal to 2"]),
        ({"MOTLENS_DRIFT_WINDOW": "abc"}, ["drift", "--window", "1h", "--min-rows", "-3"],
         ["motlens drift: bad setting: --min-rows: Input should be greater than or equal to 2"]),
        ({"MOTLENS_SERVE_GRPC_PORT": "abc"}, ["serve", "--no-predlog", "--http-port", "99999"],
         ["motlens serve: bad setting: --http-port: Input should be less than or equal to 65535",
          "motlens serve: bad setting: MOTLENS_SERVE_GRPC_PORT: Input should be a valid integer"]),
        ({"MOTLENS_TRAIN_EPOCHS": "0"}, ["train", "--data", ".", "--lr", "-1"],
         ["motlens train: bad setting: MOTLENS_TRAIN_EPOCHS: Input should be greater than or equal to 1",
          "motlens train: bad setting: --lr: Input should be greater than 0"]),
        ({}, ["train", "--clickhouse", "--max-rows", "5"],
         ["motlens train: bad setting: --max-rows: counts input rows, which --clickhouse does not read"]),
        ({"motlens_train_max_rows": "5"}, ["train", "--clickhouse"],
         ["motlens train: bad setting: motlens_train_max_rows: counts input rows, which --clickhouse does not"]),
    ],
)  # fmt: skip
def test_each_settings_problem_on_its_own_line_named_by_its_flag_or_variable(env, argv, want, monkeypatch, capsys):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "bad setting" in line]
    assert len(err) == len(want), err
    for line, start in zip(sorted(err), sorted(want), strict=True):
        assert line.startswith(start), (line, start)


def test_mlflow_prints_no_run_url_to_stdout(monkeypatch, capsys):
    """Against a tracking server MLflow wrote each run's URL (credentials included) to stdout, where
    ``train --json`` writes its document."""
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    main(["log", "count"])  # any verb
    capsys.readouterr()
    # a closed port: had it not returned at once, the run lookup behind the URL would fail
    TrackingServiceClient("http://user:s3cret@127.0.0.1:9")._log_url("0" * 32)
    assert capsys.readouterr().out == ""


def test_mlflow_telemetry_is_off_unless_asked_for(monkeypatch, tmp_path):
    """The units and the image turned MLflow's telemetry off, a command run by hand (``train``, the
    documented ``systemd-run … promote``) did not: it wrote an installation id under the home."""
    from mlflow.telemetry.utils import is_telemetry_disabled

    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    main(["log", "count"])  # any verb
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true" and is_telemetry_disabled()
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    main(["log", "count"])
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"
