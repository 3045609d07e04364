"""``motlens train``: train and register a version; ``motlens train versions``: list the registry;
``motlens train pin``: pin an older version's bundle digest."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from motlens.argtypes import nonempty_flag, path_flag
from training.data_cli import positive


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the defect head, log an MLflow run, register a version + alias",
        description=__doc__,
    )
    p.add_argument("--data", help="tidy Parquet directory (motlens data load) or a directory of DVSA bulk files")
    p.add_argument(
        "--clickhouse",
        action="store_true",
        help="read distinct texts with label counts from ClickHouse (motlens data load --clickhouse)",
    )
    p.add_argument("--ch-path", type=path_flag, help="chdb database directory (default $MOTLENS_HOME/chdb-data)")
    p.add_argument("--alias", help="alias to set on the new version (default: candidate)")
    p.add_argument("--no-alias", action="store_true", help="register without setting an alias")
    p.add_argument("--reason", help="why the version gets its alias, kept in the audit trail (MOTLENS_TRAIN_REASON)")
    p.add_argument("--actor", help="who sets the alias, for the audit (default $MOTLENS_TRAIN_ACTOR, else user@host)")
    p.add_argument("--seed", type=int, help="seed of the head's initialisation and shuffling (default 0)")
    p.add_argument(
        "--split-seed",
        type=int,
        help="seed of the train/held-out split (default 0); independent of --seed, so a retrain with another "
        "--seed evaluates on the same held-out texts",
    )
    p.add_argument(
        "--split-by",
        choices=("text", "defect"),
        help="held-out texts: new wordings (another location or tester comment) of defects seen in training "
        "(text, the default) or defects the head has not seen (defect; DVSA bulk rows only)",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--hidden", type=int, help="ReLU trunk width (0: linear heads)")
    p.add_argument(
        "--max-rows",
        type=int,
        help="with --data: read only the first N defect rows (of raw bulk files: the first N joined rows, in "
        "hash-partition order, after the whole input has been read and partitioned; run `motlens data load "
        "--out` once and train on that table instead). Not with --clickhouse (it reads no rows): use --max-texts",
    )
    p.add_argument(
        "--max-texts",
        type=int,
        help="keep the N distinct texts with the most rows (both --data and --clickhouse): what bounds "
        "embedding time and memory",
    )
    p.add_argument("--holdout-fraction", type=float)
    p.add_argument(
        "--heldout-max-texts",
        type=int,
        help="held-out texts kept with their embeddings (run artifact heldout/) for the promotion gate's "
        "paired comparison (default 20000, a uniform sample beyond; 0: none)",
    )
    p.add_argument("--device", help="cpu | cuda[:N] (default: cuda when present)")
    p.add_argument("--work-dir", help="keep the built bundle and reports here")
    p.add_argument(
        "--tracking-uri",
        type=nonempty_flag,
        help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI or local sqlite)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_train)
    tsub = p.add_subparsers(dest="train_command", metavar="{versions,pin}")
    # given before or after the subcommand (`train --json versions`, `train versions --json`): a
    # subcommand's own default would overwrite the value given to `train`
    v = tsub.add_parser("versions", help="list registered versions with aliases, tags and metrics")
    v.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    v.add_argument("--tracking-uri", type=nonempty_flag, default=argparse.SUPPRESS)
    v.add_argument("--limit", type=positive, help="only the newest N versions (default: all)")
    v.set_defaults(func=_versions)
    pin = tsub.add_parser(
        "pin",
        help="record the bundle digest of a version registered before 2026-12-01 (motlens.bundle_sha256)",
        description="Verify VERSION's stored bundle and record its bundle.json sha256 as the version's "
        "motlens.bundle_sha256 tag, which every fetch and every pinned InferenceService then checks. Without "
        "--sha256 the pin trusts the artifact store as it is now.",
    )
    pin.add_argument("version", help="version number or alias")
    pin.add_argument(
        "--sha256", type=_sha256, help="the digest it must have (e.g. from an earlier audit); refused otherwise"
    )
    pin.add_argument("--tracking-uri", type=nonempty_flag, default=argparse.SUPPRESS)
    pin.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    pin.set_defaults(func=_pin)


_FLAGS = (
    "seed",
    "split_seed",
    "split_by",
    "epochs",
    "batch_size",
    "lr",
    "hidden",
    "max_rows",
    "max_texts",
    "heldout_max_texts",
    "holdout_fraction",
    "device",
    "reason",
    "actor",
    "work_dir",
)


def _sha256(text: str) -> str:
    """argparse type: a sha256 as the registry records it (64 lowercase hex characters)."""
    import re

    from motlens.bundle import SHA256_PATTERN

    if not re.fullmatch(SHA256_PATTERN, text):
        raise argparse.ArgumentTypeError(f"expected 64 lowercase hex characters, got {text[:80]!r}")
    return text


def _train(args: argparse.Namespace) -> int:
    from motlens.cli import require

    require("sklearn", "train")
    require("matplotlib", "train")

    from pydantic import ValidationError

    from motlens.errors import env_name, flag_names, report_settings
    from training.dataset import DataError
    from training.dvsa_report import BulkFormatError, BulkResourceError
    from training.registry import Registry, RegistryError
    from training.train import TrainSettings, train

    if not args.data and not args.clickhouse:
        print("motlens train: give --data DIR or --clickhouse (or use `motlens train versions`)", file=sys.stderr)
        return 2
    if args.data and args.clickhouse:
        print("motlens train: give --data DIR or --clickhouse, not both (one would be ignored)", file=sys.stderr)
        return 2
    if args.ch_path and not args.clickhouse:
        print("motlens train: --ch-path is the chdb data --clickhouse reads; give --clickhouse", file=sys.stderr)
        return 2
    overrides = {k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None}
    if args.alias is not None:
        overrides["alias"] = args.alias
    if args.no_alias:
        overrides["alias"] = None
    try:
        settings = TrainSettings(**overrides)
    except ValidationError as e:
        flagged = [k for k in overrides if k in _FLAGS] + (["alias"] if args.alias is not None else [])
        return report_settings("motlens train", e, flag_names(flagged))
    if args.clickhouse and settings.max_rows is not None:
        name = "--max-rows" if args.max_rows is not None else env_name(TrainSettings, "max_rows")
        print(
            f"motlens train: bad setting: {name}: counts input rows, which --clickhouse does not read; "
            "use --max-texts N for the N distinct texts with the most rows",
            file=sys.stderr,
        )
        return 2
    from motlens.sigterm import EXIT_TERMINATED, Terminated, sigterm_unwinds

    try:  # SIGTERM unwinds (temporary files removed), but not a registration once begun (training.train)
        with sigterm_unwinds():
            data = _clickhouse_set(args, settings) if args.clickhouse else Path(args.data)
            source = clickhouse_source(Path(args.ch_path) if args.ch_path else None) if args.clickhouse else None
            result = train(data, settings, registry=Registry(args.tracking_uri), source=source)
    except (DataError, BulkFormatError, BulkResourceError, FileNotFoundError, RegistryError) as e:
        print(f"motlens train: {e}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"motlens train: stopped by SIGTERM{f': {e}' if str(e) else ''}", file=sys.stderr)
        return EXIT_TERMINATED
    v = result.version
    floors = result.floors
    say_audit_gaps(v.version, result.audit_gaps)
    # registered either way (the audit trail); the alias only when the held-out metrics clear the floors
    if args.json:
        print(
            json.dumps(
                {
                    "version": v.to_json(),
                    "fingerprint": result.fingerprint,
                    "timings": result.timings,
                    "floors": None
                    if floors is None
                    else {"passed": floors.passed and not floors.unchecked, "detail": floors.describe(),
                          "values": floors.values, "unchecked": floors.unchecked},
                    "alias_withheld": result.alias_withheld,
                },
                indent=2,
            )
        )
        return say_withheld(result)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"registered {v.name} version {v.version} (aliases: {', '.join(v.aliases) or 'none'})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, val in sorted(result.metrics.items()):
        t.add_row(k, f"{val:.4f}")
    c = Console()
    c.print(t)
    fp = result.fingerprint
    c.print(
        f"data {fp['sha256'][:12]}: {fp['rows_labelled']} rows, {fp['distinct_texts']} distinct texts "
        f"({fp['train_texts']} train / {fp['holdout_texts']} held out); "
        f"{result.timings['total_s']:.1f} s total, {result.timings['embed_s']:.1f} s embedding"
    )
    c.print(f"run {v.run_id}\nartifact URI {v.artifact_uri}", soft_wrap=True, markup=False, highlight=False)
    if floors is not None and not result.alias_withheld:
        c.print(floors.describe())
    return say_withheld(result)


#: the exit code of a version registered without its alias because it failed the quality floors
EXIT_BELOW_FLOORS = 3
#: what to do about it (docs/training.md "Quality floors")
FLOORS_HINT = (
    "train on more or cleaner data; MOTLENS_TRAIN_FLOOR_MARGIN / MOTLENS_TRAIN_FLOOR_AUC_MARGIN set the floors, "
    'MOTLENS_TRAIN_ALIAS_REQUIRES_FLOORS=false sets the alias anyway (docs/training.md "Quality floors")'
)


def say_audit_gaps(version: str, gaps: list[str], prog: str = "motlens train") -> None:
    """One stderr line when an alias's audit record is incomplete: the alias stands, the exit code is kept."""
    if gaps:
        print(f"{prog}: version {version} has its alias, but its audit record is incomplete: " + "; ".join(gaps),
              file=sys.stderr)  # fmt: skip


def say_withheld(result, prog: str = "motlens train", hint: str = FLOORS_HINT) -> int:  # noqa: ANN001 - TrainResult
    """The exit code of ``result``: 0, or :data:`EXIT_BELOW_FLOORS` after one closing stderr line naming
    the floors that failed and what to do (``motlens train``, ``motlens demo``)."""
    if not result.alias_withheld:
        return 0
    floors = result.floors
    failed = "; ".join(floors.failed) if floors is not None else "see the warning above"
    if floors is not None and floors.unchecked:
        failed = "; ".join(filter(None, [failed, "not checked: " + "; ".join(floors.unchecked)]))
    print(
        f"{prog}: version {result.version.version} registered without alias {result.alias_withheld!r}: "
        f"below the quality floors (exit {EXIT_BELOW_FLOORS}): {failed}; {hint}",
        file=sys.stderr,
    )
    return EXIT_BELOW_FLOORS


def _versions(args: argparse.Namespace) -> int:
    from training.registry import Registry, RegistryError

    try:
        versions = Registry(args.tracking_uri).versions(include_incomplete=True, limit=args.limit)
    except RegistryError as e:
        print(f"motlens train versions: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([v.to_json() for v in versions], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="mot-defects versions")
    for col in ("ver", "aliases", "created (UTC)", "sec F1", "sev F1", "fail AUC", "run"):
        t.add_column(col, no_wrap=col != "aliases", min_width=12 if col == "aliases" else None)
    for v in versions:
        m = v.metrics
        t.add_row(
            v.version,
            ", ".join(v.aliases),
            v.created_at.strftime("%m-%d %H:%M") if v.created_at else "",
            *(f"{m[k]:.3f}" if k in m else "" for k in ("section_macro_f1", "severity_macro_f1", "fail_auc")),
            (v.run_id or "")[:8],
        )
    c = Console()
    c.print(t if versions else "no registered versions")
    for v in versions:
        if v.incomplete:
            c.print(f"version {v.version}: registration incomplete (killed or failed part-way); never served")
    return 0


def _pin(args: argparse.Namespace) -> int:
    from training.registry import PINNED_LATER_TAG, Registry, RegistryError

    try:
        info, digest, newly = Registry(args.tracking_uri).pin(args.version, expect=args.sha256)
    except RegistryError as e:
        print(f"motlens train pin: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"version": info.version, "bundle_sha256": digest, "pinned_now": newly}))
    elif newly:
        print(f"version {info.version} pinned: bundle.json sha256 {digest}")
    else:
        when = info.tags.get(PINNED_LATER_TAG)
        since = f"by `motlens train pin` at {when}" if when else "at registration"
        print(f"version {info.version} was pinned {since}: bundle.json sha256 {digest} (verified)")
    return 0


def _clickhouse_set(args: argparse.Namespace, settings):  # noqa: ANN202 - TrainingSet

    from training.chload import distinct_texts
    from training.dataset import training_set_from_distinct

    distinct = distinct_texts(ch_path=Path(args.ch_path) if args.ch_path else None)
    return training_set_from_distinct(
        distinct,
        seed=settings.split_seed,
        holdout_fraction=settings.holdout_fraction,
        split_by=settings.split_by,
        reference_rows=settings.reference_rows,
        max_texts=settings.max_texts,
    )


def clickhouse_source(ch_path: Path | None = None) -> dict[str, str]:
    """Where ``train --clickhouse`` reads (as :func:`training.chload.open_store` picks it): the server
    URL without its user part, or the chdb directory; the database and the query. Never the password."""
    from motlens.credentials import redact
    from training.chload import DataSettings

    s = DataSettings()
    where = (
        {"engine": "server", "url": redact(s.clickhouse_url)}
        if s.clickhouse_url and ch_path is None
        else {"engine": "chdb", "path": str(Path(ch_path or s.chdb_dir()).absolute())}
    )
    return {
        "kind": "clickhouse",
        **where,
        "database": s.database,
        "query": "distinct texts with label counts of test_item JOIN test_result (FINAL), all loaded rows",
    }
