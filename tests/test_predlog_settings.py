"""PredlogSettings: env names, embedded default, secrets kept out of URLs, reprs and errors."""

from __future__ import annotations

import logging
import re
import socket
import threading

import pydantic
import pytest
from clickhouse_connect.driver.exceptions import OperationalError

from predlog import PredlogSettings
from predlog.sinks import make_client


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_unprefixed_password_and_url_variables_feed_nothing(tmp_path, monkeypatch):
    """A container's PASSWORD or CLICKHOUSE_URL, set for another program, became the log's password
    and switched the embedded log to that server (aliases named by field, read as env names)."""
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path))
    for name in ("MOTLENS_CLICKHOUSE_URL", "MOTLENS_CLICKHOUSE_PASSWORD", "MOTLENS_PREDLOG_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PASSWORD", "someone-elses")
    monkeypatch.setenv("CLICKHOUSE_URL", "https://other@ch.example:8443/theirs")
    s = PredlogSettings()
    assert s.embedded and s.password is None
    kw = PredlogSettings(clickhouse_url="chdb://memory", password="x")  # keywords by field name still work
    assert kw.clickhouse_url == "chdb://memory" and kw.password.get_secret_value() == "x"


def test_password_in_url_is_refused_without_echoing_it():
    with pytest.raises(pydantic.ValidationError) as e:
        PredlogSettings(clickhouse_url="http://u:hunter2@ch:8123")
    assert "MOTLENS_CLICKHOUSE_PASSWORD" in str(e.value) and "hunter2" not in str(e.value)


@pytest.mark.parametrize("db", ["x; DROP TABLE t", "a.b", "", "1abc"])
def test_database_must_be_an_identifier(db):
    with pytest.raises(pydantic.ValidationError, match="identifier"):
        PredlogSettings(database=db)


def test_database_comes_from_the_url_and_a_disagreeing_one_is_refused(monkeypatch):
    for var in ("MOTLENS_PREDLOG_DATABASE", "MOTLENS_CLICKHOUSE_URL", "MOTLENS_PREDLOG_CLICKHOUSE_URL"):
        monkeypatch.delenv(var, raising=False)
    from predlog.sinks import ClickHouseSink

    s = PredlogSettings(clickhouse_url="https://writer@ch.example:8443/motlens")
    assert s.database == "motlens" and ClickHouseSink(s).table == "motlens.predictions"
    assert PredlogSettings(clickhouse_url="https://ch.example:8443/").database == "default"
    assert PredlogSettings(clickhouse_url="https://ch.example:8443/motlens", database="motlens").database == "motlens"
    assert PredlogSettings(clickhouse_url="chdb:///var/lib/x").database == "default"  # a path, not a database
    with pytest.raises(pydantic.ValidationError, match="'other' disagrees with the database 'motlens' in the"):
        PredlogSettings(clickhouse_url="https://ch.example:8443/motlens", database="other")
    with pytest.raises(pydantic.ValidationError, match="not a plain identifier"):
        PredlogSettings(clickhouse_url="https://ch.example:8443/a;b")


def _credentials_sent(connect) -> list[str]:
    """What a ClickHouse client sends as Basic credentials to an HTTP endpoint that refuses everyone."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen: list[str] = []

    class Refuse(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Basic "):
                seen.append(base64.b64decode(auth.split()[1]).decode())
            self.send_response(516)
            self.end_headers()
            self.wfile.write(b"Code: 516. DB::Exception: Authentication failed")

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(Exception):  # noqa: B017 - any refusal; the credentials are the point
            connect(f"http://alice@127.0.0.1:{server.server_address[1]}/")
    finally:
        server.shutdown()
    return seen


def test_prediction_log_and_training_send_the_same_password(monkeypatch):
    """One MOTLENS_CLICKHOUSE_URL + MOTLENS_CLICKHOUSE_PASSWORD serves both (training once sent none)."""
    from predlog.sinks import make_client
    from training.chload import DataSettings, open_store

    monkeypatch.setenv("MOTLENS_CLICKHOUSE_PASSWORD", "s3cret")

    def predlog_client(url: str) -> None:
        monkeypatch.setenv("MOTLENS_CLICKHOUSE_URL", url)
        make_client(PredlogSettings())

    def training_store(url: str) -> None:
        monkeypatch.setenv("MOTLENS_CLICKHOUSE_URL", url)
        open_store(DataSettings())

    for connect in (predlog_client, training_store):
        sent = _credentials_sent(connect)
        assert sent and set(sent) == {"alice:s3cret"}, (connect.__name__, sent)
    with pytest.raises(pydantic.ValidationError, match="MOTLENS_CLICKHOUSE_PASSWORD"):
        DataSettings(clickhouse_url="http://alice:hunter2@ch:8123/")


@pytest.mark.parametrize("field", ["connect_timeout_s", "send_receive_timeout_s"])
@pytest.mark.parametrize("value", [0.5, "0.5", 1.5, 0])
def test_timeouts_clickhouse_connect_would_truncate_are_refused(field, value):
    """clickhouse-connect truncates its HTTP timeouts to whole seconds: 0.5 became 0 and every
    connection failed ("Attempted to set connect timeout to 0"), so every batch went to the spool."""
    with pytest.raises(pydantic.ValidationError, match=field):
        PredlogSettings(clickhouse_url="http://127.0.0.1:9", **{field: value})


def test_accepted_timeouts_reach_clickhouse_connect_intact(monkeypatch):
    monkeypatch.setenv("MOTLENS_PREDLOG_CONNECT_TIMEOUT_S", "2.0")
    s = PredlogSettings(clickhouse_url=f"http://127.0.0.1:{closed_port()}", send_receive_timeout_s=3)
    assert (s.connect_timeout_s, s.send_receive_timeout_s) == (2, 3)
    with pytest.raises(OperationalError):  # the closed port refuses; the timeouts themselves were taken
        make_client(s)


def test_the_writer_says_where_predictions_go_without_credentials(tmp_path, caplog):
    """`motlens serve` never said which log it opened: an upgrade that lost the ClickHouse URL (the log fell
    back to the embedded one) went unseen."""
    import predlog

    port = closed_port()  # the writer only spools
    server = PredlogSettings(clickhouse_url=f"http://motlens@127.0.0.1:{port}/preds/", password="s3cret-value",
                             dir=tmp_path / "a", connect_timeout_s=1)  # fmt: skip
    embedded = PredlogSettings(dir=tmp_path / "b")
    with caplog.at_level(logging.INFO, logger="predlog"):
        for settings in (server, embedded):
            predlog.open_writer(settings).close(5)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("predlog: predictions go to")]
    assert said == [
        f"predlog: predictions go to ClickHouse http://127.0.0.1:{port}/preds (database preds) "
        f"(spool {tmp_path / 'a' / 'spool'})",
        f"predlog: predictions go to the embedded Parquet log in {tmp_path / 'b' / 'predictions'} "
        f"(spool {tmp_path / 'b' / 'spool'})",
    ]
    assert "s3cret-value" not in caplog.text and "motlens@" not in caplog.text


class _FirstBytes:
    """A TCP listener on a free port that keeps the first bytes of each connection and closes it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.first: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():  # the client may retry: every connection is read and closed
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                self.first.append(conn.recv(8))

    def close(self) -> list[bytes]:
        self.stop.set()
        self.thread.join(15)
        self.sock.close()
        return self.first


@pytest.mark.parametrize("scheme, tls", [("https", True), ("http", False)])
def test_the_urls_scheme_decides_tls_on_any_port(scheme, tls):
    """clickhouse-connect takes TLS from the port alone (443/8443): an https URL on another port went out as
    plain HTTP, credentials included. The scheme decides, for the log and for the data loader."""
    from training.chload import ServerStore

    for connect in (
        lambda url: make_client(PredlogSettings(clickhouse_url=url, connect_timeout_s=2)),
        lambda url: ServerStore(url, password=""),
    ):
        listener = _FirstBytes()
        with pytest.raises(Exception):  # noqa: B017 - the listener answers nothing: any connection error
            connect(f"{scheme}://127.0.0.1:{listener.port}/motlens")
        firsts = listener.close()
        assert firsts, "no connection reached the listener"
        for first in firsts:  # a TLS handshake record, or a plain HTTP request
            assert first.startswith(b"\x16\x03") if tls else first[:4] in (b"GET ", b"POST"), first


def test_default_ports_follow_the_scheme_and_endpoints_compare_by_server():
    from predlog.settings import Endpoint, SinkId, clickhouse_endpoint

    assert clickhouse_endpoint("https://User@CH.example/motlens") == Endpoint("https", "ch.example", 8443)
    assert clickhouse_endpoint("http://ch/motlens?compress=1") == Endpoint("http", "ch", 8123)
    assert clickhouse_endpoint("chdb://memory") is None and clickhouse_endpoint(None) is None
    from training.chload import DataSettings

    for settings in (PredlogSettings, DataSettings):  # the log and the data loader refuse it alike
        with pytest.raises(pydantic.ValidationError, match="not a usable ClickHouse URL"):
            settings(clickhouse_url="http://ch:http/motlens")
    for url, words in (("ftp://127.0.0.1:1", "scheme 'ftp'"), ("::::", "no scheme"), ("ch:8123", "scheme 'ch'")):
        for settings in (PredlogSettings, DataSettings):  # once "cannot reach ClickHouse at http://…"
            with pytest.raises(pydantic.ValidationError, match=f"{words}; use http://, https:// or chdb://"):
                settings(clickhouse_url=url)
    # a password holding '#', '/' or '?' cuts the user part short: refused, no piece of it echoed
    for url in ("https://motlens:Xy7#k2Lm9Q@ch:8443/motlens", "https://motlens:k2Lm9QzR/b@ch:8443/motlens",
                "http://motlens:Xy7?k2Lm@ch/motlens"):  # fmt: skip
        for settings in (PredlogSettings, DataSettings):
            with pytest.raises(pydantic.ValidationError, match="MOTLENS_CLICKHOUSE_PASSWORD") as info:
                settings(clickhouse_url=url)
            assert not {"Xy7", "k2Lm", "QzR"} & set(re.findall(r"\w+", str(info.value))), str(info.value)
    # a spool bound to http://ch:8123/motlens belongs to the writer configured as HTTP://CH/motlens/ ...
    recorded = SinkId("clickhouse", "http://ch:8123/motlens", "motlens")
    assert recorded.same(SinkId("clickhouse", "HTTP://CH/motlens/", "motlens"))
    # ... not to another scheme, port, host or database
    for url, db in (("https://ch/motlens", "motlens"), ("http://ch:9000/motlens", "motlens"),
                    ("http://ch2:8123/motlens", "motlens"), ("http://ch:8123/other", "other")):  # fmt: skip
        assert not recorded.same(SinkId("clickhouse", url, db)), url
