"""Versioned DDL: ``migrations/NNN_name.sql`` (single server) or ``migrations/cluster/`` (Replicated +
Distributed), applied in order and recorded in ``schema_migrations`` with a checksum."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import Any

from predlog.settings import PredlogSettings

log = logging.getLogger(__name__)
_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def statements(self, database: str, ttl_days: int) -> list[str]:
        """The migration's statements with ``${db}`` and ``${ttl_days}`` filled in (comments dropped)."""
        text = Template(self.sql).substitute(db=database, ttl_days=int(ttl_days))
        body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
        return [s.strip() for s in re.split(r";\s*(?:\n|$)", body) if s.strip()]


def load(cluster: bool = False) -> list[Migration]:
    """All migrations of a variant, ordered by version (000 is the bootstrap)."""
    folder = resources.files("predlog").joinpath("migrations", *(["cluster"] if cluster else []))
    out = []
    for entry in folder.iterdir():
        m = _NAME.match(entry.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    return sorted(out, key=lambda m: m.version)


def apply(client: Any, settings: PredlogSettings) -> list[int]:
    """Apply pending migrations through a clickhouse-connect client; returns the versions applied.

    A recorded migration whose file changed is refused (write a new migration instead).
    """
    db = settings.database
    migrations = load(settings.cluster)
    if db != "default":
        on_cluster = " ON CLUSTER '{cluster}'" if settings.cluster else ""
        client.command(f"CREATE DATABASE IF NOT EXISTS {db}{on_cluster}")
    for stmt in migrations[0].statements(db, settings.ttl_days):
        client.command(stmt)
    done = {
        int(r[0]): r[1]
        for r in client.query(
            f"SELECT version, argMax(checksum, applied_at) FROM {db}.schema_migrations GROUP BY version"
        ).result_rows
    }
    applied = []
    for m in migrations[1:]:
        if m.version in done:
            if done[m.version] != m.checksum:
                raise RuntimeError(
                    f"migration {m.version:03d}_{m.name} changed after it was applied; add a new one instead"
                )
            continue
        for stmt in m.statements(db, settings.ttl_days):
            client.command(stmt)
        client.insert(
            f"{db}.schema_migrations",
            [[m.version, m.name, m.checksum]],
            column_names=["version", "name", "checksum"],
        )
        log.info("predlog: applied migration %03d_%s", m.version, m.name)
        applied.append(m.version)
    return applied
