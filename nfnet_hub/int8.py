"""int8 that computes the same integers on every x86 CPU, and a measure of what it changes.

Without VNNI (AVX2 CPUs such as AMD EPYC Milan), ONNX Runtime's u8 x s8 kernels add pairs of products
in 16 bits with saturation (``vpmaddubsw``): with 8-bit weights a pair can exceed 32767 and the result
then depends on the CPU (a digits model lost 10 points on AVX2 and none with VNNI). Weights are
therefore quantised to 7 bits (``reduce_range``: a pair is at most 2 x 255 x 64 = 32640), checked on
every export; the stem convolution, which sees raw pixels, and the classifier stay in fp32
(``benchmarks/int8.py`` measures the alternatives). Exports calibrate on four fifths of the
calibration images and measure top-1 agreement with fp32 on the fifth they never saw.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from .errors import ExportError, UsageError
from .preprocess import Preprocess, list_images

__all__ = ["MAX_CALIBRATION", "agreement", "check_no_saturation", "load_calibration", "quantize_int8",
           "split_calibration"]

MAX_CALIBRATION = 500  # images an int8 export calibrates on and is checked on (F7's 608 px: 2.2 GB preprocessed)
HOLD_OUT_EVERY = 5  # every fifth calibration image is held out to measure agreement
_INT8_PAIR_LIMIT = 64  # 7-bit weights: 2 x 255 x 64 = 32640 fits a signed 16-bit pair sum


def _int8_excluded(proto: onnx.ModelProto) -> list[str]:
    """The stem convolution (first Conv; it sees raw pixels) and the classifier (the Gemm or MatMul that
    yields the logits), kept in fp32."""
    graph = proto.graph
    first_conv = next((n.name for n in graph.node if n.op_type == "Conv"), None)
    producer = {out: n for n in graph.node for out in n.output}
    node, classifier = producer.get(graph.output[0].name), None
    while node is not None and classifier is None:
        if node.op_type in ("Gemm", "MatMul"):
            classifier = node.name
        elif node.op_type in ("Add", "Reshape", "Flatten", "Squeeze"):
            node = producer.get(node.input[0])
        else:
            node = None
    return [name for name in (first_conv, classifier) if name]


def quantize_int8(proto: onnx.ModelProto, calibration: np.ndarray, *, reduce_range: bool = True,
                  keep_fp32: bool = True, activations: str = "u8", weights: str = "s8",
                  method: str = "minmax") -> onnx.ModelProto:
    """Static per-channel QDQ quantisation with ONNX Runtime's tools, calibrated on ``calibration``.

    The defaults are what ``export_onnx`` uses: 7-bit weights (``reduce_range``), u8 activations, MinMax,
    the stem convolution and classifier kept in fp32. The other settings exist for ``benchmarks/int8.py``,
    which measures them on CPUs with and without VNNI."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixel_values": calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # calibrators narrate
        raw, src, dst = Path(tmp) / "raw.onnx", Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, raw)
        try:
            quant_pre_process(str(raw), str(src))
        except Exception:  # its symbolic shape inference (optional) fails on some graphs: max pooling's ReduceMax
            quant_pre_process(str(raw), str(src), skip_symbolic_shape=True)  # onnx's shape inference suffices
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=types[activations], weight_type=types[weights],
                        calibrate_method=methods[method],
                        nodes_to_exclude=_int8_excluded(onnx.load(src)) if keep_fp32 else [])
        return onnx.load(dst)


def check_no_saturation(proto: onnx.ModelProto) -> None:
    """Every int8 weight within +-64, so no x86 kernel can saturate (the result is the same on every CPU)."""
    weights = {n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    for init in proto.graph.initializer:
        if init.name in weights and init.data_type == onnx.TensorProto.INT8:
            peak = int(np.abs(onnx.numpy_helper.to_array(init).astype(np.int32)).max(initial=0))
            if peak > _INT8_PAIR_LIMIT:
                raise ExportError(f"int8 weight {init.name} reaches {peak}, beyond the 7-bit range that keeps "
                                  "x86 kernels without VNNI from saturating")


def load_calibration(folder: str | Path, pre: Preprocess, *, say: Callable[[str], Any] = print) -> np.ndarray:
    """The images of ``folder``, preprocessed: at most ``MAX_CALIBRATION``, evenly spaced in sorted order (so every
    class folder gives some), which ``say`` reports. All of them would be held in memory at once: the 50,000
    ImageNet validation images at F0's 256 px take 39 GB."""
    files = list_images(folder)
    chosen = [files[i * len(files) // MAX_CALIBRATION] for i in range(MAX_CALIBRATION)] \
        if len(files) > MAX_CALIBRATION else files
    if len(chosen) < len(files):
        say(f"calibration: {len(chosen)} of the {len(files)} images in {folder}, evenly spaced")
    images, _, unreadable = pre.readable_batch(chosen)
    if unreadable and not len(images):
        raise UsageError(f"none of the {len(chosen)} calibration images reads: {unreadable[0]}")
    if unreadable:
        say(f"calibration: {len(unreadable)} image(s) left out: " + "; ".join(unreadable[:3])
            + (" ..." if len(unreadable) > 3 else ""))
    return images


def split_calibration(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(calibrate on, held out): every fifth image is held out, at least one."""
    n = len(images)
    if n < 2:
        raise UsageError(f"int8 export needs at least 2 calibration images (one is held out to measure "
                         f"agreement), got {n}")
    held = np.zeros(n, bool)
    held[min(HOLD_OUT_EVERY, n) - 1::min(HOLD_OUT_EVERY, n)] = True
    return images[~held], images[held]


def agreement(proto: bytes, reference: nn.Module, images: np.ndarray) -> float:
    """Top-1 agreement of the exported model with ``reference`` on preprocessed ``images``."""
    import onnxruntime as ort

    session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    same = 0
    for i in range(0, len(images), 16):
        x = images[i:i + 16]
        with torch.no_grad():
            ref = reference(torch.from_numpy(x)).float().numpy()
        same += int((session.run(None, {session.get_inputs()[0].name: x})[0].argmax(-1) == ref.argmax(-1)).sum())
    return same / len(images)
