"""The ``motlens`` console script: each package registers its own subcommand.

Subcommand modules import only argparse at module level; heavy imports happen in the handlers,
so ``motlens --help`` is fast and an image without an extra still runs the other commands.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from collections.abc import Sequence

from motlens.credentials import RedactingFormatter

DESCRIPTION = "MOT defect texts → embeddings and defect predictions: train, serve, log, check drift, promote."

#: loggers that, unless -v, would only repeat at length a failure the command reports on one line:
#: retry warnings, and MLflow's store, which logs each database error with its traceback before raising
#: it (mlflow resets its own ``mlflow`` logger when imported, but leaves ``mlflow.store`` alone)
QUIET_LOGGERS = {
    "urllib3.connectionpool": logging.ERROR,
    "clickhouse_connect.driver": logging.ERROR,
    "mlflow.store": logging.CRITICAL,
}

# (module, attribute) pairs: each provides ``register(subparsers)``.
COMMAND_MODULES: tuple[str, ...] = (
    "motlens.demo",
    "training.data_cli",
    "training.train_cli",
    "predictor.cli",
    "predlog.cli",
    "drift.cli",
    "promotion.cli",
)


class MissingExtra(RuntimeError):
    """An optional dependency is not installed; the message says which extra to install."""


def require(module: str, extra: str) -> None:
    """Fail with an install hint when an optional dependency is absent."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{module} is not installed: pip install 'motlens[{extra}]'") from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="motlens", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig, with URL credentials kept out of every line
        handler = logging.StreamHandler()
        handler.setFormatter(
            RedactingFormatter("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.Formatter.converter = time.gmtime  # UTC, as the prediction log, the events and the tags
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(logging.NOTSET if args.verbose else level)
    # MLflow's per-file download bar is for terminals: in a log (a pod, a CronJob) it is one line per file
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true" if sys.stderr.isatty() else "false")
    # MLflow prints each run's URL to stdout against a tracking server: credentials and all, into --json output
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow's usage telemetry (an installation id under ~/.config/mlflow, records sent out) is off unless
    # asked for, as in the image and the units: a command run by hand is the same service
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if not getattr(args, "warns_env_itself", False):  # `serve` warns once its (JSON) logging is set up
        from motlens.envcheck import warn_unknown_env

        warn_unknown_env()
    try:
        rc = args.func(args)
    except MissingExtra as e:
        print(f"motlens: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - bad settings, a server down: one line and exit 2, not a traceback
        from motlens.errors import report

        return report(command_name(parser, args), e)
    return int(rc or 0)


def command_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The words of the command that ran, e.g. ``motlens data load``."""
    words = [parser.prog]
    while action := next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None):
        chosen = getattr(args, action.dest, None)
        if not chosen:
            break
        words.append(chosen)
        parser = action.choices[chosen]
    return " ".join(words)


if __name__ == "__main__":
    raise SystemExit(main())
