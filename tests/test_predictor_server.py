"""A real KServe predictor on free ports, driven by real v1/v2 clients (httpx, tritonclient HTTP + gRPC)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from motlens.embedder import TorchEmbedder, cosine_rows
from motlens.labels import SECTIONS, SEVERITIES

MODEL = "mot-defects"
TEXTS = [
    "Nearside Front Brake pipe corroded (1.1.11 (c))",
    "Offside Front Coil spring fractured (5.3.1 (b))",
    "Horn not working (7.5 (a))",
]


@pytest.fixture(scope="module")
def served(tiny_server):
    """The session's running server (conftest ``tiny_server``: REST + gRPC, tiny bundle, shared MiniLM)."""
    return tiny_server


def test_v1_predict_answers_labels_and_version(served, tiny_bundle):
    _, base = served
    r = httpx.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == tiny_bundle.version == "1"
    preds = body["predictions"]
    assert [p["section"] for p in preds] == [SECTIONS[1], SECTIONS[5], SECTIONS[7]]
    for p in preds:
        assert p["severity"] in SEVERITIES
        assert len(p["severity_scores"]) == 4
        assert "embedding" not in p
        assert 0.0 <= p["fail_probability"] <= 1.0


def test_v1_instances_with_context_and_embedding(served, embedder):
    _, base = served
    r = httpx.post(
        f"{base}/v1/models/{MODEL}:predict",
        json={
            "instances": [
                {
                    "text": TEXTS[0],
                    "make": "FORD",
                    "fuel_type": "PE",
                    "vehicle_age_years": 9.5,
                    "odometer_miles": 81000,
                }
            ],
            "parameters": {"return_embedding": True},
        },
    )
    assert r.status_code == 200, r.text
    emb = np.asarray(r.json()["predictions"][0]["embedding"], dtype=np.float32)
    assert emb.shape == (384,)
    assert cosine_rows(emb[None], embedder.encode([TEXTS[0]]))[0] >= 0.999


def test_v2_json_honours_requested_outputs(served):
    _, base = served
    req = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": TEXTS}]}
    r = httpx.post(f"{base}/v2/models/{MODEL}/infer", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "1"
    names = {o["name"]: o for o in body["outputs"]}
    assert set(names) == {"section", "section_score", "severity", "severity_scores", "fail_probability"}
    assert names["severity_scores"]["shape"] == [3, 4]
    assert names["section"]["data"] == [SECTIONS[1], SECTIONS[5], SECTIONS[7]]

    req["outputs"] = [{"name": "embedding"}, {"name": "section"}]
    body = httpx.post(f"{base}/v2/models/{MODEL}/infer", json=req).json()
    assert [o["name"] for o in body["outputs"]] == ["embedding", "section"]
    assert body["outputs"][0]["shape"] == [3, 384]


def test_v2_binary_extension_with_tritonclient(served, embedder):
    import tritonclient.http as th

    server, _ = served
    client = th.InferenceServerClient(f"127.0.0.1:{server.settings.http_port}")
    text = th.InferInput("text", [3], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=np.object_), binary_data=True)
    age = th.InferInput("vehicle_age_years", [3], "FP32")
    age.set_data_from_numpy(np.array([3.0, 12.0, np.nan], dtype=np.float32), binary_data=True)
    outs = [th.InferRequestedOutput(n, binary_data=True) for n in ("section", "severity_scores", "embedding")]
    res = client.infer(MODEL, [text, age], outputs=outs)
    assert res.get_response()["model_version"] == "1"
    assert [s.decode() for s in res.as_numpy("section")] == [SECTIONS[1], SECTIONS[5], SECTIONS[7]]
    assert res.as_numpy("severity_scores").shape == (3, 4)
    emb = res.as_numpy("embedding")
    assert emb.shape == (3, 384)
    assert cosine_rows(emb, embedder.encode(TEXTS)).min() >= 0.999


async def test_v2_grpc_with_kserve_client(served):
    """gRPC through KServe's own client (tritonclient.grpc's protos clash with KServe's in one process)."""
    from kserve import InferenceGRPCClient, InferInput, InferRequest
    from kserve.protocol.infer_type import RequestedOutput

    server, _ = served
    client = InferenceGRPCClient(f"127.0.0.1:{server.settings.grpc_port}", retries=0)
    try:
        assert await client.is_model_ready(MODEL)
        text = InferInput("text", [3], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=np.object_), binary_data=True)
        req = InferRequest(
            MODEL, [text], request_outputs=[RequestedOutput("section"), RequestedOutput("fail_probability")]
        )
        res = await client.infer(req)
    finally:
        await client.close()
    assert res.model_version == "1"
    names = [o.name for o in res.outputs]
    assert names == ["section", "fail_probability"]
    assert [s.decode() for s in res.get_output_by_name("section").as_numpy()] == [
        SECTIONS[1],
        SECTIONS[5],
        SECTIONS[7],
    ]
    assert res.get_output_by_name("fail_probability").as_numpy().shape == (3,)


def test_served_embeddings_equal_sentence_transformers(served, tiny_bundle):
    """Against a fresh sentence-transformers model loaded from the bundle's own embedder directory."""
    _, base = served
    texts = TEXTS + ["Offside Rear Stop lamp not working (4.3.1 (a))", "Windscreen damage in zone A"]
    r = httpx.post(
        f"{base}/v1/models/{MODEL}:predict",
        json={"instances": texts, "parameters": {"return_embedding": True}},
    )
    served_emb = np.asarray([p["embedding"] for p in r.json()["predictions"]], dtype=np.float32)
    reference = TorchEmbedder(tiny_bundle.embedder_dir, device="cpu").encode(texts)
    assert cosine_rows(served_emb, reference).min() >= 0.999


def test_model_metadata_lists_tensors(served):
    _, base = served
    meta = httpx.get(f"{base}/v2/models/{MODEL}").json()
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["embedding"] == {"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}
    assert {i["name"]: i["datatype"] for i in meta["inputs"]}["vehicle_age_years"] == "FP32"


def _scrape(base: str) -> dict[tuple[str, frozenset], float]:
    """The served /metrics as {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_show_model_info_with_served_version(served):
    """One v1 request of two items moves the served series by exactly one request and two items."""
    _, base = served

    def get(scrape, name: str, **labels: str) -> float:
        return scrape.get((name, frozenset(labels.items())), 0.0)

    ok = {"protocol": "v1", "outcome": "ok", "version": "1"}
    before = _scrape(base)
    r = httpx.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": TEXTS[:2]})
    assert r.status_code == 200
    after = _scrape(base)
    assert get(after, "motlens_requests_total", **ok) - get(before, "motlens_requests_total", **ok) == 1
    assert get(after, "motlens_items_total", **ok) - get(before, "motlens_items_total", **ok) == 2
    lat = {"protocol": "v1", "version": "1"}
    assert (get(after, "motlens_request_latency_seconds_count", **lat)
            - get(before, "motlens_request_latency_seconds_count", **lat)) == 1  # fmt: skip
    info = [dict(labels) for (name, labels), v in after.items() if name == "motlens_model_info" and v == 1]
    assert any(i["version"] == "1" and i["slot"] == "production" for i in info), info
    assert get(after, "motlens_golden_passed", slot="production") == 1
    assert any(name.startswith("request_predict_seconds") for name, _ in after)  # KServe's own histograms too


def test_readiness_reason_route(served):
    _, base = served
    assert httpx.get(f"{base}/motlens/ready").json() == {"ready": True, "reason": None}


def test_versioned_routes_pin_the_served_version(served):
    _, base = served
    req = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": TEXTS[:1]}]}
    r = httpx.post(f"{base}/v2/models/{MODEL}/versions/1/infer", json=req)
    assert r.status_code == 200 and r.json()["model_version"] == "1"
    missing = httpx.post(f"{base}/v2/models/{MODEL}/versions/9/infer", json=req)
    assert missing.status_code == 404 and "version 9" in missing.json()["error"]
    assert httpx.get(f"{base}/v2/models/{MODEL}/versions/1").json()["versions"] == ["1"]
    assert httpx.get(f"{base}/v2/models/{MODEL}/versions/1/ready").json()["ready"] is True
    assert httpx.get(f"{base}/v2/models/{MODEL}/versions/9/ready").status_code == 404
