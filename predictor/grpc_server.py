"""KServe's gRPC server as the predictor runs it: model versions honoured, client errors logged and counted."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError
from grpc import HandlerCallDetails, RpcMethodHandler, ServicerContext, StatusCode, aio
from kserve.errors import InvalidInput, ModelNotFound
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer as KServeGRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferRequest, InferResponse

from predictor.codec import check_input, short_message
from predictor.rest_edge import count_refusal

if TYPE_CHECKING:
    from predictor.server import DataPlane

log = logging.getLogger(__name__)


class _Servicer(InferenceServicer):
    """KServe's gRPC servicer with model versions: KServe ignores the request's ``version``."""

    _data_plane: DataPlane

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

    async def ModelInfer(self, request: pb.ModelInferRequest, context: ServicerContext) -> pb.ModelInferResponse:
        self._data_plane.get_model_from_registry(request.model_name)  # another model: NOT_FOUND first, as REST
        for tensor in request.inputs:  # KServe's decoder would say only "invalid content type"
            tensor.datatype = tensor.datatype.upper()  # in any case, as the REST paths read it
            check_input(tensor.name, tensor.datatype)
        _check_parameter_values(request)
        self.validate_grpc_request(request)
        response, _ = await self._data_plane.infer(
            request=InferRequest.from_grpc(request), headers=_headers(context), model_name=request.model_name
        )
        return response.to_grpc() if isinstance(response, InferResponse) else response


def _headers(context: ServicerContext) -> dict[str, str]:
    """The call's metadata as headers, the first value of a repeated key as REST reads its headers (KServe's
    ``to_headers`` keeps the last, so a repeated ``x-request-id`` named another request than over REST)."""
    headers: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        headers.setdefault(key, value)
    return headers


def _check_parameter_values(request: pb.ModelInferRequest) -> None:
    """Every parameter carries a value: KServe drops one with none of ``bool_param``, ``int64_param``,
    ``string_param`` set, so ``return_embedding`` without a value read as false (REST's null is a 400)."""
    maps = [("parameters", request.parameters)]
    maps += [(f"inputs[{i}].parameters", t.parameters) for i, t in enumerate(request.inputs)]
    maps += [(f"outputs[{i}].parameters", o.parameters) for i, o in enumerate(request.outputs)]
    for where, params in maps:
        for key, value in params.items():
            if value.WhichOneof("parameter_choice") is None:
                raise InvalidInput(
                    f"malformed v2 inference request: {where}.{short_message(key, 100)} has no value "
                    "(set its bool_param, int64_param or string_param)"
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
                count_refusal(ex, "v2-grpc", "client_error", "invalid_input" if invalid else None)
            # a model name or version as sent, bounded: the status travels in 16 KiB of metadata
            message = short_message(ex)
            log.info("gRPC %s %s: %s", method_name, code.name, message)
            await context.abort(code, message)
        else:
            await super().handle_exception(ex, request_or_iterator, context, method_name)


class _Undecodable:
    """What a request that is not its method's protobuf deserializes to (see :class:`_DecodeErrors`)."""


class _DecodeErrors(aio.ServerInterceptor):
    """A request that does not parse as its method's message gets INVALID_ARGUMENT naming the method
    (grpc-python answers UNKNOWN from inside its deserializer, before any interceptor sees the call)."""

    async def intercept_service(
        self,
        continuation: Callable[[HandlerCallDetails], Awaitable[RpcMethodHandler]],
        handler_call_details: HandlerCallDetails,
    ) -> RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler  # unknown methods (UNIMPLEMENTED) and streams: grpc's own answers
        parse, behaviour, method = handler.request_deserializer, handler.unary_unary, handler_call_details.method

        def deserialize(raw: bytes) -> Any:
            try:
                return parse(raw)
            except DecodeError:
                return _Undecodable()

        async def unary_unary(request: Any, context: ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                name = method.rsplit("/", 1)[-1]
                error = InvalidInput(f"the request is not a valid {name} message (protobuf that does not parse)")
                if name == "ModelInfer":
                    count_refusal(error, "v2-grpc", "client_error", "invalid_input")
                log.info("gRPC %s %s: %s", method, StatusCode.INVALID_ARGUMENT.name, error)
                await context.abort(StatusCode.INVALID_ARGUMENT, error.reason)
            return await behaviour(request, context)

        return handler._replace(request_deserializer=deserialize, unary_unary=unary_unary)


class GRPCServer(KServeGRPCServer):
    """KServe's gRPC server (same options and interceptors) serving :class:`_Servicer`."""

    async def start(self, max_workers: int) -> None:
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(_DecodeErrors(), LoggingInterceptor(), _ExceptionToStatus()),
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
