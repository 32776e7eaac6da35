"""What tritonclient asks a Triton server for beyond the protocol's core, answered for the served models: the model
configuration (``get_model_config``, as ``nfnet-hub triton`` would write it for this model) and the repository index
(``get_model_repository_index``). Every other HTTP error, a route that does not exist included, is answered in the
protocol's form, ``{"error": ...}``: FastAPI's ``{"detail": ...}`` left tritonclient unable to decode the answer."""
from __future__ import annotations

from typing import Any

_OPTIONAL = ("pixel_values", "image")  # a request gives one of them
NO_STATISTICS = ("statistics (Triton's extension) are not served: this server's are Prometheus metrics, over HTTP at "
                 "/metrics")


def model_config(model, *, max_delay_ms: float, instances: int) -> dict[str, Any]:
    """Triton's ``ModelConfig`` of a served model, in the JSON form Triton answers ``/config`` with."""
    alternatives = len([t for t in model.get_input_types() if t["name"] in _OPTIONAL]) > 1

    def tensor(t: dict, optional: bool = False) -> dict[str, Any]:
        kind = "STRING" if t["datatype"] == "BYTES" else t["datatype"]
        dims = t["shape"][1:]  # one element per batch item (an image's bytes) is Triton's dims [1] reshaped to []
        return {"name": t["name"], "data_type": f"TYPE_{kind}", "dims": dims or [1],
                **({} if dims else {"reshape": {"shape": []}}), **({"optional": True} if optional else {})}

    return {"name": model.name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
            "max_batch_size": model.max_batch_size,
            "input": [tensor(t, alternatives and t["name"] in _OPTIONAL) for t in model.get_input_types()],
            "output": [tensor(t) for t in model.get_output_types()],
            "dynamic_batching": {"max_queue_delay_microseconds": round(max_delay_ms * 1000)},
            "instance_group": [{"count": instances,
                                "kind": "KIND_GPU" if model.classifier.device == "cuda" else "KIND_CPU"}]}


def add_triton_routes(app, configs: dict[str, dict[str, Any]]) -> None:
    """``GET /v2/models/NAME/config`` (``configs``, by name; versions are resolved before, by ``InferenceGate``),
    ``POST /v2/repository/index``, ``/stats`` refused in words, and the protocol's error form for FastAPI's own
    errors."""
    from fastapi.responses import JSONResponse
    from kserve.errors import ModelNotFound
    from starlette.exceptions import HTTPException

    from .metrics import VERSION

    async def config(name: str):
        if name not in configs:
            raise ModelNotFound(name)
        return configs[name]

    async def index():
        return [{"name": name, "version": VERSION, "state": "READY"} for name in configs]

    async def stats(name: str):
        return JSONResponse({"error": NO_STATISTICS}, status_code=501)

    async def protocol_error(request, exc: HTTPException):
        message = (f"no such route: {request.method} {request.url.path}" if exc.status_code == 404 else
                   f"{request.method} is not allowed on {request.url.path}" if exc.status_code == 405 else
                   str(exc.detail))
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    app.add_api_route("/v2/models/{name}/config", config, methods=["GET"])
    app.add_api_route("/v2/models/{name}/stats", stats, methods=["GET"])
    app.add_api_route("/v2/repository/index", index, methods=["POST"])
    app.add_exception_handler(HTTPException, protocol_error)
