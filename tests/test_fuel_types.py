"""Fuel types: one mapping (motlens/labels.py) of DVSA codes and the MOT History API's names, shared by
training (training/history_api.py), the head's features and serving's validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from motlens.head import FeatureSpec
from motlens.labels import FUEL_ACCEPTED, FUEL_NAMES, fuel_code


def test_codes_and_api_names_map_to_one_code_in_any_case():
    spellings = ("PE", "pe", "Petrol", " PETROL ", "Diesel", "hybrid electric (clean)", "Hybrid")
    assert [fuel_code(v) for v in spellings] == ["PE", "PE", "PE", "PE", "DI", "HY", "HY"]
    assert fuel_code("Other") == fuel_code("ot") == "OT"  # a fuel DVSA records, not a missing one
    assert [fuel_code(v) for v in ("XX", "Hydrogen", "", "  ")] == [None] * 4
    assert all(fuel_code(name) == code == fuel_code(code) for code, name in FUEL_NAMES.items())


def test_the_head_reads_api_names_as_their_codes():
    """``Petrol`` was an unknown fuel to the head (the same features as ``XX``) while training stored it as PE."""
    spec = FeatureSpec()
    fuels = ["PE", "Petrol", " petrol", "DI", "Diesel", "XX", None]
    x = spec.context_features(len(fuels), {"fuel_type": fuels})
    np.testing.assert_array_equal(x[1], x[0])
    np.testing.assert_array_equal(x[2], x[0])
    np.testing.assert_array_equal(x[4], x[3])
    assert not np.array_equal(x[0], x[5]) and not np.array_equal(x[3], x[5])
    np.testing.assert_array_equal(x[5], x[6])  # neither: the unknown column, as a missing fuel
    # a vocabulary fitted on names (a bulk file that spells its fuels) is read the same way
    named = FeatureSpec(fuel_vocab=("Petrol", "Hybrid Electric (Clean)"))
    y = named.context_features(3, {"fuel_type": ["PE", "hy", "Petrol"]})
    assert y[:, 4:7].argmax(axis=1).tolist() == [0, 1, 0]


def test_serving_passes_the_code_on_and_refuses_any_other_fuel():
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferInput, InferRequest

    from predictor.codec import Limits, parse_v1, parse_v2, short_message

    v1 = parse_v1({"instances": [{"text": "Horn not working", "fuel_type": f} for f in ("Petrol", "di", " ", "Other")]},
                  Limits())  # fmt: skip
    assert v1.context["fuel_type"] == ["PE", "DI", None, "OT"]  # the head, the log and drift see the code
    texts = InferInput("text", [2], "BYTES", ["Horn not working", "Wiper blade split"])
    fuels = InferInput("fuel_type", [2], "BYTES", [b"Hybrid Electric (Clean)", b"EL"])
    assert parse_v2(InferRequest("m", [texts, fuels]), Limits()).context["fuel_type"] == ["HY", "EL"]
    with pytest.raises(InvalidInput) as info:
        parse_v1({"instances": [{"text": "Horn not working", "fuel_type": "XX"}]}, Limits())
    assert info.value.reason.startswith("instances[0].fuel_type is 'XX'; expected a DVSA fuel code or name")
    bad = InferInput("fuel_type", [2], "BYTES", [b"PE", b"Hydrogen" * 10])
    with pytest.raises(InvalidInput) as info:
        parse_v2(InferRequest("m", [texts, bad]), Limits())
    # the whole list survives the 300-character cut of a 400's message (predictor/model.py)
    assert short_message(info.value.reason) == info.value.reason and info.value.reason.endswith(FUEL_ACCEPTED)
    assert info.value.reason.startswith("input 'fuel_type' item 1 is 'HydrogenHydrogen")


def test_training_reads_api_fuel_types_with_the_same_mapping():
    from training.history_api import _fuel

    assert all(_fuel(name) == code for code, name in FUEL_NAMES.items())
    assert [_fuel(v) for v in ("petrol", "CNG", "Hydrogen", "XX", "", None)] == ["PE", "CN", "OT", "OT", None, None]


def test_the_predictor_docs_list_every_accepted_fuel():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "predictor.md").read_text()
    assert FUEL_ACCEPTED in docs
