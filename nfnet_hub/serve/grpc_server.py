"""The same models over the protocol's gRPC API: KServe's servicer, bound to ``--host`` (KServe's own
gRPC server binds every interface), with the request-size limit and the request metrics of HTTP, and the model
configuration and repository index of Triton's gRPC API.

Triton's ``grpc_service.proto`` declares the messages of KServe's (package ``inference``, ``ServerLiveRequest`` ...),
so the two cannot load in one process: Triton's ``ModelConfig`` comes from tritonclient's ``model_config_pb2``
alone, and the two one-field messages around it are written here."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from grpc import aio
from grpc_interceptor.exceptions import NotFound, Unimplemented
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
            raise NotFound(error)  # a client's mistake: KServe's interceptor answers it and logs nothing
        response = await super().ModelMetadata(request, context)
        response.versions.append(VERSION)
        return response


def _triton_model_config() -> type:
    """Triton's ``ModelConfig`` message, loaded from tritonclient's file (its package imports the clashing messages)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("No module named 'tritonclient'", name="tritonclient")
    path = Path(spec.submodule_search_locations[0], "grpc", "model_config_pb2.py")
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_triton_model_config_pb2", path))
    module.__spec__.loader.exec_module(module)
    return module.ModelConfig


_MODEL_CONFIG = _triton_model_config()  # when serve imports this module, before it starts: a missing package is said


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field: a string or an embedded message."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


_SHARED_MEMORY = "shared memory (Triton's extension) is not served: send the tensors in the request"
_NOT_SERVED = {  # the rest of Triton's gRPC API, refused in words
    "ModelStatistics": NO_STATISTICS,
    **dict.fromkeys([f"{kind}SharedMemory{verb}" for kind in ("System", "Cuda")
                     for verb in ("Status", "Register", "Unregister")], _SHARED_MEMORY),
    "TraceSetting": "trace settings (Triton's extension) are not served",
    "LogSettings": "log settings (Triton's extension) are not served: the server logs to its standard output"}


class _TritonExtensions(grpc.GenericRpcHandler):
    """Triton's gRPC extensions that tritonclient calls and KServe's servicer lacks ("Method not found!"): the model
    configuration and the repository index, as HTTP answers them; the others are refused in words."""

    def __init__(self, configs: dict[str, dict[str, Any]]):
        # ModelConfigResponse {ModelConfig config = 1}: each model's, written once
        self.configs = {name: _field(1, json_format.ParseDict(config, _MODEL_CONFIG()).SerializeToString())
                        for name, config in configs.items()}

    def service(self, details):
        service, _, method = details.method.rpartition("/")
        if service != "/inference.GRPCInferenceService":
            return None
        if method == "ModelConfig":  # Triton's ModelConfigRequest has the fields of KServe's ModelMetadataRequest
            return grpc.unary_unary_rpc_method_handler(self.config,
                                                       request_deserializer=pb.ModelMetadataRequest.FromString)
        if method == "RepositoryIndex":
            return grpc.unary_unary_rpc_method_handler(self.index)
        if method == "ModelStreamInfer":
            return grpc.stream_stream_rpc_method_handler(_no_stream)
        return grpc.unary_unary_rpc_method_handler(_refusal(_NOT_SERVED[method])) if method in _NOT_SERVED else None

    async def config(self, request, context) -> bytes:
        if request.name not in self.configs:
            raise NotFound(f"Model with name {request.name} does not exist.")
        if error := version_error(request.name, request.version):
            raise NotFound(error)
        return self.configs[request.name]

    async def index(self, request, context) -> bytes:
        # RepositoryIndexResponse {repeated ModelIndex models = 1}; ModelIndex {name = 1, version = 2, state = 3}
        return b"".join(_field(1, _field(1, name.encode()) + _field(2, VERSION.encode()) + _field(3, b"READY"))
                        for name in self.configs)


def _refusal(message: str):
    async def refuse(request, context):
        raise Unimplemented(message)
    return refuse


async def _no_stream(requests, context):
    raise Unimplemented("streaming inference (Triton's extension) is not served: send each request with ModelInfer")
    yield  # an async generator: a stream is answered with a stream


def grpc_server(dataplane, repository_extension, *, host: str, port: int, max_message_bytes: int,
                configs: dict[str, dict[str, Any]]) -> aio.Server:
    """The gRPC server of the models whose Triton configurations ``configs`` holds, by name."""
    models = set(configs)
    server = aio.server(interceptors=(_Metrics(models), ExceptionToStatusInterceptor()),
                        options=[("grpc.max_receive_message_length", max_message_bytes),
                                 ("grpc.max_send_message_length", -1)])
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        _Servicer(dataplane, repository_extension, models), server)
    server.add_generic_rpc_handlers((_TritonExtensions(configs),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:
        raise UsageError(f"cannot listen for gRPC on {address}: {e}") from None
    return server
