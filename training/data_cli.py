"""`motlens data`: synthetic DVSA data; load bulk files or API JSONL into the tidy table or ClickHouse."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from motlens.argtypes import path_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="MOT data: synthetic DVSA files, load bulk files / API JSONL")
    verbs = p.add_subparsers(dest="data_command", required=True, metavar="VERB")

    s = verbs.add_parser("synth", help="write seeded synthetic data in the DVSA bulk-file format")
    s.add_argument("--rows", type=count, required=True, help="number of test_item (defect) rows")
    s.add_argument("--seed", type=count, default=0)
    s.add_argument("--out", type=path_flag, required=True, help="output directory")
    s.add_argument("--delimiter", choices=("pipe", "comma"), default="pipe")
    s.add_argument("--zip", action="store_true", help="write one zip archive per table")
    s.set_defaults(func=_synth)

    ld = verbs.add_parser("load", help="DVSA bulk files / MOT History API JSONL → tidy Parquet or ClickHouse")
    ld.add_argument("paths", nargs="+", type=path_flag, metavar="PATH", help="files, zips or directories")
    ld.add_argument("--out", type=path_flag, help="tidy table directory (Parquet part files)")
    ld.add_argument("--clickhouse", action="store_true", help="load into ClickHouse (chdb, or MOTLENS_CLICKHOUSE_URL)")
    ld.add_argument("--ch-path", type=path_flag, help="chdb database directory (default $MOTLENS_HOME/chdb-data)")
    ld.add_argument(
        "--no-native",
        action="store_true",
        help="with chdb, parse files in Python instead of letting ClickHouse read them",
    )
    ld.add_argument("--chunk-rows", type=positive, default=200_000)
    ld.add_argument(
        "--tmp-dir",
        type=path_flag,
        help="where --out's temporary partition files go (about the input's uncompressed size; "
        "default $TMPDIR, else /tmp)",
    )
    ld.add_argument("--report", type=path_flag, help="also write the load report as JSON here")
    ld.set_defaults(func=_load)


def _at_least(text: str, low: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ({low} or more), got {text!r}") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"must be {low} or more, got {n}")
    return n


def count(text: str) -> int:
    """argparse type: an integer, 0 or more."""
    return _at_least(text, 0)


def positive(text: str) -> int:
    """argparse type: an integer, 1 or more."""
    return _at_least(text, 1)


def _not_a_file(path: Path, what: str) -> str | None:
    return f"{what} {path} exists and is not a directory" if path.exists() and not path.is_dir() else None


def _synth(args: argparse.Namespace) -> int:
    from training.outdir import ForeignOutput
    from training.synth import generate

    if problem := _not_a_file(args.out, "--out"):
        print(f"motlens data synth: {problem}", file=sys.stderr)
        return 2
    try:
        counts = generate(args.out, args.rows, args.seed, "|" if args.delimiter == "pipe" else ",", args.zip)
    except ForeignOutput as e:  # before any work
        print(f"motlens data synth: --out {e}", file=sys.stderr)
        return 2
    print(json.dumps(counts, indent=2))
    return 0


def _print_report(report: dict) -> None:
    out = sys.stdout
    print(f"files: {len(report['files'])}", file=out)
    for f in report["files"]:
        extra = f"  lacking a value: {f['bad_values']}" if f["bad_values"] else ""
        extra += f"  first bad records {f['bad_records']}" if f["bad_records"] else ""
        print(
            f"  {f['name']}: {f['kind']} rows={f['rows']} bad={f['bad_rows']} "
            f"repeated_headers={f['header_rows']} non_utf8={f['non_utf8_values']}{extra}",
            file=out,
        )
    if report.get("unused_tables"):
        print(f"not used (DVSA lookups motlens does not need): {', '.join(report['unused_tables'])}", file=out)
    for k in (
        "rows_read",
        "bad_rows",
        "duplicate_tests",
        "duplicate_items",
        "orphan_items",
        "unknown_rfr",
        "item_named_rfrs",
        "unlabelled",
        "rows_out",
    ):
        value = "not computed (ClickHouse drops repeated rows as it merges)" if report[k] is None else report[k]
        print(f"{k}: {value}", file=out)
    print(f"sections: {report['sections']}", file=out)
    print(f"severities: {report['severities']}", file=out)


def _load(args: argparse.Namespace) -> int:
    from motlens.sigterm import EXIT_TERMINATED, Terminated, sigterm_unwinds

    try:  # its temporary partition files and staging directory removed, as on Ctrl-C
        with sigterm_unwinds():
            return _load_files(args)
    except Terminated:
        print("motlens data load: stopped by SIGTERM", file=sys.stderr)
        return EXIT_TERMINATED


def _load_files(args: argparse.Namespace) -> int:
    from training.dvsa_files import discover
    from training.dvsa_reader import BulkReader
    from training.dvsa_report import BulkFormatError, BulkReport, BulkResourceError
    from training.history_api import read_jsonl
    from training.outdir import ForeignOutput
    from training.tidy import TidyError, write_tidy

    if args.clickhouse == (args.out is not None):
        print("motlens data load: give either --out DIR (tidy Parquet) or --clickhouse", file=sys.stderr)
        return 2
    problem = (
        (_not_a_file(args.out, "--out") if args.out else None)
        or (_not_a_file(args.ch_path, "--ch-path") if args.ch_path else None)
        or (f"--report's directory {args.report.parent} does not exist"
            if args.report and not args.report.parent.is_dir() else None)
        or (f"--report {args.report} exists and is not a file"
            if args.report and args.report.exists() and not args.report.is_file() else None)
        or (f"--tmp-dir {args.tmp_dir} is not a directory"
            if args.tmp_dir is not None and not args.tmp_dir.is_dir() else None)
    )  # fmt: skip
    if problem:  # checked before hours of loading, not after
        print(f"motlens data load: {problem}", file=sys.stderr)
        return 2
    try:
        if args.clickhouse:
            from motlens.labels import SEVERITIES
            from training.chload import NOT_COUNTED, DataSettings, distinct_texts, load_bulk, open_store

            settings = DataSettings()
            with open_store(settings, args.ch_path) as store:
                result = load_bulk(store, args.paths, args.chunk_rows, native=False if args.no_native else None)
                texts = distinct_texts(store, report=result.report)
                kind = store.kind
            report = result.report.to_dict() | dict.fromkeys(NOT_COUNTED)
            # labels of the de-duplicated rows, as training will read them
            report["rows_out"] = int(texts["n"].sum())
            report["sections"] = {str(i): int(texts[f"n_section_{i}"].sum()) for i in range(9)}
            report["severities"] = {s: int(texts[f"n_{s}"].sum()) for s in SEVERITIES}
            report["clickhouse"] = {"engine": kind, **result.summary(), "distinct_texts": len(texts)}
        else:
            sources, api = discover(args.paths)
            if not sources and not api:
                names = ", ".join(str(p) for p in args.paths)
                raise BulkFormatError(f"{names}: no MOT tables (DVSA bulk files or MOT History API JSON) found")
            report_obj = BulkReport()

            def chunks():
                if sources:
                    reader = BulkReader(args.paths, args.chunk_rows, tmp_dir=args.tmp_dir)
                    reader.report = report_obj
                    yield from reader
                if api:
                    yield from read_jsonl(api, args.chunk_rows, report_obj)

            write_tidy(chunks(), args.out)
            report = report_obj.to_dict()
    except ForeignOutput as e:  # write_tidy's first check, before any row is read
        print(f"motlens data load: --out {e}", file=sys.stderr)
        return 2
    except (BulkFormatError, BulkResourceError, TidyError) as e:
        print(f"motlens data load: {e}", file=sys.stderr)
        return 1
    _print_report(report)
    if "clickhouse" in report:
        print(f"clickhouse: {report['clickhouse']}")
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    return 0
