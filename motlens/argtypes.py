"""argparse types shared by the CLIs: flags whose empty value (a script's unset ``$X``) is refused.

Settings refuse an empty path flag the same way (:data:`motlens.envsource.SettingPath`); these are for
the flags that are no setting. No heavy imports: every ``motlens`` command line builds its parser.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def nonempty_flag(text: str) -> str:
    """A flag whose empty value would silently mean its default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty value: give one, or leave the flag out for the default")
    return text


def path_flag(text: str) -> Path:
    """A path flag: an empty one, read as a path, would be the working directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: give one, or leave the flag out for the default")
    return Path(text)
