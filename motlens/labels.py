"""Label sets of the prediction contract (docs/architecture.md "Prediction contract")."""

from __future__ import annotations

SECTION_NAMES: tuple[str, ...] = (
    "Identification of the vehicle",
    "Brakes",
    "Steering",
    "Visibility",
    "Lamps, reflectors and electrical equipment",
    "Axles, wheels, tyres and suspension",
    "Body, structure and attachments",
    "Other equipment",
    "Nuisance",
)
#: Output values read "<number> <name>", e.g. "1 Brakes".
SECTIONS: tuple[str, ...] = tuple(f"{i} {name}" for i, name in enumerate(SECTION_NAMES))

SEVERITIES: tuple[str, ...] = ("advisory", "minor", "major", "dangerous")
#: Severities that fail the test (since 20 May 2018).
FAILING_SEVERITIES: frozenset[str] = frozenset({"major", "dangerous"})

SLOTS: tuple[str, ...] = ("production", "canary")
ALIASES: tuple[str, ...] = ("production", "canary", "candidate")

#: Registry version tags the promotion CLI writes (promotion/workflow.py) and ``serve --follow-alias``
#: reads to restore a running canary after a restart (predictor/slots.py).
PROMOTION_STATUS_TAG = "promotion.status"
CANARY_PERCENT_TAG = "promotion.canary_percent"
