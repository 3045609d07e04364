"""HTTP edge cases of the REST API from the API review: CloudEvent attributes, bounded echoes of model
names, repeated headers, v2 parameter values, control characters in log lines, datatype case."""

from __future__ import annotations

import base64
import gzip
import json
import logging
import socket

import grpc
import httpx
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

MODEL = "mot-defects"
OK_TEXT = "Nearside Front Brake pipe corroded (1.1.11 (c))"
V1 = f"/v1/models/{MODEL}:predict"
V2 = f"/v2/models/{MODEL}/infer"
EVENT = {"specversion": "1.0", "id": "e-1", "source": "test", "type": "mot.predict"}
STRUCTURED = {"Content-Type": "application/cloudevents+json"}
BINARY_EVENT = {"ce-specversion": "1.0", "ce-id": "e-1", "ce-source": "test", "ce-type": "mot.predict"}
TEXT_TENSOR = {"name": "text", "datatype": "BYTES", "shape": [1], "data": [OK_TEXT]}


def raw_request(base: str, head: str, body: bytes = b"") -> bytes:
    """An HTTP/1.1 request sent by hand (repeated headers as written); the whole answer."""
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"{head}Host: x\r\nConnection: close\r\n\r\n".encode() + body)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def status_and_json(answer: bytes) -> tuple[bytes, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], json.loads(body)


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        *(
            ({"datacontenttype": v}, f"the CloudEvent's datacontenttype must be a string, got {t}")
            for v, t in [(5, "int"), (True, "bool"), (["application/json"], "list"), ({"a": 1}, "dict")]
        ),
        ({"specversion": 1}, "the CloudEvent's specversion must be non-empty strings"),
        ({"id": "", "source": 7}, "the CloudEvent's id, source must be non-empty strings"),
        ({"specversion": "2.0"}, "the CloudEvent's specversion '2.0' is not 1.0 or 0.3"),
    ],
    ids=["dct-int", "dct-bool", "dct-list", "dct-dict", "specversion-int", "id-source", "specversion-2"],
)
def test_structured_cloudevent_attributes_of_the_wrong_type_are_a_400(tiny_server, attributes, message):
    """A datacontenttype that is no string was an AttributeError (500); attributes KServe's CE_MERGE answer
    is built from are checked before the model runs (a specversion the SDK cannot build was a 500 after it)."""
    _, base = tiny_server
    data = base64.b64encode(json.dumps({"instances": [OK_TEXT]}).encode()).decode()
    for payload in ({"data_base64": data}, {"data": {"instances": [OK_TEXT]}}):
        r = httpx.post(base + V1, json={**EVENT, **attributes, **payload}, headers=STRUCTURED, timeout=30)
        assert r.status_code == 400, (attributes, r.text)
        assert r.json()["error"] == message


def test_a_structured_cloudevent_without_time_is_served_under_ce_merge(tiny_server, monkeypatch):
    """With KServe's CE_MERGE (read from the environment on every answer) KServe deletes the request's
    ``id`` and ``time`` from the answering event's attributes: a KeyError, a 500 after the model ran."""
    _, base = tiny_server
    monkeypatch.setenv("CE_MERGE", "true")
    r = httpx.post(base + V1, json={**EVENT, "myext": "kept", "data": {"instances": [OK_TEXT]}}, headers=STRUCTURED)
    assert r.status_code == 200, r.text
    event = r.json()
    assert r.headers["content-type"].startswith("application/cloudevents+json")
    assert len(event["data"]["predictions"]) == 1 and event["myext"] == "kept"  # merged
    assert event["id"] != "e-1" and event["time"]  # new ones
    binary = httpx.post(base + V1, json={"instances": [OK_TEXT]}, headers=BINARY_EVENT)
    assert binary.status_code == 200 and binary.headers["ce-id"] != "e-1", binary.text


def test_an_unknown_model_name_is_echoed_at_most_100_characters_on_the_ready_routes(tiny_server):
    server, base = tiny_server
    name = "x" * 5000
    expected = f"Model with name {'x' * 99}… does not exist."
    for path in (f"/v2/models/{name}/ready", f"/v1/models/{name}"):
        r = httpx.get(base + path, timeout=30)
        assert r.status_code == 404, r.text
        assert r.json()["error"] == expected, path[:20]
    stub = GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.settings.grpc_port}"))
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and info.value.details() == expected


@pytest.mark.parametrize(
    ("encodings", "gzipped", "status", "message"),
    [
        (["identity", "gzip"], True, 415, "Content-Encoding 'gzip' is not supported"),
        (["identity", "gzip"], False, 415, "Content-Encoding 'gzip' is not supported"),
        (["identity, br"], False, 415, "Content-Encoding 'br' is not supported"),
        (["identity", ""], False, 200, None),
    ],
    ids=["second-header-gzip", "second-header-plain-body", "list", "identity-only"],
)
def test_every_content_encoding_header_is_read(tiny_server, encodings, gzipped, status, message):
    """Only the first Content-Encoding header was read: a gzip body behind ``identity`` was a 400
    (malformed JSON), an uncompressed one served as if nothing were declared."""
    _, base = tiny_server
    body = json.dumps({"inputs": [TEXT_TENSOR]}).encode()
    body = gzip.compress(body) if gzipped else body
    head = f"POST {V2} HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"Content-Encoding: {e}\r\n" for e in encodings)
    status_line, answer = status_and_json(raw_request(base, head, body))
    assert status_line.startswith(f"HTTP/1.1 {status} ".encode()), (status_line, answer)
    if message:
        assert answer["error"].startswith(message)


def test_a_transfer_coding_other_than_chunked_is_a_400(tiny_server):
    """uvicorn de-chunks ``Transfer-Encoding: gzip, chunked`` and passed the still-gzipped body on."""
    _, base = tiny_server
    body = gzip.compress(json.dumps({"instances": [OK_TEXT]}).encode())
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    head = f"POST {V1} HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n"
    status_line, answer = status_and_json(raw_request(base, head, chunked))
    assert status_line == b"HTTP/1.1 400 Bad Request", (status_line, answer)  # client input: never a 5xx
    assert answer["error"] == "Transfer-Encoding 'gzip' is not supported; send the body plain or chunked"
    plain = json.dumps({"instances": [OK_TEXT]}).encode()
    head = f"POST {V1} HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    chunked = f"{len(plain):x}\r\n".encode() + plain + b"\r\n0\r\n\r\n"
    status_line, answer = status_and_json(raw_request(base, head, chunked))
    assert status_line == b"HTTP/1.1 200 OK" and len(answer["predictions"]) == 1, answer


def test_a_repeated_x_request_id_header_is_read_the_same_way_everywhere(tiny_server):
    """The first one, whether the request is refused early (the edge) or served (the handlers kept the last)."""
    _, base = tiny_server
    ids = [("x-request-id", "first-id"), ("x-request-id", "second-id")]
    served_v1 = httpx.post(base + V1, json={"instances": [OK_TEXT]}, headers=ids)
    served_v2 = httpx.post(base + V2, json={"inputs": [TEXT_TENSOR]}, headers=ids)
    refused = httpx.post(base + V1, content=b"{}", headers=[*ids, ("content-type", "text/plain")])
    assert served_v1.status_code == 200 and served_v2.status_code == 200 and refused.status_code == 415
    assert served_v2.json()["id"] == "first-id"
    assert [r.headers["x-request-id"] for r in (served_v1, served_v2, refused)] == ["first-id"] * 3


@pytest.mark.parametrize("body", [b"[1]", b"5", b"null", b'"x"', b'"{\\"instances\\": [\\"a\\"]}"'])
def test_a_binary_cloudevent_with_ce_contenttype_and_no_v1_object_names_the_problem(tiny_server, body):
    """The SDK parsed such data itself: ``[1]``, ``5``, ``null`` read as "carries no data" and the JSON
    string ``"x"`` as malformed JSON (parsed a second time)."""
    _, base = tiny_server
    headers = {**BINARY_EVENT, "Content-Type": "application/json", "ce-contenttype": "application/json"}
    r = httpx.post(base + V1, content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "v1 request body must be a JSON object with 'instances'"
    empty = httpx.post(base + V1, content=b"", headers=headers)
    assert empty.status_code == 400 and empty.json()["error"].startswith("the CloudEvent carries no data")


@pytest.mark.parametrize(("value", "got"), [(None, "null"), ({"a": 1}, "dict"), ([True], "list")])
def test_a_v2_parameter_value_of_no_parameter_type_is_named_once(tiny_server, value, got):
    """A v2 parameter is a string, number or boolean; pydantic's error was one line per union member
    (``parameters.return_embedding.float must be a number, got null; … (and 1 more)``)."""
    _, base = tiny_server
    r = httpx.post(base + V2, json={"inputs": [TEXT_TENSOR], "parameters": {"return_embedding": value}})
    assert r.status_code == 400, r.text
    expected = f"parameters.return_embedding must be a string, number or boolean, got {got}"
    assert r.json()["error"] == f"malformed v2 inference request: {expected}"
    inner = {**TEXT_TENSOR, "parameters": {"q": value}}
    outputs = [{"name": "section", "parameters": {"binary_data": value}}]
    r = httpx.post(base + V2, json={"inputs": [inner], "outputs": outputs})
    assert r.json()["error"] == (
        f"malformed v2 inference request: inputs[0].parameters.q must be a string, number or boolean, got {got}; "
        f"outputs[0].parameters.binary_data must be a string, number or boolean, got {got}"
    )
    spec = {"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 4 + len(OK_TEXT)}}
    header = json.dumps({"inputs": [spec], "parameters": {"return_embedding": value}}).encode()
    body = header + len(OK_TEXT).to_bytes(4, "little") + OK_TEXT.encode()
    r = httpx.post(base + V2, content=body, headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and r.json()["error"] == f"malformed binary inference request header: {expected}"


def test_short_message_puts_no_control_character_on_a_line():
    from predictor.codec import short_message

    assert short_message("a\r\nb\x1b[31m\tc\x00d\x7f\x85e\u2028f") == "a  b [31m c d  e f"


def test_a_carriage_return_in_a_path_reaches_no_log_line_raw(tiny_server, caplog):
    _, base = tiny_server
    with caplog.at_level(logging.INFO, logger="predictor"):
        r = httpx.get(f"{base}/v2/models/a%0D%1B[2Kforged/ready")
        r2 = httpx.post(f"{base}/v2/models/a%0Dforged/infer", json={"inputs": [TEXT_TENSOR]})
    assert r.status_code == 404 and r2.status_code == 404
    assert "\r" not in r.text and "\x1b" not in r.text
    lines = [rec.getMessage() for rec in caplog.records if "forged" in rec.getMessage()]
    assert lines and not any("\r" in line or "\x1b" in line for line in lines), lines


def test_datatypes_are_read_in_any_case_on_the_json_and_the_binary_path(tiny_server):
    """KServe upper-cases a JSON datatype; the binary-extension check refused ``bytes`` (gRPC: elsewhere)."""
    import struct

    _, base = tiny_server
    text = OK_TEXT.encode()
    json_form = {"inputs": [{**TEXT_TENSOR, "datatype": "bytes"}, {"name": "vehicle_age_years",
                 "datatype": "fp32", "shape": [1], "data": [3.0]}]}  # fmt: skip
    r = httpx.post(base + V2, json=json_form)
    assert r.status_code == 200, r.text
    spec = {"name": "text", "datatype": "bytes", "shape": [1], "parameters": {"binary_data_size": 4 + len(text)}}
    age = {"name": "vehicle_age_years", "datatype": "Fp32", "shape": [1], "parameters": {"binary_data_size": 4}}
    head = json.dumps({"inputs": [spec, age]}).encode()
    body = head + len(text).to_bytes(4, "little") + text + struct.pack("<f", 3.0)
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    binary = httpx.post(base + V2, content=body, headers=headers)
    assert binary.status_code == 200, binary.text
    assert binary.json()["outputs"][0]["data"] == r.json()["outputs"][0]["data"]
    age["parameters"]["binary_data_size"] = 2  # still checked as FP32
    head = json.dumps({"inputs": [spec, age]}).encode()
    body = head + len(text).to_bytes(4, "little") + text + b"\0\0"
    headers["Inference-Header-Content-Length"] = str(len(head))
    short = httpx.post(base + V2, content=body, headers=headers)
    assert short.status_code == 400 and "has 2 bytes of FP32 data" in short.json()["error"], short.text
