"""Request validation and response building for v1 and v2 (docs/architecture.md "Prediction contract").

Every client mistake becomes :class:`kserve.errors.InvalidInput` (HTTP 400 / gRPC INVALID_ARGUMENT)
with a message naming the field; nothing a client sends can reach the model unvalidated.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import struct
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import (
    InferOutput,
    InferRequest,
    InferResponse,
    RequestedOutput,
    to_http_parameters,
)
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from kserve.utils.numpy_codec import to_np_dtype
from pydantic import ValidationError

from motlens import EMBEDDING_DIM
from motlens.labels import FUEL_ACCEPTED, fuel_code

TEXT = "text"
BYTES_CONTEXT = ("make", "model", "fuel_type")
NUMERIC_CONTEXT = ("vehicle_age_years", "odometer_miles")
#: Accepted (inclusive) ranges of the numeric context; anything else, ±inf included, is a 400.
NUMERIC_RANGES = {"vehicle_age_years": (0.0, 150.0), "odometer_miles": (0.0, 10_000_000.0)}
INPUT_NAMES = (TEXT, *BYTES_CONTEXT, *NUMERIC_CONTEXT)
NUMERIC_DATATYPES = ("FP32", "FP64", "INT32", "INT64")
#: the datatypes each input takes
INPUT_DATATYPES = {name: ("BYTES",) if name in (TEXT, *BYTES_CONTEXT) else NUMERIC_DATATYPES for name in INPUT_NAMES}
#: What the tokenizer's BERT normaliser drops: control, format, private-use and surrogate characters,
#: U+FFFD and (as it strips accents) nonspacing marks; U+1734 was one before Unicode 14.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Mn"})
_DROPPED_CHARS = frozenset("\ufffd\u1734")
DEFAULT_OUTPUTS = ("section", "section_score", "severity", "severity_scores", "fail_probability")
EMBEDDING = "embedding"
OUTPUT_NAMES = (*DEFAULT_OUTPUTS, EMBEDDING)

#: Tensor metadata served by the model metadata endpoint.
INPUT_METADATA: list[dict[str, Any]] = [
    {"name": n, "datatype": "BYTES", "shape": [-1]} for n in (TEXT, *BYTES_CONTEXT)
] + [{"name": n, "datatype": "FP32", "shape": [-1]} for n in NUMERIC_CONTEXT]
OUTPUT_METADATA: list[dict[str, Any]] = [
    {"name": "section", "datatype": "BYTES", "shape": [-1]},
    {"name": "section_score", "datatype": "FP32", "shape": [-1]},
    {"name": "severity", "datatype": "BYTES", "shape": [-1]},
    {"name": "severity_scores", "datatype": "FP32", "shape": [-1, 4]},
    {"name": "fail_probability", "datatype": "FP32", "shape": [-1]},
    {"name": EMBEDDING, "datatype": "FP32", "shape": [-1, EMBEDDING_DIM]},
]


_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    """A unique request id without a syscall per request (process prefix + counter)."""
    return f"{_ID_PREFIX}-{next(_ID_COUNTER)}"


MAX_REQUEST_ID_CHARS = 128
# Printable ASCII, spaces only between words: an id is echoed in the x-request-id response header.
_REQUEST_ID = re.compile("[!-~]+(?: +[!-~]+)*")


def _client_id(rid: str, where: str) -> str:
    if len(rid) > MAX_REQUEST_ID_CHARS:
        raise InvalidInput(f"{where} has {len(rid)} characters; the limit is {MAX_REQUEST_ID_CHARS}")
    if not _REQUEST_ID.fullmatch(rid):
        raise InvalidInput(f"{where} must be printable ASCII without leading or trailing spaces")
    return rid


def resolve_request_id(body_id: Any = None, header_id: str | None = None) -> str:
    """The request's id: the body's ``id``, else the ``x-request-id`` header, else a new one
    (a client's id is checked: a string of printable ASCII, at most :data:`MAX_REQUEST_ID_CHARS`).
    The header's value is read without surrounding spaces and tabs, as HTTP reads a field value
    (RFC 9110 §5.5; gRPC metadata alike)."""
    if body_id is not None and not isinstance(body_id, str):
        raise InvalidInput(f"request 'id' must be a string, got {_type_name(body_id)}")
    if body_id:
        return _client_id(body_id, "request 'id'")
    header_id = header_id.strip(" \t") if header_id else header_id
    if header_id:
        return _client_id(header_id, "header x-request-id")
    return new_request_id()


@dataclass(frozen=True)
class Limits:
    max_items: int = 256
    max_text_chars: int = 2000


@dataclass
class PredictRequest:
    """A validated request, independent of the protocol it came by."""

    texts: list[str]
    context: dict[str, list[Any]] = field(default_factory=dict)
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    request_id: str = ""

    @property
    def return_embedding(self) -> bool:
        return EMBEDDING in self.outputs


@dataclass
class PredictResult:
    """Model outputs for one request (what the codec turns into a response)."""

    section: list[str]
    section_score: np.ndarray
    severity: list[str]
    severity_scores: np.ndarray
    fail_probability: np.ndarray
    embeddings: np.ndarray
    model_name: str
    model_version: str
    slot: str
    keys: list[str]  # the normalised texts (cache keys), whose hashes the prediction log stores


_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("", "0", "false", "no", "off")


def _flag(v: Any, name: str) -> bool:
    """A boolean request parameter: true/false, 1/0, or one of their usual words as a string (gRPC's
    string parameters); anything else is refused rather than read as true or false."""
    if v is None or isinstance(v, bool):
        return bool(v)
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return v.strip().lower() in _TRUE_WORDS
    raise InvalidInput(f"parameter '{name}' must be true or false, got {short_message(repr(v), 40)}")


def _keeps_a_token(text: str) -> bool:
    """Whether any character of ``text`` survives the tokenizer's normaliser and whitespace split (a
    text without one is embedded as the empty string)."""
    return any(
        not c.isspace() and c not in _DROPPED_CHARS and unicodedata.category(c) not in _DROPPED_CATEGORIES for c in text
    )


def _check_texts(texts: Sequence[Any], limits: Limits, where: str) -> list[str]:
    if not texts:
        raise InvalidInput(f"{where} has no items")
    if len(texts) > limits.max_items:
        raise InvalidInput(f"{where} has {len(texts)} items; the limit is {limits.max_items} per request")
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, bytes):
            try:
                t = t.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInput(f"{where} item {i} is not valid UTF-8 ({e.reason} at byte {e.start})") from e
        if not isinstance(t, str):
            raise InvalidInput(f"{where} item {i} must be a string, got {_type_name(t)}")
        if not _keeps_a_token(t):
            raise InvalidInput(f"{where} item {i} is empty (no characters the tokenizer keeps)")
        if len(t) > limits.max_text_chars:
            raise InvalidInput(f"{where} item {i} has {len(t)} characters; the limit is {limits.max_text_chars}")
        out.append(t)
    return out


def _context_str(v: Any, where: str) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInput(f"{where} is not valid UTF-8") from e
    if not isinstance(v, str):
        raise InvalidInput(f"{where} must be a string, got {_type_name(v)}")
    if len(v) > 200:
        raise InvalidInput(f"{where} has {len(v)} characters; the limit is 200")
    return v or None


def _context_fuel(v: Any, where: str) -> str | None:
    """A fuel type as its DVSA code: a code or its name, in any case (:func:`motlens.labels.fuel_code`); blank
    is missing."""
    s = _context_str(v, where)
    if s is None or not s.strip():
        return None
    code = fuel_code(s)
    if code is None:
        raise InvalidInput(  # under the 300 characters a 400 keeps (short_message), so the list stays whole
            f"{where} is {short_message(repr(s), 30)}; expected a DVSA fuel code or name (any case): {FUEL_ACCEPTED}"
        )
    return code


#: how each BYTES context input is read
_CONTEXT_TEXT = {"make": _context_str, "model": _context_str, "fuel_type": _context_fuel}


def _context_num(v: Any, name: str, where: str) -> float | None:
    """A numeric context value within its plausible range (NaN means missing)."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
        raise InvalidInput(f"{where} must be a number, got {_type_name(v)}")
    try:
        f = float(v)
    except OverflowError as e:
        raise InvalidInput(f"{where} is too large") from e
    if math.isnan(f):
        return None
    low, high = NUMERIC_RANGES[name]
    if not low <= f <= high:  # also refuses ±inf
        raise InvalidInput(f"{where} is {f}; expected {low:g} to {high:g}")
    return f


# ---------------------------------------------------------------- v1


def parse_v1(payload: Any, limits: Limits, request_id: str = "") -> PredictRequest:
    """``{"instances": ["text", …]}`` or ``{"instances": [{"text": …, "make": …}, …]}``."""
    if not isinstance(payload, Mapping):
        raise InvalidInput("v1 request body must be a JSON object with 'instances'")
    instances = payload.get("instances")
    if instances is None:
        raise InvalidInput('missing \'instances\' (expected {"instances": ["text", …]})')
    if not isinstance(instances, list):
        raise InvalidInput("'instances' must be a list")
    params = payload.get("parameters")
    params = {} if params is None else params  # [], 0, false and "" are no object either
    if not isinstance(params, Mapping):
        raise InvalidInput("'parameters' must be an object")
    if len(instances) > limits.max_items:  # before the per-instance work (_check_texts says it again)
        raise InvalidInput(f"'instances' text has {len(instances)} items; the limit is {limits.max_items} per request")
    texts: list[Any] = []
    context: dict[str, list[Any]] = {}
    for i, inst in enumerate(instances):
        if isinstance(inst, Mapping):
            if not context:
                context = {name: [None] * len(instances) for name in (*BYTES_CONTEXT, *NUMERIC_CONTEXT)}
            unknown = sorted(set(inst) - set(INPUT_NAMES))
            if unknown:
                raise InvalidInput(
                    f"instances[{i}] has unknown field '{unknown[0]}'; expected {', '.join(INPUT_NAMES)}"
                )
            if TEXT not in inst:
                raise InvalidInput(f"instances[{i}] is missing 'text'")
            texts.append(inst[TEXT])
            for name in BYTES_CONTEXT:
                context[name][i] = _CONTEXT_TEXT[name](inst.get(name), f"instances[{i}].{name}")
            for name in NUMERIC_CONTEXT:
                context[name][i] = _context_num(inst.get(name), name, f"instances[{i}].{name}")
        else:
            texts.append(inst)
    checked = _check_texts(texts, limits, "'instances' text")
    outputs = (
        (*DEFAULT_OUTPUTS, EMBEDDING)
        if _flag(params.get("return_embedding", False), "return_embedding")
        else DEFAULT_OUTPUTS
    )
    return PredictRequest(checked, context, outputs, resolve_request_id(None, request_id))


def build_v1(result: PredictResult, req: PredictRequest) -> dict[str, Any]:
    preds = []
    for i in range(len(result.section)):
        p: dict[str, Any] = {
            "section": result.section[i],
            "section_score": float(result.section_score[i]),
            "severity": result.severity[i],
            "severity_scores": [float(x) for x in result.severity_scores[i]],
            "fail_probability": float(result.fail_probability[i]),
        }
        if req.return_embedding:
            p[EMBEDDING] = result.embeddings[i].tolist()
        preds.append(p)
    return {"predictions": preds, "model_name": result.model_name, "model_version": result.model_version}


# ---------------------------------------------------------------- v2


#: control characters (C0, DEL, C1) and Unicode's line and paragraph separators
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def short_message(e: object, limit: int = 300) -> str:
    """``str(e)`` on one line, control characters (``\\r`` too) as spaces, and at most ``limit``
    characters: what a client sent, echoed in an error, stays bounded in the answer and the log."""
    text = _CONTROL.sub(" ", str(e))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def json_error(e: ValueError) -> str:
    """A JSON decode error (orjson's, json's) as one line: what and where, never the document."""
    msg, line, column = getattr(e, "msg", None), getattr(e, "lineno", None), getattr(e, "colno", None)
    if msg is None or line is None or column is None:
        return f"malformed JSON: {short_message(e, 200)}"
    return f"malformed JSON at line {line} column {column}: {short_message(msg, 200)}"


def not_utf8(data: str | bytes | bytearray | memoryview, what: str) -> str | None:
    """``<what> is not valid UTF-8 (<reason> at byte N)`` for bytes that do not decode, else None: JSON is
    UTF-8 (RFC 8259), and the parsers' own words for it named no byte (orjson: ``str is not valid UTF-8:
    surrogates not allowed``; pydantic: ``invalid unicode code point``). For a body that did not parse."""
    if isinstance(data, str):
        return None
    try:
        str(data, "utf-8")
    except UnicodeDecodeError as e:
        return f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})"
    return None


def check_input(name: Any, datatype: str) -> None:
    """An input of the contract with a datatype it takes for it (in any case, as KServe reads one),
    checked before KServe decodes the request: its decoders refuse FP16 JSON data with advice to
    send it binary, and an unknown datatype as an ``invalid content type``."""
    if name not in INPUT_NAMES:
        raise InvalidInput(f"unknown input '{short_message(name, 100)}'; expected {', '.join(INPUT_NAMES)}")
    kind, expected = datatype.upper(), INPUT_DATATYPES[name]
    if kind in expected:
        return
    if to_np_dtype(kind) is None:
        raise InvalidInput(f"input '{name}' has datatype {short_message(kind, 40)!r}, which v2 does not define")
    raise InvalidInput(f"input '{name}' has datatype {kind}; expected {' or '.join(expected)}")


# What a pydantic error type means, for a JSON client (pydantic's own text says "valid dictionary").
_PYDANTIC_PROBLEMS = {
    "missing": "is missing",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "extra_forbidden": "is not allowed",
    "parameter_type": "must be a string, number or boolean",
}
#: the members of KServe's parameter-value union, as pydantic names them in an error's ``loc``
_PARAMETER_UNION = frozenset({"float", "int", "bool", "str"})
_JSON_POSITION = re.compile(r"(.*) at line (\d+) column (\d+)")


def _error_path(loc: Sequence[Any]) -> str:
    """``("inputs", 0, "name")`` → ``inputs[0].name``; a FastAPI body's leading ``"body"`` dropped."""
    if len(loc) > 1 and loc[0] == "body":
        loc = loc[1:]
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or "the request body"


def _type_name(v: Any) -> str:
    """What a refused value was, as the message names it: its type (``int``, ``str``), ``null`` for None."""
    return "null" if v is None else type(v).__name__


def _one_validation_error(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "json_invalid":  # pydantic: "Invalid JSON: <what> at line L column C"; FastAPI: ctx error, loc pos
        detail = str((err.get("ctx") or {}).get("error") or err.get("msg", "")).removeprefix("Invalid JSON: ")
        if m := _JSON_POSITION.fullmatch(detail):
            return f"malformed JSON at line {m[2]} column {m[3]}: {short_message(m[1], 200)}"
        loc = err.get("loc") or ()
        at = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        return f"malformed JSON{at}: {short_message(detail, 200)}"
    problem = _PYDANTIC_PROBLEMS.get(kind)
    if problem is None:
        msg = str(err.get("msg", "is not valid"))
        problem = (
            msg.replace("Input should", "must", 1) if msg.startswith("Input should") else msg[:1].lower() + msg[1:]
        )
    elif kind != "missing" and "input" in err:
        got = err["input"]
        problem += f", got {_type_name(got)}"
    return f"{_error_path(err.get('loc') or ())} {short_message(problem, 120)}"


def _merge_parameter_unions(errors: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """A v2 parameter value of none of the union's types (null, an object, a list) gave one error per
    member (``parameters.x.float must be a number``, ``parameters.x.int …``): one error for the parameter."""
    out: list[Mapping[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for err in errors:
        loc = tuple(err.get("loc") or ())
        if len(loc) >= 3 and loc[-3] == "parameters" and loc[-1] in _PARAMETER_UNION:
            if loc[:-1] in seen:
                continue
            seen.add(loc[:-1])
            err = {"type": "parameter_type", "loc": loc[:-1], **({"input": err["input"]} if "input" in err else {})}
        out.append(err)
    return out


def validation_message(errors: Sequence[Mapping[str, Any]], limit: int = 3) -> str:
    """Pydantic (or FastAPI request-validation) errors as one line naming each problem and where
    (``id must be a string, got int``; ``malformed JSON at line 1 column 26: …``): none of pydantic's
    URLs, and the input is never echoed (it may be large or sensitive), only its type."""
    if not errors:
        return "the request body is not valid"
    errors = _merge_parameter_unions(errors)
    problems = [_one_validation_error(err) for err in errors[:limit]]
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(problems) + more


def check_binary_texts(body: bytes, json_length: int, max_items: int | None = None) -> None:
    """Before KServe decodes a binary-extension body: the header has the v2 form, every BYTES tensor
    element is UTF-8, no tensor declares more than ``max_items`` items (refused before any element is
    read), and each holds what its shape declares (refused at the first element too many: a 4 MiB body
    of empty strings is a million elements, seconds of decoding on the event loop).

    (KServe's decoder would otherwise fail with a server error, or a message that names no input.)
    """
    try:
        header = orjson.loads(body[:json_length])
    except orjson.JSONDecodeError as e:
        problem = not_utf8(body[:json_length], "the binary inference request header")
        raise InvalidInput(problem or f"malformed binary inference request header: {json_error(e)}") from e
    _check_header_form(header)
    offset = json_length
    for inp in header["inputs"]:
        name, shape = inp["name"], inp["shape"]
        check_input(name, inp["datatype"])
        declared = _declared_elements(shape)
        items = max(shape[0], declared or 0) if shape else 0
        if max_items is not None and items > max_items:
            raise InvalidInput(f"input '{name}' has {items} items; the limit is {max_items} per request")
        params = inp.get("parameters") or {}
        if "binary_data_size" not in params:
            continue
        size = params["binary_data_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer, got {size!r}")
        if inp.get("data") is not None:  # KServe would decode the JSON data and the later tensors off by this one
            raise InvalidInput(f"input '{name}' has both data and binary_data_size; send its values one way")
        chunk = body[offset : offset + size]
        offset += size
        datatype = inp["datatype"].upper()  # in any case, as KServe reads a datatype (JSON, gRPC too)
        if datatype == "BYTES":
            if len(chunk) < size:
                raise InvalidInput(f"input '{name}' declares {size} binary bytes; the body has {len(chunk)}")
            _check_bytes_items(chunk, name, shape, declared, max_items)
            continue
        dtype = to_np_dtype(datatype)
        need = None if declared is None else declared * np.dtype(dtype).itemsize
        if need is not None and len(chunk) == size != need:
            raise InvalidInput(f"input '{name}' has {size} bytes of {datatype} data; its shape {shape} takes {need}")
    if offset < len(body):  # every byte of a request belongs to a tensor
        raise InvalidInput(f"{len(body) - offset} bytes follow the last binary tensor")
    if offset > len(body):
        raise InvalidInput(
            f"the binary tensors declare {offset - json_length} bytes; the body has {len(body) - json_length}"
        )


def _check_header_form(header: Any) -> None:
    """A binary request's JSON header has the v2 request's form (an object with ``inputs``, each a
    name, a shape of integers, a datatype string; parameters objects), checked by KServe's own model.
    ``id`` and ``binary_data_size`` are left to the checks that name them, ``data`` may be absent."""
    if not isinstance(header, dict):
        raise InvalidInput("malformed binary inference request header: the header must be a JSON object")
    probe = {k: v for k, v in header.items() if k != "id"}
    if isinstance(inputs := header.get("inputs"), list):
        probe["inputs"] = [
            {"data": [], **inp, "parameters": {k: v for k, v in p.items() if k != "binary_data_size"}}
            if isinstance(inp, dict) and isinstance(p := inp.get("parameters") or {}, dict)
            else {"data": [], **inp}
            if isinstance(inp, dict)
            else inp
            for inp in inputs
        ]
    try:
        InferenceRequest.model_validate(probe)
    except ValidationError as e:
        message = validation_message(e.errors(include_url=False))
        raise InvalidInput(f"malformed binary inference request header: {message}") from e
    for inp in header["inputs"]:  # as sent: KServe's decoder reads the header again, uncoerced
        shape = inp["shape"]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise InvalidInput(
                f"input '{short_message(inp['name'], 80)}' has shape {short_message(shape, 80)}; "
                "a shape is a list of non-negative integers"
            )


def _check_bytes_items(chunk: bytes, name: str, shape: list[int], declared: int | None, max_items: int | None) -> None:
    """A BYTES tensor's binary data: length-prefixed UTF-8 items, as many as its shape declares."""
    cap = declared if declared is not None else max_items
    pos, i = 0, 0
    while pos < len(chunk):
        if cap is not None and i >= cap:
            raise InvalidInput(
                f"input '{name}' holds more items than the {cap} its shape {shape} declares"
                if declared is not None
                else f"input '{name}' holds more than {cap} items; the limit is {cap} per request"
            )
        if pos + 4 > len(chunk):
            raise InvalidInput(f"input '{name}' item {i}: {len(chunk) - pos} bytes left, too few for a length")
        n = int.from_bytes(chunk[pos : pos + 4], "little")
        if pos + 4 + n > len(chunk):
            raise InvalidInput(f"input '{name}' item {i}: length {n} runs past the end of its {len(chunk)}-byte tensor")
        try:
            chunk[pos + 4 : pos + 4 + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInput(f"input '{name}' item {i} is not valid UTF-8 ({e.reason} at byte {e.start})") from e
        pos += 4 + n
        i += 1
    if declared is not None and i < declared:
        raise InvalidInput(f"input '{name}' holds {i} items; its shape {shape} declares {declared}")


def _declared_elements(shape: Any) -> int | None:
    """The element count a tensor's shape declares (None when it is no list of non-negative integers)."""
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return None
    return math.prod(shape)


def _check_element_count(inp: Any, n: int) -> None:
    """A tensor of shape ``[n]`` or ``[n, 1]`` holds ``n`` elements, checked before anything is
    decoded: raw BYTES contents (gRPC's, or a binary body's) item by item (at most ``n + 1`` read),
    JSON data by its length, and its nesting: flat, or nested exactly as the shape (``[[a], [b]]``
    under ``[2, 1]``), the two forms v2 allows; ``[[["a", "b"]]]`` under ``[2]`` is neither."""
    raw = inp._raw_data  # kserve's binary or gRPC raw contents; None for JSON data
    if raw is not None and inp.datatype == "BYTES":
        _check_bytes_items(raw, inp.name, list(inp.shape), n, None)
        return
    if raw is not None or not isinstance(inp.data, list):
        return  # fixed-width raw data: numpy reads it in one step and the reshape names a mismatch
    shape = list(inp.shape)
    if len(inp.data) > n:
        raise InvalidInput(f"input '{inp.name}' holds more items than the {n} its shape {shape} declares")
    if any(isinstance(v, list) for v in inp.data) and not _nested_as(inp.data, shape):
        raise InvalidInput(
            f"input '{inp.name}': its data is nested otherwise than its shape {shape}; "
            "send it flat or nested as the shape"
        )


def _nested_as(data: Any, shape: Sequence[int]) -> bool:
    """Whether JSON ``data`` is nested exactly as ``shape`` (lists of its lengths, non-lists at the bottom)."""
    if not shape:
        return not isinstance(data, list)
    return isinstance(data, list) and len(data) == shape[0] and all(_nested_as(v, shape[1:]) for v in data)


def _check_json_numbers(inp: Any) -> None:
    """JSON ``data`` of a numeric tensor holds numbers of its datatype: integers for INT32/INT64 (no
    ``2.9`` truncated to 2), numbers for FP32/FP64; never strings or booleans (numpy would coerce them)."""
    data = inp.data
    if inp.datatype not in NUMERIC_DATATYPES or not isinstance(data, list):
        return
    ok: tuple[type, ...] = (int,) if inp.datatype.startswith("INT") else (int, float)
    stack: list[Any] = list(data)
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif v is not None and (isinstance(v, bool) or not isinstance(v, ok)):
            kind = "integers" if ok == (int,) else "numbers"
            got = short_message(repr(v), 60)
            raise InvalidInput(f"input '{inp.name}' ({inp.datatype}) must hold {kind}, got {got}")


def _flat_values(inp: Any) -> np.ndarray:
    try:
        _check_json_numbers(inp)
        arr = inp.as_numpy()
    except InvalidInput:
        raise
    except (ValueError, TypeError, IndexError, OverflowError, struct.error) as e:
        raise InvalidInput(
            f"input '{inp.name}': data does not fit datatype {inp.datatype} and shape {list(inp.shape)} ({e})"
        ) from e
    return arr.reshape(-1)


def _binary_flag(params: Mapping[str, Any] | None, name: str, where: str) -> bool | None:
    """A binary-extension flag: true, false or absent (a string such as "false" would read as true)."""
    flag = (params or {}).get(name)
    if flag is not None and not isinstance(flag, bool):
        raise InvalidInput(f"{where}parameter '{name}' must be true or false, got {_type_name(flag)}")
    return flag


def parse_v2(req: InferRequest, limits: Limits, header_id: str | None = None) -> PredictRequest:
    """Validate a v2 request (REST JSON, REST binary or gRPC) against the contract; ``header_id`` is the
    ``x-request-id`` header (gRPC metadata), the id when the body has none."""
    seen: dict[str, Any] = {}
    for inp in req.inputs:
        check_input(inp.name, inp.datatype)
        if inp.name in seen:
            raise InvalidInput(f"input '{inp.name}' given more than once")
        seen[inp.name] = inp
    if TEXT not in seen:
        raise InvalidInput("missing required input 'text' (BYTES [N])")
    n: int | None = None
    first = ""  # the input n was taken from
    values: dict[str, np.ndarray] = {}
    for name, inp in seen.items():
        shape = list(inp.shape or [])
        if (
            not shape
            or len(shape) > 2
            or (len(shape) == 2 and shape[1] != 1)
            or any(not isinstance(d, int) or d < 0 for d in shape)
        ):
            raise InvalidInput(f"input '{name}' has shape {shape}; expected [N] (or [N, 1])")
        if shape[0] > limits.max_items:
            raise InvalidInput(f"input '{name}' has {shape[0]} items; the limit is {limits.max_items} per request")
        _check_element_count(inp, shape[0])
        vals = _flat_values(inp)
        if n is None:
            n, first = shape[0], name
        elif shape[0] != n:
            raise InvalidInput(
                f"input '{name}' has {shape[0]} items but input '{first}' has {n}; every input must have the same N"
            )
        values[name] = vals
    texts = _check_texts(list(values[TEXT]), limits, "input 'text'")
    context: dict[str, list[Any]] = {}
    for name in BYTES_CONTEXT:
        if name in values:
            read = _CONTEXT_TEXT[name]
            context[name] = [read(v, f"input '{name}' item {i}") for i, v in enumerate(values[name])]
    for name in NUMERIC_CONTEXT:
        if name in values:
            context[name] = [_context_num(v, name, f"input '{name}' item {i}") for i, v in enumerate(values[name])]

    if req.parameters and not isinstance(req.parameters, Mapping):
        raise InvalidInput(f"'parameters' must be an object, got {_type_name(req.parameters)}")
    try:
        params = to_http_parameters(req.parameters) if req.parameters else {}
    except (AttributeError, TypeError, ValueError) as e:
        raise InvalidInput(f"'parameters' could not be read: {e}") from e
    want_embedding = _flag(params.get("return_embedding", False), "return_embedding")
    binary_outputs = _binary_flag(params, "binary_data_output", "")
    if req.request_outputs:
        names = []
        for out in req.request_outputs:
            if out.name not in OUTPUT_NAMES:
                raise InvalidInput(f"unknown output '{out.name}'; available: {', '.join(OUTPUT_NAMES)}")
            if out.name in names:
                raise InvalidInput(f"output '{out.name}' requested more than once")
            _binary_flag(out.parameters, "binary_data", f"output '{out.name}' ")
            names.append(out.name)
        if want_embedding and EMBEDDING not in names:
            names.append(EMBEDDING)
            req.request_outputs.append(RequestedOutput(EMBEDDING, {}))
        if binary_outputs:  # the default of every listed output (KServe lets a missing flag mean false)
            for out in req.request_outputs:
                if (out.parameters or {}).get("binary_data") is None:
                    out.parameters = {**(out.parameters or {}), "binary_data": True}
        outputs = tuple(dict.fromkeys(names))
    else:
        outputs = (*DEFAULT_OUTPUTS, EMBEDDING) if want_embedding else DEFAULT_OUTPUTS
    return PredictRequest(texts, context, outputs, resolve_request_id(req.id, header_id))


def build_v2(result: PredictResult, req: PredictRequest, infer_req: InferRequest) -> InferResponse:
    n = len(result.section)
    arrays: dict[str, np.ndarray] = {
        "section": np.array([s.encode() for s in result.section], dtype=np.object_),
        "section_score": np.asarray(result.section_score, dtype=np.float32),
        "severity": np.array([s.encode() for s in result.severity], dtype=np.object_),
        "severity_scores": np.asarray(result.severity_scores, dtype=np.float32).reshape(n, -1),
        "fail_probability": np.asarray(result.fail_probability, dtype=np.float32),
        EMBEDDING: np.asarray(result.embeddings, dtype=np.float32).reshape(n, -1),
    }
    outputs = []
    for name in req.outputs:
        arr = arrays[name]
        out = InferOutput(name, list(arr.shape), "BYTES" if arr.dtype == np.object_ else "FP32", data=arr)
        if infer_req.from_grpc:
            # KServe's convention: raw_input_contents in → raw_output_contents out, typed contents in →
            # typed contents out; binary_data_size belongs to the REST binary extension, not to gRPC.
            out.set_data_from_numpy(arr, binary_data=infer_req.use_binary_outputs)
            out.parameters = {}
        outputs.append(out)
    return InferResponse(
        response_id=req.request_id,
        model_name=result.model_name,
        model_version=result.model_version,
        infer_outputs=outputs,
        from_grpc=infer_req.from_grpc,
        use_binary_outputs=infer_req.use_binary_outputs,
        requested_outputs=infer_req.request_outputs,
        parameters={"slot": result.slot},
    )
