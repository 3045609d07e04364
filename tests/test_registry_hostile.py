"""A registry that fails or lies: credentials never reach a message, its answers never become paths."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from motlens.credentials import no_password_in_url, redact
from training.registry import Registry, RegistryError


def _registry_server(name: str) -> ThreadingHTTPServer:
    """An MLflow REST endpoint that names ``name`` version 1 for any alias and drops every artifact request."""
    source = "mlflow-artifacts:/1/abc/artifacts/model"
    version = {"model_version": {"name": name, "version": "1", "run_id": "", "creation_timestamp": 0,
                                 "source": source, "aliases": ["production"]}}  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if "/registered-models/alias" in self.path or "/model-versions/get" in self.path:
                body = json.dumps(version).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.connection.shutdown(socket.SHUT_RDWR)  # a failing artifact proxy

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def registry_at(monkeypatch) -> Iterator:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    servers: list[ThreadingHTTPServer] = []

    def start(name: str) -> int:
        servers.append(_registry_server(name))
        return servers[-1].server_address[1]

    yield start
    for s in servers:
        s.shutdown()


def test_a_failed_artifact_download_names_no_credentials(registry_at, tmp_path):
    """MLflow's message carries the tracking URI; it reached /motlens/ready, gate details and drift rows."""
    port = registry_at("mot-defects")
    reg = Registry(f"http://alice:p@ss-s3cret@127.0.0.1:{port}", cache_dir=tmp_path / "models")
    with pytest.raises(RegistryError) as info:
        reg.fetch("models:/mot-defects@production")
    message = str(info.value)
    assert "s3cret" not in message and "alice" not in message and f"127.0.0.1:{port}" in message


def test_a_registry_answering_another_name_or_version_is_refused(registry_at, tmp_path):
    port = registry_at("../../escaped")
    cache = tmp_path / "home" / "models"
    reg = Registry(f"http://127.0.0.1:{port}", cache_dir=cache)
    with pytest.raises(RegistryError, match="refused"):
        reg.fetch("models:/mot-defects@production")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == []


def test_redact_cuts_up_to_the_hosts_at_sign():
    assert (
        redact("see http://alice:p@ssw0rd@mlflow:5000/x and https://u:v@h/")
        == "see http://mlflow:5000/x and https://h/"
    )
    assert redact("no url here") == "no url here"
    # a password holding '/', '?' or '#' goes too (to the URL's last '@')
    assert redact("dsn https://u:k2/b?c#d@ch:8443/db, then") == "dsn https://ch:8443/db, then"
    # a library quoting the header it refused
    assert redact("Invalid header value b'Bearer tOk3n\\n'") == "Invalid header value b'Bearer ***'"
    assert redact("authorization: basic dXNlcjpwdw==") == "authorization: basic ***"


def test_redact_masks_a_credential_in_a_query_string():
    """An MLFLOW_TRACKING_URI with ``?token=…`` was printed whole in the registry's error message."""
    assert (
        redact("registry http://m:1/?token=S3cr3tQ failing: http://m:1/?a=1&Password=p%40ss&b=2#f")
        == "registry http://m:1/?token=*** failing: http://m:1/?a=1&Password=***&b=2#f"
    )
    assert redact("?tokenizer=x&secret_key=y, 3 tokens") == "?tokenizer=x&secret_key=y, 3 tokens"


def test_a_registry_error_names_no_secret_of_the_tracking_uris_query(tmp_path, monkeypatch, capsys):
    from motlens.cli import main

    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1/?token=S3cr3tQ")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert main(["train", "versions"]) == 2
    err = capsys.readouterr().err
    assert "unreachable" in err and "S3cr3tQ" not in err


def test_redact_cuts_the_user_part_of_a_url_written_without_its_scheme():
    assert redact("registry admin:hunter2pw@mlflow.internal:5000: not") == "registry mlflow.internal:5000: not"
    assert redact("'u:p%40ss@h'") == "'h'"
    # a password holding '@' or '/' goes whole (to the word's last '@')
    assert redact("registry admin:p@ss@mlflow:5000: x") == "registry mlflow:5000: x"
    assert redact("registry admin:aB3/xY+z@mlflow:5000: x") == "registry mlflow:5000: x"
    # a reference, a bare user and a URL keep what is no credential
    for text in ("models:/mot-defects@production", "alice@host", "sqlite:///a/b.db", "ts 12:00 @ noon"):
        assert redact(text) == text


def test_a_tracking_uri_without_its_scheme_is_refused_without_its_password(tmp_path, monkeypatch, capsys, caplog):
    """``user:password@host`` (the scheme forgotten) was quoted whole by `train versions`, `promote status`
    and each retried load of `motlens serve`."""
    from motlens.cli import main

    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "admin:hunter2pw@mlflow.internal:5000")
    assert main(["train", "versions"]) == 2
    err = capsys.readouterr().err
    assert "not a registry URI" in err and "mlflow.internal:5000" in err, err
    assert "hunter2pw" not in err + caplog.text


@pytest.mark.parametrize(
    "url", ["http://u:pw@ch:8123/db", "http://u@ch:8123/db?password=pw", "https://ch:8443/db?user=u&Access_Token=t"]
)
def test_a_clickhouse_password_in_the_url_is_refused(url):
    with pytest.raises(ValueError, match="MOTLENS_CLICKHOUSE_PASSWORD"):
        no_password_in_url(url)


def test_a_clickhouse_url_without_a_password_is_kept():
    assert no_password_in_url("http://u@ch:8123/db?secure=1") == "http://u@ch:8123/db?secure=1"
    assert no_password_in_url("") is None
