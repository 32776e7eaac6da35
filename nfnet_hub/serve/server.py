"""``nfnet-hub serve``: bundles behind KServe's model server, speaking the Open Inference Protocol v2.

KServe's Python server (FastAPI + uvicorn) gives the protocol: health, metadata, JSON and Triton's
binary tensor extension, ``{"error": ...}`` answers, ``/metrics``. nfnet-hub adds the models, a batcher
per model, its own metrics and the request-size limit. uvicorn drains in-flight requests on SIGTERM.
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..bundle_files import ONNX_FILES
from ..errors import UsageError
from ..runtime import OnnxClassifier, no_model_at, parse_source, precision_file, refuse_unexported, split_revision

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_model_name(name: str, fix: str) -> None:
    """A model name that the protocol's URLs (/v2/models/NAME/infer) carry as it is, and a folder name (Triton's)."""
    if not _NAME.match(name):
        raise UsageError(f"{name!r} cannot be a model name in a URL (letters, digits, '_', '.', '-'): {fix}")


@dataclass(frozen=True)
class ServeOptions:
    """How models are served (the CLI's options, with the same defaults)."""

    host: str = "127.0.0.1"
    port: int = 8080
    precision: str = "fp32"
    max_batch_size: int = 32
    max_delay_ms: float = 5.0
    instances: int = 1
    threads: int | None = None
    max_request_mb: float = 64.0
    max_image_pixels: int = 89_478_485  # Pillow's MAX_IMAGE_PIXELS: an 'image' above it is refused, not decoded
    grace_period_s: int = 30
    grpc_port: int | None = None  # the protocol's gRPC API too, on this port


def cpu_budget(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may keep busy: its affinity, capped by a container's CPU limit (cgroup v2's cpu.max,
    v1's CFS quota), which ONNX Runtime does not read."""
    budget = len(os.sched_getaffinity(0))
    for quota, period in ((cgroup / "cpu.max", None), (cgroup / "cpu" / "cpu.cfs_quota_us",
                                                       cgroup / "cpu" / "cpu.cfs_period_us")):
        try:
            fields = quota.read_text().split()
            limit, per = fields[0], fields[1] if period is None else period.read_text().strip()
            if limit not in ("max", "-1"):
                return max(1, min(budget, int(limit) // int(per)))
        except (OSError, ValueError, IndexError):
            continue
    return budget


def default_threads(instances: int, cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """ONNX Runtime threads per batch without --threads: the process's CPUs shared by the batches that run at once.
    None (ONNX Runtime's own choice, a thread per core of the machine) where one batch has the whole machine; in a
    pod limited to 4 of a node's 64 cores that choice would run 64 threads on 4 CPUs' time, throttled."""
    budget = cpu_budget(cgroup)
    return None if instances == 1 and budget >= (os.cpu_count() or 1) else max(1, budget // instances)


def _is_bundle(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / f).is_file() for f in ONNX_FILES.values())


def find_bundles(source: str, *, name: str | None = None, log: Callable = print) -> dict[str, str]:
    """Model names and where their bundles are: one bundle folder, a folder of bundle folders (each served
    under its folder's name; other visible folders are named in the log), a Hub repo id (served under its
    name part), or an ONNX file nfnet-hub exported (served under its name less ``.onnx``)."""
    source, local = parse_source(source)
    path = Path(source).expanduser()
    if not local:
        found = {name or split_revision(source)[0].split("/")[1]: source}
    elif path.is_file() and path.suffix.lower() == ".onnx":
        found = {name or path.stem: str(path)}
    elif not path.is_dir():
        if path.is_file():
            refuse_unexported(path, source)
            raise UsageError(f"no bundle folder at {source} (give the folder that holds the bundle's files, or an "
                             ".onnx file)")
        raise no_model_at(source)
    elif _is_bundle(path):
        found = {name or path.resolve().name: str(path)}
    else:
        folders = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        found = {p.name: str(p) for p in folders if _is_bundle(p)}
        if not found:
            refuse_unexported(path, source)
            raise UsageError(f"{source} is neither a bundle folder (config.json and model.onnx) nor a folder of them")
        if name:
            raise UsageError(f"--name names one model, but {source} holds {len(found)} bundles, each served under "
                             "its folder's name")
        for p in folders:
            if p.name not in found:
                log(f"note: {p} is not a bundle (config.json and model*.onnx): not served")
    for model_name in found:
        check_model_name(model_name, "choose another --name" if name else "give --name" if len(found) == 1 else
                         "rename its folder")
    return found


def load_classifiers(bundles: dict[str, str], options: ServeOptions, *, providers=None,
                     require_cuda: bool = False, log: Callable = print) -> dict[str, OnnxClassifier]:
    """An ONNX Runtime session per bundle, opened and run once (the first run allocates)."""
    import onnxruntime as ort

    if require_cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UsageError("--device cuda: this ONNX Runtime has no CUDA provider (install nfnet-hub[serve,gpu], which "
                         f"brings onnxruntime-gpu); it has {', '.join(ort.get_available_providers())}")
    classifiers, threads = {}, options.threads or default_threads(options.instances)
    if threads and not options.threads:
        log(f"ONNX Runtime threads per batch: {threads} ({cpu_budget()} CPUs for this process, {options.instances} "
            "batch(es) at once; --threads chooses)")
    for model_name, where in bundles.items():
        filename = precision_file(where, options.precision)
        clf = OnnxClassifier.from_pretrained(where, filename=filename, providers=providers, threads=threads)
        h, w = clf.preprocess.input_size
        clf.logits(np.zeros((1, clf.preprocess.channels, h, w), np.float32))
        snapshot = clf.model_path.parent  # huggingface_hub's cache: snapshots/COMMIT/FILE
        commit = f" at commit {snapshot.name}" if not parse_source(where)[1] and snapshot.parent.name == "snapshots" \
            else ""
        log(f"model {model_name}: {where}{commit} ({filename}, {clf.device}), input {clf.preprocess.channels}x{h}x{w}, "
            f"{len(clf.labels)} classes, {clf.preprocess.describe()}")
        classifiers[model_name] = clf
    return classifiers


def load_models(bundles: dict[str, str], options: ServeOptions, *, providers=None, require_cuda: bool = False,
                log: Callable = print) -> list:
    """One ``BundleModel`` per bundle. The sessions open in a thread while KServe is imported (about 0.7 s)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(load_classifiers, bundles, options, providers=providers, require_cuda=require_cuda,
                              log=log)
        from .model import BundleModel

        classifiers = loading.result()
    # Two threads per CPU decode images (one alone left 10% of the throughput of 640x480 JPEGs on 2 CPUs): asyncio's
    # default pool, up to 32 threads however few CPUs a container has, would hold more images of up to
    # max_image_pixels in memory at once, not decode them faster.
    decoder = ThreadPoolExecutor(2 * cpu_budget(), thread_name_prefix="decode")
    return [BundleModel(name, clf, max_batch_size=options.max_batch_size, max_delay_ms=options.max_delay_ms,
                        instances=options.instances, max_image_pixels=options.max_image_pixels, decoder=decoder)
            for name, clf in classifiers.items()]


def _check_port(host: str, port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"port {port!r} is not a TCP port (1 to 65535)")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(source: str, *, name: str | None = None, options: ServeOptions = ServeOptions(), providers=None,
          require_cuda: bool = False, log: Callable = print) -> None:
    """Serve the bundles of ``source`` until SIGTERM or Ctrl-C, then drain in-flight requests and return."""
    if options.precision not in ONNX_FILES:
        raise UsageError(f"unknown precision {options.precision!r}: choose one of {', '.join(ONNX_FILES)}")
    if not (isinstance(options.max_request_mb, int | float) and 0 < options.max_request_mb < float("inf")):
        raise UsageError(f"max_request_mb {options.max_request_mb!r} would refuse every request: give a size in MiB "
                         "above 0")
    if isinstance(options.max_image_pixels, bool) or not isinstance(options.max_image_pixels, int) \
            or options.max_image_pixels < 1:
        raise UsageError(f"max_image_pixels {options.max_image_pixels!r} must be a pixel count above 0")
    if options.grpc_port == options.port:
        raise UsageError(f"--grpc-port {options.grpc_port} is the HTTP port: give another")
    for port in (options.port, options.grpc_port):
        if port is not None:
            _check_port(options.host, port)
    bundles = find_bundles(source, name=name, log=log)
    models = load_models(bundles, options, providers=providers, require_cuda=require_cuda, log=log)
    rest, make_grpc = _servers(models, options)
    base = f"http://{options.host}:{options.port}"
    where = f"{base}/v2/models/{models[0].name if len(models) == 1 else 'NAME'}/infer"
    log(f"serving {', '.join(m.name for m in models)} at {where} (Open Inference Protocol v2"
        + (f"; gRPC on port {options.grpc_port}" if make_grpc else "") + f"), metrics at {base}/metrics; batches of up "
        f"to {options.max_batch_size} within {options.max_delay_ms:g} ms, {options.instances} at a time")
    import asyncio
    import signal
    import warnings

    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")  # KServe's choice, not the user's
    # Each image is held to max_image_pixels from its header (BundleModel); Pillow's own check would warn, or refuse,
    # by its limit instead.
    Image.MAX_IMAGE_PIXELS = None
    _client_errors_in_one_line()
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again for the handler it found: make that
    # one a no-op, so that a drained server exits 0 rather than dying of the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)

    async def run():
        grpc = make_grpc() if make_grpc else None  # gRPC's server belongs to the loop it is made in
        if grpc is not None:
            await grpc.start()
        try:
            await rest.start()  # returns once SIGTERM has drained HTTP
        finally:
            if grpc is not None:
                await grpc.stop(grace=options.grace_period_s)
    try:
        asyncio.run(run())
    finally:
        for model in models:
            model.stop()
    log("stopped: in-flight requests answered")


def _client_errors_in_one_line() -> None:
    """KServe logs a client's mistake (a bad request, an unknown model) with a traceback, over REST as a bare
    "Exception:": one line that says what was refused is enough; the server's own errors keep their tracebacks."""
    import logging

    from kserve.errors import InvalidInput, ModelNotFound
    from kserve.logging import logger

    from .repository import ModelControlRefused

    kinds = {InvalidInput: "bad request", ModelNotFound: "unknown model", ModelControlRefused: "model control",
             NotImplementedError: "not served"}  # KServe's v1 :explain, which no bundle has

    def one_line(record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if kind := next((kind for cls, kind in kinds.items() if isinstance(error, cls)), None):
            record.msg, record.args = f"{kind}, refused: {error}", ()
            record.exc_info = record.exc_text = None
        return True
    logger.addFilter(one_line)


def _servers(models: list, options: ServeOptions):
    """KServe's REST server over these models, bound to ``options.host`` (KServe binds every interface), and
    what makes the gRPC server, where asked for."""
    from fastapi.exceptions import RequestValidationError
    from kserve.model_repository import ModelRepository
    from kserve.model_server import app  # imported (sys.argv set aside) by .model, which every caller loads first
    from kserve.protocol.rest.server import RESTServer

    from .binary import BinaryDataPlane
    from .extensions import add_triton_routes, model_config
    from .metrics import InferenceGate
    from .repository import FixedModels

    repository = ModelRepository()
    for model in models:
        repository.update(model)
    dataplane = BinaryDataPlane(model_registry=repository)
    extension = FixedModels(model_registry=repository)
    rest = RESTServer("kserve.model_server:app", dataplane, extension, options.port,
                      grace_period=options.grace_period_s)
    rest.config.host = options.host
    rest.config.access_log = False
    app.add_exception_handler(RequestValidationError, _invalid_body)
    configs = {m.name: model_config(m, max_delay_ms=options.max_delay_ms, instances=options.instances) for m in models}
    add_triton_routes(app, configs)
    limit = int(options.max_request_mb * 2**20)
    app.add_middleware(InferenceGate, max_body_bytes=limit, models=set(configs))
    if options.grpc_port is None:
        return rest, None
    from .grpc_server import grpc_server

    return rest, lambda: grpc_server(dataplane, extension, host=options.host, port=options.grpc_port,
                                     max_message_bytes=limit, configs=configs)



async def _invalid_body(request, exc):
    """A body that is not a protocol request (malformed JSON, missing fields): the protocol's 400, not
    FastAPI's 422."""
    from fastapi.responses import JSONResponse

    where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())[1:])) or 'body'}: {e.get('msg', '')}"
                      for e in exc.errors()[:3])
    return JSONResponse({"error": f"not an inference request ({where})"}, status_code=400)
