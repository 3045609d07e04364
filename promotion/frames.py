"""Prediction-log query results (pandas DataFrames) as lists of plain-Python dicts."""

from __future__ import annotations

from typing import Any

import numpy as np


def records(df: Any) -> list[dict[str, Any]]:
    """The rows as dicts of plain Python values: pandas boxes a row's scalars, not those inside its
    maps (``section_counts`` holds numpy.uint64, which ``json.dumps(default=str)`` printed as "88")."""
    return [] if df is None or len(df) == 0 else [_plain(r) for r in df.to_dict("records")]


def _plain(value: Any) -> Any:
    """``value`` with the numpy scalars inside its dicts and lists (not its arrays) as Python numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value
