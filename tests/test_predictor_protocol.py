"""Open Inference Protocol conformance of the real server (REST + gRPC): readiness, versions, server
metadata, content forms, request ids, binary-extension flags, routing errors and their logging."""

from __future__ import annotations

import json
import logging
import time

import grpc
import httpx
import numpy as np
import pytest
from conftest import free_port
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

from motlens.labels import SECTIONS

MODEL = "mot-defects"
TEXTS = ["Nearside Front Brake pipe corroded (1.1.11 (c))", "Horn not working (7.5 (a))"]
V1 = f"/v1/models/{MODEL}:predict"
V2 = f"/v2/models/{MODEL}/infer"


def stub(port: int) -> GRPCInferenceServiceStub:
    return GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


def grpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value


def typed_text(texts: list[str]) -> pb.ModelInferRequest.InferInputTensor:
    contents = pb.InferTensorContents(bytes_contents=[t.encode() for t in texts])
    return pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[len(texts)], contents=contents)


def v2_body(**extra) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}], **extra}


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def served(tiny_server):
    server, base = tiny_server
    return base, server.settings.grpc_port


# ---------------------------------------------------------------- readiness


def _start(settings, embedder=None):
    from predictor.server import PredictorServer, ServerThread

    server = PredictorServer(settings, embedder=embedder, host="127.0.0.1")
    return server, ServerThread(server).start()


def _grpc_live(port: int) -> bool:
    try:
        return stub(port).ServerLive(pb.ServerLiveRequest(), timeout=1).live
    except grpc.RpcError:
        return False


def test_server_is_not_ready_without_a_model(tmp_path):
    """A model that cannot load (here: a missing path) leaves the server live but not ready, REST and gRPC."""
    from predictor.settings import ServeSettings

    settings = ServeSettings(model=str(tmp_path / "missing"), http_port=free_port(), grpc_port=free_port())
    server, thread = _start(settings)
    try:
        base = f"http://127.0.0.1:{settings.http_port}"
        wait_until(lambda: server.rest._server.started and _grpc_live(settings.grpc_port))
        wait_until(lambda: server.slots.slots["production"].error is not None)  # the load failed
        assert httpx.get(f"{base}/v2/health/live").status_code == 200
        ready = httpx.get(f"{base}/v2/health/ready")
        assert ready.status_code == 503 and "error" in ready.json(), ready.text
        refused = httpx.post(base + V1, json={"instances": TEXTS}, headers={"x-request-id": "trace-503"})
        assert refused.status_code == 503 and refused.headers["x-request-id"] == "trace-503"
        assert stub(settings.grpc_port).ServerReady(pb.ServerReadyRequest(), timeout=10).ready is False
    finally:
        thread.stop()


def test_server_readiness_follows_load_and_drain(tiny_bundle, embedder):
    """Ready once the model serves; not ready from the moment a drain begins, while still answering."""
    from predictor.settings import ServeSettings

    settings = ServeSettings(model=str(tiny_bundle.root), http_port=free_port(), grpc_port=free_port(), drain_s=5)
    server, thread = _start(settings, embedder)
    try:
        thread.wait_ready()
        base = f"http://127.0.0.1:{settings.http_port}"
        grpc_stub = stub(settings.grpc_port)
        assert httpx.get(f"{base}/v2/health/ready").json() == {"ready": True}
        assert grpc_stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready is True
        server.request_stop()
        wait_until(lambda: server.slots.draining)
        assert httpx.get(f"{base}/v2/health/ready").status_code == 503
        assert grpc_stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready is False
        assert httpx.post(base + V1, json={"instances": TEXTS[:1]}).status_code == 200  # still answering
    finally:
        thread.stop()


# ---------------------------------------------------------------- versions and server metadata


def test_model_metadata_and_readiness_know_the_served_versions(served):
    base, port = served
    assert httpx.get(f"{base}/v2/models/{MODEL}").json()["versions"] == ["1"]
    s = stub(port)
    assert list(s.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=10).versions) == ["1"]
    assert list(s.ModelMetadata(pb.ModelMetadataRequest(name=MODEL, version="1"), timeout=10).versions) == ["1"]
    assert s.ModelReady(pb.ModelReadyRequest(name=MODEL, version="1"), timeout=10).ready is True
    for call, request in (
        (s.ModelMetadata, pb.ModelMetadataRequest(name=MODEL, version="9")),
        (s.ModelReady, pb.ModelReadyRequest(name=MODEL, version="9")),
    ):
        err = grpc_error(call, request)
        assert err.code() == grpc.StatusCode.NOT_FOUND and "version 9" in err.details()


def test_server_metadata_lists_the_extensions_served(served):
    base, port = served
    assert httpx.get(f"{base}/v2").json()["extensions"] == ["binary_tensor_data"]
    assert list(stub(port).ServerMetadata(pb.ServerMetadataRequest(), timeout=10).extensions) == ["binary_tensor_data"]


# ---------------------------------------------------------------- explain, methods, content types


def test_explain_is_not_supported_and_bounded(served, tiny_server):
    base, _ = served
    limit = tiny_server[0].settings.max_body_bytes
    big = httpx.post(f"{base}/v1/models/{MODEL}:explain", content=b"x" * (limit + 1))
    assert big.status_code == 413 and "exceeds" in big.json()["error"]
    r = httpx.post(f"{base}/v1/models/{MODEL}:explain", json={"instances": TEXTS})
    assert r.status_code == 501 and r.json() == {"error": f"explain is not supported by {MODEL}"}
    assert httpx.post(f"{base}/v1/models/other:explain", json={"instances": TEXTS}).status_code == 404


def test_routing_errors_are_oip_errors(served):
    base, _ = served
    wrong = httpx.get(base + V1)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST", wrong.text
    assert "POST" in wrong.json()["error"]
    v2_get = httpx.get(base + V2)
    assert v2_get.status_code == 405 and "error" in v2_get.json() and "POST" in v2_get.headers["allow"]
    missing = httpx.get(f"{base}/no/such/route")
    assert missing.status_code == 404 and set(missing.json()) == {"error"}


def test_head_is_get_without_the_body(served):
    """A load balancer's or `curl -I`'s health check: HEAD on the GET routes (FastAPI's list GET only)."""
    base, _ = served
    for path in ("/v2/health/ready", "/v2/health/live", f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}", "/v2",
                 "/metrics", "/motlens/ready"):  # fmt: skip
        got, head = httpx.get(base + path), httpx.head(base + path, headers={"x-request-id": "probe-1"})
        assert head.status_code == got.status_code == 200, (path, head.status_code, got.status_code)
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"], path
        assert head.headers["x-request-id"] == "probe-1", path
        if "content-length" in got.headers and path != "/metrics":  # the metrics change between the two
            assert head.headers["content-length"] == got.headers["content-length"], path
    wrong = httpx.head(base + V1)  # a POST route: still a 405 naming what it allows
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST" and wrong.content == b""
    assert httpx.head(f"{base}/no/such/route").status_code == 404


def test_v1_needs_a_json_content_type(served):
    base, _ = served
    body = json.dumps({"instances": TEXTS}).encode()
    form = httpx.post(base + V1, content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415, form.text
    assert "application/x-www-form-urlencoded" in form.json()["error"] and "application/json" in form.json()["error"]
    assert httpx.post(base + V1, content=body).status_code == 200  # no Content-Type: parsed as JSON
    cloudevent = {"ce-specversion": "1.0", "ce-id": "e-1", "ce-source": "test", "ce-type": "mot.predict",
                  "Content-Type": "application/json"}  # fmt: skip
    ce = httpx.post(base + V1, content=body, headers=cloudevent)
    assert ce.status_code == 200 and len(ce.json()["predictions"]) == 2, ce.text


# ---------------------------------------------------------------- gRPC content forms


def test_grpc_answers_in_the_form_it_was_asked(served):
    _, port = served
    s = stub(port)
    typed = s.ModelInfer(pb.ModelInferRequest(model_name=MODEL, inputs=[typed_text(TEXTS)]), timeout=30)
    assert len(typed.raw_output_contents) == 0
    outs = {o.name: o for o in typed.outputs}
    assert [b.decode() for b in outs["section"].contents.bytes_contents] == [SECTIONS[1], SECTIONS[7]]
    assert len(outs["severity_scores"].contents.fp32_contents) == 2 * 4
    assert all("binary_data_size" not in o.parameters for o in typed.outputs)

    raw = b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in TEXTS)
    tensor = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[2])
    binary = s.ModelInfer(pb.ModelInferRequest(model_name=MODEL, inputs=[tensor], raw_input_contents=[raw]), timeout=30)
    assert len(binary.raw_output_contents) == len(binary.outputs) == 5
    assert all(not o.HasField("contents") and "binary_data_size" not in o.parameters for o in binary.outputs)
    names = [o.name for o in binary.outputs]
    scores = np.frombuffer(binary.raw_output_contents[names.index("severity_scores")], np.float32)
    np.testing.assert_allclose(scores, outs["severity_scores"].contents.fp32_contents, rtol=1e-6)


def test_grpc_reads_datatypes_in_any_case_as_rest_does(served):
    """docs/predictor.md says every path reads ``bytes``; gRPC refused it ("which v2 does not define")."""
    _, port = served
    lower = typed_text(TEXTS)
    lower.datatype = "bytes"
    age = pb.ModelInferRequest.InferInputTensor(name="vehicle_age_years", datatype="fp32", shape=[2],
                                                contents=pb.InferTensorContents(fp32_contents=[3.0, 4.0]))  # fmt: skip
    got = stub(port).ModelInfer(pb.ModelInferRequest(model_name=MODEL, inputs=[lower, age]), timeout=30)
    assert [b.decode() for b in {o.name: o for o in got.outputs}["section"].contents.bytes_contents] == [
        SECTIONS[1],
        SECTIONS[7],
    ]


# ---------------------------------------------------------------- request ids


def test_request_ids_come_from_the_body_else_the_header(served):
    base, port = served
    header = {"x-request-id": "trace-abc"}
    v2 = httpx.post(base + V2, json=v2_body(), headers=header)
    assert v2.json()["id"] == "trace-abc" and v2.headers["x-request-id"] == "trace-abc"
    own = httpx.post(base + V2, json=v2_body(id="body-1"), headers=header)
    assert own.json()["id"] == "body-1" and own.headers["x-request-id"] == "body-1"
    v1 = httpx.post(base + V1, json={"instances": TEXTS}, headers=header)
    assert v1.headers["x-request-id"] == "trace-abc"
    generated = httpx.post(base + V1, json={"instances": TEXTS})
    assert generated.status_code == 200 and generated.headers["x-request-id"]
    g = stub(port).ModelInfer(
        pb.ModelInferRequest(model_name=MODEL, inputs=[typed_text(TEXTS)]), metadata=[("x-request-id", "md-1")]
    )
    assert g.id == "md-1"
    # a repeated header: the first, over either protocol
    two = httpx.post(base + V2, json=v2_body(), headers=[("x-request-id", "first"), ("x-request-id", "second")])
    assert two.json()["id"] == "first" and two.headers["x-request-id"] == "first"
    g2 = stub(port).ModelInfer(
        pb.ModelInferRequest(model_name=MODEL, inputs=[typed_text(TEXTS)]),
        metadata=[("x-request-id", "first"), ("x-request-id", "second")],
    )
    assert g2.id == "first"
    bad = httpx.post(base + V2, json=v2_body(id="line\nbreak"))
    assert bad.status_code == 400 and "request 'id'" in bad.json()["error"]
    long_header = httpx.post(base + V2, json=v2_body(), headers={"x-request-id": "r" * 129})
    assert long_header.status_code == 400 and "x-request-id has 129 characters" in long_header.json()["error"]


def test_refusals_before_the_body_is_read_echo_the_clients_request_id(served, tiny_server):
    """413 and 415 come before the body's id is known: the client's header id still comes back."""
    base, _ = served
    header = {"x-request-id": "trace-refused"}
    limit = tiny_server[0].settings.max_body_bytes
    big = httpx.post(base + V2, content=b"x" * (limit + 1), headers=header)
    assert big.status_code == 413 and big.headers["x-request-id"] == "trace-refused"
    form = httpx.post(base + V1, content=b"instances=x", headers={**header, "Content-Type": "text/plain"})
    assert form.status_code == 415 and form.headers["x-request-id"] == "trace-refused", form.text
    bad = httpx.post(base + V2, content=b"x" * (limit + 1), headers={"x-request-id": "r" * 129})
    assert bad.status_code == 413 and bad.headers["x-request-id"] != "r" * 129  # not echoed: a generated one


def test_every_answer_carries_a_request_id(served):
    """Answers made outside the inference handlers too (explain's 501, routing errors, a body refused
    before its id is known, probes): the client's usable header id comes back, else a generated one."""
    base, _ = served
    calls = {
        "explain 501": ("POST", f"/v1/models/{MODEL}:explain", {"json": {"instances": TEXTS}}, 501),
        "no route 404": ("GET", "/nope", {}, 404),
        "other model 404": ("POST", "/v1/models/other:explain", {"json": {"instances": TEXTS}}, 404),
        "GET :predict 405": ("GET", V1, {}, 405),
        "PUT infer 405": ("PUT", V2, {}, 405),
        "malformed v2 400": ("POST", V2, {"content": b'{"inputs": ['}, 400),
        "metadata 200": ("GET", f"/v2/models/{MODEL}", {}, 200),
    }
    seen: set[str] = set()
    for what, (method, path, kwargs, status) in calls.items():
        echoed = httpx.request(method, base + path, headers={"x-request-id": f"trace-{status}"}, **kwargs)
        assert echoed.status_code == status and echoed.headers.get("x-request-id") == f"trace-{status}", what
        generated = httpx.request(method, base + path, **kwargs)
        assert generated.status_code == status and generated.headers.get("x-request-id"), what
        unusable = httpx.request(method, base + path, headers={"x-request-id": "r" * 129}, **kwargs)
        assert unusable.headers.get("x-request-id") not in (None, "r" * 129), what
        seen |= {generated.headers["x-request-id"], unusable.headers["x-request-id"]}
    assert len(seen) == 2 * len(calls)  # each generated id is new


# ---------------------------------------------------------------- binary extension


def test_binary_data_output_covers_listed_outputs(served):
    base, _ = served
    outputs = [{"name": "section"}, {"name": "fail_probability", "parameters": {"binary_data": False}}]
    r = httpx.post(base + V2, json=v2_body(outputs=outputs, parameters={"binary_data_output": True}))
    assert r.status_code == 200, r.text
    json_length = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:json_length])
    section, fail = header["outputs"]
    assert "data" not in section and section["parameters"]["binary_data_size"] > 0
    assert len(fail["data"]) == 2  # its own binary_data=false wins
    assert len(r.content) == json_length + section["parameters"]["binary_data_size"]


# ---------------------------------------------------------------- logging of client errors


def test_a_long_model_name_or_version_is_echoed_bounded(served, caplog):
    """A 20,000-character model name or version came back whole: a 60 KB 404 body and log line, and
    over gRPC a status whose message outgrew the 16 KiB metadata limit (RESOURCE_EXHAUSTED, not
    NOT_FOUND)."""
    base, port = served
    caplog.set_level(logging.INFO)
    long = "x" * 20_000
    for r in (
        httpx.get(f"{base}/v2/models/{long}", timeout=30),
        httpx.post(f"{base}/v2/models/{long}/infer", json=v2_body(), timeout=30),
        httpx.post(f"{base}/v2/models/{MODEL}/versions/{long}/infer", json=v2_body(), timeout=30),
    ):
        assert r.status_code == 404 and len(r.content) < 400, (r.status_code, r.text[:200])
        assert r.json()["error"].endswith(("x… does not exist.", "version xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx…"))
    s = stub(port)
    for call, request in (
        (s.ModelReady, pb.ModelReadyRequest(name=long)),
        (s.ModelMetadata, pb.ModelMetadataRequest(name=long)),
        (s.ModelInfer, pb.ModelInferRequest(model_name=long, inputs=[typed_text(TEXTS)])),
        (s.ModelReady, pb.ModelReadyRequest(name=MODEL, version=long)),
    ):
        for _ in range(5):  # it failed most of the time, not always
            err = grpc_error(call, request)
            assert (err.code(), len(err.details()) <= 300) == (grpc.StatusCode.NOT_FOUND, True), len(err.details())
    long_lines = [  # the server's own lines (uvicorn's access log has the URL, as any server's)
        (r.name, r.getMessage()[:120])
        for r in caplog.records
        if len(r.getMessage()) >= 1000 and r.name.startswith(("predictor", "kserve"))
    ]
    assert long_lines == []


def test_client_errors_are_logged_at_info_without_traceback(served, caplog):
    base, port = served
    caplog.set_level(logging.INFO)
    assert httpx.post(f"{base}/v2/models/other/infer", json=v2_body()).status_code == 404
    assert httpx.get(f"{base}/v2/models/other").status_code == 404
    assert httpx.post(base + V2, json=v2_body(outputs=[{"name": "logits"}])).status_code == 400
    s = stub(port)
    assert grpc_error(s.ModelReady, pb.ModelReadyRequest(name="other")).code() == grpc.StatusCode.NOT_FOUND
    no_text = pb.ModelInferRequest(model_name=MODEL, inputs=[typed_text(TEXTS)])
    no_text.inputs[0].name = "txt"
    assert grpc_error(s.ModelInfer, no_text).code() == grpc.StatusCode.INVALID_ARGUMENT
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [(r.name, r.levelname, r.getMessage()) for r in loud]
    quiet = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert "other" in quiet and "logits" in quiet and "txt" in quiet
