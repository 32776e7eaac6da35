"""ONNX export of folded NFNets: fp32, fp16 and int8, each verified before it is written.

A written ``model.onnx`` is one self-contained file (no external data) with a dynamic batch
dimension, a stated opset, and metadata carrying the preprocessing and label names, so a
runtime needs nothing else. Verification: the ONNX checker (full check), a clean-graph check
(no weight-standardisation ops, no Identity, no per-inference work on weights), and ONNX Runtime
outputs against the PyTorch model at two batch sizes. A failed check raises ``ExportError``
with the numbers and leaves no file behind.

int8 (``int8.py``) computes the same integers on every x86 CPU and reports its top-1 agreement with
fp32 on held-out calibration images; below ``min_agreement`` it is refused unless forced.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from .classes import not_utf8
from .errors import ExportError, UsageError, folder_given
from .export_limits import DEFAULT_OPSET, MIN_AGREEMENT, TOLERANCE, check_opset
from .files import write_atomically
from .folding import FoldedNFNet, fold
from .int8 import agreement, check_no_saturation, quantize_int8, split_calibration
from .onnx_graph import Fp32Graph, HalfPrecision, check_clean, to_onnx
from .preprocess import Preprocess, data_config, export_size, readable_labels

__all__ = ["DEFAULT_OPSET", "PRECISIONS", "ExportError", "ExportReport", "ValidationReport", "export_onnx",
           "onnx_logits", "validate_onnx"]

PRECISIONS = ("fp32", "fp16", "int8")
VERIFY_BATCHES = (1, 3)


@dataclass
class ExportReport:
    """What was exported and how it verified."""

    path: str
    precision: str
    opset: int
    img_size: tuple[int, int]
    nodes: int
    op_counts: dict[str, int]
    file_bytes: int
    weight_bytes: int
    max_abs_error: float
    max_rel_error: float
    verify_batches: tuple[int, ...] = VERIFY_BATCHES
    seconds: float = 0.0
    blocks: int = 0
    branches_folded_away: int = 0  # residual branches with a zero skip gain (untrained weights)
    int8: dict[str, Any] | None = None  # top-1 agreement with fp32 on held-out calibration images
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def onnx_logits(session: Any, batch: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: batch.astype(np.float32)})[0]


def _compare(proto: bytes, reference: nn.Module, shape: tuple[int, int, int], opset: int, seed: int = 0):
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types
        raise ExportError(f"ONNX Runtime {ort.__version__} cannot run the opset {opset} export "
                          f"({str(e).splitlines()[0][:200]}); choose a lower --opset") from None
    rng = np.random.default_rng(seed)
    max_abs = max_rel = 0.0
    for n in VERIFY_BATCHES:
        x = rng.standard_normal((n, *shape)).astype(np.float32)
        with torch.no_grad():
            ref = reference(torch.from_numpy(x)).float().numpy()
        out = onnx_logits(session, x)
        if out.shape != ref.shape or not np.isfinite(out).all():
            raise ExportError(f"ONNX Runtime output at batch {n}: shape {out.shape}, finite {np.isfinite(out).all()}; "
                              f"expected {ref.shape}")
        err = float(np.abs(out - ref).max())
        max_abs, max_rel = max(max_abs, err), max(max_rel, err / max(float(np.abs(ref).max()), 1e-12))
    return max_abs, max_rel


@contextlib.contextmanager
def reference_model(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` as an export computes and checks it: in eval mode, on the CPU, in float32. The caller's model is
    left as it was: its mode is restored, and a bf16, fp16 or GPU model is copied (float32 holds its weights
    exactly). A ``torch.compile`` wrapper gives its eager module: the export folds that, and compiling it only to check
    the export would take minutes on a CPU."""
    model = getattr(model, "_orig_mod", model)
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_floating_point() and (t.dtype != torch.float32 or t.device.type != "cpu") for t in tensors):
        yield copy.deepcopy(model).to("cpu", torch.float32).eval()
        return
    was_training = model.training
    try:
        yield model.eval()
    finally:
        model.train(was_training)


def available_memory(cgroup: Path = Path("/sys/fs/cgroup"), meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes this process can still allocate: the system's available memory, capped by a container's limit
    (cgroup v2); None where neither can be read."""
    free = []
    try:
        lines = meminfo.read_text().splitlines()
        free += [int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(free) if free else None


def _check_memory(model: nn.Module, shape: tuple[int, int, int]) -> None:
    """Refuse a size whose verification cannot fit in memory (the kernel would kill the process without a word):
    the largest activation at the largest verification batch, with the input it came from, is a lower bound.
    Shapes come from fake tensors: nothing is computed or allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    largest = 0

    def record(_module: nn.Module, args: tuple, output: Any) -> None:
        nonlocal largest
        tensors = [t for t in (*args, output) if isinstance(t, torch.Tensor)]
        largest = max(largest, sum(t.numel() for t in tensors))

    hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            model(torch.empty(1, *shape))
    except Exception:  # a model fake tensors cannot run: left to the export itself (this is a guard only)
        return
    finally:
        for h in hooks:
            h.remove()
    needed, free = largest * 4 * max(VERIFY_BATCHES), available_memory()
    if free is not None and needed > free:
        raise UsageError(f"verifying an export at {shape[1]}x{shape[2]} px needs at least {needed / 2**30:.1f} GiB "
                         f"(one layer at batch {max(VERIFY_BATCHES)}), more than the {free / 2**30:.1f} GiB free here: "
                         "export at a smaller size (--img-size)")


def _check_target(out: Path) -> None:
    """Refuse to replace what nfnet-hub did not write: a folder, or a file that is not our ONNX."""
    if out.is_dir():
        raise UsageError(f"{out} is a folder: give a file name (--filename) for the ONNX model")
    if out.exists():
        with out.open("rb") as f:
            head = f.read(64)
        if b"nfnet-hub" not in head:
            raise UsageError(f"{out} exists and was not written by nfnet-hub: move it away or choose another name")


def export_onnx(model: nn.Module, out: str | os.PathLike, *, img_size: int | tuple[int, int] | None = None,
                precision: str = "fp32",
                opset: int = DEFAULT_OPSET, label_names: Sequence[str] | None = None,
                calibration: np.ndarray | None = None, min_agreement: float = MIN_AGREEMENT,
                force: bool = False, fp32_graph: Fp32Graph | None = None) -> ExportReport:
    """Fold ``model``, export it to ONNX at ``precision``, verify it, then write ``out`` (a file path).

    ``img_size``: the input size, one side or (height, width) (default: the model's test size). ``label_names``
    default to the class names in the model's ``pretrained_cfg`` (a training checkpoint records them).
    ``calibration``: preprocessed NCHW float32 images for int8 static quantisation (required for int8); every fifth
    is held out to measure top-1 agreement with fp32, and an export below ``min_agreement`` is refused unless
    ``force``. ``fp32_graph`` (one ``Fp32Graph()`` kept across the exports of a model) spares int8 the second
    export of the graph that fp32 exported.
    """
    start = time.perf_counter()
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    channels = getattr(model, "in_chans", 3)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(model, FoldedNFNet) and img_size is None:  # already folded: at the size it was folded for
        img_size = model.img_size
    hw = export_size(cfg, img_size)
    held_out = None
    if precision == "int8":
        if calibration is None or len(calibration) == 0:
            raise UsageError("int8 export needs calibration images (preprocessed NCHW float32)")
        calibration = np.asarray(calibration, np.float32)
        if calibration.ndim != 4 or calibration.shape[1:] != (channels, *hw):
            raise UsageError(f"calibration images of shape {calibration.shape[1:]} for an export at {hw[0]}x{hw[1]}: "
                             f"preprocess them at the export size and channels ({channels}, H, W)")
        calibrate_on, held_out = split_calibration(calibration)
    check_opset(opset)
    num_classes = getattr(model, "num_classes", 0)
    if hasattr(model, "num_classes") and not num_classes:  # predict, serve and the Hub would read features as scores
        name = cfg.get("architecture", type(model).__name__)
        raise UsageError(f"{name} has no classifier (num_classes=0): export_onnx writes classifiers, whose outputs "
                         "predict, serve and bundles read as class scores; give it one (model.reset_classifier(N)), "
                         "or export its features yourself: torch.onnx.export(fold(model), ...)")
    if label_names is None:  # the class names the weights were trained with, where recorded
        recorded = readable_labels(cfg)
        label_names = recorded if len(recorded or ()) == num_classes else None
    if label_names is not None and len(label_names) != num_classes:
        raise UsageError(f"{len(label_names)} label names for a model with {num_classes} classes")
    if label_names is not None and (undecodable := not_utf8(label_names)):
        raise UsageError(f"class names that UTF-8 cannot write ({', '.join(undecodable[:5])}: folders named in another "
                         "encoding?) cannot go into ONNX metadata: give the names in a UTF-8 file (--labels FILE)")
    out = Path(out)
    _check_target(out)
    with reference_model(model) as model:  # the caller's model is left as it was
        _check_memory(model, (channels, *hw))
        folded = fold(model, img_size=hw)
        if precision == "fp16":
            proto = to_onnx(HalfPrecision(folded), (channels, *hw), opset)
        elif fp32_graph is not None:
            proto = fp32_graph.of(folded, (channels, *hw), opset)
        else:
            proto = to_onnx(folded, (channels, *hw), opset)
        if held_out is not None:
            proto = quantize_int8(proto, calibrate_on)
            check_no_saturation(proto)
        meta = {
            "nfnet_hub.preprocessing": json.dumps({**data_config(cfg, hw, channels=channels), "label_names": None}),
            "nfnet_hub.labels": json.dumps(list(label_names) if label_names is not None else None),
            "nfnet_hub.precision": precision,
            "nfnet_hub.opset": str(opset),
            "nfnet_hub.architecture": cfg.get("architecture", type(model).__name__),
        }
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        proto.producer_name = "nfnet-hub"
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"ONNX checker rejected the {precision} export: {e}") from None
        check_clean(proto, precision)
        data = proto.SerializeToString()
        max_abs, max_rel = _compare(data, model, (channels, *hw), opset)
        limit = TOLERANCE.get(precision)
        if limit is not None and max_rel > limit:
            raise ExportError(f"{precision} export disagrees with PyTorch: max abs error {max_abs:.3g}, relative "
                              f"{max_rel:.3g} > {limit:g} (batches {VERIFY_BATCHES})")
        int8 = None
        if held_out is not None:
            agrees = agreement(data, model, held_out)
            int8 = {"top1_agreement": agrees, "held_out_images": len(held_out),
                    "calibration_images": len(calibration) - len(held_out), "min_agreement": min_agreement,
                    "below_threshold": agrees < min_agreement}
            if agrees < min_agreement and not force:
                raise ExportError(f"int8 agrees with fp32 on {agrees:.1%} of {len(held_out)} held-out calibration "
                                  f"images, below the {min_agreement:.0%} required: calibrate on more images like the "
                                  "ones it will see, or pass --force to write it anyway")
    write_atomically(data, out)
    ops = dict(Counter(n.op_type for n in proto.graph.node))
    weight_bytes = sum(p.numel() * p.element_size() for p in folded.parameters())
    blocks = [b for stage in folded.stages for b in stage]
    return ExportReport(str(out), precision, opset, hw, len(proto.graph.node), ops, len(data), weight_bytes,
                        max_abs, max_rel, seconds=time.perf_counter() - start, blocks=len(blocks),
                        branches_folded_away=sum(b.branch is None for b in blocks), int8=int8)


@dataclass
class ValidationReport:
    """ONNX Runtime against PyTorch on the same inputs."""

    inputs: int
    source: str  # "images" or "random"
    max_abs_error: float
    mean_abs_error: float
    top1_agreement: float
    preprocessing: str = ""  # what the ONNX metadata says, applied to both models
    # with images in folders named after the labels: accuracy of each, and what the export changes
    onnx_accuracy: float | None = None
    torch_accuracy: float | None = None
    accuracy_change: float | None = None
    accuracy_note: str | None = None  # why no accuracy was measured on the images given
    unreadable: list[str] = field(default_factory=list)  # images left out, and why
    max_rel_error: float = 0.0  # over the largest PyTorch logit, as export checks it
    matches: bool | None = None  # within the export check's tolerance for its precision (None: int8's is agreement)


def validate_onnx(path: str | os.PathLike, model: nn.Module, images: Sequence[str | os.PathLike] | None = None,
                  *, random_inputs: int = 4, batch_size: int = 8,
                  progress: Callable[[int, int], Any] | None = None) -> ValidationReport:
    """Compare an exported model with ``model`` on images (preprocessed as the ONNX metadata says, a batch at a
    time) or noise; ``progress(done, total)`` is called after each batch of images.

    Images inside folders named after the model's labels (or its ``label_names``, such as the WordNet ids that name
    ImageNet's folders) count as labelled: then the accuracy of both models, and the change the export makes (e.g.
    int8 against PyTorch), are reported too.
    """
    import onnxruntime as ort

    path = Path(path)
    if path.is_dir():
        raise UsageError(folder_given(path, "an ONNX file"))
    if not path.is_file():
        raise UsageError(f"no ONNX model at {path}")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types
        raise ExportError(f"{path} is not a loadable ONNX model: {str(e).splitlines()[0]}") from None
    meta = session.get_modelmeta().custom_metadata_map
    if "nfnet_hub.preprocessing" not in meta:
        raise UsageError(f"{path} carries no nfnet-hub metadata: validate compares exports written by nfnet-hub")
    pre = Preprocess.from_pretrained_cfg(json.loads(meta["nfnet_hub.preprocessing"]))
    classes = session.get_outputs()[0].shape[-1]
    num_classes = getattr(model, "num_classes", None)
    if isinstance(classes, int) and classes != num_classes:
        raise UsageError(f"{path.name} ({meta.get('nfnet_hub.architecture', '?')}) has {classes} classes, the model "
                         f"to compare with has {num_classes}: give the --model and --checkpoint it was exported from")
    channels = getattr(model, "in_chans", pre.channels)
    if channels != pre.channels:
        raise UsageError(f"{path.name} takes {pre.channels}-channel input, the model to compare with takes {channels}: "
                         "give the --model and --checkpoint it was exported from")
    compared, unreadable = [], []

    def read(start: int) -> np.ndarray:
        x, kept, problems = pre.readable_batch(images[start:start + batch_size])
        compared.extend(images[start + k] for k in kept)
        unreadable.extend(problems)
        return x

    if images:  # read as they are compared: a whole validation set at once would not fit in memory
        batches = (read(i) for i in range(0, len(images), batch_size))
    else:
        rng = np.random.default_rng(0)
        batches = [rng.standard_normal((random_inputs, pre.channels, *pre.input_size)).astype(np.float32)]
    labels = json.loads(meta.get("nfnet_hub.labels", "null")) or []
    ids = getattr(model, "pretrained_cfg", {}).get("label_names")  # timm's class names: ImageNet's are its folders'
    if images and isinstance(ids, list) and len(ids) == len(labels) and _unlabelled(images, labels) and \
            not _unlabelled(images, ids):
        labels = ids
    note = _unlabelled(images, labels) if images else None
    errors, onnx_pred, torch_pred, largest = [], [], [], 1e-12
    with reference_model(model) as model, torch.no_grad():
        for x in batches:
            if len(x):
                ref = model(torch.from_numpy(x)).float().numpy()
                out = onnx_logits(session, x)
                errors.append(np.abs(out - ref).reshape(-1))
                largest = max(largest, float(np.abs(ref).max()))
                onnx_pred.append(out.argmax(-1))
                torch_pred.append(ref.argmax(-1))
            if images and progress is not None:
                progress(len(compared) + len(unreadable), len(images))
    if not onnx_pred:
        raise UsageError(f"none of the {len(images)} images reads: {unreadable[0]}")
    err, onnx_pred, torch_pred = np.concatenate(errors), np.concatenate(onnx_pred), np.concatenate(torch_pred)
    limit = TOLERANCE.get(meta.get("nfnet_hub.precision", ""))
    report = ValidationReport(len(onnx_pred), "images" if images else "random", float(err.max()), float(err.mean()),
                              float((onnx_pred == torch_pred).mean()), pre.describe(), accuracy_note=note,
                              unreadable=unreadable, max_rel_error=float(err.max()) / largest,
                              matches=None if limit is None else float(err.max()) / largest <= limit)
    if images and not note:
        targets = np.array([labels.index(Path(p).parent.name) for p in compared])
        report.onnx_accuracy = float((onnx_pred == targets).mean() * 100)
        report.torch_accuracy = float((torch_pred == targets).mean() * 100)
        report.accuracy_change = report.onnx_accuracy - report.torch_accuracy
    return report


def _unlabelled(images: Sequence[str | os.PathLike], labels: Sequence[str]) -> str | None:
    """Why the images cannot be scored, if they cannot: accuracy needs every image in a folder named after its label."""
    if not labels:
        return "no accuracy: the export records no label names (export with --labels, or from a trained checkpoint)"
    stray = sorted({Path(p).parent.name for p in images} - set(labels))
    if not stray:
        return None
    count = sum(Path(p).parent.name in stray for p in images)
    return (f"no accuracy: {count} of {len(images)} images are in folders not named after a label "
            f"({', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''}); put each image in a folder named after its "
            "label to measure accuracy")
