"""The one place that decides what a model's input looks like: the size to export and fold at, and
timm's eval transform (resize, crop, normalise) in numpy.

A training run records its data config (input size, crop, interpolation, mean, std and, where known,
the class names) in its checkpoints and ``args.yaml``. Loading such a checkpoint puts the record into
the model's ``pretrained_cfg``; export, bundle, validate and the runtime read it from there, through
this module, so weights never meet a preprocessing they were not trained with. Imports no torch.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UsageError

__all__ = ["IMAGE_SUFFIXES", "Preprocess", "apply_data_config", "data_config", "eval_size", "export_size",
           "list_images", "load_image", "read_labels"]

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
STRIDE = 32  # an NFNet's total stride: sizes are multiples of it


def eval_size(cfg: Mapping[str, Any], img_size: int | None = None) -> tuple[int, int]:
    """The (height, width) a model is evaluated at: ``img_size`` if given, else its test size, else its
    train size (timm's ``use_test_size``)."""
    if img_size is not None:
        return img_size, img_size
    size = cfg.get("test_input_size") or cfg.get("input_size") or (3, 224, 224)
    return int(size[-2]), int(size[-1])


def export_size(cfg: Mapping[str, Any], img_size: int | None = None) -> int:
    """The square size to fold and export at; refuses sizes the network cannot take."""
    h, w = eval_size(cfg, img_size)
    if isinstance(img_size, bool) or h != w or h < STRIDE or h % STRIDE:
        got = img_size if img_size is not None else f"{h}x{w} (from the model's config)"
        raise UsageError(f"image size must be a positive multiple of {STRIDE} (the network's stride), got {got}")
    return h


def data_config(cfg: Mapping[str, Any], img_size: int | None = None,
                label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The record of an eval transform that training writes and exports carry (JSON-ready)."""
    pre = Preprocess.from_pretrained_cfg(cfg, img_size=img_size)
    labels = list(label_names) if label_names is not None else cfg.get("label_names")
    return {"input_size": [3, *pre.input_size], "crop_pct": pre.crop_pct, "crop_mode": pre.crop_mode,
            "interpolation": pre.interpolation, "mean": list(pre.mean), "std": list(pre.std),
            "label_names": list(labels) if labels else None}


def apply_data_config(cfg: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    """A pretrained_cfg whose eval transform is the recorded one (train and test size alike)."""
    size = tuple(record["input_size"])
    out = {**cfg, "input_size": size, "test_input_size": size, "crop_pct": record["crop_pct"],
           "crop_mode": record["crop_mode"], "interpolation": record["interpolation"],
           "mean": tuple(record["mean"]), "std": tuple(record["std"])}
    out.pop("test_crop_pct", None)
    if record.get("label_names"):
        out["label_names"] = list(record["label_names"])
    return out


def load_image(source: str | os.PathLike | Image.Image) -> Image.Image:
    """An RGB image: greyscale and palette images expanded, alpha dropped (as timm's loader does),
    16-bit and 32-bit integer images rescaled to 8 bits rather than clipped."""
    if isinstance(source, Image.Image):
        img = source
    else:
        try:
            img = Image.open(source)
            img.load()
        except (UnidentifiedImageError, OSError) as e:
            raise UsageError(f"{source} is not a readable image: {e}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(arr * 255.0 / peak), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


@dataclass(frozen=True)
class Preprocess:
    """timm's eval transform (``transforms_imagenet_eval``) for a pretrained_cfg, in numpy."""

    input_size: tuple[int, int]
    crop_pct: float = 0.875
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_pretrained_cfg(cls, cfg: Mapping[str, Any], *, img_size: int | None = None) -> Preprocess:
        """The eval transform at ``img_size``, or at the config's test size (timm's ``use_test_size``)."""
        size = eval_size(cfg, img_size)
        test = cfg.get("test_input_size")
        at_test_size = bool(test) and (int(test[-2]), int(test[-1])) == size
        crop_pct = (at_test_size and cfg.get("test_crop_pct")) or cfg.get("crop_pct") or 0.875
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation not in _INTERPOLATION:
            raise UsageError(f"unknown interpolation {interpolation!r}: choose one of {', '.join(_INTERPOLATION)}")
        return cls(size, float(crop_pct), cfg.get("crop_mode") or "center", interpolation,
                   tuple(cfg.get("mean", cls.mean)), tuple(cfg.get("std", cls.std)))

    def describe(self) -> str:
        """One line a user can check against their training."""
        h, w = self.input_size
        fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        return (f"{h}x{w} px, {self.crop_mode} crop {self.crop_pct:g}, {self.interpolation}, "
                f"mean {fmt(self.mean)}, std {fmt(self.std)}")

    def resize_crop(self, img: Image.Image) -> Image.Image:
        h, w = self.input_size
        resample = _INTERPOLATION[self.interpolation]
        scale_h, scale_w = math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)
        if self.crop_mode == "squash":
            img = img.resize((scale_w, scale_h), resample)
        elif self.crop_mode == "center" and scale_h == scale_w:
            iw, ih = img.size
            short, long = (iw, ih) if iw <= ih else (ih, iw)
            new_short, new_long = scale_h, int(scale_h * long / short)
            img = img.resize((new_short, new_long) if iw <= ih else (new_long, new_short), resample)
        else:
            raise UsageError(f"crop_mode {self.crop_mode!r} with a non-square size is not supported")
        iw, ih = img.size
        top, left = int(round((ih - h) / 2.0)), int(round((iw - w) / 2.0))
        return img.crop((left, top, left + w, top + h))

    def __call__(self, image: str | os.PathLike | Image.Image) -> np.ndarray:
        arr = np.asarray(self.resize_crop(load_image(image)), dtype=np.float32) / np.float32(255.0)
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def batch(self, images: Sequence[str | os.PathLike | Image.Image]) -> np.ndarray:
        """An NCHW float32 batch of preprocessed images."""
        return np.stack([self(image) for image in images])


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted; an error if there are none. Hidden files and folders
    are left out: macOS's ``._NAME.jpg`` companions and notebook checkpoints are not the user's images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no labels file at {path}")
    try:
        labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a text file of labels (one per line)") from None
    if not labels:
        raise UsageError(f"{path} holds no labels (one per line)")
    return labels
