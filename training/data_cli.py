"""`motlens data` (stub until implemented)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="(not implemented yet)")
    p.set_defaults(func=lambda a: print("not implemented") or 2)
