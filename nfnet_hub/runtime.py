"""Production inference: an ONNX classifier with timm's eval preprocessing, without torch.

Needs only onnxruntime (or onnxruntime-gpu), numpy, Pillow and huggingface_hub. Importing this
module never imports torch, so it runs in slim serving images.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["OnnxClassifier", "Preprocess", "Prediction", "list_images", "load_image"]

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}


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
            raise ValueError(f"{source} is not a readable image: {e}") from None
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
    def from_pretrained_cfg(cls, cfg: dict[str, Any], *, test_size: bool = True) -> Preprocess:
        size = (test_size and cfg.get("test_input_size")) or cfg["input_size"]
        crop_pct = (test_size and cfg.get("test_crop_pct")) or cfg.get("crop_pct") or 0.875
        return cls(tuple(size[-2:]), crop_pct, cfg.get("crop_mode") or "center", cfg.get("interpolation") or "bicubic",
                   tuple(cfg.get("mean", cls.mean)), tuple(cfg.get("std", cls.std)))

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
            raise ValueError(f"crop_mode {self.crop_mode!r} with a non-square size is not supported")
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


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    probability: float


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _choose_providers(requested: Sequence[str] | None) -> list[str]:
    import onnxruntime as ort

    if requested:
        return list(requested)
    available = ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available \
        else ["CPUExecutionProvider"]


class OnnxClassifier:
    """Image classifier over an exported ``model.onnx`` and its ``config.json``."""

    def __init__(self, model_path: str | os.PathLike, config: dict[str, Any] | None = None, *,
                 providers: Sequence[str] | None = None):
        import onnxruntime as ort

        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"no ONNX model at {model_path}")
        try:
            self.session = ort.InferenceSession(str(model_path), providers=_choose_providers(providers))
        except Exception as e:  # onnxruntime raises its own exception types for corrupt graphs
            raise ValueError(f"{model_path} is not a loadable ONNX model: {e}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if config is None:
            config = {"pretrained_cfg": json.loads(meta["nfnet_hub.preprocessing"]),
                      "label_names": json.loads(meta.get("nfnet_hub.labels", "null"))}
        self.config = config
        self.preprocess = Preprocess.from_pretrained_cfg(config["pretrained_cfg"])
        num_classes = self.session.get_outputs()[0].shape[-1]
        self.labels = list(config.get("label_names") or [str(i) for i in range(num_classes)])
        self.input_name = self.session.get_inputs()[0].name

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually runs on (CUDA only if it could load)."""
        return self.session.get_providers()

    @property
    def device(self) -> str:
        return "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"

    @classmethod
    def from_pretrained(cls, repo_or_dir: str | os.PathLike, *, revision: str | None = None,
                        filename: str = "model.onnx", providers: Sequence[str] | None = None,
                        cache_dir: str | os.PathLike | None = None, token: str | bool | None = None) -> OnnxClassifier:
        """Load from a local bundle folder or a Hub repository id (``ORG/NAME``)."""
        path = Path(repo_or_dir)
        if path.is_dir():
            model_file, config_file = path / filename, path / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            repo_id = str(repo_or_dir)
            if repo_id.count("/") != 1:
                raise ValueError(f"{repo_id!r} is neither a folder nor a Hub repo id of the form ORG/NAME")
            kw = dict(revision=revision, cache_dir=cache_dir, token=token)
            config_file = Path(hf_hub_download(repo_id, "config.json", **kw))
            model_file = Path(hf_hub_download(repo_id, filename, **kw))
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
        return cls(model_file, config, providers=providers)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits of a preprocessed NCHW float32 batch."""
        return self.session.run(None, {self.input_name: np.asarray(batch, np.float32)})[0]

    def predict(self, images: Iterable[str | os.PathLike | Image.Image], *, top_k: int = 5,
                batch_size: int = 16) -> list[list[Prediction]]:
        """Top-k labels and probabilities for each image, in order."""
        images = list(images)
        if not images:
            raise ValueError("no images given")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        results = []
        for start in range(0, len(images), batch_size):
            batch = self.preprocess.batch(images[start:start + batch_size])
            probs = _softmax(self.logits(batch).astype(np.float64))
            for row in probs:
                top = np.argsort(-row)[:top_k]
                results.append([Prediction(self.labels[i], int(i), float(row[i])) for i in top])
        return results


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted; an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files
