"""Hostile input, bounded for CI: schemathesis over the official OIP REST spec, plus hypothesis
bodies aimed at the inference route. A client can never cause a 5xx, and the server stays up."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

OIP_SPEC = Path(__file__).resolve().parents[1].parent / "shared" / "schemas" / "oip" / "rest_predict_v2.yaml"
MODEL = "mot-defects"
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

pytestmark = pytest.mark.slow


def _oip_schema():
    import schemathesis

    if not OIP_SPEC.is_file():
        pytest.skip(f"OIP spec not found at {OIP_SPEC} (shared/ sits beside the checkout)")
    # The spec writes path templates as ${NAME}; OpenAPI wants {NAME}.
    raw = yaml.safe_load(re.sub(r"\$\{(\w+)\}", r"{\1}", OIP_SPEC.read_text()))
    return schemathesis.openapi.from_dict(raw)


def _assert_alive(base: str) -> None:
    assert httpx.get(f"{base}/v2/health/live", timeout=10).status_code == 200
    assert httpx.get(f"{base}/v2/models/{MODEL}/ready", timeout=10).status_code == 200


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_oip_no_server_errors(tiny_server, mode):
    from schemathesis import GenerationMode

    _, base = tiny_server
    schema = _oip_schema()
    strategy = schema.as_strategy(
        generation_mode=GenerationMode(mode), path_parameters={"MODEL_NAME": MODEL, "MODEL_VERSION": "1"}
    )
    seen: list[tuple[str, int]] = []

    @FUZZ
    @given(case=strategy)
    def run(case) -> None:
        response = case.call(base_url=base, timeout=30)
        seen.append((f"{case.method} {case.path}", response.status_code))
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} → {response.status_code}: {response.text[:300]}"
        )

    run()
    assert {op for op, _ in seen} >= {"POST /v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}/infer"}
    _assert_alive(base)


_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=40)
)
_json = st.recursive(
    _scalar, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)  # fmt: skip
_tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["text", "make", "vehicle_age_years", "odometer_miles", "bogus"]) | st.text(max_size=6),
        "datatype": st.sampled_from(["BYTES", "FP32", "INT64", "BOOL", "FP16", "nonsense"]),
        "shape": st.lists(st.integers(-2, 5), max_size=3),
        "data": st.lists(_scalar, max_size=6) | _json,
    }
)
_infer_body = st.fixed_dictionaries(
    {"inputs": st.lists(_tensor, max_size=4)},
    optional={"outputs": st.lists(st.fixed_dictionaries({"name": st.text(max_size=12)}), max_size=3),
              "parameters": st.dictionaries(st.text(max_size=16), _scalar, max_size=3)},
)  # fmt: skip


def test_v2_infer_hostile_tensors(tiny_server):
    _, base = tiny_server
    client = httpx.Client(base_url=base, timeout=30)

    @FUZZ
    @given(body=_infer_body)
    def run(body) -> None:
        r = client.post(f"/v2/models/{MODEL}/infer", content=json.dumps(body, allow_nan=True))
        assert r.status_code < 500, f"{body!r} → {r.status_code}: {r.text[:300]}"
        if r.status_code >= 400:
            assert r.json().get("error"), "a client error names its problem"

    run()
    _assert_alive(base)


def test_v1_predict_hostile_json_and_bytes(tiny_server):
    _, base = tiny_server
    client = httpx.Client(base_url=base, timeout=30)

    @FUZZ
    @given(payload=st.one_of(_json.map(lambda j: json.dumps({"instances": j}, allow_nan=True).encode()),
                             _json.map(lambda j: json.dumps(j, allow_nan=True).encode()),
                             st.binary(max_size=200)))  # fmt: skip
    def run(payload: bytes) -> None:
        r = client.post(f"/v1/models/{MODEL}:predict", content=payload, headers={"content-type": "application/json"})
        assert r.status_code < 500, f"{payload[:200]!r} → {r.status_code}: {r.text[:300]}"

    run()
    _assert_alive(base)
