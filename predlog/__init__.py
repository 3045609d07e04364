"""The prediction log: schema, writers (ClickHouse / local Parquet) and readers.

``open_writer(settings)`` for the predictor, ``open_reader(settings)`` for drift, promotion and
``motlens log``. With no ``MOTLENS_CLICKHOUSE_URL`` both use Parquet segments under
``$MOTLENS_HOME/predlog`` (read through chdb); see docs/predlog.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from predlog.records import PredictionRecord
from predlog.settings import PredlogSettings

__all__ = ["PredictionRecord", "PredlogSettings", "open_reader", "open_writer"]

log = logging.getLogger(__name__)


def open_writer(settings: PredlogSettings | None = None):  # -> predlog.writer.PredictionLogWriter
    """Start a background writer for the configured backend (never connects in the foreground: its
    thread connects at once, migrating the server when ``auto_migrate`` is on, else only checking the
    schema; a server that is down then is retried at the first batch). It also takes the server's audit
    rows (``record_event``: ``promotion_events``, spooled in ``spool/events/``). The embedded log also gets an
    :class:`~predlog.autocompact.AutoCompactor` (``compact_interval_s``), stopped by ``close``."""
    from predlog.sinks import ClickHouseSink, ParquetSink
    from predlog.spool import EVENTS_SPOOL, Spool
    from predlog.writer import PredictionLogWriter

    settings = settings or PredlogSettings()
    log.info("predlog: predictions go to %s (spool %s)", settings.sink, settings.spool_dir)
    # the dir's lock; segments spooled for another sink are held, not replayed here (predlog.spool)
    spool = Spool(
        settings.spool_dir, settings.spool_max_bytes, settings.spool_full_policy, settings.sink,
        lock_wait_s=settings.lock_wait_s,
    )  # fmt: skip
    try:  # the server's audit rows (promotion_events) have their own spool beside it
        events_spool = Spool(
            settings.spool_dir / EVENTS_SPOOL, settings.spool_max_bytes, settings.spool_full_policy, settings.sink,
            report=spool.unbound is None, lock_wait_s=settings.lock_wait_s,
        )  # fmt: skip
    except BaseException:
        spool.close()
        raise
    sinks: list[ClickHouseSink | ParquetSink] = []
    for table in ("predictions", "promotion_events"):
        if settings.embedded:
            parquet = ParquetSink(settings.table_dir(table))
            parquet.recover()
            sinks.append(parquet)
        else:
            sinks.append(ClickHouseSink(settings, table))
    writer = PredictionLogWriter(sinks[0], spool, settings, events=(sinks[1], events_spool))
    if settings.embedded and settings.compact_interval_s > 0:
        from predlog.autocompact import AutoCompactor
        from predlog.schema import TABLES

        writer.compactor = AutoCompactor(
            [settings.table_dir(t) for t in TABLES], settings.compact_interval_s, settings.ttl_days
        )
    return writer


def open_reader(settings: PredlogSettings | None = None):  # -> predlog.reader.PredictionLogReader
    """A reader over the server tables or the Parquet segments.

    A reader never migrates (no DDL: a read-only ClickHouse user can read): it checks that every
    migration is applied and that the tables have this release's columns, else raises
    :class:`predlog.migrate.SchemaError` saying what to do (``motlens log migrate``)."""
    from predlog import migrate
    from predlog.reader import ParquetSource, PredictionLogReader, TableSource
    from predlog.sinks import make_client

    settings = settings or PredlogSettings()
    if settings.embedded:
        _check_log_dir(settings.root)
    client = make_client(settings)
    if settings.embedded:
        return PredictionLogReader(client, ParquetSource(settings.root), settings)
    try:
        migrate.check(client, settings)
    except BaseException:
        client.close()
        raise
    return PredictionLogReader(client, TableSource(client, settings.database), settings)


def _check_log_dir(root: Path) -> None:
    """A missing log directory (or table folder) is an empty log; one that a file stands in the way of,
    or that cannot be listed (permissions), is an error naming it, never an empty log. Days a
    compaction has set aside (``.compact-<day>/``, out of the readers' sight) are named in a warning."""
    from predlog.schema import TABLES

    for path in (root, *root.parents):
        if path.exists():
            if not path.is_dir():
                raise NotADirectoryError(f"the prediction log directory {root} cannot exist: {path} is not a directory")
            break
    for folder in (root, *(root / table for table in TABLES)):
        try:
            with os.scandir(folder) as entries:
                merging = sorted(e.name.removeprefix(".compact-") for e in entries if e.name.startswith(".compact-"))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise type(e)(f"cannot list the prediction log folder {folder}: {e.strerror or e}") from e
        if merging:
            log.warning(
                "predlog: %s rows of %s are out of sight while `motlens log compact` merges them (or until it "
                "runs again, if it was interrupted)", folder.name, ", ".join(merging)
            )  # fmt: skip
