"""The ``serve`` and ``triton`` commands: their options and what they call (heavy imports stay inside)."""
from __future__ import annotations

import argparse
import shlex

from ..argtypes import non_negative_float, port, positive, positive_float

PRECISIONS = ("fp32", "fp16", "int8")


def _batching(s: argparse.ArgumentParser, instances: str) -> None:
    s.add_argument("--precision", choices=PRECISIONS, default="fp32", help="which of the bundle's ONNX models")
    s.add_argument("--max-batch-size", type=positive, default=32, help="most rows run as one batch (and per request)")
    s.add_argument("--max-delay-ms", type=non_negative_float, default=5.0,
                   help="how long the first request of a batch waits for others")
    s.add_argument(instances, type=positive, default=1, help="batches run at once (Triton's instance_group count)")


def add_serve_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("source", help="a bundle folder, a folder of bundle folders (one model each, named after its "
                   "folder), a Hub repo id ORG/NAME[@REVISION] (through huggingface_hub's cache) or an ONNX file that "
                   "nfnet-hub exported")
    s.add_argument("--name", help="model name in URLs (default: the bundle folder's, the repo's or the ONNX "
                   "file's name)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=port, default=8080, help="HTTP port")
    s.add_argument("--grpc-port", type=port, help="also serve the protocol's gRPC API on this port (default: off)")
    _batching(s, "--workers")
    s.add_argument("--threads", type=positive, help="ONNX Runtime threads per batch (default: the CPUs this process "
                   "may use, container limits included, shared by the --workers batches; ONNX Runtime's own, one per "
                   "core, where one batch has the whole machine)")
    s.add_argument("--max-request-mb", type=positive_float, default=64.0,
                   help="largest request body, in MiB; larger ones get HTTP 400")
    s.add_argument("--max-image-pixels", type=positive, default=89_478_485,
                   help="largest image (width x height) an 'image' input may hold; larger ones get HTTP 400 before "
                   "they are decoded (default: Pillow's limit, 268 MB decoded; a request decodes one image at a time)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA where onnxruntime-gpu can use it, else CPU")
    s.add_argument("--grace-period", type=positive, default=30, help="seconds SIGTERM waits for in-flight requests")


def add_triton_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("source", help="a bundle folder, a Hub repo id ORG/NAME[@REVISION] (through huggingface_hub's "
                   "cache) or an ONNX file that nfnet-hub exported")
    s.add_argument("--out", required=True, help="Triton model repository to add the model to (created if needed)")
    s.add_argument("--name", help="model name (default: the bundle folder's, the repo's or the ONNX file's name)")
    _batching(s, "--instances")
    s.add_argument("--threads", type=positive, help="ONNX Runtime threads per instance, Triton's intra_op_thread_count "
                   "(default: the backend's, a thread per core of the machine for each instance: give the CPUs of the "
                   "container over --instances)")
    s.add_argument("--gpu", action="store_true", help="run on GPUs (KIND_GPU; ONNX Runtime's CUDA provider)")
    s.add_argument("--accelerator", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                   help="with --gpu: tensorrt runs the model through TensorRT inside ONNX Runtime")
    s.add_argument("--overwrite", action="store_true", help="replace a model folder this command wrote before")


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import ServeOptions, serve

    providers = {"auto": None, "cpu": ["CPUExecutionProvider"],
                 "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}[args.device]
    options = ServeOptions(host=args.host, port=args.port, precision=args.precision, max_batch_size=args.max_batch_size,
                           max_delay_ms=args.max_delay_ms, instances=args.workers, threads=args.threads,
                           max_request_mb=args.max_request_mb, max_image_pixels=args.max_image_pixels,
                           grace_period_s=args.grace_period, grpc_port=args.grpc_port)
    serve(args.source, name=args.name, options=options, providers=providers,
          log=lambda line: print(line, flush=True), require_cuda=args.device == "cuda")
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    from .triton import write_repository

    folder = write_repository(args.source, args.out, name=args.name, precision=args.precision,
                              max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms,
                              instances=args.instances, gpu=args.gpu, accelerator=args.accelerator,
                              threads=args.threads, overwrite=args.overwrite)
    print(f"wrote {folder} (config.pbtxt, 1/model.onnx, labels.txt); serve it with: "
          f"tritonserver --model-repository={shlex.quote(str(folder.parent.resolve()))}")
    return 0
