"""The predictor's REST edge: body limits, request ids, refusal counting and the HTTP answers to exceptions."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from kserve.errors import InferenceError, InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from predictor import metrics
from predictor.batcher import Overloaded
from predictor.codec import new_request_id, resolve_request_id, short_message, validation_message
from predictor.disconnect import ClientGone

log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes")


class BodyTimeout(Exception):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request body did not arrive within {timeout_s:g} s")


class UnsupportedEncoding(Exception):
    def __init__(self, encoding: str) -> None:
        super().__init__(f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")


class UnsupportedTransferEncoding(Exception):
    def __init__(self, coding: str) -> None:
        super().__init__(f"Transfer-Encoding {coding!r} is not supported; send the body plain or chunked")


class UnsupportedContentType(Exception):
    def __init__(self, media_type: str) -> None:
        super().__init__(f"Content-Type {media_type!r} is not supported; send application/json")


def header_tokens(request: Request, name: str) -> list[str]:
    """The comma-separated values of every ``name`` header, lowercased, empty ones dropped."""
    return [t for v in request.headers.getlist(name) for t in (p.strip().lower() for p in v.split(",")) if t]


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes, (415) when it
    is compressed (a gzip body would otherwise fail later as "not valid UTF-8"), (400, the connection
    closed) when it has a transfer coding other than chunked, and (408) when it has not all arrived
    within ``timeout_s``; a client that hangs up meanwhile is :class:`ClientGone` (499)."""
    # every Content-Encoding header and every coding in each: a second header or a list was read past
    for coding in header_tokens(request, "content-encoding"):
        if coding != "identity":
            raise UnsupportedEncoding(coding[:40])
    for coding in header_tokens(request, "transfer-encoding"):
        if coding != "chunked":  # the server decodes chunked only; any other would reach the parser
            raise UnsupportedTransferEncoding(coding[:40])
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(timeout_s) from None
    except ClientDisconnect:
        gone = ClientGone()
        _count_refused(request, gone, "cancelled", "client_disconnected")
        raise gone from None
    return b"".join(chunks)


def count_refusal(exc: Exception, protocol: str, outcome: str, reason: str | None = None) -> None:
    """Count an inference request refused before or outside :meth:`MotlensModel.predict` (which
    counts, and marks, the refusals it raises itself): one series per protocol, no model version."""
    if getattr(exc, "motlens_counted", False):
        return
    metrics.by_version(metrics.REQUESTS, protocol, outcome, "").inc()
    if reason is not None:
        metrics.REJECTED.labels(reason=reason).inc()


def _count_refused(request: Request, exc: Exception, outcome: str, reason: str | None = None) -> None:
    """:func:`count_refusal` for a REST request, if it asked for an inference."""
    path = request.url.path
    if path.endswith(":predict") or path.endswith("/infer"):
        count_refusal(exc, "v1" if path.startswith("/v1/") else "v2-rest", outcome, reason)


def _answer_id(scope: Any) -> str:
    """The id an answer carries: the one an infer route resolved, else (answered before that: body too
    large or malformed, wrong media type, not ready, routing errors, explain) the client's own
    ``x-request-id`` if the codec accepts it, else a new one, kept in the request's state so that
    the log line, the body and the header of one answer name the same id."""
    state = scope.setdefault("state", {})
    rid = state.get("request_id")
    if not rid:
        header = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
        try:
            rid = resolve_request_id(None, header.decode("latin-1")) if header else new_request_id()
        except InvalidInput:
            rid = new_request_id()
        state["request_id"] = rid
    return str(rid)


def _id_header(request: Request) -> dict[str, str]:
    return {"x-request-id": _answer_id(request.scope)}


class HttpEdge:
    """What every REST answer passes through, in one ``send`` wrapper (a plain ASGI middleware:
    Starlette's ``BaseHTTPMiddleware`` costs a task per request):

    * ``x-request-id`` on every answer (:func:`_answer_id`), also those made outside the motlens
      handlers: Starlette's 404 and 405, explain's 501, probes; an answer that names its id already is
      passed on as it is.
    * ``HEAD`` is answered as ``GET`` without the body (RFC 9110 §9.3.2): FastAPI's routes (KServe's
      health, readiness and metadata) list ``GET`` only, so a load balancer's or ``curl -I``'s health
      check got a 405. A path without ``GET`` still answers 405 with its ``Allow``.
    * ``motlens_http_request_duration_seconds`` for every REST inference request (``POST`` to a path
      ending ``:predict`` or ``/infer``), from reaching the app to the end of its answer, whatever its
      status. It sees what the model adapter's ``motlens_request_latency_seconds`` cannot: refusals, and
      a stall of the loop once the app has the request (not one it arrived during: its clock starts when
      the loop reads it). Labels: protocol (``v1``, ``v2-rest``), status class and the version that
      answered ('' if none did), so the series stay bounded."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
            send = _without_body(send)
        status = [500]

        async def send_edge(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = message.get("headers") or []
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    message["headers"] = [*headers, (b"x-request-id", _answer_id(scope).encode("latin-1"))]
            await send(message)

        path = scope.get("path", "") if scope.get("method") == "POST" else ""
        protocol = "v1" if path.endswith(":predict") else "v2-rest" if path.endswith("/infer") else None
        if protocol is None:
            await self.app(scope, receive, send_edge)
            return
        t0 = time.perf_counter()
        served: dict[str, str] = {}
        token = metrics.SERVED.set(served)
        try:
            await self.app(scope, receive, send_edge)
        finally:
            metrics.SERVED.reset(token)
            metrics.observe_http(protocol, status[0], served.get("version", ""), time.perf_counter() - t0)


def _without_body(send: Any) -> Any:
    """``send`` for a HEAD request served as GET: the headers (Content-Length included) as GET's, no body."""

    async def send_head(message: Any) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_head


async def _invalid_input_handler(request: Request, exc: Exception) -> Response:
    _count_refused(request, exc, "client_error", "invalid_input")
    message = short_message(exc)
    log.info("400 %s %s: %s", request.method, short_message(request.url.path, 200), message)
    return json_response({"error": message}, status_code=400, headers=_id_header(request))


async def _request_validation_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's own request validation (a route with a pydantic body or typed parameters): a 400 in the
    usual form, one line naming the problem, instead of FastAPI's 422 that echoes the input."""
    assert isinstance(exc, RequestValidationError)
    return await _invalid_input_handler(request, InvalidInput(validation_message(exc.errors())))


async def _not_found_handler(request: Request, exc: Exception) -> Response:
    """A client error: logged at INFO without a traceback (KServe's handler logs an ERROR)."""
    _count_refused(request, exc, "client_error")
    message = short_message(exc)  # a model name or version from the path: bounded as any echo
    log.info("404 %s %s: %s", request.method, short_message(request.url.path, 200), message)
    return json_response({"error": message}, status_code=404, headers=_id_header(request))


async def _not_ready_handler(request: Request, exc: Exception) -> Response:
    """503 with a generic body: the reason (paths, registry URIs) goes to the log and, for admin
    clients, /motlens/ready."""
    _count_refused(request, exc, "unavailable")
    log.debug("503 %s %s: %s", request.method, request.url.path, exc)
    name = getattr(exc, "model_name", None) or request.path_params.get("model_name", "model")
    body = {"error": f"model {short_message(name, 100)} is not ready"}
    return json_response(body, status_code=503, headers=_id_header(request))


async def _server_not_ready_handler(_: Request, exc: Exception) -> Response:
    """/v2/health/ready while nothing serves or while draining: a probe's answer, not an error to log."""
    return json_response({"error": "server is not ready"}, status_code=503)


async def _http_error_handler(_: Request, exc: Exception) -> Response:
    """Routing errors (404 no route, 405 wrong method) in the OIP error form, not Starlette's ``detail``."""
    assert isinstance(exc, HTTPException)
    return json_response({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def server_error(request: Request, exc: BaseException) -> Response:
    """A generic 500: the exception and its traceback go to the log, never to the client; the request id
    (the one the prediction log's failure row carries) goes to both."""
    rid = _answer_id(request.scope)
    log.error("500 %s %s (request id %r)", request.method, request.url.path, rid, exc_info=exc)
    return json_response(
        {"error": "internal server error", "request_id": rid}, status_code=500, headers={"x-request-id": rid}
    )


async def _server_error_handler(request: Request, exc: Exception) -> Response:
    return server_error(request, exc)


async def _overloaded_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Overloaded)
    status = 429 if exc.reason == "queue_full" else 503
    headers = {"Retry-After": str(exc.retry_after_s), **_id_header(request)}
    return json_response({"error": str(exc)}, status_code=status, headers=headers)


async def _unsupported_media_handler(request: Request, exc: Exception) -> Response:
    _count_refused(request, exc, "client_error", "unsupported_media")
    return json_response({"error": str(exc)}, status_code=415, headers=_id_header(request))


async def _transfer_coding_handler(request: Request, exc: Exception) -> Response:
    """HTTP answers an unknown transfer coding with 501; it is the client's input, so a 400 here (the
    body cannot be read, so the connection is closed)."""
    _count_refused(request, exc, "client_error", "unsupported_media")
    return json_response({"error": str(exc)}, status_code=400, headers={"Connection": "close", **_id_header(request)})


async def _too_large_handler(request: Request, exc: Exception) -> Response:
    _count_refused(request, exc, "client_error")
    metrics.REJECTED.labels(reason="body_too_large").inc()
    return json_response({"error": str(exc)}, status_code=413, headers=_id_header(request))


async def _body_timeout_handler(request: Request, exc: Exception) -> Response:
    _count_refused(request, exc, "client_error", "body_timeout")
    return json_response({"error": str(exc)}, status_code=408, headers={"Connection": "close", **_id_header(request)})


async def _client_gone_handler(request: Request, exc: Exception) -> Response:
    return json_response({"error": "client disconnected"}, status_code=499, headers=_id_header(request))


def add_error_handlers(app: FastAPI) -> None:
    """The motlens answers to exceptions, replacing KServe's handlers for the same ones (add after those)."""
    app.add_exception_handler(InferenceError, _server_error_handler)
    app.add_exception_handler(Exception, _server_error_handler)
    app.add_exception_handler(HTTPException, _http_error_handler)
    app.add_exception_handler(InvalidInput, _invalid_input_handler)
    app.add_exception_handler(RequestValidationError, _request_validation_handler)
    app.add_exception_handler(ModelNotFound, _not_found_handler)
    app.add_exception_handler(ModelNotReady, _not_ready_handler)
    app.add_exception_handler(ServerNotReady, _server_not_ready_handler)
    app.add_exception_handler(Overloaded, _overloaded_handler)
    app.add_exception_handler(BodyTooLarge, _too_large_handler)
    app.add_exception_handler(BodyTimeout, _body_timeout_handler)
    app.add_exception_handler(UnsupportedEncoding, _unsupported_media_handler)
    app.add_exception_handler(UnsupportedContentType, _unsupported_media_handler)
    app.add_exception_handler(UnsupportedTransferEncoding, _transfer_coding_handler)
    app.add_exception_handler(ClientGone, _client_gone_handler)


def json_response(content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )
