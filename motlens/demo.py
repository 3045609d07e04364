"""``motlens demo``: the main job end to end on embedded defaults."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic data → train → register → production → serve")
    p.set_defaults(func=lambda a: print("not implemented") or 2)
