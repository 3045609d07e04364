"""Checks and the job's verdict: drift (exit 1) beats insufficient data (exit 2) beats no drift (exit 0)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

CheckStatus = Literal["pass", "drift", "insufficient"]

EXIT_NO_DRIFT, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2


@dataclass
class Check:
    """One comparison's outcome; ``score``/``threshold`` are None when it could not run."""

    name: str
    status: CheckStatus
    message: str
    score: float | None = None
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict(checks: list[Check]) -> tuple[str, int]:
    """(status, exit code): any drift → ("drift", 1); else any check short of data →
    ("insufficient_data", 2), never a silent pass; else ("no_drift", 0)."""
    if not checks:
        return "insufficient_data", EXIT_ERROR
    if any(c.status == "drift" for c in checks):
        return "drift", EXIT_DRIFT
    if any(c.status == "insufficient" for c in checks):
        return "insufficient_data", EXIT_ERROR
    return "no_drift", EXIT_NO_DRIFT
