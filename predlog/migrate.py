"""Versioned DDL: ``migrations/NNN_name.sql`` (single server) or ``migrations/cluster/`` (Replicated +
Distributed), applied in order and recorded in ``schema_migrations`` with a checksum.

The ledger is read first: with nothing pending no DDL runs (a read-only user can open the log);
``motlens log migrate`` also creates again a table dropped after its migration was recorded.
Readers never migrate (:func:`check`); the writer does when ``auto_migrate`` is on (:func:`apply`).
Either way the tables' columns are compared with :data:`predlog.schema.TABLES` and a table that
differs (an older or foreign ``predictions`` that ``CREATE TABLE IF NOT EXISTS`` left in place) is
refused, naming its missing and mistyped columns. A migration whose file has a ``-- optional: WHY``
line (a projection or an index: every read gives the same answer without it) only makes readers warn
while it is pending.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import Any

from predlog.schema import TABLES, differences
from predlog.settings import PredlogSettings

log = logging.getLogger(__name__)
_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
_OPTIONAL = re.compile(r"^--\s*optional:", re.MULTILINE)
#: a quoted literal or identifier, a ``--`` comment, a run of whitespace, or anything else
_TOKEN = re.compile(r"""'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.)*"|`(?:[^`\\]|\\.)*`|--[^\n]*|\s+|[^'"`\s-]+|-""")

#: checksums recorded before v2 (sha256 of the raw file, comments included), mapped to the
#: statements' checksum of that same file: a ledger written by an older release stays valid as
#: long as the migration's statements are unchanged, whatever its comments say now
LEGACY_CHECKSUMS: dict[str, str] = {
    # migrations/
    "0495ffb55dca78f29e5d7e5f47e601ace71a14e22c9a86651dac6f19881a3a2b": "47106bbe4a2209efb703e47c2f4a44b387d15d3523fcdf245728ec062cacf879",  # noqa: E501
    "c1d4ab9828efd8136387c58ccc99f21f24fe66f57f9a2670bfae9f97c7d6f850": "e23ab7764f4bedc4b51868de0423fe3c6005d1f69f57418dcb616a9eda7e5fa7",  # noqa: E501
    "5bec63723af09ad2ba40f22b0d98a86821fa9175dde9c91111e473f3d8a47d57": "365c4231aa77b4ff18d939a25af7d624175afe0d05f0d6c4d9294271e8570202",  # noqa: E501
    # migrations/cluster/
    "dfe5d24e39b4d224a7bc5118bd5c9b3a4583b9620ca5c5e2d99f31893a9b46e9": "43394e301fa7444fcb33195d0c6c377c80b9d8d0cf554276894d9b0dd5874ca4",  # noqa: E501
    "ff05c22a9f3dd6f9d46a0883d9b4a76a09929934bbfea85a356485da1141a7fa": "2a711f3dee8ee666ec7e3e1054919afbbc3b316733c68c15f26727b25720c107",  # noqa: E501
    "5204131903f6185d0cb82f28fc325e9fbd8085107115ca342b92a1e9d4c54445": "b736226bccf6437223decc58f38ef481d8503d60c103b160078781acab3d565b",  # noqa: E501
}


class SchemaError(RuntimeError):
    """The server's prediction-log schema cannot be used as it is (behind, changed, or mismatched)."""


def normalize(sql: str) -> str:
    """``sql`` without comments, its whitespace collapsed to one space (quoted text kept as it is)."""
    out: list[str] = []
    for token in _TOKEN.findall(sql):
        if token.startswith("--"):
            continue
        if token.isspace():
            if out and out[-1] != " ":
                out.append(" ")
            continue
        out.append(token)
    return "".join(out).strip()


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """sha256 of the statements (comments dropped, whitespace normalised, templates unfilled)."""
        return hashlib.sha256(";\n".join(normalize(s) for s in self._split(self.sql)).encode()).hexdigest()

    @property
    def optional(self) -> bool:
        """Marked ``-- optional: WHY`` in its file: readers do without it (only slower), so one pending
        makes them warn, not refuse. Never for tables or columns."""
        return bool(_OPTIONAL.search(self.sql))

    @property
    def legacy_checksum(self) -> str:
        """What releases before v2 recorded: sha256 of the raw file."""
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def accepts(self, recorded: str) -> bool:
        """Whether a ledger checksum records this migration's statements (either scheme)."""
        return recorded in (self.checksum, self.legacy_checksum) or LEGACY_CHECKSUMS.get(recorded) == self.checksum

    @staticmethod
    def _split(text: str) -> list[str]:
        body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
        return [s.strip() for s in re.split(r";\s*(?:\n|$)", body) if s.strip()]

    def statements(self, database: str, ttl_days: int) -> list[str]:
        """The migration's statements with ``${db}`` and ``${ttl_days}`` filled in (comments dropped)."""
        return self._split(Template(self.sql).substitute(db=database, ttl_days=int(ttl_days)))


def load(cluster: bool = False) -> list[Migration]:
    """All migrations of a variant, ordered by version (000 is the bootstrap)."""
    folder = resources.files("predlog").joinpath("migrations", *(["cluster"] if cluster else []))
    out = []
    for entry in folder.iterdir():
        m = _NAME.match(entry.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    return sorted(out, key=lambda m: m.version)


def _ledger(client: Any, db: str) -> dict[int, str] | None:
    """Recorded version → checksum, or None when there is no ``schema_migrations`` table (SELECTs only)."""
    exists = client.query(
        "SELECT count() FROM system.tables WHERE database = {d:String} AND name = 'schema_migrations'",
        parameters={"d": db},
    ).result_rows[0][0]
    if not int(exists):
        return None
    rows = client.query(
        f"SELECT version, argMax(checksum, applied_at) FROM {db}.schema_migrations GROUP BY version"
    ).result_rows
    return {int(r[0]): str(r[1]) for r in rows}


def pending(client: Any, settings: PredlogSettings) -> list[Migration]:
    """The migrations the ledger lacks (every one when there is none); a recorded migration whose
    statements changed since raises :class:`SchemaError`. Runs SELECTs only."""
    migrations = load(settings.cluster)[1:]
    done = _ledger(client, settings.database) or {}
    for m in migrations:
        if m.version in done and not m.accepts(done[m.version]):
            raise SchemaError(f"migration {m.version:03d}_{m.name} changed after it was applied; add a new one instead")
    return [m for m in migrations if m.version not in done]


def verify(client: Any, database: str) -> None:
    """Refuse tables whose columns differ from :data:`predlog.schema.TABLES` (missing, or another type)."""
    rows = client.query(
        "SELECT table, name, type FROM system.columns WHERE database = {d:String} AND table IN {t:Array(String)} "
        "ORDER BY table, position",
        parameters={"d": database, "t": list(TABLES)},
    ).result_rows
    found: dict[str, list[tuple[str, str]]] = {}
    for table, name, type_ in rows:
        found.setdefault(str(table), []).append((str(name), str(type_)))
    if missing := [f"{database}.{table}" for table in TABLES if table not in found]:
        raise SchemaError(
            f"the prediction-log table {', '.join(missing)} does not exist (dropped or renamed since it was "
            "created?): rename it back, or run `motlens log migrate` as a user allowed DDL to create it again"
        )
    if problems := [f"{database}.{t}: " + "; ".join(diff) for t in TABLES if (diff := differences(t, found[t]))]:
        raise SchemaError(
            "the prediction-log tables do not match this release's schema: " + " | ".join(problems)
            + ". An older or foreign table is in the way: migrate its rows into a new table (or rename it) and "
            "run `motlens log migrate`"
        )  # fmt: skip


def check(client: Any, settings: PredlogSettings) -> None:
    """A reader's check (SELECTs only, never DDL): every required migration applied (a pending optional
    one is warned about) and the tables as declared."""
    todo = pending(client, settings)
    names = ", ".join(f"{m.version:03d}_{m.name}" for m in todo)
    if any(not m.optional for m in todo):
        raise SchemaError(
            f"the prediction log in database {settings.database} is behind this release (pending: {names}); "
            "run `motlens log migrate` as a user allowed DDL, or start the predictor (its writer migrates "
            "when MOTLENS_PREDLOG_AUTO_MIGRATE is on)"
        )
    if todo:
        log.warning(
            "predlog: the prediction log in database %s lacks optional migration %s (reads give the same "
            "answers without it, some slower); run `motlens log migrate` as a user allowed DDL",
            settings.database, names,
        )  # fmt: skip
    verify(client, settings.database)


def _ttl_table(settings: PredlogSettings) -> str:
    return f"{settings.database}.predictions" + ("_local" if settings.cluster else "")


def table_ttl_days(client: Any, settings: PredlogSettings) -> int | None:
    """The ``predictions`` table's TTL in days, as the server reports it (None: no TTL / no table)."""
    db, _, name = _ttl_table(settings).partition(".")
    rows = client.query(
        "SELECT create_table_query FROM system.tables WHERE database = {d:String} AND name = {n:String}",
        parameters={"d": db, "n": name},
    ).result_rows
    m = re.search(r"\bTTL\b.*?toIntervalDay\((\d+)\)", str(rows[0][0])) if rows else None
    return int(m.group(1)) if m else None


def sync_ttl(client: Any, settings: PredlogSettings, *, modify: bool) -> tuple[int, int] | None:
    """When the table's TTL differs from ``settings.ttl_days``: ``modify`` runs ``ALTER TABLE … MODIFY TTL``
    (ClickHouse then recomputes the TTL of every part), otherwise a warning. Returns (was, now) or None."""
    was = table_ttl_days(client, settings)
    if was is None or was == settings.ttl_days:
        return None
    if not modify:
        log.warning(
            "predlog: %s keeps a TTL of %d days but MOTLENS_PREDLOG_TTL_DAYS is %d; run `motlens log migrate` "
            "to apply it", _ttl_table(settings), was, settings.ttl_days
        )  # fmt: skip
        return None
    on_cluster = " ON CLUSTER '{cluster}'" if settings.cluster else ""
    client.command(
        f"ALTER TABLE {_ttl_table(settings)}{on_cluster} "
        f"MODIFY TTL toDateTime(ts) + INTERVAL {int(settings.ttl_days)} DAY DELETE"
    )
    log.info("predlog: %s TTL changed from %d to %d days", _ttl_table(settings), was, settings.ttl_days)
    return was, settings.ttl_days


def _missing(client: Any, settings: PredlogSettings) -> set[str]:
    """The tables the migrations create that are gone (dropped after their migration was recorded)."""
    names = [*TABLES, *(f"{t}_local" for t in TABLES if settings.cluster)]
    rows = client.query(
        "SELECT name FROM system.tables WHERE database = {d:String} AND name IN {t:Array(String)}",
        parameters={"d": settings.database, "t": names},
    ).result_rows
    return set(names) - {str(r[0]) for r in rows}


_TABLE_NAMED = re.compile(r"\$\{db\}\.(\w+)")


def apply(client: Any, settings: PredlogSettings, *, modify_ttl: bool = False, recreate: bool = False) -> list[int]:
    """Apply pending migrations through a clickhouse-connect client; returns the versions applied.

    The ledger is read first: with nothing pending no DDL runs. With ``recreate`` (``motlens log migrate``)
    a table dropped after its migration was recorded is created again: the migrations naming it run once
    more (each one is idempotent: ``IF NOT EXISTS``), only the pending ones are recorded. The writer does not:
    a table renamed away for maintenance must not be replaced under the DBA (its rows wait in the spool).
    A recorded migration whose statements
    changed is refused (write a new migration instead). The tables are then checked against
    :data:`predlog.schema.TABLES` before this run's migrations are recorded, so a foreign table is
    refused (:class:`SchemaError`) and never recorded as migrated (also when a later migration's ``ALTER``
    fails on it). A TTL that differs from
    ``settings.ttl_days`` is changed with ``modify_ttl`` (``motlens log migrate``), else warned about.
    """
    db = settings.database
    migrations = load(settings.cluster)
    todo = pending(client, settings)
    gone = _missing(client, settings) if recreate else set()
    # a recorded migration runs again only for a table that is gone (its ALTERs too: a projection of a
    # recreated table); rerunning another's MATERIALIZE would rebuild a whole live table
    run = [m for m in migrations[1:] if m in todo or gone & set(_TABLE_NAMED.findall(m.sql))]
    if run:
        if db != "default":
            on_cluster = " ON CLUSTER '{cluster}'" if settings.cluster else ""
            client.command(f"CREATE DATABASE IF NOT EXISTS {db}{on_cluster}")
        for stmt in migrations[0].statements(db, settings.ttl_days):
            client.command(stmt)
        for m in run:
            for stmt in m.statements(db, settings.ttl_days):
                try:
                    client.command(stmt)
                except Exception:
                    verify(client, db)  # a foreign table an ALTER cannot change: name its mismatch instead
                    raise
    verify(client, db)
    for m in todo:
        client.insert(
            f"{db}.schema_migrations",
            [[m.version, m.name, m.checksum]],
            column_names=["version", "name", "checksum"],
        )
        log.info("predlog: applied migration %03d_%s", m.version, m.name)
    sync_ttl(client, settings, modify=modify_ttl)
    return [m.version for m in todo]
