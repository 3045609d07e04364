"""Where batches land: Parquet segments (embedded default) or a ClickHouse table via clickhouse-connect.

``insert(table, token)`` is idempotent per token: the Parquet sink names the file after the
token; the ClickHouse sink passes it as ``insert_deduplication_token``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from predlog import migrate
from predlog.settings import PredlogSettings, connect_kwargs
from predlog.swaplock import steady

log = logging.getLogger(__name__)


class Sink(Protocol):
    local: bool  # True: the sink is itself local durable storage (no write-ahead spool needed)

    def insert(self, table: pa.Table, token: str) -> None: ...

    def close(self) -> None: ...


def write_parquet_segment(folder: Path, table: pa.Table, name: str) -> Path:
    """Write ``{folder}/{name}.parquet`` atomically (tmp + fsync + rename); same name = same file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.parquet"
    tmp = folder / f".{name}.parquet.tmp"
    try:
        pq.write_table(table, tmp, compression="zstd", compression_level=3)
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a partial file must not stay behind (disk full)
        raise
    return path


def _publish(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


TOKENS_KEY = b"motlens.batch_tokens"
_BATCH_FILE = re.compile(r"^\d{8}T\d{6}-([0-9a-f]{32})\.parquet$")
#: what :func:`write_parquet_segment` leaves of a batch file when its process dies before the rename
_BATCH_TMP = re.compile(r"^\.((\d{8}T\d{6})-([0-9a-f]{32})\.parquet)\.tmp$")
#: a file :mod:`predlog.compact` merged: ``<day>T<hour>0000-c<hash>.parquet`` (a closed day: hour 00)
MERGED_FILE = re.compile(r"^(\d{8})T(\d{2})0000-c[0-9a-f]{32}\.parquet$")


def batch_tokens(path: Path) -> set[str]:
    """The batch tokens a Parquet segment holds: from its name (one batch), or for a merged file the
    list :mod:`predlog.compact` kept in its metadata."""
    m = _BATCH_FILE.match(path.name)
    if m:
        return {m.group(1)}
    meta = pq.read_schema(path).metadata or {}
    return set(filter(None, meta.get(TOKENS_KEY, b"").decode().split("\n")))


class ParquetSink:
    """Embedded default: one Parquet file per batch under ``predictions/``, named ``{first ts}-{token}``."""

    local = True

    def __init__(self, folder: Path):
        self.folder = folder

    def insert(self, table: pa.Table, token: str) -> None:
        """One file per UTC day the batch's rows fall on (nearly always one), named after its first row:
        a file named for day D holds rows of D only, which windowed reads rely on."""
        for stamp, part in _by_day(table):
            with steady(self.folder.parent):  # no compaction merges the batch between the check and the write
                if self._compacted(stamp, token):  # a replay of a batch whose hour or day was compacted since
                    continue
                write_parquet_segment(self.folder, part, f"{stamp}-{token}")

    def recover(self) -> None:
        """Finish the batch files a writer killed before their rename left as ``.<name>.parquet.tmp``:
        one that reads back whole is published under its name (unless that batch is stored already),
        a partial one is deleted. Call it only holding the spool's lock (the one writer of this log
        directory); compaction's own temporary files are left to it."""
        try:
            found = [(p, m) for p in self.folder.iterdir() if (m := _BATCH_TMP.match(p.name))]
        except OSError:  # no folder yet (or an unusable one: the writer spools)
            return
        for tmp, m in found:
            try:
                self._recover(tmp, self.folder / m.group(1), m.group(2), m.group(3))
            except Exception as e:  # noqa: BLE001 - one leftover must not stop the writer from starting
                log.error("predlog: cannot recover %s (%s); left for the next start", tmp.name, e)

    def _recover(self, tmp: Path, path: Path, stamp: str, token: str) -> None:
        with steady(self.folder.parent):
            if path.exists() or self._compacted(stamp, token):
                tmp.unlink()
                log.info("predlog: %s already stored; its leftover temporary file deleted", path.name)
                return
            try:
                pq.read_table(tmp)
            except pa.ArrowInvalid:  # cut short (a read error is an OSError: left for the next start)
                tmp.unlink()
                log.warning("predlog: incomplete %s (its writer stopped mid-write) deleted", tmp.name)
                return
            _publish(tmp, path)
        log.warning("predlog: %s, written in full by a writer that stopped before its rename, published", path.name)

    def _compacted(self, stamp: str, token: str) -> bool:
        """Whether a merged file (``predlog.compact``) of the day of ``stamp`` already holds the batch
        ``token``. Compaction merges an hour only after it has ended, so a batch of the current hour
        (every live batch but the first after the hour turns) skips the look-up."""
        try:
            hour = datetime.strptime(stamp[:11], "%Y%m%dT%H").replace(tzinfo=UTC)
        except ValueError:
            return False
        if hour + timedelta(hours=1) > datetime.now(UTC):
            return False
        merged = (f for f in self.folder.glob(f"{stamp[:8]}T*-c*.parquet") if MERGED_FILE.match(f.name))
        return any(token in batch_tokens(f) for f in merged)

    def close(self) -> None:
        """Nothing to release."""


def _by_day(table: pa.Table) -> list[tuple[str, pa.Table]]:
    """``(stamp of the first row, rows)`` per UTC day of ``ts``, in day order (rows keep their order)."""
    if not table.num_rows:
        return [("00000000T000000", table)]
    bounds = pc.min_max(table["ts"])
    first, last = bounds["min"].as_py(), bounds["max"].as_py()
    if first.date() == last.date():
        return [(first.strftime("%Y%m%dT%H%M%S"), table)]
    days = pc.floor_temporal(table["ts"], unit="day")
    parts = []
    for day in pc.unique(days).sort():
        part = table.filter(pc.equal(days, day))
        parts.append((pc.min(part["ts"]).as_py().strftime("%Y%m%dT%H%M%S"), part))
    return parts


def make_client(settings: PredlogSettings, /, **kwargs: Any) -> Any:
    """A clickhouse-connect client for ``settings.clickhouse_url`` (password from settings/env only);
    ``kwargs`` go to ``clickhouse_connect.get_client`` (e.g. ``settings={"readonly": 1}``)."""
    import clickhouse_connect

    url = settings.clickhouse_url or "chdb://memory"
    if url.startswith("chdb:"):
        return clickhouse_connect.get_client(dsn=url, tz_mode="aware", **kwargs)
    password = settings.password.get_secret_value() if settings.password else ""
    return clickhouse_connect.get_client(
        dsn=url,
        **connect_kwargs(url),
        password=password,
        tz_mode="aware",
        connect_timeout=settings.connect_timeout_s,
        send_receive_timeout=settings.send_receive_timeout_s,
        autogenerate_session_id=False,
        **kwargs,
    )


#: ClickHouse error codes a batch gets again on every retry: its columns or values do not fit the table.
#: Anything else (network, timeouts, overload, a missing table or database, access, read-only mode)
#: may pass later and is retried. So is any of these raised by a materialized view on the table
#: (:data:`_VIEW_ERROR`): ClickHouse has stored the rows in the table by then (as a rule), and the retry,
#: with the same ``insert_deduplication_token``, stores them once when the view is fixed or dropped.
PERMANENT_CODES: dict[int, str] = {
    6: "CANNOT_PARSE_TEXT",
    8: "THERE_IS_NO_COLUMN",
    10: "NOT_FOUND_COLUMN_IN_BLOCK",
    16: "NO_SUCH_COLUMN_IN_TABLE",
    20: "NUMBER_OF_COLUMNS_DOESNT_MATCH",
    26: "CANNOT_PARSE_QUOTED_STRING",
    27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
    38: "CANNOT_PARSE_DATE",
    41: "CANNOT_PARSE_DATETIME",
    43: "ILLEGAL_TYPE_OF_ARGUMENT",
    47: "UNKNOWN_IDENTIFIER",
    53: "TYPE_MISMATCH",
    69: "ARGUMENT_OUT_OF_BOUND",
    70: "CANNOT_CONVERT_TYPE",
    72: "CANNOT_PARSE_NUMBER",
    117: "INCORRECT_DATA",
    349: "CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN",
}
_CODE = re.compile(r"\bCode: (\d+)\.")
#: how ClickHouse marks an error of a dependent (materialized) view: "…: while pushing to view db.mv …"
_VIEW_ERROR = re.compile(r"\bwhile pushing to view\b", re.IGNORECASE)


_COLUMN_ERRORS = {f"{code} {PERMANENT_CODES[code]}" for code in (8, 10, 16)}


def permanent_error(e: BaseException) -> str | None:
    """``"<code> <NAME>"`` when ClickHouse refused an insert in a way no retry changes (see
    :data:`PERMANENT_CODES`), else None (transient, or not a ClickHouse error). An error of a
    materialized view on the table is transient whatever its code: the batch is stored already, and
    the view (not the batch) is what a DBA fixes."""
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    if not isinstance(e, DatabaseError) or isinstance(e, OperationalError) or _VIEW_ERROR.search(str(e)):
        return None
    m = _CODE.search(str(e))
    code = int(m.group(1)) if m else None
    return f"{code} {PERMANENT_CODES[code]}" if code in PERMANENT_CODES else None


class ClickHouseSink:
    """Batched inserts into ``{db}.predictions`` with async_insert; connects (and migrates) lazily,
    so a server that is down at start only sends batches to the spool.

    On connect the schema is checked (migrated first when ``auto_migrate`` is on) and the table's
    columns are read from ``system.columns``; a batch's columns the table lacks (a segment a newer
    writer spooled before a downgrade) are left out of the insert, with a warning and
    ``motlens_predlog_columns_dropped_total{column}``."""

    local = False
    INSERT_SETTINGS = {"async_insert": 1, "wait_for_async_insert": 1, "async_insert_deduplicate": 1}

    def __init__(self, settings: PredlogSettings, table: str = "predictions"):
        self.settings = settings
        self.table = f"{settings.database}.{table}"
        self._client: Any = None
        self._columns: frozenset[str] | None = None
        self._warned: set[str] = set()
        self._schema_error = ""
        self._lock = threading.Lock()

    def _connect(self) -> tuple[Any, frozenset[str]]:
        with self._lock:
            if self._client is None:
                client = make_client(self.settings)
                try:
                    if self.settings.auto_migrate:
                        migrate.apply(client, self.settings)
                    else:
                        migrate.check(client, self.settings)
                except migrate.SchemaError as e:
                    client.close()
                    if str(e) != self._schema_error:  # once, not on every retry
                        self._schema_error = str(e)
                        log.error("predlog: %s; batches stay in the spool until it is fixed", e)
                    raise
                except Exception:
                    client.close()
                    raise
                self._client = client
                self._schema_error = ""
            if self._columns is None:
                db, _, name = self.table.partition(".")
                rows = self._client.query(
                    "SELECT name FROM system.columns WHERE database = {d:String} AND table = {t:String}",
                    parameters={"d": db, "t": name},
                ).result_rows
                if rows:  # none: the table is gone for now (the insert says so); asked again next time
                    self._columns = frozenset(str(r[0]) for r in rows)
            return self._client, self._columns or frozenset()

    def prepare(self) -> None:
        """Connect now (migrating when ``auto_migrate`` is on): the writer's first step."""
        self._connect()

    def insert(self, table: pa.Table, token: str) -> None:
        try:
            self._insert_once(table, token)
        except Exception as e:
            if permanent_error(e) not in _COLUMN_ERRORS:
                raise
            # the columns were read before the table changed (a column dropped meanwhile): the sink
            # has read them again, so one more try leaves the dropped column out instead of refusing
            self._insert_once(table, token)

    def _insert_once(self, table: pa.Table, token: str) -> None:
        client, columns = self._connect()
        extra = [c for c in table.column_names if columns and c not in columns]
        if extra:
            from predlog import metrics

            table = table.drop_columns(extra)
            for name in extra:
                metrics.COLUMNS_DROPPED.labels(column=name).inc(table.num_rows)
            if new := sorted(set(extra) - self._warned):
                self._warned.update(new)
                log.warning("predlog: %s has no column %s; left out of the insert", self.table, ", ".join(new))
        try:
            client.insert_arrow(
                self.table, table, settings={**self.INSERT_SETTINGS, "insert_deduplication_token": token}
            )
        except Exception as e:
            if permanent_error(e) is None:
                self._drop_client()
            else:  # the table may have changed under the sink: read its columns again
                self._columns = None
            raise

    def _drop_client(self) -> None:
        """Reconnect on the next insert (a server may have restarted); chdb clients stay."""
        self._columns = None
        if not str(self.settings.clickhouse_url or "").startswith("chdb:"):
            self.close()

    def close(self) -> None:
        """Close the client (``chdb://memory`` tables vanish when the engine's last handle closes)."""
        with self._lock:
            client, self._client = self._client, None
            self._columns = None
        if client is not None:
            client.close()
