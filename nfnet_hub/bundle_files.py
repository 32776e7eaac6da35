"""A bundle's files: their names (written by ``hub``, read by ``runtime`` and ``serve``) and its checksums (no torch
here)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import BundleError

ONNX_FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}
REQUIRED = ("model.safetensors", "config.json", "model.onnx", "README.md", "export.json")
CHECKSUMS = "checksums.sha256"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checksums(folder: Path) -> dict[str, str]:
    path = folder / CHECKSUMS
    if not path.is_file():
        raise BundleError(f"{folder} has no {CHECKSUMS}")
    sums = {}
    for line in path.read_text(errors="replace").splitlines():
        digest, sep, name = line.partition("  ")
        if not line:
            continue
        if not sep or len(digest) != 64:
            raise BundleError(f"{path} has a malformed line: {line[:80]!r}")
        sums[name] = digest
    return sums


def damaged_note(path: Path) -> str:
    """Why a bundle's file that fails to load may do so: it is not the file the bundle was built with (a partial copy
    or download). Hashed only once the file has failed, so loading pays nothing."""
    try:
        expected = read_checksums(path.parent).get(path.name)
        if expected is None or sha256(path) == expected:
            return ""
    except (BundleError, OSError):
        return ""
    return f" ({path.name} does not match the bundle's {CHECKSUMS}: a partial copy or download? copy the bundle again)"
