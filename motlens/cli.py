"""The ``motlens`` console script: each package registers its own subcommand.

Subcommand modules import only argparse at module level; heavy imports happen in the handlers,
so ``motlens --help`` is fast and an image without an extra still runs the other commands.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

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
    parser = argparse.ArgumentParser(prog="motlens", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        rc = args.func(args)
    except MissingExtra as e:
        print(f"motlens: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
