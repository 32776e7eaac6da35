"""The authors' Haiku checkpoints (``F0_haiku.npz`` ...): read them safely and map them onto our names.

The files hold ``{module path: {param: array}}`` with HWIO kernels, e.g. ``NFNet/~/nf_block_3/~/conv1``
-> ``{"w", "gain", "b"}``. We read them as a zip of flat ``module/param`` arrays (``np.savez``) or as
the pickled nested dict the authors published, the latter through an unpickler that admits numpy
arrays and dicts only.
"""
from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["convert_deepmind", "looks_like_haiku", "read_haiku"]

_BLOCK_PARAMS = {
    "conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3",
    "conv_shortcut": "downsample.conv", "squeeze_excite/~/linear": "attn_last.fc1",
    "squeeze_excite/~/linear_1": "attn_last.fc2", "squeeze_excite/linear": "attn_last.fc1",
    "squeeze_excite/linear_1": "attn_last.fc2",
}
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"), ("builtins", "dict"),
}
_NOT_HAIKU = "not one of the authors' checkpoints (a NumPy .npz archive, or a pickled dict of arrays)"


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise CheckpointError(f"refusing to unpickle {module}.{name}: only numpy arrays and dicts are allowed")
        return super().find_class(module, name)


def looks_like_haiku(path: Path, head: bytes) -> bool:
    """An npz archive (a zip of ``.npy`` members), or a pickle in a file named ``.npz``."""
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                return any(name.endswith(".npy") for name in z.namelist())
        except zipfile.BadZipFile:
            return False
    return head.startswith(b"\x80") and path.suffix == ".npz"


def read_haiku(path: Path) -> dict[str, np.ndarray]:
    """Flat ``{"module/param": array}`` from either form of the authors' checkpoint."""
    if zipfile.is_zipfile(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{path} is {_NOT_HAIKU}: {str(e).splitlines()[0]}") from None
    try:
        nested = _ArraysOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
    except CheckpointError:
        raise
    except Exception:  # a truncated or foreign file: pickle raises many types
        raise CheckpointError(f"{path} is {_NOT_HAIKU}") from None
    if not isinstance(nested, dict) or not all(isinstance(v, dict) for v in nested.values()):
        raise CheckpointError(f"{path}: expected a dict of modules, found {type(nested).__name__}")
    return {f"{mod}/{p}": np.asarray(v) for mod, params in nested.items() for p, v in params.items()}


def _block_index(model: nn.Module) -> list[str]:
    return [f"stages.{si}.{bi}" for si, stage in enumerate(model.stages) for bi in range(len(stage))]


def convert_deepmind(arrays: dict[str, np.ndarray], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the authors' Haiku parameters onto ``model``'s names and layouts (HWIO -> OIHW)."""
    blocks = _block_index(model)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in arrays.items():
        if "/" not in key:
            unknown.append(key)
            continue
        path, param = key.rsplit("/", 1)
        path = re.sub(r"^NFNet/~/", "", path)
        m = re.fullmatch(r"nf_block(?:_(\d+))?(?:/~/(.+))?", path)
        if m:
            idx = int(m.group(1) or 0)
            if idx >= len(blocks):
                unknown.append(key)
                continue
            if m.group(2) is None and param == "skip_gain":
                out[f"{blocks[idx]}.skipinit_gain"] = torch.as_tensor(np.asarray(value, np.float32).reshape(1))
                continue
            target = _BLOCK_PARAMS.get(m.group(2) or "")
            name = f"{blocks[idx]}.{target}" if target else None
        elif (s := re.fullmatch(r"stem_conv(\d)", path)):
            name = f"stem.conv{int(s.group(1)) + 1}"
        elif path in ("final_conv", "linear"):
            name = "final_conv" if path == "final_conv" else "head.fc"
        else:
            name = None
        if name is None:
            unknown.append(key)
            continue
        v = np.asarray(value, dtype=np.float32)
        if param == "w":
            if v.ndim == 4:  # HWIO -> OIHW
                v = v.transpose(3, 2, 0, 1)
            elif v.ndim == 2:  # (in, out) -> (out, in), as a 1x1 conv inside squeeze-excite
                v = v.T if name == "head.fc" else v.T[:, :, None, None]
            out[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(v))
        elif param == "b":
            out[f"{name}.bias"] = torch.from_numpy(v)
        elif param == "gain":
            out[f"{name}.gain"] = torch.from_numpy(v.reshape(-1, 1, 1, 1))
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError("unexpected parameters in the DeepMind checkpoint: " + ", ".join(sorted(unknown)[:20]))
    return out
