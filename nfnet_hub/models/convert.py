"""``nfnet-hub convert deepmind``: the authors' Haiku checkpoint written as a safetensors file of the variant it
holds, in their numerics, which every command and timm's factory then load."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm

from ..classes import name_pretrained_classes
from ..errors import CheckpointError, UsageError
from ..files import check_writable_folder, partial_path, sweep_partials
from .checkpoint import check_model_name, fitted_state_dict, read_checkpoint, save_safetensors
from .deepmind import deepmind_classes, deepmind_variant
from .nfnet import DEEPMIND_NUMERICS

__all__ = ["convert_authors_checkpoint"]


def convert_authors_checkpoint(source: str | Path, name: str | None, out: str | Path, *,
                               num_classes: int | None = None, overwrite: bool = False,
                               say: Callable[[str], Any] = lambda _: None) -> tuple[Path, str]:
    """The authors' Haiku checkpoint as a safetensors file of ``name`` (by default the variant whose shapes it
    has) in the authors' numerics; returns the file and the model name. ``say``: progress, in words."""
    source, out = Path(source), Path(out)
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {out} must be a .safetensors file")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    if out.is_dir():
        raise UsageError(f"{out} is a folder")
    ours = name is not None and name.partition(".")[0] in timm.list_models("nfnet_hub_*")
    if ours:
        check_model_name(name)  # its pretrained tag
    check_writable_folder(out.parent)
    say(f"reading {source} ...")
    ckpt = read_checkpoint(source)
    if ckpt.form != "deepmind":
        raise CheckpointError(f"{source} is a {ckpt.form} checkpoint, not the authors' Haiku .npz: "
                              "load it directly with --checkpoint")
    fits = deepmind_variant(ckpt.state_dict)
    if not ours:
        if fits is None:
            raise CheckpointError(f"{source} holds none of nfnet-hub's variants: its arrays' names or shapes differ")
        if name is not None:
            raise UsageError(f"--model {name}: convert writes nfnet-hub's variants; {source} holds the authors' "
                             f"{fits} (give --model {fits}, or leave --model out)")
        name = fits
    classes = deepmind_classes(ckpt.state_dict)
    if num_classes is not None and classes and num_classes != classes:
        raise UsageError(f"--num-classes {num_classes}: {source}'s classifier has {classes} classes, and convert "
                         "keeps the authors' weights as they are; to fine-tune, convert without --num-classes and "
                         f"train with --pretrained-path {out} --num-classes {num_classes}")
    model = timm.create_model(name, num_classes=classes or num_classes or 1000, **DEEPMIND_NUMERICS)
    model.load_state_dict(fitted_state_dict(ckpt, model, str(source)))
    name_pretrained_classes(model)  # ImageNet's, recorded with the weights
    sweep_partials(out.parent)
    tmp = partial_path(out)
    try:
        save_safetensors(model, tmp, {"nfnet_hub.source": source.name})
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, name
