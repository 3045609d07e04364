"""Values every settings class refuses or reads as unset: non-finite numbers, waits beyond their bound,
thresholds outside their range, empty paths, a database name that is no identifier."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from annotated_types import Le, Lt
from pydantic import ValidationError

from drift.settings import DriftSettings
from motlens.errors import validation_problems
from motlens.state import StateSettings
from predictor.settings import ServeSettings
from predlog.settings import PredlogSettings
from promotion.settings import PromoteSettings
from training.chload import DataSettings
from training.train import TrainSettings

CLASSES = (StateSettings, ServeSettings, PredlogSettings, DriftSettings, PromoteSettings, TrainSettings, DataSettings)
WEEK_S = 7 * 86_400


@pytest.fixture(autouse=True)
def _no_motlens_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MOTLENS_"):
            monkeypatch.delenv(name)


def _env(cls, field: str) -> str:
    return cls.model_config["env_prefix"] + field.upper()


def _fields(kind):
    return [
        pytest.param(cls, name, id=f"{cls.__name__}.{name}")
        for cls in CLASSES
        for name, info in cls.model_fields.items()
        if kind(name, info)
    ]


def _problems(cls, **env: str) -> list[str]:
    """The CLI's one line per problem (``NAME: message``) for ``cls`` built from ``env``."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        with pytest.raises(ValidationError) as e:
            cls()
        return validation_problems(e.value)  # names the variables that are set


@pytest.mark.parametrize(("cls", "field"), _fields(lambda _, info: "float" in str(info.annotation)))
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
def test_no_float_setting_takes_a_non_finite_value(cls, field, value):
    """An infinite flush interval killed the prediction-log writer; an infinite threshold turned a check off."""
    var = _env(cls, field)
    assert _problems(cls, **{var: value}) == [f"{var}: Input should be a finite number"]


def _is_wait(name: str, _info) -> bool:
    return name.endswith(("_s", "_ms", "_seconds"))


@pytest.mark.parametrize(("cls", "field"), _fields(_is_wait))
def test_every_wait_has_a_bound_threading_can_wait_for(cls, field):
    """``Condition.wait``, ``Event.wait``, ``Timer`` and socket timeouts raise OverflowError near
    ``threading.TIMEOUT_MAX``: every duration is bounded far below it (at most a week)."""
    bounds = [m.le if isinstance(m, Le) else m.lt for m in cls.model_fields[field].metadata if isinstance(m, Le | Lt)]
    scale = 1000 if field.endswith("_ms") else 1
    assert bounds and max(bounds) <= WEEK_S * scale < threading.TIMEOUT_MAX
    var, huge = _env(cls, field), "1e300" if "float" in str(cls.model_fields[field].annotation) else str(10**30)
    (problem,) = _problems(cls, **{var: huge})
    assert problem.startswith(f"{var}: Input should be less than")


@pytest.mark.parametrize(
    ("cls", "env", "words"),
    [
        (PredlogSettings, {"MOTLENS_PREDLOG_FLUSH_INTERVAL_S": "1e10"}, "less than or equal to 3600"),
        (PromoteSettings, {"MOTLENS_PROMOTE_READ_TIMEOUT_S": "1e300"}, "less than or equal to 3600"),
        (PromoteSettings, {"MOTLENS_PROMOTE_MIN_STEP_INTERVAL_S": "1e9"}, "less than or equal to 604800"),
        (PromoteSettings, {"MOTLENS_PROMOTE_CLOCK_SKEW_S": "1e9"}, "less than or equal to 86400"),
        (PromoteSettings, {"MOTLENS_PROMOTE_MAX_P99_RATIO": "1e300"}, "less than or equal to 100"),
        (PromoteSettings, {"MOTLENS_PROMOTE_OFFLINE_TOLERANCE": "1"}, "less than 1"),
        (PromoteSettings, {"MOTLENS_PROMOTE_FLOOR_MARGIN": "1.5"}, "less than or equal to 1"),
        (TrainSettings, {"MOTLENS_TRAIN_FLOOR_MARGIN": "1.5"}, "less than or equal to 1"),
        (DriftSettings, {"MOTLENS_DRIFT_COLUMN_THRESHOLD": "0"}, "greater than 0"),
        (DriftSettings, {"MOTLENS_DRIFT_EMBEDDING_THRESHOLD": "-0.1"}, "greater than or equal to 0"),
        (DriftSettings, {"MOTLENS_DRIFT_EMBEDDING_THRESHOLD": "1"}, "the model method's ROC AUC never exceeds 1"),
        (
            DriftSettings,
            {"MOTLENS_DRIFT_EMBEDDING_METHOD": "ratio", "MOTLENS_DRIFT_EMBEDDING_THRESHOLD": "1.5"},
            "the ratio method's share of drifted components never exceeds 1",
        ),
    ],
)
def test_a_gate_or_check_that_could_never_fire_is_refused(cls, env, words):
    (var,) = [k for k in env if k.endswith(("THRESHOLD", "_S", "RATIO", "TOLERANCE", "MARGIN"))]
    (problem,) = _problems(cls, **env)
    assert problem.startswith(f"{var}: ") and words in problem, problem


@pytest.mark.parametrize(("method", "value"), [("mmd", "1.5"), ("distance", "3"), ("model", "0.9"), ("ratio", "0")])
def test_embedding_thresholds_within_their_methods_scale_are_taken(monkeypatch, method, value):
    monkeypatch.setenv("MOTLENS_DRIFT_EMBEDDING_METHOD", method)
    monkeypatch.setenv("MOTLENS_DRIFT_EMBEDDING_THRESHOLD", value)
    assert DriftSettings().embedding_threshold == float(value)


def test_the_defaults_are_within_the_new_bounds():
    for cls in CLASSES:
        cls()
    assert PromoteSettings(min_step_interval_s=WEEK_S, max_p99_ratio=100, offline_tolerance=0.5).dwell_s > 0


@pytest.mark.parametrize(
    ("var", "read"),
    [
        ("MOTLENS_PREDLOG_DIR", lambda: PredlogSettings().root == StateSettings().predlog_dir),
        ("MOTLENS_DRIFT_OUTPUT", lambda: DriftSettings().output == Path("drift-report")),
        ("MOTLENS_DRIFT_TEXTFILE", lambda: DriftSettings().textfile is None),
        ("MOTLENS_PROMOTE_TEXTFILE", lambda: PromoteSettings().textfile is None),
        ("MOTLENS_PROMOTE_MANIFESTS_DIR", lambda: PromoteSettings().manifests_dir == Path("manifests")),
        ("MOTLENS_TRAIN_WORK_DIR", lambda: TrainSettings().work_dir is None),
        ("MOTLENS_TRAIN_MODEL_DIR", lambda: TrainSettings().model_dir is None),
        ("MOTLENS_DATA_CHDB_PATH", lambda: DataSettings().chdb_dir() == StateSettings().home / "chdb-data"),
        ("MOTLENS_DATA_DATABASE", lambda: DataSettings().database == "motlens_data"),
        ("MOTLENS_PREDLOG_DATABASE", lambda: PredlogSettings().database == "default"),
    ],
)
def test_an_empty_path_is_unset_not_the_working_directory(monkeypatch, var, read):
    monkeypatch.setenv(var, "")
    assert read()


def test_empty_values_that_mean_something_keep_their_meaning(monkeypatch):
    """``MOTLENS_SERVE_MODEL=`` is KServe's /mnt/models, ``MOTLENS_SERVE_MODEL_SHA256=`` no pin, an empty
    gate metric list is refused, and an empty training alias is refused at start, never read as ``candidate``."""
    monkeypatch.setenv("MOTLENS_SERVE_MODEL", "")
    monkeypatch.setenv("MOTLENS_SERVE_MODEL_SHA256", "")
    assert ServeSettings().model == "" and ServeSettings().model_sha256 is None
    (problem,) = _problems(TrainSettings, MOTLENS_TRAIN_ALIAS="")
    assert problem.startswith("MOTLENS_TRAIN_ALIAS: invalid alias '': letters, digits"), problem
    assert _problems(PromoteSettings, MOTLENS_PROMOTE_OFFLINE_METRICS="")[0].startswith(
        "MOTLENS_PROMOTE_OFFLINE_METRICS: name at least one of"
    )


@pytest.mark.parametrize("name", ["bad-name", "1st", "db;drop", "a" * 65])
def test_the_data_database_is_a_plain_identifier_named_by_its_variable(name):
    (problem,) = _problems(DataSettings, MOTLENS_DATA_DATABASE=name)
    assert problem.startswith("MOTLENS_DATA_DATABASE: not a plain ClickHouse identifier"), problem
    assert DataSettings(database="motlens_2026").database == "motlens_2026"


@pytest.mark.parametrize(("cls", "var"), [(ServeSettings, "MOTLENS_SERVE_ADMIN_TOKEN"),
                                          (PromoteSettings, "MOTLENS_PROMOTE_LOCAL_TOKEN")])  # fmt: skip
def test_a_token_from_a_file_with_its_newline_is_stripped_and_one_no_header_carries_is_refused(cls, var, monkeypatch):
    """A Secret made from a file keeps its newline: the server's token never matched any request (every
    admin call 401), and the client's made http.client quote it whole in its error."""
    monkeypatch.setenv(var, "abcdefghijklmnopqrstu\n")
    field = "admin_token" if cls is ServeSettings else "local_token"
    assert getattr(cls(), field).get_secret_value() == "abcdefghijklmnopqrstu"
    (problem,) = _problems(cls, **{var: "abcdefghij\nklmnopqrstu"})
    assert problem.startswith(f"{var}: ") and "control character" in problem and "klmno" not in problem


@pytest.mark.parametrize(("cls", "var"), [(DriftSettings, "MOTLENS_DRIFT_PUSHGATEWAY"),
                                          (PromoteSettings, "MOTLENS_PROMOTE_PUSHGATEWAY_URL")])  # fmt: skip
@pytest.mark.parametrize("url", ["http://pguser:pgS3cret@pushgw.example", "http://tok@pushgw:9091", "http://pg:9091/?token=x"])
def test_credentials_in_a_pushgateway_url_are_refused_unechoed(cls, var, url):
    """urllib reads ``user:password@host`` without a port as a bad port and quotes it: the password went
    to the log, the drift summary, its MLflow artifact and the drift_reports row."""
    (problem,) = _problems(cls, **{var: url})
    assert problem.startswith(f"{var}: credentials in the Pushgateway URL are refused"), problem
    assert "S3cret" not in problem and "tok@" not in problem


def test_an_empty_flag_is_the_fields_own_not_the_default(monkeypatch):
    """Only an empty *variable* is unset: ``--local-url ""`` (a script's unset $X) once became the default
    server, ignoring the variable that named another, and ``--overlay ""`` the default overlay."""
    monkeypatch.setenv("MOTLENS_PROMOTE_LOCAL_URL", "http://10.0.0.5:8080")
    with pytest.raises(ValidationError, match="http:// or https://"):
        PromoteSettings(local_url="")
    assert PromoteSettings(overlay="").overlay == ""  # refused where it is used (no kustomization there)
    monkeypatch.setenv("MOTLENS_PROMOTE_LOCAL_URL", "")
    assert PromoteSettings().local_url == "http://127.0.0.1:8080"


@pytest.mark.parametrize(("cls", "field"), _fields(lambda _, info: "Path" in str(info.annotation)))
def test_an_empty_path_flag_is_refused(cls, field):
    """``--work-dir ""`` (a script's unset $DIR) was the working directory; an empty variable is unset."""
    with pytest.raises(ValidationError, match="an empty path"):
        cls(**{field: ""})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_env(cls, field), "")
        assert cls().model_dump()[field] == cls.model_fields[field].default


def test_every_path_setting_is_checked():
    assert len(_fields(lambda _, info: "Path" in str(info.annotation))) == 9


def test_a_blank_serve_variable_is_the_default(monkeypatch):
    """A blank line such as ``MOTLENS_SERVE_THREADS=`` in the systemd env file stopped the server (exit 2),
    and ``MOTLENS_SERVE_FOLLOW_ALIAS=`` followed the alias ''."""
    for name in ("THREADS", "HTTP_PORT", "CACHE_BYTES", "DEVICE", "FOLLOW_ALIAS", "CANARY"):
        monkeypatch.setenv(f"MOTLENS_SERVE_{name}", "")
    s = ServeSettings()
    assert (s.threads, s.http_port, s.follow_alias, s.canary) == (None, 8080, None, None)
    assert s.cache_bytes == ServeSettings.model_fields["cache_bytes"].default
