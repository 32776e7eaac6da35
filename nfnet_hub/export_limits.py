"""What an export may be and must meet: opsets, the verification tolerances, int8's least agreement. Read by
``export``, and without torch by bundle checks, ``publish`` and release manifests."""
from __future__ import annotations

import onnx

from .errors import UsageError

__all__ = ["DEFAULT_OPSET", "MIN_AGREEMENT", "MIN_OPSET", "ORT_RUNS_FROM", "TOLERANCE", "check_opset"]

DEFAULT_OPSET = 20  # the first opset with a Gelu operator: one node per activation
MIN_OPSET = 17  # for older runtimes
ORT_RUNS_FROM = {17: "1.13", 18: "1.14", 19: "1.15", 20: "1.17"}  # the first ONNX Runtime release of each opset
# Largest error of ONNX Runtime against PyTorch, relative to the largest logit magnitude.
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2}
MIN_AGREEMENT = 0.95  # top-1 agreement with fp32 on held-out calibration images, below which export refuses


def check_opset(opset: int) -> None:
    """Refuse an opset the export cannot write: torch writes none older than 18 (17 is converted down from it)."""
    newest = onnx.defs.onnx_opset_version()
    if type(opset) is not int or not MIN_OPSET <= opset <= newest:
        raise UsageError(f"opset {opset!r} is not supported: choose one from {MIN_OPSET} (what ONNX Runtime 1.13 "
                         f"runs) to {newest} (the newest this onnx {onnx.__version__} knows); {DEFAULT_OPSET}, the "
                         "default, is the first with a Gelu operator")
