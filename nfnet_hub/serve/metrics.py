"""Prometheus metrics of the server, the request-size limit, compressed requests and model versions, as one ASGI
middleware.

The metrics go to prometheus_client's default registry, which KServe's ``/metrics`` route exposes
beside its own. The middleware sees every inference request, including those KServe refuses before
the model runs (malformed JSON, an unknown model), so failures are counted wherever they happen.
Each model is served as version 1, as ``nfnet-hub triton`` numbers it, so that a client that names
Triton's version (``/v2/models/NAME/versions/1/infer``) works here too; KServe refuses every version.
"""
from __future__ import annotations

import json
import re
import time
import zlib

from prometheus_client import Counter, Histogram

_LATENCY = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
_MODEL = ["model"]
REQUESTS = Counter("nfnet_hub_requests", "inference requests received", _MODEL)
FAILURES = Counter("nfnet_hub_request_failures", "inference requests answered with an error", _MODEL + ["code"])
REQUEST_SECONDS = Histogram("nfnet_hub_request_seconds", "inference request latency, body to answer", _MODEL,
                            buckets=_LATENCY)
QUEUE_SECONDS = Histogram("nfnet_hub_queue_seconds", "time a request waited for its batch to start", _MODEL,
                          buckets=_LATENCY)
COMPUTE_SECONDS = Histogram("nfnet_hub_compute_seconds", "ONNX Runtime time per batch", _MODEL, buckets=_LATENCY)
BATCH_SIZE = Histogram("nfnet_hub_batch_size", "rows per batch run by ONNX Runtime", _MODEL,
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))

_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$")
_VERSIONED = re.compile(r"^/v2/models/([^/]+)/versions/([^/]+)(/.*)?$")
VERSION = "1"  # the one version of every model


def version_error(model: str, version: str) -> str | None:
    """Why a request for ``version`` of ``model`` cannot be answered, if it cannot ("" names no version)."""
    return None if version in ("", VERSION) else f"model {model} is served as version {VERSION} only, not {version}"


def observer(model: str):
    """The ``observe`` callback of one model's batcher."""
    queue, compute, size = QUEUE_SECONDS.labels(model), COMPUTE_SECONDS.labels(model), BATCH_SIZE.labels(model)

    def observe(queue_seconds: list[float], compute_seconds: float, rows: int) -> None:
        for q in queue_seconds:
            queue.observe(q)
        compute.observe(compute_seconds)
        size.observe(rows)
    return observe


class InferenceGate:
    """ASGI middleware: refuses request bodies above ``max_body_bytes`` and counts inference requests."""

    def __init__(self, app, *, max_body_bytes: int, models: set[str]):
        self.app, self.max_body_bytes, self.models = app, max_body_bytes, models

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body above the server's limit of {self.max_body_bytes / 2**20:g} MiB (--max-request-mb)"
        match = _INFER.match(scope.get("path", ""))
        model = match and (match.group(1) if match.group(1) in self.models else "(unknown)")  # bounded labels
        if model:
            REQUESTS.labels(model).inc()
        versioned = _VERSIONED.match(scope.get("path", ""))
        if versioned:  # an unknown model's, too: KServe's 404 for the model, not its 501 for versions
            name, version, rest = versioned.group(1), versioned.group(2), versioned.group(3) or ""
            if name in self.models and (error := version_error(name, version)):
                if model:
                    FAILURES.labels(model, "404").inc()
                return await _error(send, 404, error)
            scope = dict(scope, path=f"/v2/models/{name}{rest}", raw_path=f"/v2/models/{name}{rest}".encode())
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            if model:
                FAILURES.labels(model, "400").inc()
            return await _error(send, 400, too_big)
        if not model:
            return await self.app(scope, receive, send)
        # The protocol's body is JSON unless that header says where JSON ends and binary data begins, whatever
        # the content type says (tritonclient and curl -d do not say application/json, which FastAPI needs).
        binary = b"inference-header-content-length" in dict(scope["headers"])
        scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-type"]
                     + [(b"content-type", b"application/octet-stream" if binary else b"application/json")])
        started, status = time.perf_counter(), [500]
        body = bytearray()  # read here, bounded, whether or not the client sent a Content-Length
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                FAILURES.labels(model, "400").inc()
                return await _error(send, 400, too_big)
            if not message.get("more_body"):
                break
        if encoding := dict(scope["headers"]).get(b"content-encoding", b"").decode("latin-1").strip().lower():
            try:
                body = decompressed(bytes(body), encoding, self.max_body_bytes)
            except ValueError as e:
                FAILURES.labels(model, "400").inc()
                return await _error(send, 400, str(e))
            if len(body) > self.max_body_bytes:
                FAILURES.labels(model, "400").inc()
                return await _error(send, 400, too_big)
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"]
                                         if k not in (b"content-encoding", b"content-length")]
                         + [(b"content-length", str(len(body)).encode())])
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        async def record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, replay, record)
        finally:
            REQUEST_SECONDS.labels(model).observe(time.perf_counter() - started)
            if status[0] >= 400:
                FAILURES.labels(model, str(status[0])).inc()


def decompressed(body: bytes, encoding: str, limit: int) -> bytes:
    """A body sent with ``Content-Encoding`` gzip or deflate (tritonclient's ``request_compression_algorithm``,
    which Triton takes), decompressed no further than ``limit`` + 1 bytes: a small body may expand beyond any limit."""
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ValueError(f"Content-Encoding {encoding!r}: this server takes gzip and deflate bodies, as Triton does")
    inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)  # a gzip or zlib header, whichever the body has
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise ValueError(f"the body is not {encoding} data, as its Content-Encoding says ({e})") from None
    if len(out) > limit:
        return out
    if not inflater.eof:
        raise ValueError(f"the {encoding} body ends before its data do (truncated?)")
    return out


async def _error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
