"""``nfnet-hub triton``: a model (a bundle folder, a Hub repository, an ONNX file nfnet-hub exported) as a Triton
Inference Server model repository entry.

Writes ``REPO/NAME/1/model.onnx``, ``REPO/NAME/config.pbtxt`` (batching, tensors read from the ONNX
file itself, instances, accelerator), ``REPO/NAME/labels.txt`` (Triton's classification extension)
and ``REPO/NAME/README.md`` with the ``tritonserver`` command. Other models in REPO are left alone.
"""
from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..bundle_files import ONNX_FILES
from ..errors import UsageError
from ..files import atomic_folder, check_writable_folder
from ..runtime import (
    config_labels,
    config_preprocess,
    file_config,
    parse_source,
    precision_file,
    read_bundle_config,
    resolve_files,
    split_revision,
)
from .server import check_model_name

_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 7: "TYPE_INT64", 6: "TYPE_INT32", 3: "TYPE_INT8",
          2: "TYPE_UINT8", 9: "TYPE_BOOL"}
_OURS = {"config.pbtxt", "labels.txt", "README.md", "1"}
_SIGNATURE = "Written by `nfnet-hub triton`"  # in the README of every model folder this command writes
ACCELERATORS = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str
    dims: list[int]  # without the batch dimension


def onnx_tensors(path: Path) -> tuple[list[Tensor], list[Tensor], dict[str, str]]:
    """Inputs and outputs of an ONNX file whose first dimension is a dynamic batch, and its metadata."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and onnx's own: a file that is not an ONNX model
        raise UsageError(f"{path} is not an ONNX model ({type(e).__name__}: {e})") from None
    graph = model.graph
    initializers = {i.name for i in graph.initializer}

    def tensors(values) -> list[Tensor]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            if not dims or t.shape.dim[0].HasField("dim_value"):
                raise UsageError(f"{path}: {v.name!r} has no dynamic batch dimension; re-export it with nfnet-hub")
            out.append(Tensor(v.name, _TYPES.get(t.elem_type, f"elem_type {t.elem_type}"), dims[1:]))
        return out
    return tensors(graph.input), tensors(graph.output), {p.key: p.value for p in model.metadata_props}


def model_config(name: str, inputs: list[Tensor], outputs: list[Tensor], *, max_batch_size: int,
                 max_delay_ms: float, instances: int, gpu: bool, accelerator: str, precision: str = "fp32",
                 threads: int | None = None) -> str:
    """``config.pbtxt`` text (Triton's ``ModelConfig`` message)."""
    def tensor(t: Tensor, extra: str = "") -> str:
        return f'  {{ name: "{t.name}" data_type: {t.data_type} dims: [ {", ".join(map(str, t.dims))} ]{extra} }}'
    lines = [f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {max_batch_size}",
             "input [", ",\n".join(tensor(t) for t in inputs), "]",
             "output [", ",\n".join(tensor(t, ' label_filename: "labels.txt"' if i == 0 else "")
                                    for i, t in enumerate(outputs)), "]",
             f"dynamic_batching {{ max_queue_delay_microseconds: {round(max_delay_ms * 1000)} }}",
             f"instance_group [ {{ count: {instances} kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]"]
    if threads:  # the ONNX Runtime backend's threads per instance (its default: a thread per core, per instance)
        lines.append(f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{threads}" }} }}')
    if gpu and accelerator == "tensorrt":
        mode = "FP16" if precision == "fp16" else "FP32"  # int8 models carry their own quantisation
        lines.append('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" '
                     f'parameters {{ key: "precision_mode" value: "{mode}" }} }} ] }} }}')
    return "\n".join(lines) + "\n"


def write_repository(source: str | Path, repo: str | Path, *, name: str | None = None, precision: str = "fp32",
                     max_batch_size: int = 32, max_delay_ms: float = 5.0, instances: int = 1, gpu: bool = False,
                     accelerator: str = "onnxruntime", threads: int | None = None, overwrite: bool = False) -> Path:
    """Add the model ``source`` names (as ``serve`` takes them) to the Triton model repository ``repo`` as
    ``name``; the model's folder. ``threads``: ONNX Runtime threads per instance (the machine Triton runs on decides
    its default, a thread per core for each instance)."""
    where, local = parse_source(str(source))
    path, repo = Path(where).expanduser(), Path(repo)
    if accelerator not in ACCELERATORS:
        raise UsageError(f"unknown accelerator {accelerator!r}: choose one of {', '.join(ACCELERATORS)}")
    if accelerator == "tensorrt" and not gpu:
        raise UsageError("--accelerator tensorrt needs --gpu (TensorRT runs on NVIDIA GPUs only)")
    if precision not in ONNX_FILES:
        raise UsageError(f"unknown precision {precision!r}: choose one of {', '.join(ONNX_FILES)}")
    filename = precision_file(str(source), precision)
    lone = local and path.is_file()
    fix = "choose another --name" if name else "give --name"
    name = name or (path.stem if lone else path.resolve().name if local else split_revision(where)[0].split("/")[1])
    check_model_name(name, fix)  # which also keeps the model's folder inside the repository
    target = repo / name
    if target.exists():
        if not overwrite:
            raise UsageError(f"{target} exists: pass --overwrite to replace it")
        if not _written_here(target):  # a Triton model folder of the user's looks like ours but for the README
            raise UsageError(f"refusing to replace {target}: it is not a model folder this command wrote")
    check_writable_folder(repo)
    onnx_file, config_file = resolve_files(str(source), filename=filename)
    inputs, outputs, metadata = onnx_tensors(onnx_file)
    config = read_bundle_config(config_file) if config_file is not None and config_file.is_file() \
        else file_config(onnx_file, metadata)
    preprocessing = config_preprocess(config).describe()
    labels = config_labels(config) or [str(i) for i in range(max(outputs[0].dims[-1:] or [0]))]  # as serve names them
    text = model_config(name, inputs, outputs, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms,
                        instances=instances, gpu=gpu, accelerator=accelerator, precision=precision, threads=threads)
    with atomic_folder(target, replace=overwrite) as tmp:
        (tmp / "1").mkdir()
        shutil.copyfile(onnx_file, tmp / "1" / "model.onnx")
        (tmp / "config.pbtxt").write_text(text)
        (tmp / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
        (tmp / "README.md").write_text(_readme(name, repo, inputs, outputs, gpu, preprocessing))
    return target


def _written_here(folder: Path) -> bool:
    try:
        return folder.is_dir() and {p.name for p in folder.iterdir()} <= _OURS and \
            (folder / "config.pbtxt").is_file() and _SIGNATURE in (folder / "README.md").read_text(errors="replace") \
            and [p.name for p in (folder / "1").iterdir()] == ["model.onnx"]
    except OSError:
        return False


def _readme(name: str, repo: Path, inputs: list[Tensor], outputs: list[Tensor], gpu: bool,
            preprocessing: str) -> str:
    shape = lambda t: "[N, " + ", ".join(map(str, t.dims)) + "]"  # noqa: E731
    where = str(repo.resolve())
    return (f"# {name} for Triton Inference Server\n\n{_SIGNATURE} from an nfnet-hub model. "
            f"Serve the repository with\n\n```\ntritonserver --model-repository={shlex.quote(where)}\n```\n\n"
            f"or in NVIDIA's container, `docker run --rm {'--gpus all ' if gpu else ''}-p8000:8000 -p8001:8001 "
            f"-v {shlex.quote(where + ':/models')} nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver "
            f"--model-repository=/models`.\n\nInput `{inputs[0].name}` {inputs[0].data_type} {shape(inputs[0])}: "
            f"images preprocessed with timm's eval transform as the model was trained ({preprocessing}). Output "
            f"`{outputs[0].name}` {outputs[0].data_type} {shape(outputs[0])}, with labels from labels.txt through "
            "the classification extension. The same "
            "Open Inference Protocol client works against `nfnet-hub serve` and KServe.\n")
