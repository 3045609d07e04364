"""``MOTLENS_*`` variables that no setting reads are named at start (a typo kept the default silently)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from motlens.envcheck import OTHER, SETTINGS, _names, retired_env, unknown_env

REPO = Path(__file__).resolve().parents[1]
_NAME = re.compile(r"\bMOTLENS_[A-Z0-9_]*[A-Z0-9]\b")
_TEXT = {"", ".py", ".sh", ".yaml", ".md"}


def test_typos_and_renamed_settings_are_named_with_the_closest_setting():
    env = {
        "MOTLENS_PROMOTE_MIN_SAMPLE": "5",
        "MOTLENS_PREDLOG_TTL_DAY": "30",
        "motlens_serve_log_embedding_sample_rates": "1.0",
        "MOTLENS_NOTHING_LIKE_IT": "x",
        "PATH": "/bin",
    }
    assert unknown_env(env) == [
        ("MOTLENS_NOTHING_LIKE_IT", None),
        ("MOTLENS_PREDLOG_TTL_DAY", "MOTLENS_PREDLOG_TTL_DAYS"),
        ("MOTLENS_PROMOTE_MIN_SAMPLE", "MOTLENS_PROMOTE_MIN_SAMPLES"),
        ("motlens_serve_log_embedding_sample_rates", "MOTLENS_SERVE_LOG_EMBEDDING_SAMPLE_RATE"),
    ]


def test_every_setting_and_alias_is_known_in_any_case():
    names = set(OTHER).union(*(_names(t) for t in SETTINGS.values()))
    assert {"MOTLENS_SERVE_HTTP_PORT", "MOTLENS_PREDLOG_CLICKHOUSE_URL", "MOTLENS_DATA_PASSWORD"} <= names
    assert unknown_env(dict.fromkeys(names, "1")) == []
    assert unknown_env(dict.fromkeys((n.lower() for n in names), "1")) == []


#: unknown names that tests set on purpose (to see the warning, or that a check bites)
DELIBERATE = {"MOTLENS_NO_SUCH_SETTING", "MOTLENS_SERVE_DRAIN_SECONDS"}


def test_every_name_the_repository_uses_is_read_by_a_setting():
    """Docs, manifests and scripts that set a variable nothing reads would configure nothing."""
    files = [REPO / "README.md", REPO / "Dockerfile", REPO / "Makefile", *(REPO / "docs").glob("*.md")]
    for folder in ("manifests", "scripts", "bench", ".ci", "motlens", "predictor", "predlog", "drift",
                   "promotion", "training", "tests"):  # fmt: skip
        files += [p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in _TEXT]
    used: dict[str, str] = {}
    for path in files:
        if path.name == Path(__file__).name:
            continue
        for name in _NAME.findall(path.read_text(errors="replace")):
            used.setdefault(name, str(path.relative_to(REPO)))
    stale = {name: where for name, where in used.items() if unknown_env({name: "1"}) and name not in DELIBERATE}
    assert not stale, f"set or named but read by no setting: {stale}"


def test_the_names_outside_the_prefixes_are_still_read_somewhere():
    sources = [p.read_text() for d in ("motlens", "predictor", "predlog", "training") for p in (REPO / d).rglob("*.py")
               if p.name != "envcheck.py"]  # fmt: skip
    for name in OTHER:
        assert any(name in s for s in sources), f"{name} is read by nothing: drop it from motlens.envcheck.OTHER"


def test_the_cli_warns_by_name_and_never_shows_the_value(tmp_path, monkeypatch, capsys, caplog):
    from motlens.cli import main

    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path))
    monkeypatch.setenv("MOTLENS_PREDLOG_PASWORD", "s3cret-value")
    with caplog.at_level("WARNING"):
        assert main(["log", "count"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [
        "MOTLENS_PREDLOG_PASWORD is set but no motlens setting reads it (did you mean MOTLENS_PREDLOG_PASSWORD?)"
    ]
    assert "s3cret-value" not in caplog.text + "".join(capsys.readouterr())


@pytest.mark.parametrize("prefix", sorted(SETTINGS))
def test_each_prefix_names_a_settings_class_with_that_prefix(prefix):
    assert all(n.startswith(prefix) or n in OTHER for n in _names(SETTINGS[prefix])), prefix


def test_kubernetes_service_links_are_not_settings():
    """A Service named `motlens-clickhouse` puts these in every pod of its namespace (enableServiceLinks)."""
    links = [f"MOTLENS_CLICKHOUSE_{suffix}" for suffix in (
        "SERVICE_HOST", "SERVICE_PORT", "SERVICE_PORT_HTTP", "PORT_8123_TCP", "PORT_8123_TCP_PROTO",
        "PORT_8123_TCP_PORT", "PORT_8123_TCP_ADDR")]  # fmt: skip
    env = dict.fromkeys(links, "10.0.0.7") | {"MOTLENS_CLICKHOUSE_PORT": "tcp://10.0.0.7:8123"}
    assert unknown_env(env) == []
    typo = "MOTLENS_SERVE_HTTPS_PORT"  # ends like a service link, is not one
    assert unknown_env({typo: "8443"}) == [(typo, "MOTLENS_SERVE_HTTP_PORT")]


def test_names_older_releases_read_are_named_with_the_one_to_set():
    """Releases before 3201d46 read CLICKHOUSE_URL and PASSWORD (any case): set alone after the upgrade
    they configured nothing, and the prediction log fell back to the embedded one without a word."""
    assert retired_env({"CLICKHOUSE_URL": "http://ch:8123/motlens", "PASSWORD": "x", "PATH": "/bin"}) == [
        ("CLICKHOUSE_URL", "MOTLENS_CLICKHOUSE_URL"),
        ("PASSWORD", "MOTLENS_CLICKHOUSE_PASSWORD"),
    ]
    assert retired_env({"clickhouse_url": "http://ch:8123/motlens"}) == [("clickhouse_url", "MOTLENS_CLICKHOUSE_URL")]
    new = {"MOTLENS_CLICKHOUSE_URL": "http://ch:8123/motlens", "MOTLENS_PREDLOG_PASSWORD": "x"}
    assert retired_env({**new, "CLICKHOUSE_URL": "http://other:8123", "PASSWORD": "y"}) == []
    assert retired_env({"MOTLENS_PREDLOG_CLICKHOUSE_URL": "http://ch:8123", "PASSWORD": "y"}) == [
        ("PASSWORD", "MOTLENS_CLICKHOUSE_PASSWORD")
    ]
    assert retired_env({"PASSWORD": "y"}) == []  # no ClickHouse at all: an older release had no use for it
    assert retired_env({"CLICKHOUSE_URL": ""}) == []


def test_the_cli_names_an_older_releases_variable_and_never_shows_the_value(tmp_path, monkeypatch, capsys, caplog):
    from motlens.cli import main

    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path))
    for name in ("MOTLENS_CLICKHOUSE_URL", "MOTLENS_PREDLOG_CLICKHOUSE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLICKHOUSE_URL", "https://user@ch.example:8443/s3cret-db")
    with caplog.at_level("WARNING"):
        assert main(["log", "count"]) == 0  # a warning, not a refusal: the name may be another program's
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [
        "CLICKHOUSE_URL is set but motlens reads only MOTLENS_CLICKHOUSE_URL (older releases read CLICKHOUSE_URL "
        "too): the prediction log is the embedded one; if CLICKHOUSE_URL is meant for motlens, set "
        "MOTLENS_CLICKHOUSE_URL"
    ]
    assert "s3cret-db" not in caplog.text + "".join(capsys.readouterr())
