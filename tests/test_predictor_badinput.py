"""Every bad input of docs/predictor.md (plus oversized bodies, wrong tensor names, N mismatch): its 4xx and message."""

from __future__ import annotations

import gzip
import json
import logging
import socket

import httpx
import numpy as np
import pytest
from pydantic import BaseModel

MODEL = "mot-defects"
OK_TEXT = "Nearside Front Brake pipe corroded (1.1.11 (c))"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base(tiny_bundle, embedder):
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings

    settings = ServeSettings(
        model=str(tiny_bundle.root),
        http_port=_port(),
        grpc_port=_port(),
        max_items_per_request=8,
        max_text_chars=100,
        max_body_bytes=64 * 1024,
        body_timeout_s=1.0,
    )
    server = PredictorServer(settings, embedder=embedder, host="127.0.0.1")
    thread = ServerThread(server).start().wait_ready()
    yield f"http://127.0.0.1:{settings.http_port}", settings
    thread.stop()


def text_input(data, shape=None, datatype="BYTES", name="text"):
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


def v2(*inputs, **extra):
    return {"inputs": list(inputs), **extra}


def binary_body(items: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """A v2 binary-extension body with one BYTES tensor holding ``items`` as raw bytes."""
    return raw_binary_body(b"".join(len(b).to_bytes(4, "little") + b for b in items), len(items))


def raw_binary_body(raw: bytes, n: int) -> tuple[bytes, dict[str, str]]:
    """A v2 binary-extension body whose 'text' tensor of ``n`` items is the bytes ``raw``, as given."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [n],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    return header + raw, {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def binary_request(header: dict, raw: bytes) -> tuple[bytes, dict[str, str]]:
    """A v2 binary-extension body: the JSON ``header`` as given, then ``raw``."""
    head = json.dumps(header).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def ok_text_tensor(**header) -> tuple[bytes, dict[str, str]]:
    """One OK text as a binary BYTES tensor, with extra top-level ``header`` fields."""
    spec = {"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 4 + len(OK_TEXT)}}
    return binary_request({"inputs": [spec], **header}, len(OK_TEXT).to_bytes(4, "little") + OK_TEXT.encode())


V2 = f"/v2/models/{MODEL}/infer"
V1 = f"/v1/models/{MODEL}:predict"
CLOUDEVENT = {"ce-specversion": "1.0", "ce-id": "e-1", "ce-source": "test", "ce-type": "mot.predict"}

# (id, path, json body or (raw bytes, headers), expected status, substring of the error message)
CASES = [
    ("missing-text", V2, v2(text_input(["FORD"], name="make")), 400, "missing required input 'text'"),
    ("wrong-tensor-name", V2, v2(text_input([OK_TEXT], name="txt")), 400, "unknown input 'txt'"),
    ("duplicate-input", V2, v2(text_input([OK_TEXT]), text_input([OK_TEXT])), 400, "more than once"),
    ("text-wrong-datatype", V2, v2(text_input([1.5], datatype="FP32")), 400, "'text' has datatype FP32"),
    (
        "age-wrong-datatype",
        V2,
        v2(text_input([OK_TEXT]), text_input(["old"], name="vehicle_age_years")),
        400,
        "'vehicle_age_years' has datatype BYTES",
    ),
    (
        "shape-disagrees-with-data",
        V2,
        v2(text_input([OK_TEXT, OK_TEXT], shape=[3])),
        400,
        "does not fit datatype BYTES and shape [3]",
    ),
    ("shape-2d", V2, v2(text_input([OK_TEXT] * 4, shape=[2, 2])), 400, "expected [N]"),
    (
        "n-mismatch-across-inputs",
        V2,
        v2(text_input([OK_TEXT, OK_TEXT]), text_input(["FORD"] * 3, name="make")),
        400,
        "same N",
    ),
    (  # the N named is the first input's, which need not be 'text'
        "n-mismatch-names-the-input-n-came-from",
        V2,
        v2(text_input(["FORD", "VW"], name="make"), text_input([OK_TEXT])),
        400,
        "input 'text' has 1 items but input 'make' has 2; every input must have the same N",
    ),
    *(  # data nested deeper than its shape was read as the shape's items
        (
            f"data-nested-otherwise-than-shape-{label}",
            V2,
            v2(text_input(data, shape=shape, datatype=dt, name=name)),
            400,
            f"input '{name}': its data is nested otherwise than its shape {shape}; send it flat or nested as the shape",
        )
        for label, name, dt, data, shape in (
            ("3-deep-under-1d", "text", "BYTES", [[[OK_TEXT, OK_TEXT]]], [2]),
            ("3-deep-under-2d", "text", "BYTES", [[[OK_TEXT]]], [1, 1]),
            ("ragged", "text", "BYTES", [[OK_TEXT], [OK_TEXT, OK_TEXT]], [2, 1]),
        )
    ),  # fmt: skip
    (
        "numeric-data-nested-deeper-than-shape",
        V2,
        v2(text_input([OK_TEXT]), text_input([[[5.0]]], shape=[1], datatype="FP32", name="odometer_miles")),
        400,
        "input 'odometer_miles': its data is nested otherwise than its shape [1]",
    ),
    *(  # the datatype is checked before KServe's decoder, which advised sending FP16 JSON data binary
        (f"fp16-json-{label}", V2, body, 400, message)
        for label, body, message in (
            (
                "context",
                v2(text_input([OK_TEXT]), text_input([5.0], datatype="FP16", name="odometer_miles")),
                "input 'odometer_miles' has datatype FP16; expected FP32 or FP64 or INT32 or INT64",
            ),
            ("text", v2(text_input([1.0], datatype="FP16")), "input 'text' has datatype FP16; expected BYTES"),
            (
                "unknown-input",
                v2(text_input([OK_TEXT]), text_input([5.0], datatype="FP16", name="colour")),
                "unknown input 'colour'",
            ),
            (
                "in-a-binary-request",
                binary_request(
                    {
                        "inputs": [
                            {
                                "name": "text",
                                "datatype": "BYTES",
                                "shape": [1],
                                "parameters": {"binary_data_size": 4 + len(OK_TEXT)},
                            },
                            text_input([5.0], datatype="FP16", name="odometer_miles"),
                        ]
                    },
                    len(OK_TEXT).to_bytes(4, "little") + OK_TEXT.encode(),
                ),
                "input 'odometer_miles' has datatype FP16; expected FP32",
            ),
        )
    ),  # fmt: skip
    *(  # a fuel type is a DVSA code or its name (docs/predictor.md lists them)
        (f"unknown-fuel-{label}", path, body, 400, message)
        for label, path, body, message in (
            (
                "v1",
                V1,
                {"instances": [{"text": OK_TEXT, "fuel_type": "XX"}]},
                "instances[0].fuel_type is 'XX'; expected a DVSA fuel code or name (any case): PE/Petrol, DI/Diesel",
            ),
            (
                "v2",
                V2,
                v2(text_input([OK_TEXT]), text_input(["Hydrogen"], name="fuel_type")),
                "input 'fuel_type' item 0 is 'Hydrogen'; expected a DVSA fuel code or name",
            ),
        )
    ),  # fmt: skip
    *(  # a body that is not UTF-8 says so, and where (the JSON parsers' words named no byte)
        (f"not-utf8-{label}", path, (body, headers), 400, message)
        for label, path, body, headers, message in (
            (
                "v1",
                V1,
                b'{"instances": ["Brake \xff pipe"]}',
                {"Content-Type": "application/json"},
                "the request body is not valid UTF-8 (invalid start byte at byte 22)",
            ),
            (
                "v2",
                V2,
                b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["\xc3("]}]}',
                {"Content-Type": "application/json"},
                "the request body is not valid UTF-8 (invalid continuation byte at byte 74)",
            ),
            (
                "binary-cloudevent",
                V1,
                b'{"instances": ["\xed\xa0\x80"]}',
                {**CLOUDEVENT, "Content-Type": "application/json"},
                "the request body is not valid UTF-8 (invalid continuation byte at byte 16)",
            ),
            (
                "structured-cloudevent",
                V1,
                b'{"specversion": "1.0", "id": "e", "source": "s", "type": "t", "data": {"instances": ["\xff"]}}',
                {"Content-Type": "application/cloudevents+json"},
                "the request body is not valid UTF-8 (invalid start byte at byte 86)",
            ),
            (
                "cloudevent-data-base64",
                V1,
                json.dumps(
                    {"specversion": "1.0", "id": "e", "source": "s", "type": "t", "data_base64": "/w=="}
                ).encode(),
                {"Content-Type": "application/cloudevents+json"},
                "the CloudEvent's decoded data_base64 is not valid UTF-8 (invalid start byte at byte 0)",
            ),
            (
                "binary-header",
                V2,
                b'{"inputs": ["\xff"]}',
                {"Inference-Header-Content-Length": "17"},
                "the binary inference request header is not valid UTF-8 (invalid start byte at byte 13)",
            ),
        )
    ),  # fmt: skip
    (
        "binary-header-length-not-an-integer",
        V2,
        (b"{}", {"Inference-Header-Content-Length": "abc"}),
        400,
        "header inference-header-content-length='abc' is not a non-negative integer",
    ),
    ("too-many-items", V2, v2(text_input([OK_TEXT] * 9)), 400, "the limit is 8"),
    ("no-items", V2, v2(text_input([], shape=[0])), 400, "has no items"),
    ("empty-text", V2, v2(text_input([OK_TEXT, "   "])), 400, "item 1 is empty"),
    ("text-too-long", V2, v2(text_input(["x" * 101])), 400, "101 characters; the limit is 100"),
    ("text-not-string", V2, v2(text_input([42])), 400, "item 0 must be a string"),
    (
        "non-utf8-binary",
        V2,
        binary_body([OK_TEXT.encode(), b"\xff\xfe bad"]),
        400,
        "input 'text' item 1 is not valid UTF-8",
    ),
    *(
        (
            f"binary-shape-{name}",
            V2,
            binary_request(
                {
                    "inputs": [
                        {
                            "name": "text",
                            "datatype": "BYTES",
                            "shape": shape,
                            "parameters": {"binary_data_size": 4 + len(OK_TEXT)},
                        }
                    ]
                },  # fmt: skip
                len(OK_TEXT).to_bytes(4, "little") + OK_TEXT.encode(),
            ),
            400,
            f"input 'text' has shape {shape}; a shape is a list of non-negative integers",
        )
        for name, shape in (("string", ["1"]), ("float", [1.0]), ("bool", [True]), ("negative", [-1]))
    ),
    (
        "binary-header-length-too-big",
        V2,
        (b"{}", {"Inference-Header-Content-Length": "999"}),
        400,
        "does not fit a body",
    ),
    (
        "unknown-output",
        V2,
        v2(text_input([OK_TEXT]), outputs=[{"name": "logits"}]),
        400,
        "unknown output 'logits'",
    ),
    ("malformed-json", V2, (b'{"inputs": [', {"Content-Type": "application/json"}), 400, "malformed JSON at line 1"),
    ("v2-id-not-string", V2, v2(text_input([OK_TEXT]), id=5), 400, "request: id must be a string, got int"),
    ("inputs-not-list", V2, {"inputs": "text"}, 400, "malformed v2"),
    ("oversized-body", V2, v2(text_input(["y" * 90] * 800)), 413, "exceeds 65536 bytes"),
    ("v1-missing-instances", V1, {"data": [OK_TEXT]}, 400, "missing 'instances'"),
    ("v1-instances-not-list", V1, {"instances": OK_TEXT}, 400, "'instances' must be a list"),
    *(
        (f"v1-parameters-{name}", V1, {"instances": [OK_TEXT], "parameters": v}, 400, "'parameters' must be an object")
        for name, v in (("list", []), ("zero", 0), ("false", False), ("empty-string", ""))
    ),
    (
        "v1-instance-without-text",
        V1,
        {"instances": [{"make": "FORD"}]},
        400,
        "instances[0] is missing 'text'",
    ),
    (
        "v1-unknown-field",
        V1,
        {"instances": [{"text": OK_TEXT, "colour": "red"}]},
        400,
        "unknown field 'colour'",
    ),
    (
        "v1-bad-age",
        V1,
        {"instances": [{"text": OK_TEXT, "vehicle_age_years": "old"}]},
        400,
        "instances[0].vehicle_age_years must be a number",
    ),
    (
        "int32-overflow",
        V2,
        v2(text_input([OK_TEXT]), text_input([1099511627776], datatype="INT32", name="odometer_miles")),
        400,
        "input 'odometer_miles'",
    ),
    (
        "int64-overflow",
        V2,
        v2(text_input([OK_TEXT]), text_input([2**70], datatype="INT64", name="odometer_miles")),
        400,
        "input 'odometer_miles'",
    ),
    (
        "binary-length-prefix-past-end",
        V2,
        raw_binary_body((100).to_bytes(4, "little") + b"short", 1),
        400,
        "input 'text' item 0",
    ),
    ("binary-chunk-under-4-bytes", V2, raw_binary_body(b"\x01\x00", 1), 400, "input 'text'"),
    (
        "age-out-of-range",
        V2,
        v2(text_input([OK_TEXT]), text_input([200.0], datatype="FP32", name="vehicle_age_years")),
        400,
        "input 'vehicle_age_years' item 0 is 200.0; expected 0 to 150",
    ),
    (
        "odometer-huge",
        V2,
        v2(text_input([OK_TEXT]), text_input([1e300], datatype="FP64", name="odometer_miles")),
        400,
        "input 'odometer_miles' item 0",
    ),
    (
        "v1-odometer-huge",
        V1,
        {"instances": [{"text": OK_TEXT, "odometer_miles": 1e300}]},
        400,
        "instances[0].odometer_miles",
    ),
    (
        "v1-negative-age",
        V1,
        {"instances": [{"text": OK_TEXT, "vehicle_age_years": -1}]},
        400,
        "instances[0].vehicle_age_years is -1.0; expected 0 to 150",
    ),
    ("v2-id-too-long", V2, v2(text_input([OK_TEXT]), id="r" * 129), 400, "request 'id' has 129 characters"),
    ("v1-empty-text", V1, {"instances": [""]}, 400, "item 0 is empty"),
    ("v1-null-text", V1, {"instances": [OK_TEXT, None]}, 400, "item 1 must be a string, got null"),
    *(  # a flag that is neither true nor false is refused, not read as one of them
        (
            f"v1-return-embedding-{label}",
            V1,
            {"instances": [OK_TEXT], "parameters": {"return_embedding": flag}},
            400,
            f"parameter 'return_embedding' must be true or false, got {shown}",
        )
        for label, flag, shown in (("list", [1], "[1]"), ("word", "maybe", "'maybe'"), ("two", 2, "2"))
    ),  # fmt: skip
    ("v1-malformed-json", V1, (b"{nope", {"Content-Type": "application/json"}), 400, "malformed JSON at line 1"),
    ("v1-oversized-body", V1, {"instances": ["z" * 90] * 800}, 413, "exceeds 65536 bytes"),
    ("unknown-model", "/v2/models/other/infer", v2(text_input([OK_TEXT])), 404, "other"),
    # texts the tokenizer reduces to nothing are empty too (NUL, zero-width space, BOM, soft hyphen, C0)
    ("nul-text", V2, v2(text_input(["\x00"])), 400, "item 0 is empty"),
    ("invisible-text", V2, v2(text_input([OK_TEXT, "\u200b\ufeff\u00ad \x01"])), 400, "item 1 is empty"),
    ("v1-invisible-text", V1, {"instances": ["\u200b"]}, 400, "item 0 is empty"),
    # ... and so are combining marks, variation selectors, U+FFFD and private-use characters alone
    (
        "marks-only-text",
        V1,
        {"instances": ["\u0301\ufe0f\U000e0100", "\ufffd\ue000\U000f0000"]},
        400,
        "item 0 is empty",
    ),  # fmt: skip
    ("binary-nul-text", V2, binary_body([b"\x00\x00"]), 400, "item 0 is empty"),
    # JSON numbers must fit their datatype, not be truncated or parsed by numpy
    *(
        (
            f"{dt}-{kind}",
            V2,
            v2(text_input([OK_TEXT]), text_input([bad], datatype=dt, name="vehicle_age_years")),
            400,
            f"input 'vehicle_age_years' ({dt}) must hold",
        )
        for dt, kind, bad in [
            ("INT32", "float", 2.9),
            ("INT32", "negative-float", -0.9),
            ("INT64", "string", "7"),
            ("INT64", "bool", True),
            ("FP32", "bool", True),
            ("FP32", "string", "12.5"),
        ]
    ),
    (
        "duplicate-output",
        V2,
        v2(text_input([OK_TEXT]), outputs=[{"name": "section"}, {"name": "section"}]),
        400,
        "output 'section' requested more than once",
    ),  # fmt: skip
    (
        "binary-trailing-bytes",
        V2,
        (lambda b: (b[0] + b"junk", b[1]))(binary_body([OK_TEXT.encode()])),
        400,
        "4 bytes follow the last binary tensor",
    ),
    (
        "binary-fp32-past-the-end",
        V2,
        binary_request(
            {
                "inputs": [
                    {
                        "name": "text",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 4 + len(OK_TEXT)},
                    },
                    {
                        "name": "vehicle_age_years",
                        "datatype": "FP32",
                        "shape": [1],
                        "parameters": {"binary_data_size": 4},
                    },
                ]
            },
            len(OK_TEXT).to_bytes(4, "little") + OK_TEXT.encode(),
        ),
        400,
        "the binary tensors declare",
    ),
    (  # KServe decodes the JSON data and reads the next binary tensor from the text's bytes (age 4.8e-44)
        "binary-and-json-data-for-one-input",
        V2,
        binary_request(
            {
                "inputs": [
                    {
                        "name": "text",
                        "datatype": "BYTES",
                        "shape": [1],
                        "data": ["Horn not working"],
                        "parameters": {"binary_data_size": 4 + len(OK_TEXT)},
                    },
                    {
                        "name": "vehicle_age_years",
                        "datatype": "FP32",
                        "shape": [1],
                        "parameters": {"binary_data_size": 4},
                    },
                ]
            },
            len(OK_TEXT).to_bytes(4, "little") + OK_TEXT.encode() + np.float32(3.0).tobytes(),
        ),
        400,
        "input 'text' has both data and binary_data_size; send its values one way",
    ),
    ("binary-too-many-items", V2, binary_body([OK_TEXT.encode()] * 9), 400, "has 9 items; the limit is 8"),
    (  # a million empty strings under shape [1]: refused at the second, the third (not UTF-8) never read
        "binary-more-items-than-shape",
        V2,
        raw_binary_body(b"".join(len(b).to_bytes(4, "little") + b for b in (OK_TEXT.encode(), b"", b"\xff")), 1),
        400,
        "input 'text' holds more items than the 1 its shape [1] declares",
    ),
    (
        "binary-shape-product-over-limit",
        V2,
        binary_request(
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 9], "parameters": {"binary_data_size": 0}}]},
            b"",
        ),
        400,
        "has 9 items; the limit is 8",
    ),
    *(  # the binary header's form, checked before KServe decodes it (a shape of 1 was a 500)
        (f"binary-header-{label}", V2, binary_request(header, raw), 400, message)
        for label, header, raw, message in (
            ("array", [1, 2], b"", "the header must be a JSON object"),
            ("inputs-null", {"inputs": None}, b"", "inputs must be a list, got null"),
            ("inputs-item-int", {"inputs": [5]}, b"", "inputs[0] must be an object, got int"),
            (
                "shape-int",
                {"inputs": [{"name": "text", "shape": 1, "datatype": "BYTES", "data": ["x"]}]},
                b"",
                "inputs[0].shape must be a list, got int",
            ),
            (
                "datatype-int",
                {"inputs": [{"name": "text", "shape": [1], "datatype": 5, "data": ["x"]}]},
                b"",
                "inputs[0].datatype must be a string, got int",
            ),
            (
                "params-list",
                {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": [1]}]},
                b"",
                "inputs[0].parameters must be an object, got list",
            ),
            (
                "output-params-list",
                {"inputs": [text_input([OK_TEXT])], "outputs": [{"name": "section", "parameters": [1]}]},
                b"",
                "outputs[0].parameters must be an object, got list",
            ),
            ("outputs-int", {"inputs": [text_input([OK_TEXT])], "outputs": 5}, b"", "outputs must be a list, got int"),
            (
                "unknown-datatype",
                {"inputs": [{"name": "text", "shape": [1], "datatype": "WHAT", "parameters": {"binary_data_size": 4}}]},
                b"abcd",
                "input 'text' has datatype 'WHAT', which v2 does not",
            ),
            (
                "fewer-items",
                {
                    "inputs": [
                        {"name": "text", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}
                    ]
                },
                b"\x01\x00\x00\x00a",
                "input 'text' holds 1 items; its shape [2]",
            ),
            (
                "numeric-size",
                {
                    "inputs": [
                        text_input([OK_TEXT]),
                        {
                            "name": "odometer_miles",
                            "shape": [1],
                            "datatype": "FP32",
                            "parameters": {"binary_data_size": 8},
                        },
                    ]
                },
                b"\x00" * 8,
                "input 'odometer_miles' has 8 bytes of FP32 data; its shape [1] takes 4",
            ),
        )
    ),  # fmt: skip
    (
        "v2-json-more-data-than-shape",
        V2,
        v2(text_input([OK_TEXT] * 20, shape=[1])),
        400,
        "input 'text' holds more items than the 1 its shape [1] declares",
    ),
    ("binary-id-not-string", V2, ok_text_tensor(id={"a": 1}), 400, "request 'id' must be a string"),
    *(
        (
            f"binary-size-{kind}",
            V2,
            binary_request(
                {
                    "inputs": [
                        {"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": size}}
                    ]
                },
                b"\x00" * 8,
            ),
            400,
            "binary_data_size must be a non-negative integer",
        )
        for kind, size in [("negative", -4), ("string", "51"), ("float", 4.5)]
    ),
    (
        "gzip-body",
        V1,
        (gzip.compress(b'{"instances": ["x"]}'), {"Content-Type": "application/json", "Content-Encoding": "gzip"}),
        415,
        "Content-Encoding 'gzip' is not supported",
    ),
    (
        "binary-parameters-not-object",
        V2,
        ok_text_tensor(parameters=[1]),
        400,
        "header: parameters must be an object, got list",
    ),
    (
        "binary-data-output-not-bool",
        V2,
        v2(text_input([OK_TEXT]), parameters={"binary_data_output": "false"}),
        400,
        "parameter 'binary_data_output' must be true or false",
    ),
    (
        "output-binary-data-not-bool",
        V2,
        v2(text_input([OK_TEXT]), outputs=[{"name": "section", "parameters": {"binary_data": 0}}]),
        400,
        "output 'section' parameter 'binary_data' must be true or false",
    ),
    (
        "v1-form-content-type",
        V1,
        (b'{"instances": ["x"]}', {"Content-Type": "application/x-www-form-urlencoded"}),
        415,
        "Content-Type 'application/x-www-form-urlencoded' is not supported",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_its_status_and_message(base, path, body, status, message):
    url, _ = base
    if isinstance(body, tuple):
        r = httpx.post(url + path, content=body[0], headers=body[1])
    else:
        r = httpx.post(url + path, json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert httpx.get(f"{url}/v2/health/live").status_code == 200  # the server stays up


JSON = {"Content-Type": "application/json"}
SECRET = "s3cret-plate-AB12CDE"  # must never come back in an error


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        (V2, b'{"inputs": [{"name": "text", "data": ["' + SECRET.encode(), "malformed JSON at line 1 column "),
        (V2, b"", "malformed JSON at line 1 column 0: EOF while parsing a value"),
        (
            V2,
            json.dumps({"id": 5, "inputs": [text_input([SECRET])]}).encode(),
            "malformed v2 inference request: id must be a string, got int",
        ),
        (
            V2,
            json.dumps({"inputs": [{**text_input([SECRET]), "shape": SECRET}]}).encode(),
            "malformed v2 inference request: inputs[0].shape must be a list, got str",
        ),
        (
            V2,
            json.dumps({"inputs": [{"datatype": "BYTES", "shape": [1], "data": [SECRET]}], "outputs": SECRET}).encode(),
            "malformed v2 inference request: inputs[0].name is missing; outputs must be a list, got str",
        ),
        (V2, json.dumps([SECRET]).encode(), "malformed v2 inference request: the request body must be an object"),
        (V1, b'{"instances": ["' + SECRET.encode(), "malformed JSON at line 1 column "),
    ],
    ids=["v2-truncated", "v2-empty", "v2-id-int", "v2-shape-str", "v2-two-problems", "v2-array", "v1-truncated"],
)
def test_malformed_bodies_are_one_line_naming_the_problem_without_echo(base, path, body, message):
    """A body that is not JSON, or not the v2 schema, is a 400 in the usual ``{"error": …}`` form: one
    line naming the problem and where; no pydantic dump (URL, ``input_value``), no echo of the body."""
    url, _ = base
    for headers in (JSON, {}):  # also without Content-Type (parsed as JSON, as KServe would)
        r = httpx.post(url + path, content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert list(r.json()) == ["error"]
        error = r.json()["error"]
        assert error.startswith(message), error
        assert SECRET not in r.text and "pydantic" not in error and "input_value" not in error and "\n" not in error
        assert r.headers["x-request-id"]  # refused before the body's id was known: a generated one


class _ThingBody(BaseModel):
    ref: str
    n: int = 1


def test_fastapi_request_validation_is_a_400_in_the_usual_form():
    """Routes FastAPI validates itself (a pydantic body or typed parameters) answer like the others:
    400 ``{"error": …}`` naming the problem, not FastAPI's 422 with the input echoed."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.testclient import TestClient

    from predictor.rest_edge import _request_validation_handler

    app = FastAPI()
    app.add_exception_handler(RequestValidationError, _request_validation_handler)

    @app.post("/thing")
    def thing(body: _ThingBody) -> dict:
        return {"ref": body.ref}

    client = TestClient(app)
    wrong = client.post("/thing", json={"ref": 5, "n": SECRET})
    assert wrong.status_code == 400
    assert wrong.json() == {"error": "ref must be a string, got int; n must be an integer, got str"}
    broken = client.post("/thing", content=b'{"ref": "' + SECRET.encode(), headers=JSON)
    assert broken.status_code == 400 and broken.json()["error"].startswith("malformed JSON at character ")
    assert SECRET not in broken.text


async def test_grpc_bad_input_is_invalid_argument(base):
    import grpc
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    _, settings = base
    client = InferenceGRPCClient(f"127.0.0.1:{settings.grpc_port}", retries=0)
    try:
        inp = InferInput("text", [2], "BYTES")
        inp.set_data_from_numpy(np.array([OK_TEXT.encode(), b"\xc3\x28"], dtype=np.object_), binary_data=True)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.infer(InferRequest(MODEL, [inp]))
    finally:
        await client.close()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'text' item 1 is not valid UTF-8" in info.value.details()


def test_bad_inputs_are_counted_as_client_errors(base):
    """Each refused request moves its series by exactly one (before/after, not mere presence)."""
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    refused = {"outcome": "client_error", "version": ""}
    series = {
        "v2_client_error": ("motlens_requests_total", {"protocol": "v2-rest", **refused}),
        "v1_client_error": ("motlens_requests_total", {"protocol": "v1", **refused}),
        "invalid_input": ("motlens_rejected_total", {"reason": "invalid_input"}),
        "body_too_large": ("motlens_rejected_total", {"reason": "body_too_large"}),
    }
    url, _ = base
    before = {k: value(n, **labels) for k, (n, labels) in series.items()}
    assert httpx.post(url + V2, json=v2(text_input([""]))).status_code == 400
    assert httpx.post(url + V2, json=v2(text_input([OK_TEXT]), id=5)).status_code == 400  # refused by the schema
    assert httpx.post(url + V1, content=b'{"instances": [', headers=JSON).status_code == 400  # malformed JSON
    assert httpx.post(url + V1, json={"instances": ["z" * 90] * 800}).status_code == 413
    delta = {k: value(n, **labels) - before[k] for k, (n, labels) in series.items()}
    assert delta == {"v2_client_error": 2, "v1_client_error": 2, "invalid_input": 3, "body_too_large": 1}


def test_admin_api_is_absent_unless_enabled(base):
    url, settings = base
    assert settings.admin_enabled is False
    assert httpx.get(f"{url}/motlens/admin/slots").status_code == 404
    assert httpx.post(f"{url}/motlens/admin/promote").status_code == 404
    assert httpx.post(f"{url}/motlens/admin/slots/production/load", json={"ref": "/x"}).status_code == 404


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), 1e300, -5.0])
def test_context_numbers_must_be_finite_and_in_range(value):
    from kserve.errors import InvalidInput

    from predictor.codec import Limits, parse_v1

    with pytest.raises(InvalidInput, match=r"instances\[0\]\.odometer_miles"):
        parse_v1({"instances": [{"text": OK_TEXT, "odometer_miles": value}]}, Limits())


def test_v1_json_with_a_charset_is_parsed(base):
    url, _ = base
    body = json.dumps({"instances": [OK_TEXT]}).encode()
    r = httpx.post(url + V1, content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 1
    bad = httpx.post(url + V1, content=b"{nope", headers={"Content-Type": "application/json; charset=utf-8"})
    assert bad.status_code == 400 and "malformed JSON at line 1 column 2" in bad.json()["error"]


def test_request_ids_are_capped_at_128_characters(base):
    url, _ = base
    long_id = httpx.post(url + V1, json={"instances": [OK_TEXT]}, headers={"x-request-id": "r" * 129})
    assert long_id.status_code == 400 and "x-request-id has 129 characters" in long_id.json()["error"]
    assert httpx.post(url + V1, json={"instances": [OK_TEXT]}, headers={"x-request-id": "r" * 128}).status_code == 200
    ok = httpx.post(url + V2, json=v2(text_input([OK_TEXT]), id="r" * 128))
    assert ok.status_code == 200 and ok.json()["id"] == "r" * 128


def test_numbers_of_the_right_type_are_served(base):
    url, _ = base
    ok = v2(text_input([OK_TEXT, OK_TEXT]), text_input([3, 12], datatype="INT32", name="vehicle_age_years"),
            text_input([5.5, 70000], datatype="FP64", name="odometer_miles"))  # fmt: skip
    assert httpx.post(url + V2, json=ok).status_code == 200


def test_v1_item_limit_is_checked_before_the_instances_are_read():
    """A huge v1 body is refused without per-instance work (the quadratic loop once took seconds on
    the event loop): the limit is reported although an instance past it is malformed, so no instance
    was read first (no timing needed)."""
    from kserve.errors import InvalidInput

    from predictor.codec import Limits, parse_v1

    many = {"instances": [{"text": "a"}] * 199_999 + [{"text": "a", "colour": "red"}]}
    with pytest.raises(InvalidInput, match="200000 items; the limit is 256"):
        parse_v1(many, Limits())
    req = parse_v1({"instances": [{"text": OK_TEXT, "make": "FORD"}, OK_TEXT]}, Limits())
    assert req.context["make"] == ["FORD", None] and req.context["odometer_miles"] == [None, None]


def test_repository_extension_cannot_unload_the_model(base):
    """KServe's /v2/repository routes would let any client unload the model: they do not exist."""
    url, _ = base
    for action in ("unload", "load"):
        assert httpx.post(f"{url}/v2/repository/models/{MODEL}/{action}").status_code == 404
    assert httpx.get(f"{url}/v2/models/{MODEL}/ready").status_code == 200
    assert httpx.post(url + V1, json={"instances": [OK_TEXT]}).status_code == 200


async def test_grpc_repository_unload_is_unimplemented_and_raw_bytes_are_checked(base):
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    _, settings = base
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        ready = await stub.ModelReady(pb.ModelReadyRequest(name=MODEL))
        assert ready.ready

        def raw_text(raw: bytes, datatype: str = "BYTES") -> pb.ModelInferRequest:
            """A request whose one 'text' tensor of shape [1] is ``raw``, as given."""
            tensor = pb.ModelInferRequest.InferInputTensor(name="text", datatype=datatype, shape=[1])
            return pb.ModelInferRequest(model_name=MODEL, inputs=[tensor], raw_input_contents=[raw])

        for raw in (b"\x64\x00\x00\x00short", b"\x01\x00"):  # a length past the end; too short for one
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(raw_text(raw))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert "input 'text'" in info.value.details()
        # more items than the shape declares: counted from the length prefixes, refused before decoding
        raw = b"".join(len(b).to_bytes(4, "little") + b for b in [OK_TEXT.encode()] + [b""] * 5000)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(raw_text(raw))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "input 'text' holds more items than the 1 its shape [1] declares"
        fewer = raw_text(len(OK_TEXT).to_bytes(4, "little") + OK_TEXT.encode())
        fewer.inputs[0].shape[:] = [2]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(fewer)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "input 'text' holds 1 items; its shape [2] declares 2"
        for datatype in ("STRING", "Str", ""):  # not a v2 datatype in any case: named (KServe: "invalid content type")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(raw_text(b"\x01\x00\x00\x00a", datatype))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == f"input 'text' has datatype {datatype.upper()!r}, which v2 does not define"
        # bytes that are no protobuf at all: grpc-python's deserializer answered UNKNOWN
        for method in ("ModelInfer", "ModelReady"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")  # raw bytes both ways
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"\xff\xff\xff\xff")
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == f"the request is not a valid {method} message (protobuf that does not parse)"
        assert (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL))).ready


def test_the_empty_text_check_agrees_with_the_tokenizer():
    """Every code point of the planes in use (BMP, SMP, tags and variation selectors, plane 15): one the
    check keeps gives the tokenizer a token; one it refuses gives none, except characters newer than the
    tokenizer's Unicode tables (a few hundred marks and format characters), which it reads as [UNK]."""
    import unicodedata

    from tokenizers import Tokenizer

    from motlens.embedder import default_model_dir
    from predictor.codec import _keeps_a_token

    tokenizer = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    points = [*range(0x20000), *range(0xE0000, 0xE0200), *range(0xF0000, 0xF0100)]
    chars = [chr(c) for c in points if not 0xD800 <= c <= 0xDFFF]
    tokens = [len(e.ids) - 2 for e in tokenizer.encode_batch(chars)]
    kept_without_token = [hex(ord(c)) for c, n in zip(chars, tokens, strict=True) if _keeps_a_token(c) and n == 0]
    assert kept_without_token == []
    refused_with_token = [c for c, n in zip(chars, tokens, strict=True) if not _keeps_a_token(c) and n > 0]
    assert {unicodedata.category(c) for c in refused_with_token} <= {"Mn", "Cf"}
    assert len(refused_with_token) < 500 and not _keeps_a_token("\u0301 \ue000\ufffd") and _keeps_a_token("e\u0301")


@pytest.mark.parametrize(
    ("headers", "body", "status", "message"),
    [
        ({**CLOUDEVENT, "Content-Type": "application/json"}, b"", 400, "the CloudEvent carries no data"),
        ({**CLOUDEVENT, "Content-Type": "application/json"}, b'{"instances": [', 400, "malformed JSON at line 1"),
        ({**CLOUDEVENT, "Content-Type": "text/plain"}, b'{"instances": ["x"]}', 415, "Content-Type 'text/plain'"),
    ],
    ids=["no-data", "malformed-json", "not-json"],
)
def test_binary_cloudevents_with_bad_data_are_4xx(base, headers, body, status, message):
    """A binary-mode CloudEvent's data is checked like a plain v1 body (no data was a 500)."""
    url, _ = base
    r = httpx.post(url + V1, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"].startswith(message), r.text


def test_a_binary_cloudevent_with_ce_contenttype_is_served(base):
    """The CloudEvents SDK parses the data itself when ``ce-contenttype`` is set (that was a 500)."""
    url, _ = base
    body = json.dumps({"instances": [OK_TEXT, OK_TEXT]}).encode()
    headers = {**CLOUDEVENT, "Content-Type": "application/json", "ce-contenttype": "application/json"}
    r = httpx.post(url + V1, content=body, headers=headers)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2, r.text


def test_a_structured_cloudevent_is_served_without_its_optional_time(base):
    """A structured-mode event (Content-Type application/cloudevents+json) needs specversion, id, source
    and type; KServe unwrapped one only with the optional ``time``, else answered `missing 'instances'`.
    Its data may also come as ``data_base64``; the answer is a CloudEvent."""
    import base64

    url, _ = base
    request = {"instances": [OK_TEXT, OK_TEXT]}
    event = {"specversion": "1.0", "id": "e-2", "source": "test", "type": "mot.predict"}
    ct = {"Content-Type": "application/cloudevents+json"}
    charset = {"Content-Type": "application/cloudevents+json; charset=utf-8"}  # was unwrapped, answered plain
    encoded = base64.b64encode(json.dumps(request).encode()).decode()
    for body, headers in (
        ({**event, "data": request}, ct),
        ({**event, "data": request}, charset),
        ({**event, "data_base64": encoded, "datacontenttype": "application/json"}, ct),
    ):
        r = httpx.post(url + V1, content=json.dumps(body).encode(), headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/cloudevents+json")
        assert len(r.json()["data"]["predictions"]) == 2 and r.json()["specversion"] == "1.0"
    for body, message in (
        ({k: v for k, v in event.items() if k != "id"} | {"data": request}, "lacks its required attribute(s) id"),
        (event, "the CloudEvent carries no data"),
        ({**event, "data_base64": "%%%"}, "the CloudEvent's data_base64 is not valid base64"),
        ({**event, "data_base64": base64.b64encode(b"{nope").decode()}, "malformed JSON"),
        (["not", "an", "event"], "a application/cloudevents+json body must be a JSON object"),
    ):
        r = httpx.post(url + V1, content=json.dumps(body).encode(), headers=ct)
        assert r.status_code == 400 and message in r.json()["error"], (body, r.text)


def test_v2_answers_v2_whatever_cloudevent_headers_come_with_it(base):
    """v2 defines no CloudEvents: with ce-* headers KServe's encoder wrapped the answer, sent JSON as
    application/octet-stream and dropped Inference-Header-Content-Length from a binary answer."""
    url, _ = base
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [OK_TEXT]}]}
    plain = httpx.post(url + V2, json=body, headers=CLOUDEVENT)
    assert plain.status_code == 200 and plain.headers["content-type"] == "application/json", plain.headers
    assert "section" in {o["name"] for o in plain.json()["outputs"]}
    binary = httpx.post(url + V2, json={**body, "parameters": {"binary_data_output": True}}, headers=CLOUDEVENT)
    length = int(binary.headers["inference-header-content-length"])
    header = json.loads(binary.content[:length])
    assert binary.status_code == 200 and all(o["parameters"]["binary_data_size"] > 0 for o in header["outputs"])
    structured = httpx.post(url + V2, content=json.dumps(body).encode(),
                            headers={"Content-Type": "application/cloudevents+json"})  # fmt: skip
    assert structured.status_code == 200 and "outputs" in structured.json(), structured.text


def _raw_post(url: str, head_extra: str, body: bytes) -> socket.socket:
    """A POST to the v2 infer route sent by hand: its headers, then ``body`` (maybe less than declared)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=15)
    sock.sendall(f"POST {V2} HTTP/1.1\r\nHost: x\r\n{head_extra}\r\n".encode() + body)
    return sock


def test_the_header_length_header_may_carry_whitespace(base):
    """HTTP allows whitespace around a header value; `Inference-Header-Content-Length: 105 ` was a 400."""
    url, _ = base
    body, headers = ok_text_tensor()
    head = f"Inference-Header-Content-Length: {headers['Inference-Header-Content-Length']} \r\n"
    head += f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    with _raw_post(url, head, body) as sock:
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


def test_a_request_id_header_is_read_without_surrounding_whitespace(base):
    """HTTP strips a field value's surrounding whitespace (RFC 9110 §5.5): `x-request-id: trace-7 ` was a
    400 while ` trace-7` was served (the HTTP parser strips only the leading one). gRPC metadata alike."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    url, settings = base
    host, port = url.removeprefix("http://").split(":")
    bodies = {V1: json.dumps({"instances": [OK_TEXT]}).encode(), V2: json.dumps(v2(text_input([OK_TEXT]))).encode()}
    for path, body in bodies.items():
        for value in ("trace-7 ", " trace-7", "\ttrace-7 \t"):
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nx-request-id: {value}\r\nContent-Type: application/json\r\n"
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            with socket.create_connection((host, int(port)), timeout=15) as sock:
                sock.sendall(head.encode() + body)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 "), (path, value, answer[-300:])
            assert b"\r\nx-request-id: trace-7\r\n" in answer.lower(), (path, value)
    text = pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[OK_TEXT.encode()])
    )
    with grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
        answer = GRPCInferenceServiceStub(channel).ModelInfer(
            pb.ModelInferRequest(model_name=MODEL, inputs=[text]), metadata=[("x-request-id", " md-7 ")], timeout=30
        )
    assert answer.id == "md-7"


def test_a_grpc_parameter_without_a_value_is_refused(base):
    """KServe drops an InferParameter with none of its values set, so a gRPC `return_embedding` without
    one read as false where REST's `null` is a 400: it is refused too, wherever a parameter may be."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    _, settings = base

    def request(params=None, input_params=None, output_params=None) -> pb.ModelInferRequest:
        contents = pb.InferTensorContents(bytes_contents=[OK_TEXT.encode()])
        text = pb.ModelInferRequest.InferInputTensor(
            name="text", datatype="BYTES", shape=[1], contents=contents, parameters=input_params
        )
        out = pb.ModelInferRequest.InferRequestedOutputTensor(name="section", parameters=output_params)
        return pb.ModelInferRequest(model_name=MODEL, inputs=[text], outputs=[out], parameters=params)

    unset = {"x": pb.InferParameter()}
    with grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        for bad, where in (
            (request(params={"return_embedding": pb.InferParameter()}), "parameters.return_embedding"),
            (request(input_params=unset), "inputs[0].parameters.x"),
            (request(output_params=unset), "outputs[0].parameters.x"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(bad, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == (
                f"malformed v2 inference request: {where} has no value "
                "(set its bool_param, int64_param or string_param)"
            )
        served = stub.ModelInfer(request(params={"return_embedding": pb.InferParameter(bool_param=True)}), timeout=30)
        assert [o.name for o in served.outputs] == ["section", "embedding"]


def test_a_body_that_stops_arriving_is_a_408(base):
    """A client that sends part of its body and then nothing holds its request for ``body_timeout_s``, not
    forever; the answer names the limit."""
    from prometheus_client import REGISTRY

    url, settings = base
    before = REGISTRY.get_sample_value("motlens_rejected_total", {"reason": "body_timeout"}) or 0.0
    with _raw_post(url, "Content-Type: application/json\r\nContent-Length: 1000\r\n", b'{"inputs": [') as sock:
        answer = b""
        while chunk := sock.recv(65536):  # the server closes the connection after its answer
            answer += chunk
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 408"), answer
    assert f"the request body did not arrive within {settings.body_timeout_s:g} s".encode() in rest
    assert REGISTRY.get_sample_value("motlens_rejected_total", {"reason": "body_timeout"}) == before + 1
    assert httpx.post(url + V1, json={"instances": [OK_TEXT]}).status_code == 200


def test_a_client_hanging_up_mid_body_is_cancelled_not_a_server_error(base, caplog):
    """Starlette's ClientDisconnect while the body streams in was logged as a 500 with a traceback and
    counted as a 5xx; it is a cancelled request (499, ``client_disconnected``)."""
    import time

    from prometheus_client import REGISTRY

    def value(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    url, _ = base
    series = {
        "gone": ("motlens_rejected_total", {"reason": "client_disconnected"}),
        "cancelled": ("motlens_requests_total", {"protocol": "v2-rest", "outcome": "cancelled", "version": ""}),
        "5xx": ("motlens_http_request_duration_seconds_count", {"protocol": "v2-rest", "code": "5xx", "version": ""}),
        "4xx": ("motlens_http_request_duration_seconds_count", {"protocol": "v2-rest", "code": "4xx", "version": ""}),
    }
    before = {k: value(*v) for k, v in series.items()}
    with caplog.at_level(logging.INFO):
        _raw_post(url, "Content-Type: application/json\r\nContent-Length: 1000\r\n", b'{"inputs": [').close()
        deadline = time.monotonic() + 10
        while value(*series["4xx"]) == before["4xx"] and time.monotonic() < deadline:
            time.sleep(0.05)
    delta = {k: value(*v) - before[k] for k, v in series.items()}
    assert delta == {"gone": 1, "cancelled": 1, "5xx": 0, "4xx": 1}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(("flag", "embedded"), [(True, True), ("true", True), (1, True), ("off", False), (None, False)])
def test_return_embedding_takes_booleans_and_their_words(base, flag, embedded):
    url, _ = base
    r = httpx.post(url + V1, json={"instances": [OK_TEXT], "parameters": {"return_embedding": flag}})
    assert r.status_code == 200, r.text
    assert ("embedding" in r.json()["predictions"][0]) is embedded
