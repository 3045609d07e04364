"""Load DVSA bulk tables into ClickHouse and read back the distinct defect texts with label counts.

At full scale (the original system holds 1.7 billion defect rows) the join of ``test_item`` with
``test_result`` and the de-duplication run in ClickHouse, and training reads only the distinct
texts with their label counts. Locally the engine is chdb (ClickHouse in-process, one database
directory per process); with ``MOTLENS_CLICKHOUSE_URL`` set, a server via clickhouse-connect.

Files are parsed by the same tolerant reader as the Parquet path (``training.dvsa_files.iter_raw``), so
bad rows, latin-1 bytes and repeated headers are handled and reported identically; typed rows go
in as Arrow batches. Tables are ``ReplacingMergeTree`` keyed on the whole row, so loading the same
file twice does not double its rows (queries read them with ``FINAL``). Labels are computed in
Python from the SQL aggregate (``training.dvsa_lookups.label_defects``): one labelling rule for both paths.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc
from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from tqdm import tqdm

from motlens.envsource import SettingPath
from motlens.labels import SEVERITIES
from motlens.state import StateSettings
from predlog.settings import IDENT, connect_kwargs, usable_url
from training import mot_labels
from training.dvsa_columns import DATE_DMY, DATE_ISO, DATE_YEARS, typed_items, typed_results
from training.dvsa_files import Source, check_damage, discover, iter_raw
from training.dvsa_lookups import Lookups, defect_groups, label_defects, load_lookups, with_detail
from training.dvsa_report import BulkFormatError, BulkReport, FileReport

SEVERITY_COUNT_COLUMNS = tuple(f"n_{s}" for s in SEVERITIES)
SECTION_COUNT_COLUMNS = tuple(f"n_section_{i}" for i in range(9))
#: Report counts a ClickHouse load does not compute (``None`` in its report): its tables drop repeated
#: rows as they merge (ReplacingMergeTree), so which rows repeated is not known.
NOT_COUNTED = ("duplicate_tests", "duplicate_items")


class DataSettings(BaseSettings):
    """``MOTLENS_DATA_*``; the server URL is also read from ``MOTLENS_CLICKHOUSE_URL``."""

    # an empty variable is unset (MOTLENS_DATA_CHDB_PATH= is the default, not the working directory)
    model_config = SettingsConfigDict(
        env_prefix="MOTLENS_DATA_",
        extra="ignore",
        populate_by_name=True,
        hide_input_in_errors=True,
        env_ignore_empty=True,
        allow_inf_nan=False,
    )

    clickhouse_url: str | None = Field(
        default=None, validation_alias=AliasChoices("MOTLENS_DATA_CLICKHOUSE_URL", "MOTLENS_CLICKHOUSE_URL")
    )
    password: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("MOTLENS_DATA_PASSWORD", "MOTLENS_CLICKHOUSE_PASSWORD")
    )
    database: str = "motlens_data"
    chdb_path: SettingPath | None = None

    @field_validator("clickhouse_url")
    @classmethod
    def _usable_url(cls, v: str | None) -> str | None:
        return usable_url(v)

    @field_validator("database")
    @classmethod
    def _identifier(cls, v: str) -> str:
        """Checked here, not only by the store: the error names MOTLENS_DATA_DATABASE."""
        if not IDENT.match(v):
            raise ValueError(f"not a plain ClickHouse identifier: {v[:70]!r}")
        return v

    def chdb_dir(self) -> Path:
        return self.chdb_path or (StateSettings().home / "chdb-data")


_DDL = (
    "CREATE DATABASE IF NOT EXISTS {db}",
    """CREATE TABLE IF NOT EXISTS {db}.test_result (
        test_id Int64, test_date Date32, test_class_id Int16, test_mileage Nullable(Float64),
        make LowCardinality(Nullable(String)), model LowCardinality(Nullable(String)),
        fuel_type LowCardinality(Nullable(String)), first_use_date Nullable(Date32)
    ) ENGINE = ReplacingMergeTree ORDER BY test_id""",
    """CREATE TABLE IF NOT EXISTS {db}.test_item (
        test_id Int64, rfr_id Int64, rfr_type_code LowCardinality(String), location_id Int64,
        dangerous_mark LowCardinality(String), rfr_comment String
    ) ENGINE = ReplacingMergeTree
      ORDER BY (test_id, rfr_id, rfr_type_code, location_id, dangerous_mark, rfr_comment)""",
    """CREATE TABLE IF NOT EXISTS {db}.item_detail (
        rfr_id Int64, test_class_id Int16, test_item_id Int64, rfr_desc String,
        rfr_insp_manual_desc String, rfr_advisory_text String, rfr_deficiency_category String,
        group_root String
    ) ENGINE = ReplacingMergeTree ORDER BY (rfr_id, test_class_id)""",
    """CREATE TABLE IF NOT EXISTS {db}.rfr_location (location_id Int64, location String)
       ENGINE = ReplacingMergeTree ORDER BY location_id""",
    # every item_group node's top-level name: a test class without its own item_detail row takes its
    # rfr's first entry, whose item is looked up in the test's class (as the Parquet path does)
    """CREATE TABLE IF NOT EXISTS {db}.item_group_root (test_item_id Int64, test_class_id Int16, group_root String)
       ENGINE = ReplacingMergeTree ORDER BY (test_item_id, test_class_id)""",
)

_RESULT_ARROW = pa.schema(
    [
        ("test_id", pa.int64()),
        ("test_date", pa.date32()),
        ("test_class_id", pa.int16()),
        ("test_mileage", pa.float64()),
        ("make", pa.string()),
        ("model", pa.string()),
        ("fuel_type", pa.string()),
        ("first_use_date", pa.date32()),
    ]
)
_ITEM_ARROW = pa.schema(
    [
        ("test_id", pa.int64()),
        ("rfr_id", pa.int64()),
        ("rfr_type_code", pa.string()),
        ("location_id", pa.int64()),
        ("dangerous_mark", pa.string()),
        ("rfr_comment", pa.string()),
    ]
)


class Store:
    """A ClickHouse connection: chdb in-process or a server. Use as a context manager."""

    kind: str
    location: str

    def __init__(self, database: str):
        if not IDENT.match(database):
            raise ValueError(f"invalid ClickHouse database name {database!r}")
        self.database = database

    def command(self, sql: str, params: dict | None = None) -> None:
        raise NotImplementedError

    def query_df(self, sql: str, params: dict | None = None) -> pd.DataFrame:
        raise NotImplementedError

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the connection."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def sql(self, template: str) -> str:
        return template.replace("{db}", self.database)


class ChdbStore(Store):
    """chdb (ClickHouse in-process) on a database directory; one process may open it at a time."""

    kind = "chdb"

    def __init__(self, path: Path, database: str = "motlens_data", *, create: bool = True):
        from chdb.session import Session

        super().__init__(database)
        if not create and not path.is_dir():  # reading: a missing directory is not made
            raise _no_data(path)
        path.mkdir(parents=True, exist_ok=True)
        self.location = str(path)
        try:
            self._session = Session(str(path))
        except RuntimeError as e:
            raise RuntimeError(
                f"cannot open chdb at {path}: chdb allows one open database directory per process "
                f"(close the other session first): {e}"
            ) from e

    def command(self, sql: str, params: dict | None = None) -> None:
        self._session.query(sql, params=params)

    def query_df(self, sql: str, params: dict | None = None) -> pd.DataFrame:
        return self._session.query(sql, "DataFrame", params=params)

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        with ipc.new_stream(sink, data.schema) as w:
            w.write_table(data)
        cols = ", ".join(data.schema.names)
        with self._session.send_insert(f"INSERT INTO {self.database}.{table} ({cols})", "ArrowStream") as ins:
            ins.append(sink.getvalue().to_pybytes())
            ins.finish()

    def close(self) -> None:
        self._session.close()


class ServerStore(Store):
    """A ClickHouse server (>= 25.8) through clickhouse-connect; the URL is never logged."""

    kind = "server"

    def __init__(self, url: str, database: str = "motlens_data", password: str = ""):
        import clickhouse_connect

        super().__init__(database)
        self._client = clickhouse_connect.get_client(dsn=url, password=password, **connect_kwargs(url))
        self.location = "MOTLENS_CLICKHOUSE_URL"

    def command(self, sql: str, params: dict | None = None) -> None:
        self._client.command(sql, parameters=params)

    def query_df(self, sql: str, params: dict | None = None) -> pd.DataFrame:
        return self._client.query_df(sql, parameters=params)

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        self._client.insert_arrow(table, data, database=self.database)

    def close(self) -> None:
        self._client.close()


def open_store(settings: DataSettings | None = None, ch_path: Path | None = None, *, create: bool = True) -> Store:
    """A server store when a ClickHouse URL is configured, else chdb at ``ch_path`` (or the default;
    with ``create=False`` a missing directory is :class:`~training.dataset.DataError`, not made)."""
    settings = settings or DataSettings()
    if settings.clickhouse_url and ch_path is None:
        password = settings.password.get_secret_value() if settings.password else ""
        return ServerStore(settings.clickhouse_url, settings.database, password)
    return ChdbStore(Path(ch_path or settings.chdb_dir()), settings.database, create=create)


def _no_data(where: object) -> Exception:
    from training.dataset import DataError

    return DataError(f"no ClickHouse training data at {where}: run motlens data load --clickhouse first")


def create_tables(store: Store) -> None:
    for ddl in _DDL:
        store.command(store.sql(ddl))


@dataclass
class LoadResult:
    """What a load inserted and how fast."""

    report: BulkReport
    inserted: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict:
        big = self.inserted.get("test_result", 0) + self.inserted.get("test_item", 0)
        return {
            "inserted": dict(self.inserted),
            "seconds": round(self.seconds, 2),
            "rows_per_second": round(big / self.seconds) if self.seconds else None,
        }


def _lookup_tables(lk: Lookups) -> tuple[pa.Table, pa.Table, pa.Table]:
    d = lk.detail  # classes already within Int16 (load_lookups: beyond it is class 4)
    item_ids = d["test_item_id"].fillna(-1).astype("int64")
    roots = [lk.group_root.get((int(i), int(c)), "") for i, c in zip(item_ids, d["test_class_id"], strict=True)]
    detail = pa.table(
        {
            "rfr_id": pa.array(d["rfr_id"].astype("int64")),
            "test_class_id": pa.array(d["test_class_id"].astype("int16")),
            "test_item_id": pa.array(item_ids),
            **{
                c: pa.array(d[c].fillna("").astype(str))
                for c in ("rfr_desc", "rfr_insp_manual_desc", "rfr_advisory_text", "rfr_deficiency_category")
            },
            "group_root": pa.array(roots, type=pa.string()),
        }
    )
    locations = pa.table(
        {
            "location_id": pa.array(list(lk.locations), type=pa.int64()),
            "location": pa.array(list(lk.locations.values()), type=pa.string()),
        }
    )
    keys = list(lk.group_root)
    roots_table = pa.table(
        {
            "test_item_id": pa.array([i for i, _ in keys], type=pa.int64()),
            "test_class_id": pa.array([c for _, c in keys], type=pa.int16()),
            "group_root": pa.array([lk.group_root[k] for k in keys], type=pa.string()),
        }
    )
    return detail, locations, roots_table


_CHUNK_ROWS = 200_000


def load_bulk(
    store: Store, paths: Sequence[Path], chunk_rows: int = _CHUNK_ROWS, native: bool | None = None
) -> LoadResult:
    """Insert DVSA bulk files into ClickHouse; the report counts bad rows per file.

    ``native`` (default: on for chdb) lets ClickHouse read plain or gzipped ``test_result`` /
    ``test_item`` files itself (:func:`native_load`); zip members, and every file for a server,
    are parsed in Python and inserted as Arrow batches.
    """
    sources, api = discover(paths)
    if api:
        raise BulkFormatError(f"{api[0]}:1: the ClickHouse path takes DVSA bulk files; load API JSONL with --out")
    kinds = {s.kind for s in sources}
    for k in ("test_result", "test_item", "item_detail"):
        if k not in kinds:
            raise BulkFormatError(f"{', '.join(map(str, paths))}:0: no {k} table among the inputs")
    native = store.kind == "chdb" if native is None else native
    t0 = time.perf_counter()
    create_tables(store)
    result = LoadResult(BulkReport())
    detail, locations, roots = _lookup_tables(load_lookups(sources, result.report))
    store.insert_arrow("item_detail", detail)
    store.insert_arrow("rfr_location", locations)
    store.insert_arrow("item_group_root", roots)
    result.inserted = {"item_detail": detail.num_rows, "rfr_location": locations.num_rows}
    big = [s for s in sources if s.kind in ("test_result", "test_item")]
    with tqdm(total=sum(s.size for s in big), unit="B", unit_scale=True, desc="load ClickHouse",
              disable=sum(s.size for s in big) < 50 << 20) as bar:  # fmt: skip
        for src in big:
            fr = FileReport(src.name, src.kind, src.delimiter)
            result.report.files.append(fr)
            if native and src.member is None:
                n = native_load(store, src, fr)
            else:
                n = _python_load(store, src, fr, chunk_rows)
            result.inserted[src.kind] = result.inserted.get(src.kind, 0) + n
            bar.update(src.size)
    result.seconds = time.perf_counter() - t0
    return result


def _typed_tables(src: Source, fr: FileReport, chunk_rows: int) -> Iterator[pa.Table]:
    """A ``test_result`` / ``test_item`` file's rows read by the Python reader, typed as the tables
    take them; a file where most rows are bad is refused (``check_damage``)."""
    for raw in iter_raw(src, fr, chunk_rows):
        if src.kind == "test_result":
            df = typed_results(raw, fr)
            table = pa.Table.from_pandas(df, schema=_RESULT_ARROW, preserve_index=False)
        else:
            df = typed_items(raw, fr, 0).drop(columns="seq")
            for c in ("rfr_type_code", "dangerous_mark", "rfr_comment"):
                df[c] = df[c].fillna("")
            table = pa.Table.from_pandas(df, schema=_ITEM_ARROW, preserve_index=False)
        check_damage(src, fr)
        yield table


def _python_load(store: Store, src: Source, fr: FileReport, chunk_rows: int) -> int:
    n = 0
    for table in _typed_tables(src, fr, chunk_rows):
        store.insert_arrow(src.kind, table)
        n += table.num_rows
    return n


def _txt(col: str) -> str:
    """A text column as UTF-8: bytes that are not UTF-8 are read as latin-1 (as the Python reader)."""
    return f"if(isValidUTF8({col}), {col}, convertCharset({col}, 'latin1', 'utf8'))"


def _date_sql(col: str) -> str:
    """The date forms the Python reader reads (``dvsa_columns.DATE_ISO``/``DATE_DMY``), else NULL: the
    value as ``YYYY-MM-DD``, kept only where it round-trips (toDate32OrNull reads 2021-02-30 as 2 March)."""
    t = f"trimBoth({col})"
    iso, dmy = (f"'{p}'" for p in (DATE_ISO, DATE_DMY))  # no quotes or backslashes in them
    g = f"extractGroups({t}, {dmy})"
    ymd = (
        f"multiIf(match({t}, {iso}), substring({t}, 1, 10), match({t}, {dmy}), "
        f"concat({g}[3], '-', leftPad({g}[2], 2, '0'), '-', leftPad({g}[1], 2, '0')), '')"
    )
    lo, hi = DATE_YEARS
    return (
        f"if(toString(toDate32OrNull({ymd})) = {ymd} AND toInt32OrZero(substring({ymd}, 1, 4)) BETWEEN {lo} AND {hi}, "
        f"toDate32OrNull({ymd}), NULL)"
    )


_NATIVE_SELECT = {
    "test_result": (
        "(test_id, test_date, test_class_id, test_mileage, make, model, fuel_type, first_use_date)",
        "toInt64OrNull(trimBoth(test_id)) AS id, {date} AS day, "
        "coalesce(toInt16OrNull(trimBoth(test_class_id)), 4), toFloat64OrNull(trimBoth(test_mileage)), "
        "nullIf({make}, ''), nullIf({model}, ''), nullIf(trimBoth(fuel_type), ''), {first_use}",
        (("test_id", "id"), ("test_date", "day")),
    ),
    "test_item": (
        "(test_id, rfr_id, rfr_type_code, location_id, dangerous_mark, rfr_comment)",
        "toInt64OrNull(trimBoth(test_id)) AS id, toInt64OrNull(trimBoth(rfr_id)) AS rfr, rfr_type_code, "
        "coalesce(toInt64OrNull(trimBoth(location_id)), 0), dangerous_mark, {comment}",
        (("test_id", "id"), ("rfr_id", "rfr")),
    ),
}  # (columns inserted, the SELECT, the key columns as (name, alias): a row lacking one is a bad row)
_OPTIONAL = {"test_class_id", "test_mileage", "make", "model", "fuel_type", "first_use_date", "location_id",
             "dangerous_mark", "rfr_comment", "rfr_type_code"}  # fmt: skip


def _native_source(src: Source) -> str:
    """A subquery over the file giving one String column per header name (wrong-shape rows dropped)."""
    cols = list(src.columns)
    if not all(IDENT.match(c) for c in cols):
        raise BulkFormatError(f"{src.name}:1: header names are not plain identifiers: {cols}")
    if src.delimiter == "|":
        fields = ", ".join(f"c[{i + 1}] AS {c}" for i, c in enumerate(cols))
        return (
            # a CRLF file's \r would stay in the last field (a location_id of '1\r' is no number)
            f"(SELECT {fields} FROM (SELECT splitByChar('|', if(endsWith(line, '\\r'), substring(line, 1, "
            f"length(line) - 1), line)) AS c FROM file({{path:String}}, 'LineAsString') "
            f"WHERE line NOT IN ('', '\\r') AND length(c) = {len(cols)}))"
        )
    structure = ", ".join(f"{c} String" for c in cols)
    return f"(SELECT * FROM file({{path:String}}, 'CSV', '{structure}'))"


_BOM = "'\\xEF\\xBB\\xBF'"
_FFFD = "'\\xEF\\xBF\\xBD'"
#: Per file: non-blank lines, lines with a backslash, runs of non-UTF-8 bytes (toValidUTF8 makes each
#: run one U+FFFD, as the Python reader counts them) and lines mixing those with UTF-8 characters.
_LINES_SQL = (
    "SELECT count() AS n, countIf(position(line, '\\\\') > 0) AS escaped, "
    f"sum(countSubstrings(toValidUTF8(line), {_FFFD}) - countSubstrings(line, {_FFFD})) AS non_utf8, "
    # padded: toValidUTF8 swallows the rest of a line after a lead byte cut short at its end ('x\xf1\xc3\xa9')
    f"countIf(NOT isValidUTF8(line) AND length(replaceAll(toValidUTF8(concat(line, '   ')), {_FFFD}, '')) "
    f"!= lengthUTF8(replaceAll(toValidUTF8(concat(line, '   ')), {_FFFD}, ''))) AS mixed, "
    # a CR not ending the line: the Python reader ends a line there, LineAsString only at LF
    "countIf(position(substring(line, 1, length(line) - 1), '\\r') > 0) AS bare_cr "
    "FROM file({path:String}, 'LineAsString') WHERE line NOT IN ('', '\\r')"
)
_NATIVE_SETTINGS = (
    " SETTINGS input_format_csv_skip_first_lines = 1, input_format_allow_errors_ratio = 1,"
    " input_format_allow_errors_num = 1000000000000"
)


def native_load(store: Store, src: Source, fr: FileReport) -> int:
    """Let ClickHouse read and convert one plain/gzipped bulk file; fills ``fr`` like the Python reader.

    Rows with the wrong number of fields are skipped by the engine and counted from the file's
    line count; a file the engine cannot read is re-read in Python to name the failing line.
    """
    cols = set(src.columns)
    first = src.columns[0]
    head_sql, select, keys = _NATIVE_SELECT[src.kind]
    where = " AND ".join(f"{alias} IS NOT NULL" for _, alias in keys)
    source = _native_source(src)
    missing = sorted(_OPTIONAL - cols)
    if missing:
        source = f"(SELECT *, {', '.join(f'{chr(39) * 2} AS {c}' for c in missing)} FROM {source})"
    select = select.format(
        date=_date_sql("test_date"),
        first_use=_date_sql("first_use_date"),
        make=_txt("make"),
        model=_txt("model"),
        comment=_txt("rfr_comment"),
    )
    # line 1 of a pipe file (its header) may start with a byte-order mark
    header = f"lower(trimBoth(if(startsWith(raw_first, {_BOM}), substring(raw_first, 4), raw_first))) = '{first}'"
    fields = ", ".join(src.columns)
    # per key column, the rows lacking it but none before it (FileReport.bad_values)
    lacking = ", ".join(
        f"countIf(NOT {header} AND {alias} IS NULL"
        + "".join(f" AND {before} IS NOT NULL" for _, before in keys[:i])
        + f") AS bad_{name}"
        for i, (name, alias) in enumerate(keys)
    )
    stats_sql = (
        f"SELECT count() AS shaped, countIf({header}) AS headers, {lacking}, "
        f"countIf(arrayExists(x -> position(x, '\\n') > 0, [{fields}])) AS broken "
        f"FROM (SELECT {select}, {first} AS raw_first, {fields} FROM {source})"
    )
    insert_sql = store.sql(f"INSERT INTO {{db}}.{src.kind} {head_sql} SELECT {select} FROM {source} WHERE {where}")
    params = {"path": str(src.path.resolve())}
    if any(c in params["path"] for c in "*?{}\\"):  # file() would take the path for a glob or read escapes
        return _python_load(store, src, fr, _CHUNK_ROWS)
    try:
        lines = store.query_df(_LINES_SQL, params)
        mixed, bare_cr, escaped = (int(lines[c].iloc[0]) for c in ("mixed", "bare_cr", "escaped"))
        if mixed or bare_cr or (src.delimiter == "," and escaped):
            # Python reads these: a comma file with a backslash (DVSA writes \" from 2024 on; the Python
            # reader undoes any backslash escape, ClickHouse's CSV reader none: \" took the rest of the
            # file into one field), a line mixing UTF-8 and latin-1 (convertCharset would re-encode
            # the whole field, mojibake of its UTF-8 part), and a CR inside a line (a line end there)
            return _python_load(store, src, fr, _CHUNK_ROWS)
        st = store.query_df(stats_sql + _NATIVE_SETTINGS, params).iloc[0]
        if src.delimiter == "," and int(st["broken"]):
            # a line break inside a field: the Python reader skips such a row as a quote that ran on
            return _python_load(store, src, fr, _CHUNK_ROWS)
        headers = int(st["headers"]) - (1 if src.delimiter == "|" else 0)  # LineAsString keeps line 1
        shaped = int(st["shaped"]) - (1 if src.delimiter == "|" else 0)
        fr.rows = int(lines["n"].iloc[0]) - 1 - headers  # every line but the header and its repeats
        fr.header_rows = headers
        fr.bad_values = {name: int(st[f"bad_{name}"]) for name, _ in keys if int(st[f"bad_{name}"])}
        fr.bad_rows = (fr.rows + headers - shaped) + sum(fr.bad_values.values())
        fr.non_utf8_values = int(lines["non_utf8"].iloc[0])
        if fr.mostly_bad:  # refused before any row goes in: the Python reader names the first bad record
            for _ in _typed_tables(src, FileReport(src.name, src.kind, src.delimiter), _CHUNK_ROWS):
                pass
        store.command(insert_sql + _NATIVE_SETTINGS, params)
    except BulkFormatError:
        raise
    except Exception as e:  # the engine failed: the Python reader names the file and line
        for _ in iter_raw(src, FileReport(src.name, src.kind, src.delimiter)):
            pass
        raise BulkFormatError(f"{src.name}:0: ClickHouse could not read the file: {e}") from e
    return fr.rows - fr.bad_rows


_COMBOS_SQL = """
SELECT i.rfr_id AS rfr_id, r.test_class_id AS test_class_id, i.location_id AS location_id,
       i.rfr_comment AS rfr_comment, i.rfr_type_code AS rfr_type_code, i.dangerous_mark AS dangerous_mark,
       r.test_date >= toDate32({cutoff:String}) AS post, count() AS n
FROM {db}.test_item AS i FINAL
INNER JOIN (
    SELECT test_id, any(test_date) AS test_date, any(test_class_id) AS test_class_id
    FROM {db}.test_result FINAL GROUP BY test_id
) AS r ON i.test_id = r.test_id
GROUP BY rfr_id, test_class_id, location_id, rfr_comment, rfr_type_code, dangerous_mark, post
ORDER BY rfr_id, test_class_id, location_id, rfr_comment, rfr_type_code, dangerous_mark, post
SETTINGS join_algorithm = 'full_sorting_merge,hash'
"""


def _lookups_from_store(store: Store) -> Lookups:
    d = store.query_df(store.sql("SELECT * FROM {db}.item_detail FINAL"))
    d = d.replace({"": None})
    d["test_item_id"] = d["test_item_id"].where(d["test_item_id"] >= 0)
    roots = {
        (int(i), int(c)): r
        for i, c, r in zip(d["test_item_id"].fillna(-1), d["test_class_id"], d["group_root"].fillna(""), strict=True)
    }
    has_roots = store.query_df(
        "SELECT count() AS n FROM system.tables WHERE database = {db:String} AND name = 'item_group_root'",
        {"db": store.database},
    )
    if int(has_roots["n"].iloc[0]):  # absent in a store loaded by an earlier motlens
        g = store.query_df(store.sql("SELECT test_item_id, test_class_id, group_root FROM {db}.item_group_root FINAL"))
        for i, c, r in zip(g["test_item_id"], g["test_class_id"], g["group_root"], strict=True):
            roots[(int(i), int(c))] = str(r)
    loc = store.query_df(store.sql("SELECT location_id, location FROM {db}.rfr_location FINAL"))
    locations = {int(i): str(s) for i, s in zip(loc["location_id"], loc["location"], strict=True)}
    return Lookups(d.drop(columns="group_root"), roots, locations)


def aggregate_texts(
    text: np.ndarray, section: np.ndarray, severity: pd.Series, n: np.ndarray, group: np.ndarray | None = None
) -> pd.DataFrame:
    """Distinct texts with label counts; ``section``/``severity`` are the majority labels;
    ``split_groups``: the sorted distinct ``group`` values (rows' split groups, None: none) of each text."""
    df = pd.DataFrame({"text": text, "section": section, "severity": severity.to_numpy(), "n": n, "group": group})
    df = df[(df["section"] >= 0) & df["severity"].notna()]
    sev = df.pivot_table(index="text", columns="severity", values="n", aggfunc="sum", fill_value=0)
    sec = df.pivot_table(index="text", columns="section", values="n", aggfunc="sum", fill_value=0)
    sev = sev.reindex(columns=list(SEVERITIES), fill_value=0)
    sec = sec.reindex(columns=list(range(9)), fill_value=0)
    out = pd.DataFrame(index=sev.index)
    # ties go to the first label in contract order (deterministic)
    out["section"] = sec.to_numpy().argmax(axis=1).astype("int8")
    out["severity"] = np.asarray(SEVERITIES, dtype=object)[sev.to_numpy().argmax(axis=1)]
    out["n"] = sev.sum(axis=1).astype("int64")
    for s, col in zip(SEVERITIES, SEVERITY_COUNT_COLUMNS, strict=True):
        out[col] = sev[s].astype("int64")
    for i, col in enumerate(SECTION_COUNT_COLUMNS):
        out[col] = sec[i].astype("int64")
    pairs = df.dropna(subset=["group"])[["text", "group"]].drop_duplicates().sort_values(["text", "group"])
    groups = pairs.groupby("text")["group"].agg(tuple)
    out["split_groups"] = groups.reindex(out.index).map(lambda g: g if isinstance(g, tuple) else ())
    out = out.reset_index().sort_values(["n", "text"], ascending=[False, True], kind="stable")
    return out.reset_index(drop=True)


def distinct_texts_from_tidy(tidy: pd.DataFrame) -> pd.DataFrame:
    """The same distinct-text table computed from a tidy DataFrame (the Parquet path)."""
    return aggregate_texts(
        tidy["text"].to_numpy(dtype=object),
        tidy["section"].to_numpy(dtype=np.int8),
        tidy["severity"],
        np.ones(len(tidy), dtype=np.int64),
        tidy["split_group"].to_numpy(dtype=object) if "split_group" in tidy else None,
    )


def distinct_texts(
    store: Store | None = None,
    settings: DataSettings | None = None,
    ch_path: Path | None = None,
    report: BulkReport | None = None,
) -> pd.DataFrame:
    """Distinct defect texts in the loaded tables: text, section, severity (majority), n, label counts
    and split groups (:func:`aggregate_texts`). ``report`` gets the store's ``orphan_items``,
    ``unknown_rfr`` and ``unlabelled`` (defect rows of its de-duplicated tables).

    The join with ``test_result`` and the de-duplication run in ClickHouse; only one row per
    (defect, class, location, comment, type, 2018-regime) combination comes back to Python. Both
    tables are sorted by ``test_id``, so the join is a streaming sort-merge (no hash table of
    billions of tests in memory).
    """
    if store is None:
        with open_store(settings, ch_path, create=False) as s:
            return distinct_texts(s, report=report)
    loaded = store.query_df(
        "SELECT count() AS n FROM system.tables"
        " WHERE database = {db:String} AND name IN ('item_detail', 'test_item', 'test_result')",
        {"db": store.database},
    )
    if int(loaded["n"].iloc[0]) < 3:
        raise _no_data(f"{store.location} (database {store.database})")
    lk = _lookups_from_store(store)
    combos = store.query_df(store.sql(_COMBOS_SQL), {"cutoff": mot_labels.EU_CUTOFF.isoformat()})
    if report is not None:
        items = store.query_df(store.sql("SELECT count() AS n FROM {db}.test_item FINAL"))
        report.orphan_items = int(items["n"].iloc[0]) - int(combos["n"].sum())  # no test to join
    if combos.empty:
        return aggregate_texts(np.array([], dtype=object), np.array([], dtype=np.int8), pd.Series([]), np.array([]))
    combos = combos.replace({"rfr_comment": {"": None}, "dangerous_mark": {"": None}})
    m = with_detail(combos, lk.detail)
    known = m["rfr_desc"].notna()
    m, unknown = m[known].reset_index(drop=True), m[~known]
    text, section, severity = label_defects(m, m["post"].astype(bool), lk)
    n = m["n"].to_numpy(dtype=np.int64)
    if report is not None:
        report.unknown_rfr = int(unknown["n"].sum())
        report.unlabelled = int(n[(section < 0) | severity.isna().to_numpy()].sum())
    return aggregate_texts(text, section, severity, n, defect_groups(m))


def table_counts(store: Store) -> dict[str, int]:
    """Rows per loaded table after de-duplication."""
    out = {}
    for t in ("test_result", "test_item", "item_detail", "rfr_location"):
        df = store.query_df(store.sql(f"SELECT count() AS n FROM {{db}}.{t} FINAL"))
        out[t] = int(df["n"].iloc[0])
    return out
