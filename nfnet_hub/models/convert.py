"""Checkpoints in, our state dict out: safetensors, timm's (pickled, loaded weights-only) and
the authors' Haiku ``.npz`` files.

The authors' files hold ``{module path: {param: array}}`` with HWIO kernels, e.g.
``NFNet/~/nf_block_3/~/conv1`` -> ``{"w", "gain", "b"}``. We read them as a zip of flat
``module/param`` arrays (``np.savez``) or as the pickled nested dict the authors published, the
latter through an unpickler that admits numpy arrays and dicts only.
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

from .nfnet import DEEPMIND_NUMERICS

__all__ = ["CheckpointError", "check_fit", "convert_deepmind", "create_model", "load_checkpoint", "read_state_dict",
           "save_safetensors"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


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


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise CheckpointError(f"refusing to unpickle {module}.{name}: only numpy arrays and dicts are allowed")
        return super().find_class(module, name)


def _read_haiku(path: Path) -> dict[str, np.ndarray]:
    """Flat ``{"module/param": array}`` from either form of the authors' checkpoint."""
    if zipfile.is_zipfile(path):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    nested = _ArraysOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
    if not isinstance(nested, dict):
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


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Tensors of a checkpoint file; pickles are loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        if path.suffix == ".npz":
            return dict(_read_haiku(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # unreadable, truncated, or a pickle that is not weights only
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def check_fit(state_dict: dict[str, torch.Tensor], model: nn.Module, source: str = "checkpoint") -> None:
    """Raise with every missing, unexpected and mis-shaped key at once."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f"{k}: {tuple(state_dict[k].shape)} != {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(state_dict))
              if state_dict[k].shape != expected[k].shape and not state_dict[k].numel() == expected[k].numel() == 1]
    problems = [(label, items) for label, items in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if items]
    if problems:
        lines = [f"{source} does not fit {type(model).__name__}:"]
        lines += [f"  {label} ({len(items)}): " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else "")
                  for label, items in problems]
        raise CheckpointError("\n".join(lines))


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint (any supported form) into ``model``, strictly."""
    sd = read_state_dict(path)
    if str(path).endswith(".npz"):
        sd = convert_deepmind(sd, model)
    check_fit(sd, model, str(path))
    model.load_state_dict(sd)
    return model


def create_model(name: str, checkpoint: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name)``, with the weights (and class count) of ``checkpoint`` if given.

    An authors' ``.npz`` selects the authors' weight-standardisation form. A checkpoint saved by
    ``nfnet-hub convert`` records its form in the safetensors metadata.
    """
    import timm

    if name not in timm.list_models():
        from .variants import VARIANTS, model_name
        ours = ", ".join(model_name(v) for v in VARIANTS)
        raise ValueError(f"unknown model {name!r}; nfnet-hub registers: {ours} (timm's NF models work too)")
    if checkpoint is None:
        return timm.create_model(name, **kwargs)
    path = Path(checkpoint)
    sd = read_state_dict(path)
    if path.suffix == ".npz":
        for k, val in DEEPMIND_NUMERICS.items():
            kwargs.setdefault(k, val)
        fc = next((v for k, v in sd.items() if re.fullmatch(r"(NFNet/~/)?linear/w", k)), None)
        if fc is not None:
            kwargs.setdefault("num_classes", fc.shape[1])
    else:
        if "head.fc.weight" in sd:
            kwargs.setdefault("num_classes", sd["head.fc.weight"].shape[0])
        meta = _safetensors_metadata(path)
        for key in ("ws", "act"):
            if meta.get(f"nfnet_hub.{key}"):
                kwargs.setdefault(key, meta[f"nfnet_hub.{key}"])
    model = timm.create_model(name, **kwargs)
    if path.suffix == ".npz":
        sd = convert_deepmind(sd, model)
    check_fit(sd, model, str(path))
    model.load_state_dict(sd)
    return model


def _safetensors_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def save_safetensors(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's weights (contiguous, shared tensors split) with the WS form in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "ws"):
        meta["nfnet_hub.ws"], meta["nfnet_hub.act"] = cfg.ws, cfg.act
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path
