"""The predictor process: KServe's REST and gRPC servers around :class:`MotlensModel`, plus admin routes.

Built from KServe's own parts (``DataPlane``, ``RESTServer``, ``GRPCServer``) rather than
``kserve.ModelServer.start`` so that the server is up (live, not ready) while the model loads, so
several servers can run in one process (tests), and so SIGTERM drains gracefully. Extra routes:

* ``POST /v1/models/{name}:predict`` and ``POST /v2/models/{name}/infer`` are answered by motlens
  handlers placed before KServe's: bodies over ``max_body_bytes`` get 413 before parsing, and any
  malformed body is a 400 naming the problem in one line (KServe's own decoders turn some into 500s,
  pydantic's text would echo the body). The request id (v2 body ``id``, else ``x-request-id``, else a
  new one) is echoed in ``x-request-id``, as on every other REST answer (:class:`_HttpEdge`).
* ``POST /v1/models/{name}:explain``: 501 after the body limit; other methods on ``:predict`` 405.
* Server readiness (``/v2/health/ready``, gRPC ``ServerReady``) is the slots' readiness; model
  metadata lists the served versions; server metadata names the extensions actually served.
* ``GET /motlens/ready``: readiness with its reason (200 or 503).
* ``/motlens/admin/…``: slot operations for ``motlens promote --target local`` (docs/predictor.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import socket
import struct
import threading
import time
from collections.abc import Coroutine, Generator, Mapping
from concurrent import futures
from functools import partial
from typing import Any, TypeVar

import orjson
import uvicorn
from cloudevents.sdk.converters.util import has_binary_headers
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from grpc import ServicerContext, StatusCode, aio
from grpc_interceptor.exceptions import Unimplemented
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import InferenceError, InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import JSON_HEADERS, DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest.server import RESTServer
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from motlens.embedder import Embedder
from predictor import metrics
from predictor.backend import ModelLoadError, load_backend
from predictor.batcher import Overloaded
from predictor.cache import EmbeddingCache
from predictor.codec import (
    check_binary_texts,
    json_error,
    new_request_id,
    resolve_request_id,
    short_message,
    validation_message,
)
from predictor.events import write_event
from predictor.model import MotlensModel
from predictor.priority import nice_current_thread
from predictor.settings import ServeSettings
from predictor.slots import SlotError, SlotManager

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
ADMIN_PREFIX = "/motlens/admin"
LOOPBACK = ("127.0.0.1", "::1")
GRPC_MAX_SEND = 64 * 1024 * 1024


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes")


class UnsupportedEncoding(Exception):
    def __init__(self, encoding: str) -> None:
        super().__init__(f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")


class UnsupportedContentType(Exception):
    def __init__(self, media_type: str) -> None:
        super().__init__(f"Content-Type {media_type!r} is not supported; send application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes, and (415) when
    it is compressed: a gzip body would otherwise fail later as "not valid UTF-8"."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedEncoding(encoding[:40])
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class ServerFailed(RuntimeError):
    """The REST or gRPC server stopped (or never listened) before a stop was requested."""


class _Uvicorn(uvicorn.Server):
    """Uvicorn without its own signal handling: :class:`PredictorServer` drains on SIGTERM itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Raise where uvicorn would ``sys.exit`` (it cannot listen): a SystemExit in a task stops the loop."""
        try:
            await super().startup(sockets)
        except SystemExit as e:
            raise RuntimeError(str(e.__context__ or f"uvicorn startup failed (exit {e.code})")) from e.__context__


class _RESTServer(RESTServer):
    """KServe's REST server on a fresh FastAPI app (not KServe's module-level one) with motlens routes."""

    def __init__(self, server: PredictorServer, dataplane: DataPlane, ext: ModelRepositoryExtension, host: str) -> None:
        super().__init__(
            "kserve.model_server:app",
            dataplane,
            ext,
            server.settings.http_port,
            grace_period=server.settings.grace_period_s,
            event_loop="asyncio",
        )
        self.motlens = server
        self.config.host = host
        if not server.settings.access_log:  # what uvicorn.Config(access_log=False) does
            access = logging.getLogger("uvicorn.access")
            access.handlers = []
            access.propagate = False
        self._server = _Uvicorn(self.config)

    def create_application(self) -> None:
        app = FastAPI(title="motlens predictor", docs_url=None, redoc_url=None)
        app.add_middleware(_HttpEdge)
        self.motlens.add_routes(app)
        if self.motlens.settings.access_log:
            self._add_middlewares(app)  # KServe's per-request timing lines (costly: getrusage per request)
        # KServe's model-repository extension (load/unload by name) would let any client unload the
        # model; slots are managed through the gated admin API instead. Routes match in order, so this
        # one shadows KServe's.
        app.router.add_route("/v2/repository/{rest:path}", _no_repository, methods=["GET", "POST", "PUT", "DELETE"])
        self._register_endpoints(app)
        self._add_exception_handlers(app)
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
        app.add_exception_handler(UnsupportedEncoding, _unsupported_media_handler)
        app.add_exception_handler(UnsupportedContentType, _unsupported_media_handler)
        app.add_exception_handler(ClientGone, _client_gone_handler)
        self.config.app = app

    def request_exit(self) -> None:
        self._server.should_exit = True


def _count_refusal(exc: Exception, protocol: str, outcome: str, reason: str | None = None) -> None:
    """Count an inference request refused before or outside :meth:`MotlensModel.predict` (which
    counts, and marks, the refusals it raises itself): one series per protocol, no model version."""
    if getattr(exc, "motlens_counted", False):
        return
    metrics.by_version(metrics.REQUESTS, protocol, outcome, "").inc()
    if reason is not None:
        metrics.REJECTED.labels(reason=reason).inc()


def _count_refused(request: Request, exc: Exception, outcome: str, reason: str | None = None) -> None:
    """:func:`_count_refusal` for a REST request, if it asked for an inference."""
    path = request.url.path
    if path.endswith(":predict") or path.endswith("/infer"):
        _count_refusal(exc, "v1" if path.startswith("/v1/") else "v2-rest", outcome, reason)


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


class _HttpEdge:
    """What every REST answer passes through, in one ``send`` wrapper (a plain ASGI middleware:
    Starlette's ``BaseHTTPMiddleware`` costs a task per request):

    * ``x-request-id`` on every answer (:func:`_answer_id`), also those made outside the motlens
      handlers: Starlette's 404 and 405, explain's 501, probes; an answer that names its id already is
      passed on as it is.
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


async def _invalid_input_handler(request: Request, exc: Exception) -> Response:
    _count_refused(request, exc, "client_error", "invalid_input")
    message = short_message(exc)
    log.info("400 %s %s: %s", request.method, request.url.path, message)
    return _json({"error": message}, status_code=400, headers=_id_header(request))


async def _request_validation_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's own request validation (a route with a pydantic body or typed parameters): a 400 in the
    usual form, one line naming the problem, instead of FastAPI's 422 that echoes the input."""
    assert isinstance(exc, RequestValidationError)
    return await _invalid_input_handler(request, InvalidInput(validation_message(exc.errors())))


async def _not_found_handler(request: Request, exc: Exception) -> Response:
    """A client error: logged at INFO without a traceback (KServe's handler logs an ERROR)."""
    _count_refused(request, exc, "client_error")
    log.info("404 %s %s: %s", request.method, request.url.path, exc)
    return _json({"error": str(exc)}, status_code=404, headers=_id_header(request))


async def _not_ready_handler(request: Request, exc: Exception) -> Response:
    """503 with a generic body: the reason (paths, registry URIs) goes to the log and /motlens/ready."""
    _count_refused(request, exc, "unavailable")
    log.debug("503 %s %s: %s", request.method, request.url.path, exc)
    name = getattr(exc, "model_name", None) or request.path_params.get("model_name", "model")
    return _json({"error": f"model {name} is not ready"}, status_code=503, headers=_id_header(request))


async def _server_not_ready_handler(_: Request, exc: Exception) -> Response:
    """/v2/health/ready while nothing serves or while draining: a probe's answer, not an error to log."""
    return _json({"error": "server is not ready"}, status_code=503)


async def _http_error_handler(_: Request, exc: Exception) -> Response:
    """Routing errors (404 no route, 405 wrong method) in the OIP error form, not Starlette's ``detail``."""
    assert isinstance(exc, HTTPException)
    return _json({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _no_repository(_: Request) -> Response:
    return _json({"error": "the model repository extension is disabled"}, status_code=404)


async def _post_only(request: Request) -> Response:
    """``GET /v1/models/{name}:predict`` would otherwise match KServe's ``GET /v1/models/{name}`` (a 404)."""
    return _json(
        {"error": f"{request.method} is not allowed on {request.url.path}; use POST"},
        status_code=405,
        headers={"Allow": "POST"},
    )


def server_error(request: Request, exc: BaseException) -> Response:
    """A generic 500: the exception and its traceback go to the log, never to the client; the request id
    (the one the prediction log's failure row carries) goes to both."""
    rid = _answer_id(request.scope)
    log.error("500 %s %s (request id %r)", request.method, request.url.path, rid, exc_info=exc)
    return _json({"error": "internal server error", "request_id": rid}, status_code=500, headers={"x-request-id": rid})


async def _server_error_handler(request: Request, exc: Exception) -> Response:
    return server_error(request, exc)


class _NoRepository(ModelRepositoryExtension):
    """gRPC's RepositoryModelLoad/Unload answer UNIMPLEMENTED (see :meth:`_RESTServer.create_application`)."""

    async def load(self, model_name: str) -> dict[str, Any]:
        raise Unimplemented("the model repository extension is disabled; use the motlens admin API")

    async def unload(self, model_name: str) -> dict[str, Any]:
        raise Unimplemented("the model repository extension is disabled; use the motlens admin API")


class _DataPlane(DataPlane):
    """KServe's data plane, answering from the slots where KServe's answers are fixed."""

    def __init__(self, model_registry: ModelRepository, slots: SlotManager) -> None:
        super().__init__(model_registry=model_registry)
        self.slots = slots

    async def ready(self) -> bool:
        """False until a production model serves and from the start of a drain (KServe's: always true)."""
        return self.slots.ready

    def metadata(self) -> dict[str, Any]:
        """The extensions served: binary tensors, not the (switched-off) model repository."""
        return {**super().metadata(), "extensions": ["binary_tensor_data"]}

    async def model_metadata(self, model_name: str) -> dict[str, Any]:
        return {**await super().model_metadata(model_name), "versions": self.slots.served_versions()}

    def check_version(self, model_name: str, model_version: str) -> None:
        """ModelNotFound (404, gRPC NOT_FOUND) for another model or a version no slot serves."""
        self.get_model_from_registry(model_name)
        if model_version not in self.slots.served_versions():
            raise ModelNotFound(f"{model_name} version {model_version}")


class _Servicer(InferenceServicer):
    """KServe's gRPC servicer with model versions: KServe ignores the request's ``version``."""

    _data_plane: _DataPlane

    async def ModelReady(self, request: pb.ModelReadyRequest, context: ServicerContext) -> pb.ModelReadyResponse:
        if request.version:
            self._data_plane.check_version(request.name, request.version)
        return await super().ModelReady(request, context)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: ServicerContext
    ) -> pb.ModelMetadataResponse:
        if request.version:
            self._data_plane.check_version(request.name, request.version)
        meta = await self._data_plane.model_metadata(request.name)
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=[request.version] if request.version else meta["versions"],
            platform=meta["platform"],
            inputs=meta["inputs"],
            outputs=meta["outputs"],
        )


class _ExceptionToStatus(ExceptionToStatusInterceptor):
    """Client errors logged at INFO without a traceback (KServe logs them as errors) and, for
    ModelInfer, counted like REST's; the rest as KServe."""

    async def handle_exception(
        self, ex: Exception, request_or_iterator: Any, context: ServicerContext, method_name: str
    ) -> None:
        if isinstance(ex, InvalidInput | ModelNotFound):
            invalid = isinstance(ex, InvalidInput)
            code = StatusCode.INVALID_ARGUMENT if invalid else StatusCode.NOT_FOUND
            if method_name.endswith("/ModelInfer"):
                _count_refusal(ex, "v2-grpc", "client_error", "invalid_input" if invalid else None)
            log.info("gRPC %s %s: %s", method_name, code.name, ex)
            await context.abort(code, ex.reason)
        else:
            await super().handle_exception(ex, request_or_iterator, context, method_name)


class _GRPCServer(GRPCServer):
    """KServe's gRPC server (same options and interceptors) serving :class:`_Servicer`."""

    async def start(self, max_workers: int) -> None:
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), _ExceptionToStatus()),
            options=[
                ("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length")),
                ("grpc.so_reuseport", 0),  # a taken port fails the start instead of splitting traffic
            ],
        )
        servicer = _Servicer(self._data_plane, self._model_repository_extension)
        add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        self._server.add_insecure_port(f"[::]:{self._port}")
        await self._server.start()
        await self._server.wait_for_termination()


async def _overloaded_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Overloaded)
    status = 429 if exc.reason == "queue_full" else 503
    headers = {"Retry-After": str(exc.retry_after_s), **_id_header(request)}
    return _json({"error": str(exc)}, status_code=status, headers=headers)


async def _unsupported_media_handler(request: Request, exc: Exception) -> Response:
    _count_refused(request, exc, "client_error", "unsupported_media")
    return _json({"error": str(exc)}, status_code=415, headers=_id_header(request))


async def _too_large_handler(request: Request, exc: Exception) -> Response:
    _count_refused(request, exc, "client_error")
    metrics.REJECTED.labels(reason="body_too_large").inc()
    return _json({"error": str(exc)}, status_code=413, headers=_id_header(request))


ADMIN_MAX_BODY = 64 * 1024


class _LoadBody(BaseModel):
    ref: str = Field(min_length=1, max_length=4096, strict=True)


class _PercentBody(BaseModel):
    percent: float = Field(allow_inf_nan=False, strict=True)  # no "25" or true


class PredictorServer:
    """One predictor process: REST + gRPC servers, the slots, the prediction-log writer."""

    def __init__(
        self,
        settings: ServeSettings,
        *,
        embedder: Embedder | None = None,
        writer: Any | None = None,
        host: str = "0.0.0.0",
    ) -> None:
        self.settings = settings
        self.writer = writer
        self.cache = EmbeddingCache(settings.cache_bytes)
        loader = partial(
            load_backend,
            backend=settings.backend,
            device=settings.device,
            dtype=settings.dtype,
            threads=settings.resolved_threads(),
            single_thread_tokens=settings.single_thread_tokens,
            embedder=embedder,
        )
        self.slots = SlotManager(settings, self.cache, loader)
        log_settings = getattr(writer, "settings", None)
        if log_settings is not None and hasattr(log_settings, "embedded"):  # a predlog writer: audit rows too
            self.slots.on_event = partial(write_event, log_settings)
        self.model = MotlensModel(self.slots, settings, writer)
        repo = ModelRepository()
        repo.update(self.model)
        self.dataplane = _DataPlane(repo, self.slots)
        ext = _NoRepository(model_registry=repo)
        self.rest = _RESTServer(self, self.dataplane, ext, host)
        self.grpc = _GRPCServer(
            settings.grpc_port,
            self.dataplane,
            ext,
            grace_period=settings.grace_period_s,
            kwargs={
                "grpc_max_send_message_length": GRPC_MAX_SEND,
                "grpc_max_receive_message_length": settings.max_body_bytes,
            },
        )
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ lifecycle

    async def serve(self, handle_signals: bool = False) -> None:
        """Run until :meth:`request_stop` (or SIGTERM/SIGINT with ``handle_signals``), then drain."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if self.settings.admin_enabled and self.settings.admin_token is None:
            log.warning("admin API enabled without MOTLENS_SERVE_ADMIN_TOKEN: only loopback clients may use it")
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stopping.set)
        if self.settings.event_loop_nice:
            self.slots.start_model_thread()  # model threads descend from it, at the process's priority
            nice_current_thread(self.settings.event_loop_nice)
        servers = [asyncio.create_task(self.rest.start(), name="rest")]
        if self.settings.enable_grpc:
            servers.append(asyncio.create_task(self.grpc.start(4), name="grpc"))
        background = [asyncio.create_task(self.slots.load_with_retry("production", self.settings.model), name="load")]
        if self.settings.follow_alias:
            background.append(
                asyncio.create_task(
                    self.slots.follow(self.settings.follow_alias, self.settings.follow_interval_s),
                    name="follow",
                )
            )
        if self.settings.canary:
            background.append(asyncio.create_task(self._start_canary(self.settings.canary), name="canary"))
        stop = asyncio.create_task(self._stopping.wait(), name="stop")
        await asyncio.wait([stop, *servers], return_when=asyncio.FIRST_COMPLETED)
        failure = None if self._stopping.is_set() else self._failure(next(t for t in servers if t.done()))
        if failure is not None:
            log.error("%s", failure)
        stop.cancel()
        await self._shutdown(servers, background)
        if failure is not None:
            raise ServerFailed(failure)

    def _failure(self, task: asyncio.Task) -> str:
        """One line naming a server task that ended before a stop was requested, and why."""
        rest = task.get_name() == "rest"
        what = f"{'REST' if rest else 'gRPC'} server on :{self.settings.http_port if rest else self.settings.grpc_port}"
        exc = None if task.cancelled() else task.exception()
        return f"{what} failed: {exc}" if exc is not None else f"{what} stopped unexpectedly"

    async def _start_canary(self, ref: str) -> None:
        await self.slots.load_with_retry("canary", ref)
        self.slots.set_canary_percent(self.settings.canary_percent)

    async def _shutdown(self, servers: list[asyncio.Task], background: list[asyncio.Task]) -> None:
        log.info("shutting down: not ready, draining in-flight requests")
        for t in background:
            t.cancel()
        self.slots.begin_drain()
        if self.settings.drain_s:
            await asyncio.sleep(self.settings.drain_s)
        self.rest.request_exit()
        if self.settings.enable_grpc:
            await self.grpc.stop()
        await asyncio.gather(*servers, return_exceptions=True)
        await self.slots.shutdown()
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close, self.settings.grace_period_s)
        log.info("stopped")

    def request_stop(self) -> None:
        """Thread-safe: begin a graceful shutdown."""
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    # ------------------------------------------------------------ routes

    def add_routes(self, app: FastAPI) -> None:
        # The infer routes are plain Starlette routes: FastAPI's per-request dependency solving cost
        # ≈ 10 % of the event loop's time on cache hits, for three path parameters.
        app.router.add_route("/v1/models/{model_name}:predict", self._v1_route, methods=["POST"])
        app.router.add_route("/v1/models/{model_name}:explain", self._v1_explain, methods=["POST"])
        for verb in ("predict", "explain"):
            app.router.add_route(
                f"/v1/models/{{model_name}}:{verb}", _post_only, methods=["GET", "PUT", "PATCH", "DELETE"]
            )
        app.router.add_route("/v2/models/{model_name}/infer", self._v2_route, methods=["POST"])
        app.router.add_route("/v2/models/{model_name}/versions/{model_version}/infer", self._v2_route, methods=["POST"])
        app.add_api_route(
            "/v2/models/{model_name}/versions/{model_version}",
            self._version_metadata,
            methods=["GET"],
            response_model=None,
        )
        app.add_api_route(
            "/v2/models/{model_name}/versions/{model_version}/ready",
            self._version_ready,
            methods=["GET"],
            response_model=None,
        )
        app.add_api_route("/motlens/ready", self._ready, methods=["GET"], response_model=None)
        if self.settings.admin_enabled:
            self._add_admin_routes(app)

    def _add_admin_routes(self, app: FastAPI) -> None:
        app.add_api_route(f"{ADMIN_PREFIX}/slots", self._admin_status, methods=["GET"], response_model=None)
        # plain routes: the body is read after the token check (FastAPI would parse it first)
        app.router.add_route(f"{ADMIN_PREFIX}/slots/{{slot}}/load", self._admin_load, methods=["POST"])
        app.router.add_route(f"{ADMIN_PREFIX}/canary/percent", self._admin_percent, methods=["POST", "PUT"])
        app.add_api_route(f"{ADMIN_PREFIX}/promote", self._admin_promote, methods=["POST"], response_model=None)
        app.add_api_route(f"{ADMIN_PREFIX}/rollback", self._admin_rollback, methods=["POST"], response_model=None)

    async def _check_ready(self, model_name: str) -> None:
        """404 for another model; 503 only while nothing can serve (a draining server still answers)."""
        self.dataplane.get_model_from_registry(model_name)
        if not self.slots.serving:
            reason = self.slots.not_ready_reason()
            raise ModelNotReady(model_name, reason[1] if reason else None)

    async def _v1_route(self, request: Request) -> Response:
        try:
            return await self._v1_predict(request.path_params["model_name"], request)
        except _CLIENT_FACING:
            raise
        except Exception as e:
            return server_error(request, e)

    async def _v2_route(self, request: Request) -> Response:
        params = request.path_params
        try:
            return await self._v2_infer(params["model_name"], request, params.get("model_version"))
        except _CLIENT_FACING:
            raise
        except Exception as e:
            return server_error(request, e)

    async def _v1_explain(self, request: Request) -> Response:
        """Explain is not served: 501, after the body limit like every other route that takes a body."""
        await read_body(request, self.settings.max_body_bytes)
        model_name = request.path_params["model_name"]
        self.dataplane.get_model_from_registry(model_name)
        return _json({"error": f"explain is not supported by {model_name}"}, status_code=501)

    async def _v1_predict(self, model_name: str, request: Request) -> Response:
        body = await read_body(request, self.settings.max_body_bytes)
        await self._check_ready(model_name)
        headers = dict(request.headers.items())
        rid = request.state.request_id = resolve_request_id(None, headers.get("x-request-id"))
        headers["x-request-id"] = rid  # the model logs its rows under this id
        payload, attrs = self.dataplane.decode(body=_v1_json(body, headers), headers=headers)
        response, response_headers = await _unless_disconnected(
            request, self.dataplane.infer(model_name=model_name, request=payload, headers=headers)
        )
        response, res_headers = self.dataplane.encode(
            model_name=model_name, response=response, headers=headers, req_attributes=attrs
        )
        response_headers.update(res_headers)
        response_headers.pop("content-length", None)
        response_headers["x-request-id"] = rid
        if isinstance(response, bytes | str):
            return Response(content=response, headers=response_headers)
        return _json(content=response, headers=response_headers)

    async def _version_metadata(self, model_name: str, model_version: str) -> Response:
        self.dataplane.check_version(model_name, model_version)
        meta = await self.dataplane.model_metadata(model_name)
        return _json({**meta, "versions": [model_version]})

    async def _version_ready(self, model_name: str, model_version: str) -> Response:
        self.dataplane.check_version(model_name, model_version)
        if not self.slots.ready:
            reason = self.slots.not_ready_reason()
            raise ModelNotReady(model_name, reason[1] if reason else None)
        return _json({"name": model_name, "ready": True})

    async def _v2_infer(self, model_name: str, request: Request, model_version: str | None = None) -> Response:
        body = await read_body(request, self.settings.max_body_bytes)
        await self._check_ready(model_name)
        headers = dict(request.headers.items())
        try:
            json_length = headers.get(INFERENCE_CONTENT_LENGTH_HEADER)
            if json_length is not None:
                if not json_length.isdigit() or int(json_length) > len(body):
                    raise InvalidInput(
                        f"header {INFERENCE_CONTENT_LENGTH_HEADER}={json_length!r} does not fit "
                        f"a body of {len(body)} bytes"
                    )
                check_binary_texts(body, int(json_length), self.settings.max_items_per_request)
                infer_request = InferRequest.from_bytes(body, int(json_length), model_name)
            else:
                infer_request = InferRequest.from_inference_request(
                    InferenceRequest.model_validate_json(body), model_name
                )
        except InvalidInput:
            raise
        except ValidationError as e:  # the JSON form: malformed JSON, or a field of the wrong type
            errors = e.errors(include_url=False)
            message = validation_message(errors)
            if errors and errors[0]["type"] != "json_invalid":
                message = f"malformed v2 inference request: {message}"
            raise InvalidInput(message) from e
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error, InferenceError) as e:
            detail = f"missing field {e}" if isinstance(e, KeyError) else short_message(e)
            raise InvalidInput(f"malformed v2 inference request: {detail}") from e
        rid = request.state.request_id = resolve_request_id(infer_request.id, headers.get("x-request-id"))
        infer_request.id = rid
        if model_version is not None:
            self.dataplane.check_version(model_name, model_version)
            infer_request.model_version = model_version
        response, response_headers = await _unless_disconnected(
            request, self.dataplane.infer(model_name=model_name, request=infer_request, headers=headers)
        )
        response, res_headers = self.dataplane.encode(
            model_name=model_name, response=response, headers=headers, req_attributes={}
        )
        response_headers.update(res_headers)
        response_headers.pop("content-length", None)
        response_headers.pop("content-type", None)
        response_headers["x-request-id"] = rid
        if isinstance(response, bytes):
            return Response(content=response, headers=response_headers, media_type="application/octet-stream")
        return _json(content=response, headers=response_headers)

    async def _ready(self) -> Response:
        status = self.slots.status()
        return _json(
            {"ready": status["ready"], "reason": status["reason"]},
            status_code=200 if status["ready"] else 503,
        )

    def _admin_auth(self, request: Request) -> Response | None:
        """The bearer token if one is set, else loopback clients only (the routes exist only when enabled)."""
        token = self.settings.admin_token
        if token is None:
            if request.client is None or request.client.host not in LOOPBACK:
                return _json({"error": "admin API without a token answers loopback clients only"}, status_code=403)
            return None
        expected = f"Bearer {token.get_secret_value()}".encode()
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            return _json({"error": "admin API needs 'Authorization: Bearer <token>'"}, status_code=401)
        return None

    async def _admin_status(self, request: Request) -> Response:
        return self._admin_auth(request) or _json(self.slots.status())

    async def _admin_body(self, request: Request, model: type[M]) -> M | Response:
        """The admin request's JSON body, read only after the caller is authorised, bounded, validated."""
        if denied := self._admin_auth(request):
            return denied
        try:
            return model.model_validate_json(await read_body(request, ADMIN_MAX_BODY))
        except BodyTooLarge as e:
            return _json({"error": str(e)}, status_code=413)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
            return _json({"error": f"bad admin request: {problems}"}, status_code=422)

    async def _admin_load(self, request: Request) -> Response:
        body = await self._admin_body(request, _LoadBody)
        if isinstance(body, Response):
            return body
        slot = request.path_params["slot"]
        try:
            return _json(await self.slots.load(slot, body.ref, admin=True))
        except SlotError as e:
            return _json({"error": str(e)}, status_code=404)
        except ModelLoadError as e:
            return _json({"error": str(e), **self.slots.status()}, status_code=422)

    async def _admin_percent(self, request: Request) -> Response:
        body = await self._admin_body(request, _PercentBody)
        if isinstance(body, Response):
            return body
        try:
            return _json(self.slots.set_canary_percent(body.percent))
        except SlotError as e:
            return _json({"error": str(e)}, status_code=409)

    async def _admin_promote(self, request: Request) -> Response:
        if denied := self._admin_auth(request):
            return denied
        try:
            return _json(await self.slots.promote())
        except SlotError as e:
            return _json({"error": str(e)}, status_code=409)

    async def _admin_rollback(self, request: Request) -> Response:
        return self._admin_auth(request) or _json(await self.slots.rollback())


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready; its queued work was dropped."""


# Exceptions with their own handler and status; anything else raised by an infer route is a 500.
_CLIENT_FACING = (
    InvalidInput,
    ModelNotReady,
    ModelNotFound,
    Overloaded,
    BodyTooLarge,
    UnsupportedEncoding,
    UnsupportedContentType,
    ClientGone,
)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``, cancelling it (and so dropping its queued model work) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.sleep(0)  # let it run its first step: all cache hits finish there, without a watcher
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task.done():
        return task.result()
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        metrics.REJECTED.labels(reason="client_disconnected").inc()
        raise ClientGone()
    return task.result()


async def _client_gone_handler(request: Request, exc: Exception) -> Response:
    return _json({"error": "client disconnected"}, status_code=499, headers=_id_header(request))


def _v1_json(body: bytes, headers: dict[str, str]) -> bytes | Any:
    """A JSON body, parsed here so that ``application/json; charset=utf-8`` counts as JSON (KServe's
    decoder compares the whole header and would pass such a body on as raw bytes), as is a body
    without Content-Type (as KServe would: the same ``malformed JSON`` message either way). A binary
    CloudEvent is left to KServe; any other Content-Type (curl's default form encoding) is a 415."""
    if has_binary_headers(headers):
        return body
    media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type and media_type not in JSON_HEADERS:
        raise UnsupportedContentType(media_type[:100])
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(json_error(e)) from e


def _json(content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


class ServerThread:
    """A :class:`PredictorServer` running in a background thread (tests, benchmarks, local promotion)."""

    def __init__(self, server: PredictorServer) -> None:
        self.server = server
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="motlens-serve", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve())
        except BaseException as e:
            self.error = e  # for wait_ready; the thread still reports it
            raise

    def start(self) -> ServerThread:
        self._thread.start()
        return self

    def wait_ready(self, timeout: float = 300.0) -> ServerThread:
        """Block until both servers listen and production is ready; raise with the reason otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError(f"server thread exited: {self.error or 'stopped'}")
            if self.server.rest._server.started and self.server.slots.ready:
                return self
            time.sleep(0.05)
        reason = self.server.slots.not_ready_reason()
        raise TimeoutError(f"not ready after {timeout}s: {reason[1] if reason else 'servers not listening'}")

    def stop(self, timeout: float = 60.0) -> None:
        while self.server._loop is None and self._thread.is_alive():
            threading.Event().wait(0.05)
        if self._thread.is_alive():
            self.server.request_stop()
            self._thread.join(timeout)
