"""Prediction-log settings (``MOTLENS_PREDLOG_*``; the server URL also from ``MOTLENS_CLICKHOUSE_URL``)."""

from __future__ import annotations

import json
import re
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from motlens.credentials import no_password_in_url, redact
from motlens.envsource import SettingPath
from motlens.errors import env_name
from motlens.state import StateSettings

#: A plain ClickHouse identifier (database, table, column); shared with training.chload.
IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _host_dir() -> str:
    """This host's name as one path component (a pod's name under Kubernetes)."""
    name = socket.gethostname()
    if name in ("", ".", "..") or "/" in name:
        raise ValueError(f"the host name {name!r} cannot name a directory (MOTLENS_PREDLOG_DIR_PER_HOST)")
    return name


def _url_database(url: str | None) -> str:
    """The database in an http(s) URL's path (``https://host:8443/motlens`` → ``motlens``), else ""."""
    return urlsplit(url).path.strip("/") if url and url.lower().startswith(("http://", "https://")) else ""


#: ClickHouse's HTTP ports by URL scheme
DEFAULT_PORTS = {"http": 8123, "https": 8443}


@dataclass(frozen=True)
class Endpoint:
    """The server an http(s) URL names: ``interface`` (its scheme: TLS or not), host and port."""

    interface: str
    host: str
    port: int


def clickhouse_endpoint(url: str | None) -> Endpoint | None:
    """The endpoint of an http(s) URL (default port by scheme, host in lower case); None for another
    scheme (``chdb://``) or no URL. Raises ValueError for a port that is not a number."""
    if not url:
        return None
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        return None
    return Endpoint(scheme, (parts.hostname or "localhost").lower(), parts.port or DEFAULT_PORTS[scheme])


def connect_kwargs(url: str | None) -> dict[str, Any]:
    """What ``clickhouse_connect.get_client(dsn=url, …)`` needs besides an http(s) URL: it takes TLS from
    the port alone (``https://host`` or ``https://host:9443`` would be plain HTTP, ``https://host`` on
    port 8123), so the scheme's interface and port are passed explicitly; nothing for other URLs."""
    endpoint = clickhouse_endpoint(url)
    return {"interface": endpoint.interface, "port": endpoint.port} if endpoint else {}


def usable_url(url: str | None) -> str | None:
    """``url`` (None for empty), refused with the reason when it carries a password or a port that is
    not a number (the validator of every setting that holds a ClickHouse URL)."""
    url = no_password_in_url(url)
    scheme = urlsplit(url).scheme.lower() if url else ""
    if url and scheme not in (*DEFAULT_PORTS, "chdb"):
        shown = f"scheme {scheme[:20]!r}" if scheme else "no scheme"
        raise ValueError(f"not a usable ClickHouse URL: {shown}; use http://, https:// or chdb://")
    try:
        clickhouse_endpoint(url)
    except ValueError:  # urllib's message quotes the "port", which may be part of a password
        raise ValueError("not a usable ClickHouse URL: its port is not a number") from None
    return url


def _server(url: str) -> Endpoint | str:
    """What a recorded sink URL names: its endpoint, or the text itself where it has none."""
    try:
        return clickhouse_endpoint(url) or url
    except ValueError:  # a hand-edited record: compared as written
        return url


@dataclass(frozen=True)
class SinkId:
    """Where a writer's batches go, as its spool records it: ``clickhouse`` (``url`` without credentials,
    ``database``) or ``embedded`` (``url``: its folder, for messages only — an embedded log always lies
    beside its spool, so a moved directory is the same sink)."""

    kind: str
    url: str
    database: str = ""

    def same(self, other: SinkId) -> bool:
        """Same kind and, for ClickHouse, the same server (scheme, host, port: ``http://ch`` is
        ``http://ch:8123/``) and database."""
        if self.kind != other.kind:
            return False
        if self.kind == "embedded":
            return True
        return _server(self.url) == _server(other.url) and self.database == other.database

    def __str__(self) -> str:
        if self.kind == "embedded":
            return f"the embedded Parquet log in {self.url}"
        return f"ClickHouse {self.url} (database {self.database})"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SinkId:
        """Raises ValueError for anything but what :meth:`to_json` wrote."""
        try:
            data = json.loads(text)
            sink = cls(str(data["kind"]), str(data["url"]), str(data.get("database", "")))
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"not a sink record: {e}") from None
        if sink.kind not in ("clickhouse", "embedded"):
            raise ValueError(f"unknown sink kind {sink.kind!r}")
        return sink


SERVER_FLUSH_INTERVAL_S = 1.0
#: bounds of waits and timeouts: far below threading.TIMEOUT_MAX (Condition.wait overflows near it)
HOUR_S = 3600
DAY_S = 86_400
WEEK_S = 7 * DAY_S
EMBEDDED_FLUSH_INTERVAL_S = 10.0


class PredlogSettings(BaseSettings):
    """Where predictions go and how the writer batches, spills and drops.

    With no ``clickhouse_url`` the log is embedded: Parquet segments under ``dir`` (default
    ``$MOTLENS_HOME/predlog``) read through chdb. A ``chdb://memory`` or ``chdb:///path`` URL selects
    clickhouse-connect's in-process chdb client with the real tables (tests, single-process use).
    """

    # an empty variable is unset (MOTLENS_PREDLOG_DIR= is the default, not the working directory); no NaN or
    # infinity in any float
    model_config = SettingsConfigDict(
        env_prefix="MOTLENS_PREDLOG_",
        extra="ignore",
        populate_by_name=True,
        hide_input_in_errors=True,
        env_ignore_empty=True,
        allow_inf_nan=False,
    )

    clickhouse_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MOTLENS_PREDLOG_CLICKHOUSE_URL", "MOTLENS_CLICKHOUSE_URL"),
        description="http(s)://user@host:8123/db or chdb://memory; the password never goes here",
    )
    password: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("MOTLENS_PREDLOG_PASSWORD", "MOTLENS_CLICKHOUSE_PASSWORD"),
    )
    database: str = Field(
        default="default",
        validate_default=False,  # only a database that was set is checked against the URL's
        description="default: the database in the URL's path (https://host:8443/motlens), else 'default'",
    )
    cluster: bool = Field(default=False, description="cluster DDL: ON CLUSTER '{cluster}', Replicated + Distributed")
    auto_migrate: bool = True
    ttl_days: int = Field(
        default=400,
        ge=1,
        description="days a prediction is kept: the server table's TTL (migration 001); the embedded log's "
        "compaction deletes each day of predictions once all its rows are this old (audit tables: kept)",
    )
    dir: SettingPath | None = Field(
        default=None, description="embedded segments and the spool; default MOTLENS_HOME/predlog"
    )
    dir_per_host: bool = Field(
        default=False,
        description="use DIR/<host name> (a pod's name): each predictor of a volume they share has its own "
        "spool, and `motlens log replay --under DIR` drains those of pods that are gone",
    )

    lock_wait_s: float = Field(
        default=0.0,
        ge=0,
        le=HOUR_S,
        description="how long a writer waits for its spool's lock while another process holds it (0: refuse at "
        "once, naming it); a predictor on a shared volume waits out a `motlens log replay` of its directory",
    )
    queue_rows: int = Field(default=100_000, ge=1, description="bounded in-memory queue (rows)")
    batch_rows: int = Field(default=5_000, ge=1)
    flush_interval_s: float | None = Field(
        default=None,
        gt=0,
        le=HOUR_S,
        description="longest wait before a partial batch is written (at most an hour); unset: 1 s to ClickHouse, "
        "10 s embedded",
    )
    compact_interval_s: float = Field(
        default=3600,
        ge=0,
        le=WEEK_S,
        description="embedded log: the predictor's writer merges closed hours and days a minute after start, "
        "then every this many seconds, at most a week "
        "(0: never; `motlens log compact` does the same by hand)",
    )
    spool_max_bytes: int = Field(default=2 * 1024**3, ge=1)
    spool_full_policy: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    retry_initial_s: float = Field(default=0.5, gt=0, le=HOUR_S)
    retry_max_s: float = Field(default=30.0, gt=0, le=HOUR_S)
    connect_timeout_s: int = Field(
        default=5, ge=1, le=HOUR_S, description="whole seconds (clickhouse-connect truncates), at most an hour"
    )
    send_receive_timeout_s: int = Field(
        default=30, ge=1, le=DAY_S, description="whole seconds (clickhouse-connect truncates), at most a day"
    )
    max_window_rows: int = Field(default=5_000_000, ge=1)
    max_query_rows: int = Field(default=100_000, ge=1, description="row cap on ad-hoc `query()` SELECTs")

    @field_validator("database")
    @classmethod
    def _identifier_agreeing_with_the_url(cls, v: str, info: ValidationInfo) -> str:
        """The URL's database is the one the statements name (they qualify every table); an explicit
        ``database`` that disagrees with it is refused rather than silently writing elsewhere."""
        if not IDENT.match(v):
            raise ValueError(f"not a plain ClickHouse identifier: {v!r}")
        in_url = _url_database(info.data.get("clickhouse_url"))
        if in_url and v != in_url:
            url_name = env_name(cls, "clickhouse_url") or "the ClickHouse URL"
            raise ValueError(f"{v!r} disagrees with the database {in_url!r} in {url_name}; set one of them")
        return v

    @field_validator("connect_timeout_s", "send_receive_timeout_s", mode="before")
    @classmethod
    def _whole_seconds(cls, v: object) -> object:
        """clickhouse-connect's HTTP client truncates its timeouts to int: 0.5 became 0 and every
        connection failed, 2.5 silently became 2."""
        try:
            whole = float(v).is_integer()  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return v  # not a number: pydantic's own error
        if not whole:
            raise ValueError("whole seconds only: clickhouse-connect drops the fraction (0.5 would become 0)")
        return v

    @field_validator("clickhouse_url")
    @classmethod
    def _valid_url(cls, v: str | None) -> str | None:
        v = usable_url(v)
        in_url = _url_database(v)
        if in_url and not IDENT.match(in_url):
            raise ValueError(f"the URL's database {in_url!r} is not a plain identifier")
        return v

    @model_validator(mode="after")
    def _database_from_url(self) -> PredlogSettings:
        """No explicit ``database``: the URL's (an explicit one was checked against it)."""
        self.database = _url_database(self.clickhouse_url) or self.database
        return self

    @property
    def flush_interval(self) -> float:
        """The writer's wait for a partial batch: ``flush_interval_s`` when set, else 1 s to ClickHouse and
        10 s for the embedded log, where every batch is a file (at 1 s a quiet predictor wrote 86 400 files
        a day; at 10 s its rows reach readers up to 10 s later, and a killed process loses up to 10 s of them)."""
        if self.flush_interval_s is not None:
            return self.flush_interval_s
        return EMBEDDED_FLUSH_INTERVAL_S if self.embedded else SERVER_FLUSH_INTERVAL_S

    @property
    def embedded(self) -> bool:
        return not self.clickhouse_url

    @property
    def sink(self) -> SinkId:
        """Where this writer's batches go (what its spool records; never a credential)."""
        if self.embedded:
            return SinkId("embedded", str(self.table_dir("predictions")))
        return SinkId("clickhouse", redact(self.clickhouse_url or "").rstrip("/"), self.database)

    @property
    def root(self) -> Path:
        root = (self.dir or StateSettings().predlog_dir).resolve()
        return root / _host_dir() if self.dir_per_host else root

    @property
    def spool_dir(self) -> Path:
        return self.root / "spool"

    def table_dir(self, table: str) -> Path:
        return self.root / table
