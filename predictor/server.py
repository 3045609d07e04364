"""The predictor process: KServe's REST and gRPC servers around :class:`MotlensModel`, plus admin routes.

Built from KServe's own parts (``DataPlane``, ``RESTServer``, ``GRPCServer``) rather than
``kserve.ModelServer.start`` so that the server is up (live, not ready) while the model loads, so
several servers can run in one process (tests), and so SIGTERM drains gracefully. Extra routes:

* ``POST /v1/models/{name}:predict`` and ``POST /v2/models/{name}/infer`` are answered by motlens
  handlers placed before KServe's: bodies over ``max_body_bytes`` get 413 before parsing, and any
  malformed body is a 400 naming the problem in one line (KServe's own decoders turn some into 500s,
  pydantic's text would echo the body). The request id (v2 body ``id``, else ``x-request-id``, else a
  new one) is echoed in ``x-request-id``, as on every other REST answer (:class:`predictor.rest_edge.HttpEdge`).
* ``POST /v1/models/{name}:explain``: 501 after the body limit; other methods on ``:predict`` 405.
* Server readiness (``/v2/health/ready``, gRPC ``ServerReady``) is the slots' readiness; model
  metadata lists the served versions; server metadata names the extensions actually served.
* ``GET /motlens/ready``: readiness (200 or 503) with its reason; a load error's text for admin clients only.
* ``/motlens/admin/…``: slot operations for ``motlens promote --target local`` (docs/predictor.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import signal
import socket
import struct
import threading
import time
from collections.abc import Generator
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import cloudevents.exceptions as ce
import orjson
import uvicorn
from cloudevents.http import from_http
from cloudevents.sdk.converters.util import has_binary_headers
from fastapi import FastAPI, Request
from fastapi.responses import Response
from grpc_interceptor.exceptions import Unimplemented
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import InferenceError, InvalidInput, ModelNotFound, ModelNotReady
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import JSON_HEADERS
from kserve.protocol.dataplane import DataPlane as KServeDataPlane
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest.server import RESTServer
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from pydantic import BaseModel, Field, ValidationError

from motlens.embedder import Embedder
from predictor.backend import ModelLoadError, load_backend
from predictor.batcher import Overloaded
from predictor.cache import EmbeddingCache
from predictor.codec import (
    check_binary_texts,
    check_input,
    json_error,
    not_utf8,
    resolve_request_id,
    short_message,
    validation_message,
)
from predictor.disconnect import ClientGone, unless_disconnected
from predictor.events import write_event
from predictor.grpc_server import GRPCServer
from predictor.http_deadline import with_header_timeout
from predictor.model import MotlensModel
from predictor.priority import nice_current_thread
from predictor.rest_edge import (
    BodyTimeout,
    BodyTooLarge,
    HttpEdge,
    UnsupportedContentType,
    UnsupportedEncoding,
    UnsupportedTransferEncoding,
    add_error_handlers,
    json_response,
    read_body,
    server_error,
)
from predictor.settings import ServeSettings
from predictor.slots import SlotError, SlotManager

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
ADMIN_PREFIX = "/motlens/admin"
LOOPBACK = ("127.0.0.1", "::1")
#: the Content-Type of a structured-mode CloudEvent, and the attributes CloudEvents 1.0 requires
STRUCTURED_CLOUDEVENT = "application/cloudevents+json"
CLOUDEVENT_REQUIRED = ("specversion", "id", "source", "type")
#: the spec versions the CloudEvents SDK builds an event of (KServe's answer, with CE_MERGE)
CLOUDEVENT_VERSIONS = ("1.0", "0.3")
CLOUDEVENT_ERRORS = (
    ce.MissingRequiredFields,
    ce.InvalidRequiredFields,
    ce.InvalidStructuredJSON,
    ce.InvalidHeadersFormat,
    ce.DataMarshallerError,
    ce.DataUnmarshallerError,
)
#: headers a proxy adds (or passes on from its client): a request with one is not a loopback client's
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")
GRPC_MAX_SEND = 64 * 1024 * 1024


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
        self.config.http = with_header_timeout(server.settings.header_timeout_s)
        if not server.settings.access_log:  # what uvicorn.Config(access_log=False) does
            access = logging.getLogger("uvicorn.access")
            access.handlers = []
            access.propagate = False
        self._server = _Uvicorn(self.config)

    def create_application(self) -> None:
        app = FastAPI(title="motlens predictor", docs_url=None, redoc_url=None)
        app.add_middleware(HttpEdge)
        self.motlens.add_routes(app)
        if self.motlens.settings.access_log:
            self._add_middlewares(app)  # KServe's per-request timing lines (costly: getrusage per request)
        # KServe's model-repository extension (load/unload by name) would let any client unload the
        # model; slots are managed through the gated admin API instead. Routes match in order, so this
        # one shadows KServe's.
        app.router.add_route("/v2/repository/{rest:path}", _no_repository, methods=["GET", "POST", "PUT", "DELETE"])
        self._register_endpoints(app)
        self._add_exception_handlers(app)
        add_error_handlers(app)
        self.config.app = app

    def request_exit(self) -> None:
        self._server.should_exit = True


async def _no_repository(_: Request) -> Response:
    return json_response({"error": "the model repository extension is disabled"}, status_code=404)


async def _post_only(request: Request) -> Response:
    """``GET /v1/models/{name}:predict`` would otherwise match KServe's ``GET /v1/models/{name}`` (a 404)."""
    return json_response(
        {"error": f"{request.method} is not allowed on {request.url.path}; use POST"},
        status_code=405,
        headers={"Allow": "POST"},
    )


class _NoRepository(ModelRepositoryExtension):
    """gRPC's RepositoryModelLoad/Unload answer UNIMPLEMENTED (see :meth:`_RESTServer.create_application`)."""

    async def load(self, model_name: str) -> dict[str, Any]:
        raise Unimplemented("the model repository extension is disabled; use the motlens admin API")

    async def unload(self, model_name: str) -> dict[str, Any]:
        raise Unimplemented("the model repository extension is disabled; use the motlens admin API")


class DataPlane(KServeDataPlane):
    """KServe's data plane, answering from the slots where KServe's answers are fixed."""

    def __init__(self, model_registry: ModelRepository, slots: SlotManager) -> None:
        super().__init__(model_registry=model_registry)
        self.slots = slots

    async def ready(self) -> bool:
        """False until a production model serves and from the start of a drain (KServe's: always true)."""
        return self.slots.ready

    def get_model_from_registry(self, name: str) -> Any:
        """KServe's lookup, with an unknown name bounded in the answer (it comes from the path or the
        gRPC request: 20,000 characters outgrew gRPC's 16 KiB of status metadata)."""
        model = self._model_registry.get_model(name)
        if model is None:
            raise ModelNotFound(short_message(name, 100))
        return model

    async def get_model(self, name: str) -> Any:
        self.get_model_from_registry(name)  # an unknown name bounded, as above
        return await super().get_model(name)

    async def model_ready(self, model_name: str, disable_predictor_health_check: bool = False) -> bool:
        """KServe's, with an unknown name bounded (v1 ``GET /v1/models/{name}``, v2 ``…/ready``, gRPC)."""
        self.get_model_from_registry(model_name)
        return await super().model_ready(model_name, disable_predictor_health_check)

    def metadata(self) -> dict[str, Any]:
        """The extensions served: binary tensors, not the (switched-off) model repository."""
        return {**super().metadata(), "extensions": ["binary_tensor_data"]}

    async def model_metadata(self, model_name: str) -> dict[str, Any]:
        return {**await super().model_metadata(model_name), "versions": self.slots.served_versions()}

    def check_version(self, model_name: str, model_version: str) -> None:
        """ModelNotFound (404, gRPC NOT_FOUND) for another model or a version no slot serves."""
        self.get_model_from_registry(model_name)
        if model_version not in self.slots.served_versions():
            raise ModelNotFound(f"{model_name} version {short_message(model_version, 40)}")


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
            torch_trace=settings.torch_trace,
            embedder=embedder,
            # the configured model's pin only: the admin API loads other versions through the registry,
            # which checks each against its own recorded digest
            pinned={settings.model: settings.model_sha256} if settings.model_sha256 else None,
        )
        self.slots = SlotManager(settings, self.cache, loader)
        log_settings = getattr(writer, "settings", None)
        if log_settings is not None and hasattr(log_settings, "embedded"):  # a predlog writer: audit rows too
            self.slots.on_event = partial(write_event, log_settings)
        self.model = MotlensModel(self.slots, settings, writer)
        repo = ModelRepository()
        repo.update(self.model)
        self.dataplane = DataPlane(repo, self.slots)
        ext = _NoRepository(model_registry=repo)
        self.rest = _RESTServer(self, self.dataplane, ext, host)
        self.grpc = GRPCServer(
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
        background: list[asyncio.Task[Any]] = [
            asyncio.create_task(self.slots.load_with_retry("production", self.settings.model), name="load")
        ]
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
        if await self.slots.load_with_retry("canary", ref):
            self.slots.set_canary_percent(self.settings.canary_percent, cause="start")

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
        await read_body(request, self.settings.max_body_bytes, self.settings.body_timeout_s)
        model_name = request.path_params["model_name"]
        self.dataplane.get_model_from_registry(model_name)
        return json_response({"error": f"explain is not supported by {model_name}"}, status_code=501)

    async def _v1_predict(self, model_name: str, request: Request) -> Response:
        body = await read_body(request, self.settings.max_body_bytes, self.settings.body_timeout_s)
        await self._check_ready(model_name)
        headers = _first_headers(request)
        rid = request.state.request_id = resolve_request_id(None, headers.get("x-request-id"))
        headers["x-request-id"] = rid  # the model logs its rows under this id
        payload, attrs = _v1_payload(self.dataplane, body, headers)
        if _media_type(headers.get("content-type")) == STRUCTURED_CLOUDEVENT:
            headers["content-type"] = STRUCTURED_CLOUDEVENT  # KServe answers with an event on this exact value
        response, response_headers = await unless_disconnected(
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
        return json_response(content=response, headers=response_headers)

    async def _version_metadata(self, model_name: str, model_version: str) -> Response:
        self.dataplane.check_version(model_name, model_version)
        meta = await self.dataplane.model_metadata(model_name)
        return json_response({**meta, "versions": [model_version]})

    async def _version_ready(self, model_name: str, model_version: str) -> Response:
        self.dataplane.check_version(model_name, model_version)
        if not self.slots.ready:
            reason = self.slots.not_ready_reason()
            raise ModelNotReady(model_name, reason[1] if reason else None)
        return json_response({"name": model_name, "ready": True})

    async def _v2_infer(self, model_name: str, request: Request, model_version: str | None = None) -> Response:
        body = await read_body(request, self.settings.max_body_bytes, self.settings.body_timeout_s)
        await self._check_ready(model_name)
        headers = _first_headers(request)
        try:
            json_length = headers.get(INFERENCE_CONTENT_LENGTH_HEADER)
            if json_length is not None:
                json_length = json_length.strip()  # HTTP allows whitespace around a header's value
                if not json_length.isascii() or not json_length.isdigit():
                    raise InvalidInput(
                        f"header {INFERENCE_CONTENT_LENGTH_HEADER}={short_message(repr(json_length), 40)} "
                        "is not a non-negative integer"
                    )
                if int(json_length) > len(body):
                    raise InvalidInput(
                        f"header {INFERENCE_CONTENT_LENGTH_HEADER}={json_length!r} does not fit "
                        f"a body of {len(body)} bytes"
                    )
                check_binary_texts(body, int(json_length), self.settings.max_items_per_request)
                infer_request = InferRequest.from_bytes(body, int(json_length), model_name)
            else:
                parsed = InferenceRequest.model_validate_json(body)
                for inp in parsed.inputs:  # before KServe's decoder ("Sending FP16 data via JSON…")
                    check_input(inp.name, inp.datatype)
                infer_request = InferRequest.from_inference_request(parsed, model_name)
        except InvalidInput:
            raise
        except ValidationError as e:  # the JSON form: malformed JSON, or a field of the wrong type
            errors = e.errors(include_url=False)
            message = validation_message(errors)
            if errors and errors[0]["type"] != "json_invalid":
                message = f"malformed v2 inference request: {message}"
            elif problem := not_utf8(body, "the request body"):
                message = problem
            raise InvalidInput(message) from e
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error, InferenceError) as e:
            detail = f"missing field {e}" if isinstance(e, KeyError) else short_message(e)
            raise InvalidInput(f"malformed v2 inference request: {detail}") from e
        rid = request.state.request_id = resolve_request_id(infer_request.id, headers.get("x-request-id"))
        infer_request.id = rid
        if model_version is not None:
            self.dataplane.check_version(model_name, model_version)
            infer_request.model_version = model_version
        response, response_headers = await unless_disconnected(
            request, self.dataplane.infer(model_name=model_name, request=infer_request, headers=headers)
        )
        # no request headers: v2 defines no CloudEvents, and KServe's encoder, seeing ce-* headers or a
        # CloudEvent Content-Type, wrapped the answer and dropped Inference-Header-Content-Length
        response, res_headers = self.dataplane.encode(
            model_name=model_name, response=response, headers=None, req_attributes={}
        )
        response_headers.update(res_headers)
        response_headers.pop("content-length", None)
        response_headers.pop("content-type", None)
        response_headers["x-request-id"] = rid
        if isinstance(response, bytes):
            return Response(content=response, headers=response_headers, media_type="application/octet-stream")
        return json_response(content=response, headers=response_headers)

    async def _ready(self, request: Request) -> Response:
        """Readiness with its reason. The reason's text (a load error names paths and registry URIs) is
        for whoever may use the admin API (:meth:`_admin_auth`); anyone else gets its label and where
        to look."""
        ready, reason = self.slots.ready, self.slots.not_ready_reason()
        if reason is None:
            shown = None
        elif self._admin_auth(request) is None:
            shown = reason[1]
        else:
            shown = f"{reason[0]} (the detail is in the server log, and here for admin API clients)"
        return json_response({"ready": ready, "reason": shown}, status_code=200 if ready else 503)

    def _admin_auth(self, request: Request) -> Response | None:
        """The bearer token if one is set, else loopback clients only (the routes exist only when enabled).

        A request carrying a forwarding header came through a proxy, whatever its peer: uvicorn takes the
        client from ``X-Forwarded-For`` when the peer is loopback, so a local proxy passing a client's own
        ``X-Forwarded-For: 127.0.0.1`` on would otherwise make any client a loopback one."""
        token = self.settings.admin_token
        if token is None:
            proxied = any(h in request.headers for h in FORWARDING_HEADERS)
            if proxied or request.client is None or request.client.host not in LOOPBACK:
                return json_response(
                    {"error": "admin API without a token answers loopback clients only, never proxied requests"},
                    status_code=403,
                )
            return None
        expected = f"Bearer {token.get_secret_value()}".encode()
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            return json_response({"error": "admin API needs 'Authorization: Bearer <token>'"}, status_code=401)
        return None

    async def _admin_status(self, request: Request) -> Response:
        return self._admin_auth(request) or json_response(self.slots.status())

    async def _admin_body(self, request: Request, model: type[M]) -> M | Response:
        """The admin request's JSON body, read only after the caller is authorised, bounded, validated."""
        if denied := self._admin_auth(request):
            return denied
        try:
            return model.model_validate_json(await read_body(request, ADMIN_MAX_BODY, self.settings.body_timeout_s))
        except BodyTooLarge as e:
            return json_response({"error": str(e)}, status_code=413)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
            return json_response({"error": f"bad admin request: {problems}"}, status_code=422)

    async def _admin_load(self, request: Request) -> Response:
        body = await self._admin_body(request, _LoadBody)
        if isinstance(body, Response):
            return body
        slot = request.path_params["slot"]
        try:
            return json_response(await self.slots.load(slot, body.ref, cause="admin"))
        except SlotError as e:
            return json_response({"error": str(e)}, status_code=404)
        except ModelLoadError as e:
            return json_response({"error": str(e), **self.slots.status()}, status_code=422)

    async def _admin_percent(self, request: Request) -> Response:
        body = await self._admin_body(request, _PercentBody)
        if isinstance(body, Response):
            return body
        try:
            return json_response(self.slots.set_canary_percent(body.percent))
        except SlotError as e:
            return json_response({"error": str(e)}, status_code=409)

    async def _admin_promote(self, request: Request) -> Response:
        if denied := self._admin_auth(request):
            return denied
        try:
            return json_response(await self.slots.promote())
        except SlotError as e:
            return json_response({"error": str(e)}, status_code=409)

    async def _admin_rollback(self, request: Request) -> Response:
        return self._admin_auth(request) or json_response(await self.slots.rollback())


# Exceptions with their own handler (rest_edge.add_error_handlers); anything else raised by an infer route is a 500.
_CLIENT_FACING = (
    InvalidInput,
    ModelNotReady,
    ModelNotFound,
    Overloaded,
    BodyTooLarge,
    BodyTimeout,
    UnsupportedEncoding,
    UnsupportedTransferEncoding,
    UnsupportedContentType,
    ClientGone,
)


def _first_headers(request: Request) -> dict[str, str]:
    """The request's headers, the first of a repeated one winning (as ``request.headers.get`` and the
    answer's ``x-request-id`` take it; ``dict(headers.items())`` kept the last)."""
    headers: dict[str, str] = {}
    for k, v in request.headers.items():
        headers.setdefault(k, v)
    return headers


def _v1_json(
    body: str | bytes | bytearray | memoryview, content_type: str | None, what: str = "the request body"
) -> Any:
    """A JSON body, parsed here so that ``application/json; charset=utf-8`` counts as JSON (KServe's
    decoder compares the whole header and would pass such a body on as raw bytes), as is a body
    without Content-Type (as KServe would: the same ``malformed JSON`` message either way); any other
    Content-Type (curl's default form encoding) is a 415. ``what`` names the JSON in a UTF-8 error."""
    media_type = _media_type(content_type)
    if media_type and media_type not in JSON_HEADERS:
        raise UnsupportedContentType(media_type[:100])
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(not_utf8(body, what) or json_error(e)) from e


def _v1_payload(dataplane: KServeDataPlane, body: bytes, headers: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    """A v1 body and, for a CloudEvent, its attributes (KServe answers such a request with a
    CloudEvent). A structured event is a JSON body KServe unwraps; a binary-mode one (``ce-*``
    headers) has its data, as sent, parsed here like a plain body: KServe's own decoding failed with a
    server error on an event without data, or on one whose data the CloudEvents SDK had already parsed
    (a ``ce-contenttype`` header)."""
    if not has_binary_headers(headers):
        payload = _v1_json(body, headers.get("content-type"))
        if _media_type(headers.get("content-type")) == STRUCTURED_CLOUDEVENT:
            return _structured_event(payload)
        return dataplane.decode(body=payload, headers=headers)
    try:  # the data as sent: with ce-contenttype KServe had the SDK parse it (a JSON string parsed twice)
        event = from_http(headers, body, lambda x: x)
    except CLOUDEVENT_ERRORS as e:
        raise InvalidInput(f"malformed binary CloudEvent: {short_message(e, 200)}") from e
    data = event.get_data()
    if not data:
        raise InvalidInput("the CloudEvent carries no data; send the v1 request as its JSON data")
    return _v1_json(data, event.get("datacontenttype")), event._get_attributes()


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _structured_event(event: Any) -> tuple[Any, dict[str, Any]]:
    """A structured-mode CloudEvent's v1 request (``data``, or JSON in ``data_base64``) and its other
    attributes. KServe unwrapped only an event with the optional ``time``, and passed any other on
    whole, to fail as a request without ``instances``."""
    if not isinstance(event, dict):
        raise InvalidInput(f"a {STRUCTURED_CLOUDEVENT} body must be a JSON object (a CloudEvent)")
    missing = [k for k in CLOUDEVENT_REQUIRED if k not in event]
    if missing:
        raise InvalidInput(
            f"the CloudEvent lacks its required attribute(s) {', '.join(missing)} "
            f"({STRUCTURED_CLOUDEVENT} needs {', '.join(CLOUDEVENT_REQUIRED)})"
        )
    # checked before the model runs: with CE_MERGE KServe builds its answer from these attributes
    not_strings = [k for k in CLOUDEVENT_REQUIRED if not isinstance(event[k], str) or not event[k]]
    if not_strings:
        raise InvalidInput(f"the CloudEvent's {', '.join(not_strings)} must be non-empty strings")
    if event["specversion"] not in CLOUDEVENT_VERSIONS:
        raise InvalidInput(
            f"the CloudEvent's specversion {short_message(event['specversion'], 20)!r} is not "
            f"{' or '.join(CLOUDEVENT_VERSIONS)}"
        )
    content_type = event.get("datacontenttype")
    if content_type is not None and not isinstance(content_type, str):
        raise InvalidInput(f"the CloudEvent's datacontenttype must be a string, got {type(content_type).__name__}")
    attributes = {k: v for k, v in event.items() if k not in ("data", "data_base64")}
    # KServe's CE_MERGE answer deletes the request's id and time (a KeyError, a 500, without a time)
    attributes.setdefault("time", datetime.now(UTC).isoformat())
    if "data" in event:
        return event["data"], attributes
    if "data_base64" not in event:
        raise InvalidInput("the CloudEvent carries no data; send the v1 request as its JSON data")
    try:
        data = base64.b64decode(event["data_base64"], validate=True)
    except (binascii.Error, TypeError, ValueError) as e:
        raise InvalidInput("the CloudEvent's data_base64 is not valid base64") from e
    return _v1_json(data, content_type, "the CloudEvent's decoded data_base64"), attributes


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
