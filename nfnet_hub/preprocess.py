"""The one place that decides what a model's input looks like: the size to export and fold at, and
timm's eval transform (resize, crop, normalise) in numpy.

A training run records its data config (input size, crop, interpolation, mean, std and, where known,
the class names) in its checkpoints and ``args.yaml``. Loading such a checkpoint puts the record into
the model's ``pretrained_cfg``; export, bundle, validate and the runtime read it from there, through
this module, so weights never meet a preprocessing they were not trained with. Imports no torch.
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UsageError

__all__ = ["IMAGE_SUFFIXES", "UNDECODABLE", "WIDE_MODES", "ImageSource", "Preprocess", "apply_data_config",
           "data_config", "eval_size", "export_size", "image_mode_bands", "list_images", "load_image", "open_image",
           "readable_labels"]

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I")  # 16-bit and 32-bit integer images, which PIL's convert clips
CROP_MODES = ("center", "squash", "border")  # timm's transforms_imagenet_eval
IMAGE_MODE = "input_img_mode"  # the record's key for a mode other than the default, as train.py's option names it
DEFAULT_MODES = {3: "RGB", 1: "L"}  # the PIL mode timm's train.py reads images in, without --input-img-mode
# how Pillow says a file does not decode: truncated or foreign files (several types), and images so large they
# are taken for decompression bombs (above Pillow's MAX_IMAGE_PIXELS twice over)
UNDECODABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def eval_size(cfg: Mapping[str, Any], img_size: int | Sequence[int] | None = None) -> tuple[int, int]:
    """The (height, width) a model is evaluated at: ``img_size`` if given (one side for a square, or two), else
    its test size, else its train size (timm's ``use_test_size``)."""
    if img_size is not None:
        return (img_size, img_size) if isinstance(img_size, int) else (int(img_size[-2]), int(img_size[-1]))
    size = cfg.get("test_input_size") or cfg.get("input_size") or (3, 224, 224)
    return int(size[-2]), int(size[-1])


def export_size(cfg: Mapping[str, Any], img_size: int | Sequence[int] | None = None) -> tuple[int, int]:
    """The (height, width) to fold and export at: any size the network takes, as timm's models take any (folding
    makes SAME padding static for it)."""
    h, w = eval_size(cfg, img_size)
    if isinstance(img_size, bool) or min(h, w) < 1:
        got = img_size if img_size is not None else f"{h}x{w} (from the model's config)"
        raise UsageError(f"image size must be positive, got {got}")
    return h, w


def data_config(cfg: Mapping[str, Any], img_size: int | Sequence[int] | None = None,
                label_names: Sequence[str] | None = None, *, channels: int | None = None) -> dict[str, Any]:
    """The record of an eval transform that training writes and exports carry (JSON-ready); ``channels``:
    the model's input channels, where they may differ from the config's (see ``Preprocess.from_pretrained_cfg``)."""
    pre = Preprocess.from_pretrained_cfg(cfg, img_size=img_size, channels=channels)
    labels = list(label_names) if label_names is not None else cfg.get("label_names")
    mode = {IMAGE_MODE: pre.image_mode} if pre.image_mode != DEFAULT_MODES.get(pre.channels) else {}
    return {"input_size": [pre.channels, *pre.input_size], "crop_pct": pre.crop_pct, "crop_mode": pre.crop_mode,
            "interpolation": pre.interpolation, "mean": list(pre.mean), "std": list(pre.std), **mode,
            "label_names": list(labels) if labels else None}


def apply_data_config(cfg: Mapping[str, Any], record: Mapping[str, Any], *,
                      channels: int | None = None) -> dict[str, Any]:
    """A pretrained_cfg whose eval transform is the recorded one (train and test size alike), for a model of
    ``channels`` input channels where given."""
    if channels is not None:
        record = data_config(record, channels=channels)
    size = tuple(record["input_size"])
    out = {**cfg, "input_size": size, "test_input_size": size, "crop_pct": record["crop_pct"],
           "crop_mode": record["crop_mode"], "interpolation": record["interpolation"],
           "mean": tuple(record["mean"]), "std": tuple(record["std"])}
    out.pop("test_crop_pct", None)
    out.pop(IMAGE_MODE, None)
    if record.get(IMAGE_MODE):  # not a key of timm's pretrained_cfg: a bundle's config.json holds it outside
        out[IMAGE_MODE] = record[IMAGE_MODE]
    if record.get("label_names"):
        out["label_names"] = list(record["label_names"])
    return out


def open_image(source: str | os.PathLike | IO[bytes], *, name: str | None = None,
               formats: Sequence[str] | None = None, max_pixels: int | None = None,
               limit_option: str | None = None) -> Image.Image:
    """A decoded image, or one ``UsageError`` that names it (``name``, else ``source``) whatever Pillow raised;
    ``formats``: the only ones taken; ``max_pixels``: the largest image taken, refused from its header, undecoded
    (``limit_option``: the option that raises it, named in the refusal)."""
    try:
        img = Image.open(source, formats=formats)
        too_large = max_pixels is not None and img.width * img.height > max_pixels
        if not too_large:
            img.load()
    except FileNotFoundError:
        if str(source).startswith(("http://", "https://")):  # timm's inference.py does not fetch them either
            raise UsageError(f"{source} is a URL: images are read from files, bytes or arrays (download it first: "
                             f"curl -O {source})") from None
        raise UsageError(f"{name or source} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{source} is a folder, not an image: pass its images (list_images(folder) lists them as "
                         "`nfnet-hub predict FOLDER` reads them)") from None
    except UNDECODABLE as e:
        why = str(e).splitlines()[0][:200].replace(f" {source!r}", "") if str(e) else type(e).__name__  # no <BytesIO>
        taken = f" (formats taken: {', '.join(formats)})" if formats else ""
        raise UsageError(f"{name or source} is not a readable image: {why}{taken}") from None
    if too_large:
        w, h = img.size
        img.close()
        raise UsageError(f"{name or source} is {w}x{h} ({w * h:,} pixels), more than the {max_pixels:,} pixels an "
                         "image may have here" + (f" ({limit_option} raises the limit)" if limit_option else ""))
    return img


ImageSource = str | os.PathLike | bytes | IO[bytes] | np.ndarray | Image.Image
"""An image as the runtime takes it: a file path, an encoded file's bytes (or a binary file object open on them, as
``open(path, "rb")``, ``io.BytesIO`` or a web framework's upload), a PIL image, or a uint8 array of RGB
(HxWx3), RGBA (HxWx4) or grey (HxW) pixels; OpenCV's arrays are BGR and must be converted first. It is read in the
model's image mode (RGB, L ...), as timm's loader reads files."""


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or arr.ndim == 3 and arr.shape[2] in (3, 4)):
        raise UsageError(f"an image array must be uint8 pixels, HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA); got "
                         f"{arr.dtype} of shape {list(arr.shape)} (a preprocessed NCHW batch goes to logits())")
    return Image.fromarray(np.ascontiguousarray(arr))


def _image(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return open_image(io.BytesIO(source), name=f"an image of {len(source)} bytes")
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, (str, os.PathLike)):
        return open_image(source)
    if callable(getattr(source, "read", None)):
        name = getattr(source, "name", "") or f"an image read from a {type(source).__name__}"
        return open_image(source, name=str(name))
    raise UsageError(f"an image is a file path, an encoded file's bytes or a binary file object, a PIL image or a "
                     f"uint8 pixel array, not {type(source).__name__}")


def load_image(source: ImageSource, mode: str = "RGB") -> Image.Image:
    """An image in PIL ``mode`` (RGB, L for greyscale ...), converted as timm's loader converts (``input_img_mode``:
    alpha dropped for RGB, palettes expanded), 16-bit and 32-bit integer images rescaled to 8 bits, not clipped."""
    img = _image(source)
    if 0 in img.size:  # Pillow resizes an empty image to the input size: a confident answer about nothing
        raise UsageError(f"an image of {img.size[0]}x{img.size[1]} pixels has none to classify")
    if img.mode in WIDE_MODES:
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(arr * 255.0 / peak), 0, 255).astype(np.uint8), "L")
    try:
        return img if img.mode == mode else img.convert(mode)  # convert would copy it
    except ValueError as e:  # Pillow converts between some modes only
        raise UsageError(f"a {img.mode} image cannot be read in mode {mode}: {e}") from None


@dataclass(frozen=True)
class Preprocess:
    """timm's eval transform (``transforms_imagenet_eval``) for a pretrained_cfg, in numpy, on images read in
    ``image_mode`` (timm's ``input_img_mode``): by default RGB for 3-channel models and L (greyscale) for 1-channel
    ones, as train.py reads them; a model of other channels reads images only in a mode it records (RGBA ...)."""

    input_size: tuple[int, int]
    crop_pct: float = 0.875
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channels: int = 3
    image_mode: str | None = None

    def __post_init__(self) -> None:
        for name in ("mean", "std"):  # one value stands for every channel, as in timm's data config
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values * self.channels if len(values) == 1 else values)
        if self.crop_mode not in CROP_MODES:
            raise UsageError(f"crop_mode {self.crop_mode!r} is not supported: choose {', '.join(CROP_MODES)}")
        if not self.crop_pct > 0:
            raise UsageError(f"crop_pct must be positive, got {self.crop_pct}")
        mode = self.image_mode or DEFAULT_MODES.get(self.channels)
        object.__setattr__(self, "image_mode", mode)
        if mode is not None and (bands := image_mode_bands(mode)) != self.channels:
            raise UsageError(f"image mode {mode} has {bands} channels, the model takes {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise UsageError(f"mean {self.mean} and std {self.std} must have a value per input channel "
                             f"({self.channels}), or one for all")

    @classmethod
    def from_pretrained_cfg(cls, cfg: Mapping[str, Any], *, img_size: int | Sequence[int] | None = None,
                            channels: int | None = None) -> Preprocess:
        """The eval transform at ``img_size``, or at the config's test size (timm's ``use_test_size``).

        ``channels`` (the model's ``in_chans``) overrides the config's: timm leaves a model's pretrained_cfg at
        3 channels when it is created with ``in_chans=1``, and its loader then normalises with the mean of the
        three means and stds, as done here."""
        size = eval_size(cfg, img_size)
        test = cfg.get("test_input_size")
        at_test_size = bool(test) and (int(test[-2]), int(test[-1])) == size
        crop_pct = (at_test_size and cfg.get("test_crop_pct")) or cfg.get("crop_pct") or 0.875
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation not in _INTERPOLATION:
            raise UsageError(f"unknown interpolation {interpolation!r}: choose one of {', '.join(_INTERPOLATION)}")
        if channels is None:
            channels = int((cfg.get("test_input_size") or cfg.get("input_size") or (3,))[0])
        return cls(size, float(crop_pct), cfg.get("crop_mode") or "center", interpolation,
                   _per_channel(cfg.get("mean", cls.mean), channels), _per_channel(cfg.get("std", cls.std), channels),
                   channels, cfg.get(IMAGE_MODE))

    @classmethod
    def for_model(cls, model: Any, *, img_size: int | Sequence[int] | None = None) -> Preprocess:
        """The eval transform of a timm model: its pretrained_cfg, for its ``in_chans``."""
        return cls.from_pretrained_cfg(model.pretrained_cfg, img_size=img_size,
                                       channels=getattr(model, "in_chans", None))

    def describe(self) -> str:
        """One line a user can check against their training."""
        h, w = self.input_size
        fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        mode = {"RGB": "", "L": " greyscale", None: f" {self.channels}-channel"}.get(self.image_mode,
                                                                                    f" {self.image_mode}")
        return (f"{h}x{w} px{mode}, {self.crop_mode} crop {self.crop_pct:g}, {self.interpolation}, "
                f"mean {fmt(self.mean)}, std {fmt(self.std)}")

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """Resize to 1/crop_pct of the input size, then take its centre (timm's three crop modes)."""
        h, w = self.input_size
        resample = _INTERPOLATION[self.interpolation]
        scale_h, scale_w = math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)
        iw, ih = img.size
        fill = 0
        if self.crop_mode == "squash":
            img = img.resize((scale_w, scale_h), resample)
        elif self.crop_mode == "center" and scale_h == scale_w:  # torchvision's Resize of the shorter side
            short, long = (iw, ih) if iw <= ih else (ih, iw)
            new_short, new_long = scale_h, int(scale_h * long / short)
            img = img.resize((new_short, new_long) if iw <= ih else (new_long, new_short), resample)
        else:  # timm's ResizeKeepRatio: the side nearer its target fits it, or the longest side for "border"
            ratio = max(ih / scale_h, iw / scale_w) if self.crop_mode == "border" else min(ih / scale_h, iw / scale_w)
            img = img.resize((round(iw / ratio), round(ih / ratio)), resample)
            if self.crop_mode == "border":  # padded with the mean colour, as timm pads it
                fill = tuple(round(255 * m) for m in self.mean) if len(self.mean) > 1 else round(255 * self.mean[0])
        return _center_crop_or_pad(img, h, w, fill)

    def require_image_mode(self) -> str:
        """The mode images are read in; a model that records none takes arrays only, which is said."""
        if self.image_mode is None:
            raise UsageError(f"the model takes {self.channels}-channel input and records no image mode to read images "
                             f"in (train with --input-img-mode): give it preprocessed [N, {self.channels}, H, W] "
                             "arrays (OnnxClassifier.logits, the server's tensor input)")
        return self.image_mode

    def __call__(self, image: ImageSource) -> np.ndarray:
        img = load_image(image, self.require_image_mode())
        arr = np.asarray(self.resize_crop(img))
        if arr.dtype == bool:  # mode 1: timm's loader takes a set pixel as 255
            arr = arr.astype(np.uint8) * 255
        arr = arr.astype(np.float32).reshape(*self.input_size, -1) / np.float32(255.0)
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def batch(self, images: Sequence[ImageSource]) -> np.ndarray:
        """An NCHW float32 batch of preprocessed images."""
        return np.stack([self(image) for image in images])

    def readable_batch(self, images: Sequence[ImageSource]) -> tuple[np.ndarray, list[int], list[str]]:
        """The batch of the images that read, their places in ``images``, and why each other one does not: a folder
        of thousands may hold a broken file, which training and predict skip too."""
        arrays, kept, problems = [], [], []
        for i, image in enumerate(images):
            try:
                arrays.append(self(image))
                kept.append(i)
            except UsageError as e:
                problems.append(str(e))
        batch = np.stack(arrays) if arrays else np.zeros((0, self.channels, *self.input_size), np.float32)
        return batch, kept, problems


def _center_crop_or_pad(img: Image.Image, h: int, w: int, fill: int | tuple[int, ...]) -> Image.Image:
    """The centre ``h`` x ``w`` of ``img``, padded first where it is smaller, as torchvision's ``CenterCrop`` and
    timm's ``CenterCropOrPad`` pad (the odd pixel after, not before: PIL's crop out of bounds rounds the other way)."""
    iw, ih = img.size
    if w > iw or h > ih:
        pw, ph = max(w - iw, 0), max(h - ih, 0)
        padded = Image.new(img.mode, (iw + pw, ih + ph), fill)
        padded.paste(img, (pw // 2, ph // 2))
        img, (iw, ih) = padded, padded.size
    top, left = int(round((ih - h) / 2.0)), int(round((iw - w) / 2.0))
    return img.crop((left, top, left + w, top + h))


def image_mode_bands(mode: str) -> int:
    """The channels of images read in PIL ``mode``; an error for a name Pillow does not know, and for modes of
    wider pixels than 8 bits (I, F, I;16), which timm's loader hands over unscaled or cannot normalise."""
    from PIL import ImageMode

    try:
        info = ImageMode.getmode(mode)
    except (KeyError, ValueError):
        raise UsageError(f"{mode!r} is not an image mode: choose RGB (3 channels), L (1), RGBA or CMYK (4), LA (2), "
                         "or another of Pillow's modes") from None
    if info.typestr not in ("|u1", "|b1"):
        raise UsageError(f"image mode {mode} has {info.typestr[1:]} pixels: timm's loader hands them to the model "
                         "unscaled, or fails on them; choose a mode of 8-bit channels (L for greyscale)")
    return len(info.bands)


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """Normalisation values for ``channels`` channels, as timm's loader adapts them (``adapt_to_chs``)."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    return (sum(values) / len(values),) * channels


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively, through linked folders as timm's folder reader goes, each folder
    once), sorted; an error if there are none. Hidden files and folders are left out: macOS's ``._NAME.jpg``
    companions and notebook checkpoints are not the user's images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder of images")
    files, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # reached again through a link (a link back up the tree would never end)
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # in order: the first path to a folder names it
        files += [Path(root, n) for n in names if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES]
    files.sort()
    if not files:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


def readable_labels(cfg: Mapping[str, Any]) -> list[str] | None:
    """A config's class names as people read them, as timm's inference.py prints them: each of ``label_names``
    through ``label_descriptions`` where it describes it (timm's ImageNet configs name classes by WordNet id)."""
    names, descriptions = cfg.get("label_names"), cfg.get("label_descriptions") or {}
    if isinstance(names, Mapping):  # timm's index -> name form; JSON makes its keys strings
        by_index = {int(k): v for k, v in names.items()}
        names = [by_index[i] for i in range(len(by_index))] if set(by_index) == set(range(len(by_index))) else None
    return [descriptions.get(n, n) for n in names] if names else None
