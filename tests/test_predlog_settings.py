"""PredlogSettings: env names, embedded default, secrets kept out of URLs, reprs and errors."""

from __future__ import annotations

import pydantic
import pytest

from predlog import PredlogSettings


def test_embedded_default_under_motlens_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path))
    monkeypatch.delenv("MOTLENS_CLICKHOUSE_URL", raising=False)
    s = PredlogSettings()
    assert s.embedded and s.root == (tmp_path / "predlog").resolve()
    assert s.table_dir("predictions") == s.root / "predictions" and s.spool_dir == s.root / "spool"


def test_server_url_and_password_from_env(monkeypatch):
    monkeypatch.setenv("MOTLENS_CLICKHOUSE_URL", "https://writer@ch.example:8443/motlens")
    monkeypatch.setenv("MOTLENS_CLICKHOUSE_PASSWORD", "s3cret-value")
    monkeypatch.setenv("MOTLENS_PREDLOG_BATCH_ROWS", "123")
    s = PredlogSettings()
    assert not s.embedded and s.batch_rows == 123
    assert s.password.get_secret_value() == "s3cret-value"
    assert "s3cret-value" not in repr(s) and "s3cret-value" not in str(s.model_dump())


def test_password_in_url_is_refused_without_echoing_it():
    with pytest.raises(pydantic.ValidationError) as e:
        PredlogSettings(clickhouse_url="http://u:hunter2@ch:8123")
    assert "MOTLENS_CLICKHOUSE_PASSWORD" in str(e.value) and "hunter2" not in str(e.value)


@pytest.mark.parametrize("db", ["x; DROP TABLE t", "a.b", "", "1abc"])
def test_database_must_be_an_identifier(db):
    with pytest.raises(pydantic.ValidationError, match="identifier"):
        PredlogSettings(database=db)
