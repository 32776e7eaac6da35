"""One exception base for every user error.

The CLI prints an ``NfnetHubError`` as one line (``nfnet-hub <command>: error: ...``) and exits 2;
anything else is a bug and keeps its traceback. Each subclass also derives from the built-in type
that fits, so library callers may catch ``ValueError`` or ``FileExistsError`` as before.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["BundleError", "CheckpointError", "ExportError", "FoldError", "HubError", "NfnetHubError", "TrainingError",
           "UsageError", "folder_given", "missing_package"]


class NfnetHubError(Exception):
    """A mistake in what the user asked for or gave us; the message says what to do.

    ``details``: one line per item where there are several (options refused by name, say); the CLI
    prints them under the error line."""

    def __init__(self, message: str, *, details: Sequence[str] = ()):
        super().__init__(message)
        self.message, self.details = message, list(details)

    def __str__(self) -> str:
        return "\n".join([self.message, *(f"  {d}" for d in self.details)])


class UsageError(NfnetHubError, ValueError):
    """An option or argument that cannot work (a bad value, a conflict, a missing input)."""


class CheckpointError(NfnetHubError, ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class FoldError(NfnetHubError, TypeError):
    """The model holds a module that fold does not know how to make plain."""


class ExportError(NfnetHubError, RuntimeError):
    """An export that failed a check; nothing was written."""


class BundleError(NfnetHubError, ValueError):
    """A bundle that is incomplete, altered or fails its parity record, or a folder that is not a bundle."""


class HubError(NfnetHubError, RuntimeError):
    """The Hugging Face Hub could not be reached, or refused a request."""


class TrainingError(NfnetHubError, RuntimeError):
    """A training run that cannot start, or cannot go on (the last good checkpoint is kept)."""


_FILES_IN = {"a checkpoint file": ("model.safetensors", "model_best.pth.tar", "last.pth.tar"),  # bundle, run
             "an ONNX file": ("model.onnx", "model_int8.onnx", "model_fp16.onnx")}


def folder_given(path: Path, what: str) -> str:
    """The message for a folder given where ``what`` (a key of ``_FILES_IN``) was meant, naming the file of that
    kind it holds (a bundle's model.safetensors or model.onnx, a run folder's model_best.pth.tar)."""
    found = next((path / name for name in _FILES_IN[what] if (path / name).is_file()), None)
    return f"{path} is a folder, not {what}" + (f": give {found}" if found else "")


_TORCH = ("{}, which this installation lacks (the serving installation, deploy/Dockerfile's, runs serve, predict, "
          "triton and list): install nfnet-hub with its dependencies, torch and torchvision as a matching pair: "
          'pip install torch torchvision "nfnet-hub[cpu]"')
_INSTALLED_BY = {
    "onnxruntime": 'ONNX Runtime, which is not installed: pip install "nfnet-hub[cpu]" (or "nfnet-hub[gpu]" for '
                   "onnxruntime-gpu; never both)",
    **dict.fromkeys(("kserve", "prometheus_client", "grpc", "orjson", "fastapi", "uvicorn", "tritonclient"),
                    'the server\'s packages, which are not installed: pip install "nfnet-hub[serve]"'),
    **{module: _TORCH.format(package) for module, package in (
        ("torch", "torch"), ("torchvision", "torchvision"), ("timm", "timm"), ("onnxscript", "onnxscript"),
        ("safetensors", "safetensors"), ("sklearn", "scikit-learn"), ("tqdm", "tqdm"))},
}


def missing_package(module: str | None) -> str | None:
    """What a command needs and this installation lacks (``pip install nfnet-hub`` without an ONNX Runtime extra, the
    torch-free serving image), and what installs it; None for any other missing module, which is a bug."""
    root = (module or "").split(".")[0]
    return f"this command needs {_INSTALLED_BY[root]}" if root in _INSTALLED_BY else None
