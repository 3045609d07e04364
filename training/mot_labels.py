"""MOT labels: manual section (0–8) and severity from DVSA bulk codes and MOT History API types.

Rules (docs/data.md "Labels"):

* Since 20 May 2018 the manual reference at the end of a defect text, e.g.
  ``"… (1.1.14 (a) (ii))"``, gives the section: its first number. Before that date the manual was
  numbered differently, so the reference is not used; the top-level ``item_group`` name is mapped
  instead where it is unambiguous (``GROUP_SECTIONS``), otherwise the row has no section.
* Bulk severity: ``rfr_type_code`` A → advisory, M → minor; F (fail) and P (PRS, a fail repaired
  at the test station) take ``rfr_deficiency_category`` (Dangerous / Major / Minor, or the codes
  D / MA / MI; Pre-EU Directive or PE → major) and ``dangerous_mark`` raises a failure to dangerous.
* API ``type``: ADVISORY, MINOR, MAJOR, DANGEROUS as named; FAIL and PRS → major (dangerous when
  the ``dangerous`` flag is set); USER ENTERED → advisory (tester notes outside the catalogue).
"""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pandas as pd

#: First day of the EU roadworthiness directive categories and the renumbered manual.
EU_CUTOFF = dt.date(2018, 5, 20)

# "(1.1.14 (a) (ii))", "(0.1 (a))", "(8.2.1.2 (a))", "(5.2.3)" at the very end of a text.
_REF_AT_END = re.compile(r"\((\d{1,2})(?:\.\d+)+(?:\s*\([0-9a-z]{1,5}\))*\)\s*$", re.IGNORECASE)
_BARE_REF = re.compile(r"^\s*(\d{1,2})(?:\.\d+)+(?:\s*\([0-9a-z]{1,5}\))*\s*$", re.IGNORECASE)

#: Top-level ``item_group`` names (lower case) whose manual section is unambiguous.
GROUP_SECTIONS: dict[str, int] = {
    "identification of the vehicle": 0,
    "vehicle identification number": 0,
    "registration plates": 0,
    "brakes": 1,
    "steering": 2,
    "steering and suspension": 2,
    "visibility": 3,
    "drivers view of the road": 3,
    "driver's view of the road": 3,
    "lamps, reflectors and electrical equipment": 4,
    "lighting and signalling": 4,
    "axles, wheels, tyres and suspension": 5,
    "tyres": 5,
    "road wheels": 5,
    "suspension": 5,
    "body, chassis, structure": 6,
    "body, structure and attachments": 6,
    "body, structure and general items": 6,
    "other equipment": 7,
    "seat belts and supplementary restraint systems": 7,
    "seat belt installation check": 7,
    "horn": 7,
    "nuisance": 8,
    "noise, emissions and leaks": 8,
    "exhaust, fuel and emissions": 8,
    "brake performance": 1,
    "registration plates and vin": 0,
}


def _group_key(name: str) -> str:
    """A group name compared without case, punctuation or spacing (``Driver’s view`` = ``drivers view``)."""
    name = re.sub(r"['’`]", "", name.lower().replace("&", " and "))
    return " ".join(re.sub(r"[^a-z0-9]+", " ", name).split())


_GROUP_KEYS = {_group_key(k): v for k, v in GROUP_SECTIONS.items()}

#: ``rfr_deficiency_category`` values (lower case) per severity of a failing row: DVSA's words and
#: the codes its data dictionary lists (D, MA, MI, PE); a pre-2018 fail (Pre-EU Directive) is major.
CATEGORY_NAMES: dict[str, tuple[str, ...]] = {
    "dangerous": ("dangerous", "d"),
    "major": ("major", "ma", "pre-eu directive", "pre-eu", "pe"),
    "minor": ("minor", "mi"),
}

API_TYPES: dict[str, str] = {
    "ADVISORY": "advisory",
    "MINOR": "minor",
    "MAJOR": "major",
    "DANGEROUS": "dangerous",
    "FAIL": "major",
    "PRS": "major",
    "USER ENTERED": "advisory",
}


def section_from_text(text: str | None) -> int | None:
    """Section 0–8 from the manual reference that ends ``text``, or ``None``."""
    if not text:
        return None
    m = _REF_AT_END.search(text)
    if m is None:
        return None
    n = int(m.group(1))
    return n if 0 <= n <= 8 else None


def is_reference(ref: str | None) -> bool:
    """Whether ``ref`` looks like a manual reference (``"1.1.14 (a) (ii)"``)."""
    return isinstance(ref, str) and _BARE_REF.match(ref) is not None


def section_from_group(name: str | None) -> int | None:
    """Section from a top-level ``item_group`` name where that is unambiguous."""
    if not name:
        return None
    return _GROUP_KEYS.get(_group_key(name))


def normalised(s: pd.Series, case) -> pd.Series:
    """Strip and case-fold the few distinct values of a code column (fast on millions of rows)."""
    codes, uniques = pd.factorize(s, use_na_sentinel=True)
    norm = np.array([case(str(u).strip()) for u in uniques] + [""], dtype=object)
    return pd.Series(norm[codes], index=s.index)


def bulk_severity(type_code: pd.Series, category: pd.Series, dangerous_mark: pd.Series) -> pd.Series:
    """Vectorised bulk-file severity; rows that fit no rule get ``None``."""
    t = normalised(type_code, str.upper)
    cat = normalised(category, str.lower)
    dmark = normalised(dangerous_mark, str.upper).isin(["D", "Y", "1", "TRUE", "T"])
    failing = t.isin(["F", "P"])
    conds = [
        t == "A",
        t == "M",
        failing & (dmark | cat.isin(CATEGORY_NAMES["dangerous"])),
        failing & cat.isin(CATEGORY_NAMES["major"] + ("",)),
        failing & cat.isin(CATEGORY_NAMES["minor"]),
    ]
    choices = ["advisory", "minor", "dangerous", "major", "minor"]
    out = np.select(conds, choices, default="")
    return pd.Series(out, index=type_code.index).replace("", None)


def api_severity(defect_type: str | None, dangerous: bool | None) -> str | None:
    """Severity of one MOT History API defect, or ``None`` for an unknown type."""
    sev = API_TYPES.get(str(defect_type or "").strip().upper())
    if sev is None:
        return None
    if dangerous and sev == "major":  # a failure marked dangerous, as the bulk files' dangerous_mark
        return "dangerous"
    return sev  # an advisory or a minor defect is no failure: a dangerous flag on one does not make it so
