"""Reader API for drift, promotion and ``motlens log``: bounded windows, SQL-side stats, audit rows.

Both backends run the same SQL (``predlog.queries``) through a clickhouse-connect client:
a ClickHouse server (or clickhouse-connect's in-process chdb client) with the real tables, or
chdb over the embedded Parquet segments via ``file('…/*.parquet', Parquet, '<structure>')``.
Reads never take a live chdb database directory, so any number of processes can read while
the predictor writes.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from predlog import queries
from predlog.schema import TABLES, row_to_arrow, structure
from predlog.settings import PredlogSettings
from predlog.sinks import write_parquet_segment
from predlog.swaplock import steady


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _quote(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _filters(params: dict[str, Any]) -> str:
    """The ``AND …`` fragments of :data:`predlog.queries.FILTERS` whose parameters are set."""
    return "".join(f" AND {frag}" for key, frag in queries.FILTERS.items() if key in params)


class TableSource:
    """The server tables ``{database}.{table}``; sampling via ``SAMPLE k`` on the sampling key."""

    def __init__(self, client: Any, database: str):
        self.client = client
        self.database = database

    def ref(
        self, table: str, sample: str | None = None, start: datetime | None = None, end: datetime | None = None
    ) -> str:
        """The table (``start``/``end``: the server prunes partitions and granules by ``ts`` itself)."""
        return f"{self.database}.{table}" + (f" SAMPLE {sample}" if sample else "")

    sample_in_where = False

    def catalog(self, client: Any) -> str:
        """The database in which ad-hoc SQL sees the log's tables."""
        return self.database

    def insert(self, table: str, data: pa.Table) -> None:
        self.client.insert_arrow(
            f"{self.database}.{table}", data, settings={"insert_deduplication_token": uuid.uuid4().hex}
        )


#: a segment's name: the day and time of its first row (a batch's, or a merged hour's or day's)
_SEGMENT = re.compile(r"^\d{8}T\d{6}-[^/]*\.parquet$")
#: the most days a window's glob lists; then it lists months, up to ``MAX_GLOB_MONTHS``, then takes every
#: file. chdb lists the folder once per ``{a,b,…}`` alternative, so a long list costs more than opening
#: every file (1 500 one-row daily files, window_counts: every file 0.5-0.6 s; a list of 400 days 1.1 s,
#: 62 days 0.13 s, 31 days 0.06 s; the same windows by month 0.36 s (15 months), 0.05 s, 0.03 s; 25 months
#: 0.49 s)
MAX_GLOB_DAYS = 31
MAX_GLOB_MONTHS = 24
#: how far back ``tail`` looks, in turn, before it reads the whole log
TAIL_SPANS = (timedelta(hours=1), timedelta(days=1), timedelta(days=31))


class ParquetSource:
    """Embedded Parquet segments read by chdb; sampling as a hash-range filter on the same key."""

    def __init__(self, root: Path):
        self.root = root
        self._catalog: str | None = None

    def ref(
        self, table: str, sample: str | None = None, start: datetime | None = None, end: datetime | None = None
    ) -> str:
        """``file(…)`` over the table's segments; with ``start``/``end`` (a read filtered on ``ts``), over
        those of the days the window can hold rows of only (:meth:`days_glob`)."""
        pattern = "*.parquet"
        if table == "predictions" and (start is not None or end is not None):
            pattern = self.days_glob(table, start, end)
        return f"file({_quote(str(self.root / table) + '/' + pattern)}, Parquet, {_quote(structure(table))})"

    def days_glob(self, table: str, start: datetime | None, end: datetime | None) -> str:
        """A glob of the segments that can hold rows with ``start <= ts < end``.

        A segment is named after its first row (``<day>T<time>-…``; a merged one after its hour or day),
        so a file of a day after ``end``'s holds none. The writer files a batch under each day its rows
        fall on, but one written before it did may have spanned midnight: a file named for the day
        before ``start``'s can still hold rows of ``start``'s day, so that day is read too.

        Beyond :data:`MAX_GLOB_DAYS` days the glob lists the window's months (``{202611,202612}*.parquet``),
        beyond :data:`MAX_GLOB_MONTHS` months (or when the window's months are all the log's) every file: a
        longer list costs more than it saves."""
        low = (_utc(start) - timedelta(days=1)).strftime("%Y%m%d") if start is not None else ""
        high = _utc(end).strftime("%Y%m%d") if end is not None else "99999999"
        try:  # never mid-swap (the day's files away, its merged file not in yet); after, the names keep their day
            with steady(self.root), os.scandir(self.root / table) as entries:
                days = {e.name[:8] for e in entries if _SEGMENT.match(e.name)}
        except FileNotFoundError:
            return "*.parquet"
        keep = sorted(d for d in days if low <= d <= high)
        if len(keep) == len(days):
            return "*.parquet"
        if len(keep) == 1:
            return f"{keep[0]}T*.parquet"
        if len(keep) <= MAX_GLOB_DAYS:
            return "{" + ",".join(keep or ["00000000"]) + "}T*.parquet"
        # a long window: its months (a few more files, at the ends; rows are filtered on ts in SQL anyway)
        months = sorted({d[:6] for d in keep})
        if len(months) > MAX_GLOB_MONTHS or len(months) == len({d[:6] for d in days}):
            return "*.parquet"
        return "{" + ",".join(months) + "}*.parquet"

    sample_in_where = True

    def catalog(self, client: Any) -> str:
        """An in-memory database of views over the segments (one per log directory), so that ad-hoc SQL
        sees tables: ``EXISTS``, ``SHOW COLUMNS FROM`` and ``SHOW TABLES`` cannot take ``file(…)``."""
        if self._catalog is None:
            database = "motlens_log_" + hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
            client.command(f"CREATE DATABASE IF NOT EXISTS {database} ENGINE = Memory")
            for table in TABLES:
                client.command(f"CREATE OR REPLACE VIEW {database}.{table} AS SELECT * FROM {self.ref(table)}")
            self._catalog = database
        return self._catalog

    def insert(self, table: str, data: pa.Table) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        write_parquet_segment(self.root / table, data, f"{stamp}-{uuid.uuid4().hex}")


class PredictionLogReader:
    """Query the prediction log; every read is bounded by a LIMIT (ad-hoc SELECTs by ``max_query_rows``)."""

    def __init__(self, client: Any, source: TableSource | ParquetSource, settings: PredlogSettings):
        self.client = client
        self.source = source
        self.settings = settings
        self._readonly: bool | None = None

    def _df(self, sql: str, params: dict[str, Any], settings: dict[str, Any] | None = None) -> pd.DataFrame:
        """Run a read; on the embedded log, while no compaction swaps segments (:func:`predlog.swaplock.steady`)."""
        with steady(self.source.root) if isinstance(self.source, ParquetSource) else nullcontext():
            return self.client.query_df(sql, parameters=params, settings=settings)

    @staticmethod
    def _window_params(
        model_name: str, model_version: str | None, slot: str | None, status: str | None,
        start: datetime | None, end: datetime | None,
    ) -> dict[str, Any]:  # fmt: skip
        params: dict[str, Any] = {"model_name": model_name}
        for key, value in (("model_version", model_version), ("slot", slot), ("status", status)):
            if value is not None:
                params[key] = str(value)
        if start is not None:
            params["start"] = _utc(start)
        if end is not None:
            params["end"] = _utc(end)
        return params

    def window(
        self,
        *,
        model_name: str = "mot-defects",
        model_version: str | None = None,
        slot: str | None = None,
        status: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 50_000,
        sample: float | None = None,
        with_embeddings: bool = False,
    ) -> pd.DataFrame:
        """Rows of one model (optionally one version/slot/status/time range), oldest first, at most
        ``limit``: when more match, the ``limit`` rows of smallest sampling hash (a uniform subset of
        the range, not its oldest rows).

        ``sample`` in (0, 1] keeps that fraction of rows, chosen by ``cityHash64(request_id,
        item_index)`` (deterministic; SAMPLE on the table, the same hash range on Parquet).
        ``with_embeddings`` returns only rows that carry an embedding, decoded to float32 in
        column ``embedding`` (stack them with :func:`drift.columns.embedding_matrix`).
        """
        if not 1 <= int(limit) <= self.settings.max_window_rows:
            raise ValueError(f"limit must be in 1..{self.settings.max_window_rows}, got {limit}")
        params = self._window_params(model_name, model_version, slot, status, start, end)
        params["limit"] = int(limit)
        ratio = None
        if sample is not None:
            if not 0 < float(sample) <= 1:
                raise ValueError(f"sample must be in (0, 1], got {sample}")
            ratio = f"{float(sample):.6f}".rstrip("0")
            if Fraction(ratio) == 0:
                raise ValueError(f"sample {sample} is below the 1e-6 resolution")
            if Fraction(ratio) == 1:  # 1, or a share that rounds to it: every row (2**64 overflows the bound)
                ratio = None
            elif self.source.sample_in_where:
                params["sample_bound"] = int(Fraction(ratio) * 2**64)
        filters = _filters(params)
        if with_embeddings:
            filters += " AND length(embedding_q) > 0"
        columns = queries.ROW_COLUMNS + (", " + queries.EMBEDDING if with_embeddings else "")
        sql = (
            queries.WINDOW.replace("{columns}", columns)
            .replace("{filters}", filters)
            .replace(
                "{source}",
                self.source.ref("predictions", None if self.source.sample_in_where else ratio, start=start, end=end),
            )
        )
        return self._df(sql, params)

    def window_counts(
        self,
        *,
        model_name: str = "mot-defects",
        model_version: str | None = None,
        slot: str | None = None,
        status: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> dict[str, Any]:
        """What :meth:`window` would read with the same filters and no limit: ``n`` rows, ``n_emb`` of
        them with an embedding, the ``versions`` among them and the ``first`` row's ts (None without
        rows; embedded: the window's days only)."""
        params = self._window_params(model_name, model_version, slot, status, start, end)
        filters = _filters(params)
        sql = queries.WINDOW_COUNTS.replace("{filters}", filters).replace(
            "{source}", self.source.ref("predictions", start=start, end=end)
        )
        row = self._df(sql, params).iloc[0]
        n = int(row["n"])
        first = pd.Timestamp(row["first"]) if n else None
        if first is not None and first.tzinfo is None:
            first = first.tz_localize(UTC)
        return {"n": n, "n_emb": int(row["n_emb"]), "versions": sorted(str(v) for v in row["versions"]),
                "first": first.to_pydatetime() if first is not None else None}  # fmt: skip

    def live_stats(
        self,
        *,
        since: datetime,
        until: datetime | None = None,
        model_name: str = "mot-defects",
        by_slot: bool = True,
    ) -> pd.DataFrame:
        """Per model_version and slot over ``since <= ts < until`` (``until`` None: up to now): n, errors,
        error_rate, latency p50/p95/p99 (ms), mean fail probability, cache-hit rate, section and severity
        counts (maps), first/last ts.

        ``by_slot=False``: one row per model_version over every slot, the slots listed in ``slots``
        (on Kubernetes every pod logs its own slot, ``production``, canary revisions included, so the
        promotion gates tell canary from production by version)."""
        slot, group = queries.LIVE_STATS_SLOT[by_slot]
        params: dict[str, Any] = {"model_name": model_name, "since": _utc(since)}
        if until is not None:
            params["until"] = _utc(until)
        sql = (
            queries.LIVE_STATS.replace("{slot}", slot)
            .replace("{by_slot}", group)
            .replace("{until}", f" AND ts < {{until:{queries.TS_PARAM}}}" if until is not None else "")
            .replace("{source}", self.source.ref("predictions", start=since, end=until))
        )
        df = self._df(sql, params)
        return df.drop(columns=["latency_q"], errors="ignore")

    def live_requests(
        self,
        *,
        since: datetime,
        until: datetime | None = None,
        model_name: str = "mot-defects",
        cap: int = 20_000,
        max_requests: int = 500_000,
    ) -> pd.DataFrame:
        """Per model_version over ``since <= ts < until``, counted by request (``queries.LIVE_REQUESTS``):
        ``items`` (rows), ``requests``, ``failed_requests``, ``miss_requests`` and ``missed_items`` (the
        ok texts they missed), up to ``cap`` sampled latencies (ms) of the ok requests (``latencies``) and
        of those with a cache miss (``miss_latencies``) and with exactly one missed text
        (``one_miss_latencies``), up to ``cap`` sampled ok requests with a cache miss as two arrays of
        equal length, their latencies (``miss_pair_latencies``) and how many texts each missed
        (``miss_pair_texts``), ``latency_cap``. A window of more than
        ``max_requests`` requests keeps a hash range of request ids holding about that many (so the
        grouping's memory stays bounded): ``requests_fraction`` says which share. What the promotion
        live gate tests."""
        params: dict[str, Any] = {"model_name": model_name, "since": _utc(since), "cap": int(cap)}
        if until is not None:
            params["until"] = _utc(until)
        until_sql = f" AND ts < {{until:{queries.TS_PARAM}}}" if until is not None else ""
        source = self.source.ref("predictions", start=since, end=until)
        counted = self._df(queries.LIVE_REQUEST_COUNT.replace("{until}", until_sql).replace("{source}", source), params)
        total = int(counted["requests"].iloc[0]) if len(counted) else 0
        fraction, sample = 1.0, ""
        if total > max_requests:
            fraction = max_requests / total
            params["request_bound"] = int(fraction * 2**64)
            sample = queries.REQUESTS_SAMPLE
        sql = (
            queries.LIVE_REQUESTS.replace("{until}", until_sql)
            .replace("{requests}", sample)
            .replace("{source}", source)
        )
        df = self._df(sql, params)
        df["requests_fraction"] = fraction
        return df

    def counts(self) -> pd.DataFrame:
        """Rows per model, version and slot (with how many carry embeddings)."""
        return self._df(queries.COUNTS.replace("{source}", self.source.ref("predictions")), {})

    def tail(self, n: int = 20) -> pd.DataFrame:
        """The newest ``n`` rows (no embeddings), newest first: read from the last hour, day or month
        (:data:`TAIL_SPANS`), the first that holds ``n`` rows, else from the whole log."""
        if not 1 <= int(n) <= self.settings.max_window_rows:
            raise ValueError(f"n must be in 1..{self.settings.max_window_rows}, got {n}")
        now = datetime.now(UTC)
        for span in TAIL_SPANS:
            since = now - span
            sql = queries.TAIL.replace("{source}", self.source.ref("predictions", start=since))
            df = self._df(sql.replace("{since}", queries.TAIL_SINCE), {"n": int(n), "since": since})
            if len(df) >= int(n):  # every row outside the span is older than every row in it
                return df
        return self._df(queries.TAIL.replace("{source}", self.source.ref("predictions")).replace("{since}", ""),
                        {"n": int(n)})  # fmt: skip

    def query(self, sql: str, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """A single read-only statement over the log's tables ``predictions``/``drift_reports``/
        ``promotion_events`` on either backend; values go in ``params`` as ``{name:Type}``.

        What runs is ClickHouse's own rendering of the parsed statement (:meth:`canonical`: comments
        gone, literals re-quoted), checked by :func:`predlog.queries.check_read_only`, so what is
        checked is what executes; its ``EXPLAIN AST`` must hold no table function. The log's table names
        then become ``{catalog}.{table}`` (embedded: views over the segments), a bare ``SHOW TABLES``
        lists that database. SELECT/WITH results are cut at ``max_query_rows``; on a ClickHouse server
        the query also runs with ``readonly=2`` (unless the user is read-only already)."""
        text = queries.check_read_only(self.canonical(sql))
        if unused := sorted(set(params or {}) - set(queries.PLACEHOLDER.findall(text))):
            raise ValueError(
                f"parameter {', '.join(unused)} is not used in the query: put {{{unused[0]}:Type}} where its value goes"
            )
        # the parser's own view: a table function anywhere a table may stand (a comma join, a subquery,
        # DESCRIBE), whatever its name — the lexical check only knows FROM/JOIN and a list of names
        ast = [str(r[0]) for r in self.client.query(f"EXPLAIN AST {text}", parameters=dict(params or {})).result_rows]
        if found := queries.table_functions(ast):
            raise queries.ReadOnlyViolation(
                f"table function {found[0]}() is not allowed; query predictions, drift_reports or promotion_events"
            )
        database = self.source.catalog(self.client)
        text = queries.qualify_tables(text, database)
        text = queries.SHOW_TABLES.sub(rf"\1 FROM {database}", text)
        if queries.first_keyword(text) in ("select", "with"):
            text = f"SELECT * FROM (\n{text}\n) LIMIT {int(self.settings.max_query_rows)}"
        url = self.settings.clickhouse_url or ""
        settings = {"readonly": 2} if url and not url.startswith("chdb:") and not self._read_only_user() else None
        return self._df(text, dict(params or {}), settings)

    def _read_only_user(self) -> bool:
        """Whether the session is read-only already (``readonly`` 1 or 2 in the user's profile): such a
        user may not change ``readonly`` (Code 164), and needs no second fence."""
        if self._readonly is None:
            self._readonly = int(self.client.query("SELECT getSetting('readonly')").result_rows[0][0]) > 0
        return self._readonly

    def canonical(self, sql: str) -> str:
        """``sql`` parsed and re-rendered on one line by ClickHouse (``formatQuerySingleLine``).

        Raises :class:`~predlog.queries.ReadOnlyViolation` when it is empty or does not parse as a
        single statement (ClickHouse's syntax error, first line, in the message)."""
        text = sql.strip().rstrip(";").strip()
        if not text:
            raise queries.ReadOnlyViolation("empty query")
        try:
            rows = self.client.query("SELECT formatQuerySingleLine({q:String})", parameters={"q": text}).result_rows
        except Exception as e:
            msg = str(e)
            if "Code: 62" not in msg and "Syntax error" not in msg:
                raise
            detail = next((ln.strip() for ln in msg.splitlines() if "Syntax error" in ln), msg.splitlines()[0])
            raise queries.ReadOnlyViolation(f"not a single valid statement: {detail[:300]}") from e
        return str(rows[0][0])

    def insert_drift_report(self, row: dict[str, Any]) -> None:
        """Store one drift verdict (columns: predlog.schema.DRIFT_REPORTS; dict values become JSON)."""
        self.source.insert("drift_reports", row_to_arrow("drift_reports", row))

    def drift_reports(
        self, *, model_version: str | None = None, slot: str | None = None, limit: int = 100
    ) -> pd.DataFrame:
        params: dict[str, Any] = {"limit": int(limit)}
        if model_version is not None:
            params["model_version"] = str(model_version)
        if slot is not None:
            params["slot"] = str(slot)
        filters = "".join(f" AND {queries.FILTERS[k]}" for k in ("model_version", "slot") if k in params)
        sql = queries.DRIFT_REPORTS.replace("{filters}", filters).replace("{source}", self.source.ref("drift_reports"))
        return self._df(sql, params)

    def insert_promotion_event(self, row: dict[str, Any]) -> None:
        """Store one promotion action (columns: predlog.schema.PROMOTION_EVENTS)."""
        self.source.insert("promotion_events", row_to_arrow("promotion_events", row))

    def promotion_events(self, *, limit: int = 100) -> pd.DataFrame:
        sql = queries.PROMOTION_EVENTS.replace("{source}", self.source.ref("promotion_events"))
        return self._df(sql, {"limit": int(limit)})

    def last_production_change(self, version: str) -> dict[str, Any] | None:
        """The newest successful, applied promote/deploy/rollback/follow row that made ``version`` production."""
        sql = queries.LAST_PRODUCTION_CHANGE.replace("{source}", self.source.ref("promotion_events"))
        rows = self._df(sql, {"version": str(version)}).to_dict("records")
        return rows[0] if rows else None

    def last_change(self, target: str, model_name: str) -> dict[str, Any] | None:
        """``target``'s newest change of ``model_name`` (``queries.LAST_CHANGE``), however many holds
        and refusals came after it; None when none is recorded."""
        sql = queries.LAST_CHANGE.replace("{source}", self.source.ref("promotion_events"))
        rows = self._df(sql, {"target": str(target), "model": str(model_name)}).to_dict("records")
        return rows[0] if rows else None

    def last_serve_load(self, version: str) -> datetime | None:
        """When a server last loaded ``version`` (``queries.LAST_SERVE_LOAD``), None when none recorded it."""
        sql = queries.LAST_SERVE_LOAD.replace("{source}", self.source.ref("promotion_events"))
        ts = self._df(sql, {"version": str(version)})["ts"].iloc[0]
        return None if pd.isna(ts) else _utc(pd.Timestamp(ts).to_pydatetime())

    def close(self) -> None:
        self.client.close()
