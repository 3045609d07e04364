"""MOT label rules: section from the manual reference, severity from bulk codes and API types."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training import mot_labels


@pytest.mark.parametrize(
    ("text", "section"),
    [
        ("Nearside Front Brake disc worn, pitted or scored (1.1.14 (a) (ii))", 1),
        ("Registration plate missing (0.1 (a))", 0),
        ("Exhaust emits excessive smoke (8.2.1.2 (a))", 8),
        ("Tyre worn close to legal limit (5.2.3)", 5),
        ("Horn not working (7.5 (a)) ", 7),
        ("Brake pipe corroded (3.6.B.2c)", None),  # pre-2018 numbering: not a 2018 reference
        ("Wheel (1.1.14 (a)) has a note after the reference", None),  # must be at the end
        ("Something (9.1 (a))", None),  # no section 9
        ("no reference", None),
        ("", None),
    ],
)
def test_section_from_text(text, section):
    assert mot_labels.section_from_text(text) == section


def test_bare_reference_and_groups():
    assert mot_labels.is_reference("1.1.14 (a) (ii)") and not mot_labels.is_reference("Brake discs")
    assert mot_labels.section_from_group(" Road Wheels ") == 5
    assert mot_labels.section_from_group("Noise, emissions and leaks") == 8
    assert mot_labels.section_from_group("Something else") is None


def test_bulk_severity_rules():
    rows = [  # type code, category, dangerous mark → severity
        ("A", "Dangerous", "", "advisory"),
        ("M", "Minor", "", "minor"),
        ("F", "Major", "", "major"),
        ("P", "Major", "", "major"),
        ("F", "Dangerous", "", "dangerous"),
        ("F", "Major", "D", "dangerous"),
        ("f ", "Pre-EU Directive", None, "major"),
        ("F", None, None, "major"),
        ("F", "Minor", "", "minor"),
        ("F", "MA", "", "major"),  # the codes DVSA's data dictionary lists
        ("P", "d", "", "dangerous"),
        ("F", "MI", "", "minor"),
        ("F", "PE", "", "major"),
        ("F", "unheard-of", "", None),
        ("X", "Major", "", None),
        (None, None, None, None),
    ]
    t, c, d, expected = zip(*rows, strict=True)
    got = mot_labels.bulk_severity(pd.Series(t), pd.Series(c), pd.Series(d))
    assert got.tolist() == list(expected)


@pytest.mark.parametrize(
    ("kind", "dangerous", "severity"),
    [
        ("ADVISORY", False, "advisory"),
        ("MINOR", False, "minor"),
        ("MINOR", True, "minor"),  # no failure: as a bulk M row with a dangerous mark (it was dangerous)
        ("FAIL", True, "dangerous"),
        ("MAJOR", False, "major"),
        ("MAJOR", True, "dangerous"),
        ("DANGEROUS", False, "dangerous"),
        ("FAIL", False, "major"),
        ("PRS", True, "dangerous"),
        ("USER ENTERED", False, "advisory"),
        ("advisory", True, "advisory"),
        ("NONSENSE", False, None),
        (None, False, None),
    ],
)
def test_api_severity(kind, dangerous, severity):
    assert mot_labels.api_severity(kind, dangerous) == severity


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=80))
def test_section_is_in_range_or_none(text):
    s = mot_labels.section_from_text(text)
    assert s is None or 0 <= s <= 8
