"""The authors' Haiku checkpoints (``F0_haiku.npz`` ...): read them safely, map them onto our names and tell the
variant they hold (``convert.py`` writes them as safetensors).

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

__all__ = ["convert_deepmind", "deepmind_classes", "deepmind_variant", "looks_like_haiku", "read_haiku"]

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


# How each kind of the authors' arrays is laid out as ours: HWIO kernels as OIHW, (in, out) matrices as
# (out, in) (inside squeeze-excite as 1x1 convs), gains per output channel broadcast over the kernel.
_LAYOUTS = {
    "kernel": lambda v: v.transpose(3, 2, 0, 1), "linear": lambda v: v.T, "se": lambda v: v.T[:, :, None, None],
    "gain": lambda v: v.reshape(-1, 1, 1, 1), "skip": lambda v: v.reshape(1), "as is": lambda v: v,
}


def _target(key: str, ndim: int, blocks: list[str]) -> tuple[str, str] | None:
    """Our name for one of the authors' arrays and its layout (a key of ``_LAYOUTS``); None if we have none."""
    if "/" not in key:
        return None
    path, param = key.rsplit("/", 1)
    path = re.sub(r"^NFNet/~/", "", path)
    name = None
    if m := re.fullmatch(r"nf_block(?:_(\d+))?(?:/~/(.+))?", path):
        idx = int(m.group(1) or 0)
        if idx >= len(blocks):
            return None
        if m.group(2) is None and param == "skip_gain":
            return f"{blocks[idx]}.skipinit_gain", "skip"
        target = _BLOCK_PARAMS.get(m.group(2) or "")
        name = f"{blocks[idx]}.{target}" if target else None
    elif s := re.fullmatch(r"stem_conv(\d)", path):
        name = f"stem.conv{int(s.group(1)) + 1}"
    elif path in ("final_conv", "linear"):
        name = "final_conv" if path == "final_conv" else "head.fc"
    if name is None or param not in ("w", "b", "gain"):
        return None
    if param == "w":
        layout = {4: "kernel", 2: "linear" if name == "head.fc" else "se"}.get(ndim, "as is")
        return f"{name}.weight", layout
    return (f"{name}.bias", "as is") if param == "b" else (f"{name}.gain", "gain")


def convert_deepmind(arrays: dict[str, np.ndarray], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the authors' Haiku parameters onto ``model``'s names and layouts (HWIO -> OIHW)."""
    blocks = _block_index(model)
    targets = {key: _target(key, np.ndim(value), blocks) for key, value in arrays.items()}
    if unknown := sorted(key for key, target in targets.items() if target is None):
        raise CheckpointError("unexpected parameters in the DeepMind checkpoint: " + ", ".join(unknown[:20]))
    return {name: torch.from_numpy(np.ascontiguousarray(_LAYOUTS[layout](np.asarray(arrays[key], np.float32))))
            for key, (name, layout) in targets.items()}


def deepmind_classes(arrays: dict[str, np.ndarray]) -> int | None:
    """The class count of the authors' classifier (``linear/w`` is (features, classes))."""
    return next((np.shape(v)[1] for k, v in arrays.items() if re.fullmatch(r"(NFNet/~/)?linear/w", k)), None)


def deepmind_variant(arrays: dict[str, np.ndarray]) -> str | None:
    """The nfnet_hub variant whose tensors the authors' arrays are, name for name and shape for shape (models
    built on the meta device, arrays never copied), or None."""
    import timm

    from .variants import VARIANTS, model_name

    blocks = {m.group(1) or "0" for k in arrays if (m := re.match(r"(?:NFNet/~/)?nf_block(?:_(\d+))?/", k))}
    for variant in (n for n, v in VARIANTS.items() if sum(v.depths) == len(blocks)):
        with torch.device("meta"):
            model = timm.create_model(model_name(variant), num_classes=deepmind_classes(arrays) or 1000)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        index, shapes = _block_index(model), {}
        for key, value in arrays.items():
            if (target := _target(key, np.ndim(value), index)) is None:
                break
            shapes[target[0]] = _LAYOUTS[target[1]](np.broadcast_to(np.float32(0), np.shape(value))).shape
        else:
            if shapes == expected:
                return model_name(variant)
    return None
