"""The same models over the protocol's gRPC API: KServe's servicer, bound to ``--host`` (KServe's own
gRPC server binds every interface), with the request-size limit and the request metrics of HTTP."""
from __future__ import annotations

import time

import grpc
from grpc import aio
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer

from ..errors import UsageError
from .extensions import NO_STATISTICS
from .metrics import FAILURES, REQUEST_SECONDS, REQUESTS, VERSION, version_error


class _Metrics(aio.ServerInterceptor):
    """Counts and times ``ModelInfer`` calls under the metric names HTTP requests use, and refuses versions other
    than the one served, as HTTP does (KServe's servicer would answer any)."""

    def __init__(self, models: set[str]):
        self.models = models

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.endswith("/ModelInfer"):
            return handler
        inner = handler.unary_unary

        async def timed(request, context):
            model = request.model_name if request.model_name in self.models else "(unknown)"
            REQUESTS.labels(model).inc()
            started = time.perf_counter()
            try:
                if model != "(unknown)" and (error := version_error(model, request.model_version)):
                    await context.abort(grpc.StatusCode.NOT_FOUND, error)
                return await inner(request, context)
            except BaseException:
                code = context.code()
                FAILURES.labels(model, getattr(code, "name", "UNKNOWN")).inc()
                raise
            finally:
                REQUEST_SECONDS.labels(model).observe(time.perf_counter() - started)
        return grpc.unary_unary_rpc_method_handler(timed, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


class _Servicer(InferenceServicer):
    """KServe's servicer, answering for the one version served as HTTP does: a model's metadata lists it, and
    another version is not ready and has no metadata (KServe's lists none, and answers for any)."""

    def __init__(self, dataplane, repository_extension, models: set[str]):
        super().__init__(dataplane, repository_extension)
        self.models = models

    def _version_error(self, request) -> str | None:
        return version_error(request.name, request.version) if request.name in self.models else None

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=False) if self._version_error(request) else \
            await super().ModelReady(request, context)

    async def ModelMetadata(self, request, context):
        if error := self._version_error(request):
            await context.abort(grpc.StatusCode.NOT_FOUND, error)
        response = await super().ModelMetadata(request, context)
        response.versions.append(VERSION)
        return response


_OVER_HTTP = {  # Triton's gRPC extensions that tritonclient calls, which KServe's servicer lacks ("Method not found!")
    "ModelConfig": "the model configuration (Triton's extension) is served over HTTP only: GET /v2/models/NAME/config",
    "RepositoryIndex": "the repository index (Triton's extension) is served over HTTP only: POST /v2/repository/index",
    "ModelStatistics": NO_STATISTICS}


class _ServedOverHttp(grpc.GenericRpcHandler):
    """Says where what tritonclient asks for over gRPC is served instead."""

    def service(self, details):
        service, _, method = details.method.rpartition("/")
        if service != "/inference.GRPCInferenceService" or method not in _OVER_HTTP:
            return None

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, _OVER_HTTP[method])
        return grpc.unary_unary_rpc_method_handler(refuse)


def grpc_server(dataplane, repository_extension, *, host: str, port: int, max_message_bytes: int,
                models: set[str]) -> aio.Server:
    server = aio.server(interceptors=(_Metrics(models), ExceptionToStatusInterceptor()),
                        options=[("grpc.max_receive_message_length", max_message_bytes),
                                 ("grpc.max_send_message_length", -1)])
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        _Servicer(dataplane, repository_extension, models), server)
    server.add_generic_rpc_handlers((_ServedOverHttp(),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:
        raise UsageError(f"cannot listen for gRPC on {address}: {e}") from None
    return server
