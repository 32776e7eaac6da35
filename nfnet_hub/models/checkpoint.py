"""Checkpoints: read, check, load, save, and create a model from one.

Read: safetensors, PyTorch checkpoints (ours, timm's; pickles only with ``torch.load(weights_only=True)``)
and the authors' Haiku files (``deepmind.py``), told apart by their content rather than their names.
A training checkpoint of ours also carries the data config it was trained with, and one written by timm's
train.py the options it resolved its data config from; ``create_model`` puts that into the model's
``pretrained_cfg``, so export, bundle and validate preprocess as training did.
"""
from __future__ import annotations

import argparse
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.models import clean_state_dict
from torch import nn

from ..errors import CheckpointError, UsageError, folder_given
from ..files import honour_umask
from ..preprocess import IMAGE_MODE, apply_data_config, data_config
from ..runs import best_checkpoint, is_weights_file, run_model
from .deepmind import convert_deepmind, deepmind_classes, deepmind_variant, looks_like_haiku, read_haiku
from .nfnet import DEEPMIND_NUMERICS, NFNet, recorded_model_args

__all__ = ["Checkpoint", "Provenance", "check_fit", "checkpoint_form", "checkpoint_model_args", "create_model",
           "load_checkpoint", "load_model", "model_args", "read_checkpoint", "read_pytorch", "read_state_dict",
           "save_safetensors"]

DATA_CONFIG_KEY = "nfnet_hub.data_config"  # safetensors metadata; training checkpoints hold "data_config"


@dataclass
class Checkpoint:
    """What a checkpoint file holds: tensors, the form they are in, and the data config if recorded."""

    path: Path
    form: str  # "safetensors", "pytorch" or "deepmind"
    state_dict: dict[str, Any]
    data_config: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    entry: str = ""  # which weights of a training checkpoint: "state_dict_ema", "state_dict", ...
    train_args: dict[str, Any] | None = None  # the options of timm's train.py run that wrote it, if it did
    model_args: dict[str, Any] = field(default_factory=dict)  # to build its model again: see model_args()


def model_args(model: nn.Module) -> dict[str, Any]:
    """What ``timm.create_model`` must be given, beyond the name and the tensors' shapes, to build ``model`` again:
    our WS form and activation, and a global pooling other than timm's average (pooling has no tensors)."""
    cfg = getattr(model, "cfg", None)
    args = {"ws": cfg.ws, "act": cfg.act} if cfg is not None and hasattr(cfg, "ws") else {}
    pool = getattr(getattr(getattr(model, "head", None), "global_pool", None), "pool_type", "avg")
    return args if pool == "avg" else {**args, "global_pool": pool}


def run_model_args(run: dict[str, Any], timms: bool = False) -> dict[str, Any]:
    """The model arguments of a training run's options: --model-kwargs and --gp; for timm's train.py (``timms``),
    over what its --pretrained-path records, which timm's factory builds our models with (ours writes them into
    --model-kwargs)."""
    start = recorded_model_args(run["pretrained_path"]) if timms and run.get("pretrained_path") else {}
    return {**start, **(run.get("model_kwargs") or {}), **({"global_pool": run["gp"]} if run.get("gp") else {})}


def checkpoint_form(path: Path) -> str:
    """The format of a checkpoint file, from its first bytes."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(folder_given(path, "a checkpoint file"))
    with path.open("rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if looks_like_haiku(path, head):
        return "deepmind"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return "pytorch"  # torch.save's zip format, or its legacy pickle
    raise CheckpointError(f"{path} is not a checkpoint: neither safetensors, a PyTorch checkpoint, "
                          "nor the authors' .npz")


def read_pytorch(path: Path) -> Any:
    """``torch.load`` of weights only, with errors that say what the file is. timm's train.py stores its options
    as an ``argparse.Namespace`` (a bag of attributes), which is admitted too."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise CheckpointError(f"{path} holds Python objects other than tensors, numbers and containers; "
                                  "nfnet-hub loads only those (save a state dict, or use safetensors)") from None
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError):
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint") from None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The tensors of a checkpoint file, its form, and the data config it records (if any)."""
    path = Path(path)
    form = checkpoint_form(path)
    if form == "deepmind":
        return Checkpoint(path, form, dict(read_haiku(path)), model_args=dict(DEEPMIND_NUMERICS))
    if form == "safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            sd = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {str(e).splitlines()[0]}") from None
        record = json.loads(metadata[DATA_CONFIG_KEY]) if DATA_CONFIG_KEY in metadata else None
        return Checkpoint(path, form, clean_state_dict(sd), record, metadata, model_args=recorded_model_args(path))
    raw = read_pytorch(path)
    record = raw.get("data_config") if isinstance(raw, dict) else None
    run = raw.get("args") if isinstance(raw, dict) else None
    run = vars(run) if isinstance(run, argparse.Namespace) else run if isinstance(run, dict) else {}
    sd, entry = raw, ""
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # the EMA first, as timm's load_checkpoint
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd, entry = sd[key], key
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (found {type(sd).__name__})")
    # the prefixes DDP and torch.compile put on keys (a compiled model's own state_dict), as timm strips them
    timms = isinstance(raw.get("args"), argparse.Namespace)
    return Checkpoint(path, form, clean_state_dict(sd), record, entry=entry,
                      train_args=run if timms and record is None else None, model_args=run_model_args(run, timms))


def checkpoint_model_args(path: str | Path) -> dict[str, Any]:
    """``read_checkpoint(path).model_args``, reading a safetensors file's header only."""
    form = checkpoint_form(Path(path))
    if form != "pytorch":
        return dict(DEEPMIND_NUMERICS) if form == "deepmind" else recorded_model_args(path)
    return read_checkpoint(path).model_args


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Tensors of a checkpoint file (the authors' arrays as they are, before mapping)."""
    return read_checkpoint(path).state_dict


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
        name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        fits = _variant_of(state_dict) if isinstance(model, NFNet) else None
        hint = f" (its tensors are {fits}'s: give that model name)" if fits and fits != name else ""
        lines = [f"{source} does not fit {name}{hint}:"]
        lines += [f"  {label} ({len(items)}): " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else "")
                  for label, items in problems]
        raise CheckpointError("\n".join(lines))


def _variant_of(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The nfnet_hub variant whose tensors a state dict holds, key for key and shape for shape (built on the meta
    device, with the state dict's class and channel counts), to name it when another model was given."""
    import timm

    def shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple]:
        return {k: tuple(v.shape) if v.numel() != 1 else () for k, v in sd.items()}

    given, fc, stem = shapes(state_dict), state_dict.get("head.fc.weight"), state_dict.get("stem.conv1.weight")
    counts = {"num_classes": fc.shape[0] if fc is not None and fc.ndim == 2 else 1000,
              "in_chans": stem.shape[1] if stem is not None and stem.ndim == 4 else 3}
    for name in timm.list_models("nfnet_hub_*"):
        with torch.device("meta"):
            if shapes(timm.create_model(name, **counts).state_dict()) == given:
                return name
    return None


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint (any supported form) into ``model``, strictly."""
    model.load_state_dict(fitted_state_dict(read_checkpoint(path), model, str(path)))
    return model


def fitted_state_dict(ckpt: Checkpoint, model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the model's names, checked against it; the authors' arrays of another
    variant are told that variant (their own names say nothing of it)."""
    if ckpt.form != "deepmind":
        check_fit(ckpt.state_dict, model, source)
        return ckpt.state_dict
    try:
        sd = convert_deepmind(ckpt.state_dict, model)
        check_fit(sd, model, source)
    except CheckpointError:
        name = getattr(model, "pretrained_cfg", {}).get("architecture")
        if isinstance(model, NFNet) and (fits := deepmind_variant(ckpt.state_dict)) and fits != name:
            raise CheckpointError(f"{source} does not fit {name}: it holds the authors' {fits} "
                                  "(give that model name)") from None
        raise
    return sd


def check_model_name(name: str, weights_option: str = "--checkpoint") -> None:
    """Refuse a model name timm would not know, naming ours; pretrained tags, hf-hub: and local-dir: pass. A run's
    folder or a weights file is told the model and the option (``weights_option``) that take it."""
    import timm
    from timm.models import get_arch_pretrained_cfgs

    if names_saved_model(name):
        return
    base, _, tag = name.partition(".")
    if not timm.is_model(base):
        from .variants import VARIANTS, model_name

        path = Path(name).expanduser()
        if best := best_checkpoint(path):
            raise UsageError(f"unknown model {name!r}: that folder is a training run: give its model and its best "
                             f"checkpoint, `{run_model(path)} {weights_option} {best}`")
        if is_weights_file(path):
            raise UsageError(f"unknown model {name!r}: that file holds weights: give the model they are for, and the "
                             f"file as {weights_option}, `{run_model(path.parent)} {weights_option} {name}`")
        if path.is_dir():  # timm's names for a saved model, which a plain path is not
            raise UsageError(f"unknown model {name!r}: for the model saved in that folder (timm's config.json and "
                             f"weights, as in a bundle) name it local-dir:{name}")
        ours = ", ".join(model_name(v) for v in VARIANTS)
        raise UsageError(f"unknown model {name!r}; nfnet-hub registers: {ours} (timm's NF models work too)"
                         + (f"; a model on the Hub is hf-hub:{name}" if name.count("/") == 1 else ""))
    tags = [n.partition(".")[2] for n in get_arch_pretrained_cfgs(base) if "." in n]  # with weights or not
    if tag and tag not in tags:
        raise UsageError(f"{base} has no pretrained tag {tag!r}" + (f"; it has: {', '.join(tags)}" if tags else ""))


def _timm_create(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm

    from ..hubclient import hub_errors

    if name.startswith("local-dir:") and not Path(name.removeprefix("local-dir:")).is_dir():
        raise UsageError(f"{name}: no such folder")
    if pretrained and not names_saved_model(name):
        check_downloadable(name, kwargs)
    with hub_errors(f"loading {name}"):
        return timm.create_model(name, pretrained=pretrained, **kwargs)


def check_downloadable(name: str, kwargs: dict[str, Any] | None = None, *,
                       give: str = "--checkpoint FILE; train: --pretrained-path FILE") -> None:
    """A one-line refusal where timm would raise for a model (or tag) without weights to load; ``give`` says how
    to give them as a file instead."""
    kwargs = kwargs or {}
    from timm.models import get_pretrained_cfg, split_model_name_tag
    from timm.models import list_pretrained as tagged

    sources = ("hf_hub_id", "url", "file", "state_dict")
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if "pretrained_cfg" in kwargs or any(overlay.get(k) for k in sources):  # the caller says where they are
        return
    cfg = get_pretrained_cfg(name)
    if cfg is None or any(getattr(cfg, k) for k in sources):
        return
    others = tagged(f"{split_model_name_tag(name)[0]}.*")
    hint = "; the authors' .npz converts with nfnet-hub convert deepmind" if cfg.tag == "deepmind_in1k" else ""
    these = f" (these have: {', '.join(others)})" if others else ""
    raise UsageError(f"{name} has no weights to download{these}: give them as a file ({give}){hint}")


@dataclass(frozen=True)
class Provenance:
    """Where a model's weights and its preprocessing came from, in words for the user."""

    weights: str
    preprocessing: str
    random: bool
    classes: str | None = None  # where class names came from, when nfnet-hub chose them


def names_saved_model(name: str) -> bool:
    """Whether ``name`` is timm's name for a saved model (``hf-hub:``, ``local-dir:``): its config.json gives the
    architecture and preprocessing, and timm loads its weights when asked (``pretrained=True``)."""
    return name.startswith(("hf-hub:", "local-dir:"))


def _saved_config(name: str) -> dict[str, Any]:
    """The config.json of a saved model (``local-dir:PATH``, ``hf-hub:ORG/NAME[@REVISION]``), as timm reads it."""
    where = name.partition(":")[2]
    if name.startswith("local-dir:"):
        path = Path(where) / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        from ..hubclient import hub_errors

        repo, _, revision = where.partition("@")
        with hub_errors(f"loading {name}"):
            path = Path(hf_hub_download(repo, "config.json", revision=revision or None))
    return json.loads(path.read_text())


def pretrained_cfg_of(name: str) -> dict[str, Any]:
    """The pretrained config timm gives ``name`` (a tag's, a saved model's config.json), from a model built on the
    meta device: its preprocessing before the class count is known, without allocating weights."""
    check_model_name(name)
    return dict(_timm_create(name, False, device="meta").pretrained_cfg)


def load_model(name: str, checkpoint: str | Path | None = None, *, pretrained: bool = False,
               **kwargs: Any) -> tuple[nn.Module, Provenance]:
    """``timm.create_model(name)`` with the weights, class count and data config of ``checkpoint`` if
    given, and a record of where weights and preprocessing came from.

    An authors' ``.npz`` selects the authors' weight-standardisation form; a checkpoint saved by
    ``nfnet-hub`` records its form in the safetensors metadata.
    """
    from ..classes import describe_wordnet_ids, name_pretrained_classes

    check_model_name(name)
    if checkpoint is None:
        model = _timm_create(name, pretrained, **kwargs)
        if names_saved_model(name) and (mode := _saved_config(name).get(IMAGE_MODE)):
            model.pretrained_cfg = {**model.pretrained_cfg, IMAGE_MODE: mode}  # timm leaves it in config.json
        weights = f"pretrained weights of {name}" if pretrained else "random weights (no checkpoint given)"
        classes = None
        if pretrained:  # a pretrained tag's ImageNet weights, or a saved model that names classes by WordNet id
            classes = (None if names_saved_model(name) else name_pretrained_classes(model)) or \
                describe_wordnet_ids(model)
        return model, Provenance(weights, f"{name}'s pretrained config", not pretrained, classes)
    ckpt = read_checkpoint(checkpoint)
    sd = ckpt.state_dict
    kwargs = {**ckpt.model_args, **kwargs}
    if ckpt.form == "deepmind":
        if classes := deepmind_classes(sd):
            kwargs.setdefault("num_classes", classes)
    else:
        if "head.fc.weight" in sd:
            kwargs.setdefault("num_classes", sd["head.fc.weight"].shape[0])
        if "stem.conv1.weight" in sd:
            kwargs.setdefault("in_chans", sd["stem.conv1.weight"].shape[1])
    try:
        model = _timm_create(name, False, **kwargs)
    except TypeError:  # recorded arguments another architecture does not take
        if not ckpt.model_args:
            raise
        fits = _variant_of(sd) if ckpt.form != "deepmind" else deepmind_variant(sd)
        raise CheckpointError(f"{checkpoint} does not fit {name}: its model was built with "
                              + ", ".join(f"{k}={v}" for k, v in ckpt.model_args.items()) + f", which {name} does not "
                              "take" + (f" (its tensors are {fits}'s: give that model name)" if fits else "")) from None
    model.load_state_dict(fitted_state_dict(ckpt, model, str(checkpoint)))
    record, source = ckpt.data_config, f"the data config recorded in {Path(checkpoint).name}"
    if not record and ckpt.train_args:  # as timm's train.py resolved it from its options
        from timm.data import resolve_data_config

        record = {**resolve_data_config(ckpt.train_args, pretrained_cfg=model.pretrained_cfg),
                  IMAGE_MODE: ckpt.train_args.get("input_img_mode")}  # train.py's option; its config has no key
        source = (f"the options of timm's train.py recorded in {Path(checkpoint).name}, resolved as train.py "
                  "resolves them (it records no class names)")
    if record:
        model.pretrained_cfg = {**apply_data_config(model.pretrained_cfg, record,
                                                    channels=getattr(model, "in_chans", None)),
                                "num_classes": model.num_classes}
    else:
        source = f"{name}'s pretrained config ({Path(checkpoint).name} records none)"
    # the authors published ImageNet weights only; a run on ImageNet's folders names classes by WordNet id
    classes = (name_pretrained_classes(model) if ckpt.form == "deepmind" else None) or describe_wordnet_ids(model)
    ema = f" (its EMA weights, {ckpt.entry}, as timm's load_checkpoint takes them)" if "ema" in ckpt.entry else ""
    built = ", ".join(f"{k}={v}" for k, v in ckpt.model_args.items() if kwargs.get(k) == v)
    built = f"; built with {built}, as it records" if built and ckpt.form != "deepmind" else ""
    return model, Provenance(f"{checkpoint}{ema}{built}", source, False, classes)


def create_model(name: str, checkpoint: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name)``, with the weights, class count and data config of ``checkpoint`` if given."""
    return load_model(name, checkpoint, **kwargs)[0]


def save_safetensors(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's weights (contiguous, shared tensors split) with its model_args() and data config in the
    metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    meta.update({f"nfnet_hub.{k}": str(v) for k, v in model_args(model).items()})
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if pretrained_cfg:
        meta[DATA_CONFIG_KEY] = json.dumps(data_config(pretrained_cfg, channels=getattr(model, "in_chans", None)))
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    honour_umask(path)
    return path
