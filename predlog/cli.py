"""``motlens log``: inspect the prediction log on either backend (count, tail, stats, query), migrate, compact,
replay."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta

from motlens.argtypes import path_flag
from motlens.times import EARLIEST, parse_time

#: the longest `log replay --timeout` (an hour, as the prediction log's other waits)
MAX_TIMEOUT_S = 3600
TAIL_COLUMNS = (
    "ts",
    "model_version",
    "slot",
    "status",
    "section",
    "severity",
    "fail_probability",
    "latency_ms",
    "text",
)
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNBOUNDED = 100_000  # the width a table is measured at: its natural width, unclipped by the terminal


def _since(value: str) -> datetime:
    """``24h``/``30m``/``7d`` ago (a duration reaching before 1970 means 1970), or an ISO timestamp
    (UTC when naive) from 1970 to 2262."""
    m = _DURATION.match(value)
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        now = datetime.now(UTC)
        try:
            return max(EARLIEST, now - timedelta(**{unit: int(m.group(1))}))
        except OverflowError:  # longer than datetime reaches back
            return EARLIEST
    try:
        return parse_time(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected e.g. 24h or an ISO time: {e}") from e


def _param(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"--param: expected NAME=VALUE, got {value!r}")
    return key, val


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("log", help="the prediction log: count | tail | stats | query | migrate | compact | replay")
    verbs = p.add_subparsers(dest="log_command", required=True, metavar="VERB")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    verbs.add_parser("count", parents=[common], help="rows per model version and slot")
    t = verbs.add_parser("tail", parents=[common], help="the newest rows")
    t.add_argument("-n", type=int, default=20)
    s = verbs.add_parser("stats", parents=[common], help="live stats per version and slot (computed in SQL)")
    s.add_argument("--since", type=_since, default="24h", help="window start: 24h, 30m, 7d or an ISO time")
    s.add_argument("--until", type=_since, help="window end (excluded), as --since; default: now")
    s.add_argument("--model-name", default="mot-defects")
    q = verbs.add_parser("query", parents=[common], help="one read-only SQL statement")
    q.add_argument(
        "sql",
        help='e.g. "SELECT slot, count() FROM predictions WHERE model_version = {v:String} GROUP BY slot"',
    )
    q.add_argument("--param", type=_param, action="append", default=[], help="NAME=VALUE for {NAME:Type}")
    verbs.add_parser(
        "migrate", help="apply pending DDL migrations to the ClickHouse server (and MOTLENS_PREDLOG_TTL_DAYS)"
    )
    verbs.add_parser(
        "compact",
        help="embedded backend: delete the predictions days past MOTLENS_PREDLOG_TTL_DAYS, then merge each closed "
        "hour's, then day's, segments into one file",
    )
    r = verbs.add_parser(
        "replay",
        help="drain into ClickHouse the spools predictors left (ClickHouse was down when they stopped); a "
        "directory a running predictor holds is left alone",
    )
    r.add_argument(
        "dirs", nargs="*", type=path_flag, metavar="DIR",
        help="one predictor's directory (its MOTLENS_PREDLOG_DIR; with MOTLENS_PREDLOG_DIR_PER_HOST, DIR/<host name>)",
    )  # fmt: skip
    r.add_argument(
        "--under", type=path_flag, action="append", default=[], metavar="PARENT",
        help="every predictor directory below PARENT (the MOTLENS_PREDLOG_DIR of MOTLENS_PREDLOG_DIR_PER_HOST)",
    )  # fmt: skip
    r.add_argument("--timeout", type=_timeout_s, default=300.0, help="seconds per directory (default 300)")
    r.add_argument("--remove-empty", action="store_true", help="delete a directory once its spools are empty")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import sys

    from clickhouse_connect.driver.exceptions import DatabaseError

    from motlens.errors import describe
    from predlog import open_reader
    from predlog.queries import ReadOnlyViolation
    from predlog.settings import PredlogSettings

    settings = PredlogSettings()
    if args.log_command == "migrate":
        return _migrate(settings)
    if args.log_command == "compact":
        return _compact(settings)
    if args.log_command == "replay":
        return _replay(settings, args)
    if args.log_command == "tail" and not 1 <= args.n <= settings.max_window_rows:
        print(
            f"motlens log tail: bad setting: -n: must be in 1..{settings.max_window_rows}, got {args.n}",
            file=sys.stderr,
        )
        return 2
    reader = open_reader(settings)
    try:
        if args.log_command == "count":
            df = reader.counts()
        elif args.log_command == "tail":
            df = reader.tail(args.n)
            if not args.json:
                df = df[[c for c in TAIL_COLUMNS if c in df.columns]]
        elif args.log_command == "stats":
            if args.until is not None and args.until <= args.since:
                window = f"--until ({args.until.isoformat()}) must come after --since ({args.since.isoformat()})"
                raise ValueError(window)
            df = reader.live_stats(since=args.since, until=args.until, model_name=args.model_name)
        else:
            df = reader.query(args.sql, dict(args.param))
    except (ReadOnlyViolation, ValueError) as e:
        print(f"motlens log {args.log_command}: {e}", file=sys.stderr)
        return 2
    except DatabaseError as e:  # refused by ClickHouse (unknown column, missing parameter) or unreachable
        print(f"motlens log {args.log_command}: {describe(e)}", file=sys.stderr)
        return 2
    finally:
        reader.close()
    _print(df, as_json=args.json)
    return 0


def _migrate(settings) -> int:
    from predlog import migrate
    from predlog.sinks import make_client

    if settings.embedded:
        print("embedded Parquet backend: nothing to migrate (set MOTLENS_CLICKHOUSE_URL)")
        return 0
    client = make_client(settings)
    try:
        was = migrate.table_ttl_days(client, settings)
        applied = migrate.apply(client, settings, modify_ttl=True, recreate=True)
        now = migrate.table_ttl_days(client, settings)
    finally:
        client.close()
    print(f"applied migrations: {applied or 'none pending'}")
    if was is not None and now != was:
        print(f"predictions TTL changed from {was} to {now} days (MOTLENS_PREDLOG_TTL_DAYS)")
    return 0


def _compact(settings) -> int:
    """Every table folder in turn: one held by another compaction is skipped (a note), one that fails
    is reported on stderr, and the others are still compacted; exit 2 if any failed."""
    from motlens.errors import report
    from predlog import compact as compaction

    if not settings.embedded:
        print("ClickHouse backend: MergeTree merges parts itself; nothing to compact")
        return 0
    failed = False
    for table in ("predictions", "drift_reports", "promotion_events"):
        folder = settings.table_dir(table)
        if not folder.is_dir():
            continue
        try:
            for gone in compaction.expire(folder, settings.ttl_days):
                print(f"{table}: {gone.day} deleted, older than {settings.ttl_days} days ({gone.files} files, "
                      f"{gone.bytes} bytes)")  # fmt: skip
            merged = compaction.compact(folder)
        except compaction.CompactBusy as e:
            print(f"{table}: skipped: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - one line per failed table; the other tables still go
            report("motlens log compact", e)
            failed = True
            continue
        for day, rows in merged.items():
            print(f"{table}: {day} compacted ({rows} rows)")
    return 2 if failed else 0


def _replay(settings, args: argparse.Namespace) -> int:
    """A line per directory; exit 1 when rows stay spooled (the sink is down: the next run goes on), 2 on a
    bad invocation."""
    import sys

    from predlog.replay import REMOVING, replay_dir, spool_dirs, sweep

    if settings.embedded:
        print("motlens log replay: needs the ClickHouse sink (MOTLENS_CLICKHOUSE_URL); an embedded log's own "
              "spool is replayed by its server at start", file=sys.stderr)  # fmt: skip
        return 2
    if not args.dirs and not args.under:
        print("motlens log replay: name the directories (DIR ...) or their parent (--under PARENT)", file=sys.stderr)
        return 2
    try:
        dirs = list(dict.fromkeys(p.resolve() for p in [*args.dirs, *spool_dirs(args.under)]))
    except FileNotFoundError as e:
        print(f"motlens log replay: {e}", file=sys.stderr)
        return 2
    if args.remove_empty:  # directories a run cut short moved aside and did not finish deleting
        for parent in dict.fromkeys([*args.under, *(d.parent for d in dirs)]):
            for doomed in parent.glob(f"{REMOVING}*"):
                sweep(doomed)
    failed = False
    for i, path in enumerate(dirs):
        result = replay_dir(settings, path, args.timeout, args.remove_empty)
        print(result.line(), flush=True)
        failed |= result.state in ("pending", "missing", "unusable", "foreign")
        if result.state == "pending" and i + 1 < len(dirs):  # the sink is down or slow: no use waiting on each
            print(f"{len(dirs) - i - 1} more directories left for the next run")
            break
    if not dirs:
        print("no predictor directories found")
    return 1 if failed else 0


def _timeout_s(value: str) -> float:
    number = float(value)
    if not 0 < number <= MAX_TIMEOUT_S:  # NaN and inf fail too
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds above 0 and at most {MAX_TIMEOUT_S}, not {value}"
        )
    return number


def _print(df, *, as_json: bool) -> None:
    """JSON lines, a table where it fits the terminal, else one block per row (``field  value`` lines)."""
    if as_json:
        print(df.to_json(orient="records", lines=True, date_format="iso", default_handler=str), end="")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    names = [str(col) for col in df.columns]
    rows = [
        [_cell(v, cut=name == "text") for name, v in zip(names, row, strict=True)] for row in df.itertuples(index=False)
    ]
    console = Console()
    table = Table(show_lines=False)
    for name in names:
        table.add_column(name)
    for cells in rows:
        table.add_row(*(Text(c) for c in cells))
    if console.measure(table, options=console.options.update_width(_UNBOUNDED)).maximum <= console.width:
        console.print(table)
    else:
        _print_vertical(names, rows)
    print(f"{len(df)} row(s)")


def _print_vertical(names: list[str], rows: list[list[str]]) -> None:
    """Each row as ``row N`` and one indented ``field  value`` line per column (a narrow terminal)."""
    width = max(map(len, names), default=0)
    for number, cells in enumerate(rows, 1):
        print(f"row {number}")
        for name, cell in zip(names, cells, strict=True):
            print(f"  {name:<{width}}  {cell}")


def _cell(v, *, cut: bool) -> str:
    """A value as printed: counts as ``label: count`` (largest first); cut at 80 characters if ``cut``
    (a prediction's text; a promotion's reason or a report's details are printed in full)."""
    if isinstance(v, dict):
        return ", ".join(f"{k}: {n}" for k, n in sorted(v.items(), key=lambda kv: (-int(kv[1]), str(kv[0]))))
    text = str(v)
    return text if not cut or len(text) <= 80 else text[:77] + "..."
