"""Label sets and input vocabularies of the prediction contract (docs/architecture.md "Prediction contract")."""

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

# Fuel types: DVSA's two-letter codes and their names, as the MOT History API spells them. The bulk
# files hold the codes (DVSA's ``mdr_fuel_types`` lookup names them), the API's ``fuelType`` the names.
# Training stores codes (training/history_api.py); serving takes either and passes the code on
# (predictor/codec.py), so the head, the prediction log and the drift job see one spelling.

#: DVSA fuel code → its name; ``OT`` (Other) is a fuel DVSA records, not a missing one.
FUEL_NAMES: dict[str, str] = {
    "PE": "Petrol",
    "DI": "Diesel",
    "EL": "Electric",
    "HY": "Hybrid Electric (Clean)",
    "ED": "Electric Diesel",
    "LP": "LPG",
    "CN": "CNG",
    "LN": "LNG",
    "GA": "Gas",
    "GB": "Gas Bi-Fuel",
    "GD": "Gas Diesel",
    "FC": "Fuel Cells",
    "ST": "Steam",
    "OT": "Other",
}
OTHER_FUEL = "OT"
#: further spellings read as a code (``Hybrid``: training read it as HY before the mapping was shared)
_FUEL_ALIASES = {"hybrid": "HY"}
_FUEL_CODES: dict[str, str] = {
    **{code.lower(): code for code in FUEL_NAMES},
    **{name.lower(): code for code, name in FUEL_NAMES.items()},
    **_FUEL_ALIASES,
}
#: what :func:`fuel_code` accepts, each code with its spellings: ``PE/Petrol, …, HY/Hybrid Electric (Clean)/Hybrid, …``
FUEL_ACCEPTED = ", ".join(
    "/".join([code, name, *(alias.title() for alias, c in _FUEL_ALIASES.items() if c == code)])
    for code, name in FUEL_NAMES.items()
)


def fuel_code(value: str) -> str | None:
    """The DVSA code of a code or a name (any case, surrounding whitespace ignored); None for anything else."""
    return _FUEL_CODES.get(value.strip().lower())


def fuel_key(value: str) -> str:
    """A fuel value as the head and the drift job compare it: its DVSA code (``Petrol`` and ``pe`` are
    ``PE``), else the value stripped and upper-cased (a fuel no vocabulary holds: the unknown column)."""
    return fuel_code(value) or value.strip().upper()
