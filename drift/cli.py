"""``motlens drift``: Evidently drift of the prediction log; exit 0 no drift, 1 drift, 2 error/insufficient data.

Every flag has a ``MOTLENS_DRIFT_*`` environment variable (flags win), so a Kubernetes CronJob
configures the job by env alone; see docs/drift.md.
"""

from __future__ import annotations

import argparse
import sys

_FLAGS: tuple[tuple[str, str, dict], ...] = (
    ("--version", "version", {"help": "model version (default: the version the slot's alias names)"}),
    ("--slot", "slot", {"choices": ["production", "canary"],
                        "help": "the alias that names the version (default production; canary only with --canary); "
                                "rows are read by version"}),
    ("--window", "window", {"help": "current window: duration ending now or at --end (default 24h)"}),
    ("--end", "end", {"help": "end of the current window, ISO-8601 UTC (default now)"}),
    ("--reference", "reference", {"help": "bundle | duration before the window (7d) | START/END | bundle dir "
                                          "or Parquet path (default bundle)"}),
    ("--output", "output", {"help": "output directory (report.html, embeddings.html, summary.json)"}),
    ("--max-rows", "max_rows", {"type": int, "help": "row cap per window (default 50000)"}),
    ("--embedding-max-rows", "embedding_max_rows", {"type": int, "help": "embedding rows per window (2000)"}),
    ("--min-rows", "min_rows", {"type": int, "help": "fewer rows is insufficient data (default 200)"}),
    ("--min-embedding-rows", "min_embedding_rows", {"type": int, "help": "default 100"}),
    ("--embedding-method", "embedding_method", {"choices": ["model", "mmd", "ratio", "distance"],
                                                "help": "EmbeddingsDrift method (default model)"}),
    ("--pushgateway", "pushgateway", {"help": "Prometheus Pushgateway URL"}),
    ("--textfile", "textfile", {"help": "node-exporter textfile collector path (*.prom)"}),
    ("--model-name", "model_name", {"help": "registered model name (default mot-defects)"}),
)  # fmt: skip
_FLAG_OF = {dest: flag for flag, dest, _ in _FLAGS}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "drift",
        help="drift of the prediction log against a reference (Evidently)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, dest, kw in _FLAGS:
        p.add_argument(flag, dest=dest, default=None, **kw)
    p.add_argument("--canary", action="store_const", const=True, default=None,
                   help="compare the canary slot with production over the same window")  # fmt: skip
    p.add_argument("--no-html", dest="html", action="store_const", const=False, default=None,
                   help="skip the HTML reports (and EmbeddingsDrift's t-SNE plot)")  # fmt: skip
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None)
    p.add_argument("--no-artifact", dest="log_artifact", action="store_const", const=False, default=None,
                   help="do not log the outputs to the version's MLflow run")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the JSON summary")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    from pydantic import ValidationError

    from drift.settings import DriftSettings
    from motlens.cli import require
    from motlens.errors import report_settings

    overrides = {dest: getattr(args, dest) for _, dest, _ in _FLAGS}
    for dest in ("canary", "html", "progress", "log_artifact"):
        overrides[dest] = getattr(args, dest)
    try:  # before importing Evidently (seconds): a bad flag fails at once
        settings = DriftSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        given = {dest for dest, v in overrides.items() if v is not None and dest in _FLAG_OF}
        return report_settings("motlens drift", e, {dest: _FLAG_OF[dest] for dest in given})
    from predlog.settings import PredlogSettings

    try:  # the log the job reads: a bad MOTLENS_PREDLOG_* is a bad setting, not a run that ends in `error`
        PredlogSettings()
    except ValidationError as e:
        return report_settings("motlens drift", e)
    require("evidently", "drift")
    require("prometheus_client", "drift")
    from drift.job import DriftJob

    try:
        result = DriftJob(settings).run()
    except OSError as e:  # the output directory cannot be made or written
        print(f"motlens drift: cannot write the outputs to {settings.output}: {e}", file=sys.stderr)
        return 2
    details = result.summary["details"]
    if args.json:
        print(json.dumps(result.summary, indent=2, sort_keys=True))
    else:
        for c in details["checks"]:
            print(f"{c['name']:<26} {c['status']:<13} {c['message']}")
        for m in details["messages"]:
            if m.startswith(("error", "could not")):
                print(m, file=sys.stderr)
        print(f"verdict: {details['status']} (exit {result.exit_code}); summary: {details['outputs']['summary']}")
    return result.exit_code
