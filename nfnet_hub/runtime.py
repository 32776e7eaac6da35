"""Production inference: an ONNX classifier with timm's eval preprocessing, without torch.

Needs only onnxruntime (or onnxruntime-gpu), numpy, Pillow and huggingface_hub. Importing this
module never imports torch, so it runs in slim serving images.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .bundle_files import ONNX_FILES, damaged_note
from .errors import UsageError
from .preprocess import IMAGE_MODE, ImageSource, Preprocess, list_images, load_image, readable_labels
from .runs import best_checkpoint, is_weights_file, run_model

__all__ = ["ImageSource", "OnnxClassifier", "Preprocess", "Prediction", "list_images", "load_image"]


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    probability: float


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _choose_providers(requested: Sequence[str] | None) -> list[str]:
    """``requested`` where this ONNX Runtime has one of them (ONNX Runtime would run on its CPU provider instead,
    with a warning, even for a misspelt name); else CUDA where present, then the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        if not set(requested) & set(available):
            gpu = " (CUDAExecutionProvider comes with onnxruntime-gpu: pip install 'nfnet-hub[gpu]')" \
                if "CUDAExecutionProvider" in requested else ""
            raise UsageError(f"none of the providers asked for ({', '.join(requested)}) is in this ONNX Runtime, "
                             f"which has {', '.join(available)}{gpu}; list CPUExecutionProvider last to fall back to "
                             "the CPU")
        return list(requested)
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available \
        else ["CPUExecutionProvider"]


def parse_source(name: str) -> tuple[str, bool]:
    """A bundle's name without timm's ``hf-hub:`` or ``local-dir:`` prefix, and whether it is a local folder: with
    no prefix, whether it looks like a path (it exists, starts with ``.``, ``/`` or ``~``, has other than one ``/``,
    or its parent folder exists here) rather than a Hub repo id ORG/NAME."""
    if name.startswith(("hf-hub:", "local-dir:")):
        scheme, _, rest = name.partition(":")
        return rest, scheme == "local-dir"
    path, repo = Path(name).expanduser(), name.partition("@")[0]  # a revision (refs/pr/1) may hold '/'
    return name, (path.exists() or name.startswith((".", "/", "~")) or repo.count("/") != 1 or name.endswith("/")
                  or os.sep != "/" and os.sep in repo or (path.parent != Path(".") and path.parent.is_dir()))


def split_revision(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """A Hub name's repo id and revision: the branch, tag or commit that timm's ``ORG/NAME@REVISION`` pins, or
    ``revision`` (both only where they agree)."""
    repo_id, at, pinned = name.partition("@")
    if at and not pinned:
        raise UsageError(f"{name!r} names no revision after '@': give ORG/NAME@REVISION (a branch, tag or commit), "
                         "or ORG/NAME for the main branch")
    if pinned and revision and pinned != revision:
        raise UsageError(f"{name!r} pins revision {pinned!r}, but revision {revision!r} is given too: give one")
    return repo_id, pinned or revision


def read_bundle_config(path: Path) -> dict[str, Any]:
    """A bundle's config.json, which must hold timm's ``pretrained_cfg``."""
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}): is the bundle complete?") from None
    if not isinstance(config, dict) or not isinstance(config.get("pretrained_cfg"), dict):
        raise UsageError(f"{path} has no pretrained_cfg (the preprocessing): it is not a bundle's config.json")
    return config


def config_labels(config: dict[str, Any]) -> list[str] | None:
    """A bundle config's class names as people read them (timm's config.json holds them at its top level, the
    pretrained_cfg of a timm model, which the ONNX metadata carries, inside it)."""
    return readable_labels({**config.get("pretrained_cfg", {}), **{
        k: config[k] for k in ("label_names", "label_descriptions") if config.get(k)}})


def config_preprocess(config: dict[str, Any]) -> Preprocess:
    """A config's eval transform: its pretrained_cfg, read in the image mode a bundle's config.json holds at its top
    level (timm's pretrained_cfg has no key for it; the ONNX metadata holds it inside)."""
    mode = {IMAGE_MODE: config[IMAGE_MODE]} if config.get(IMAGE_MODE) else {}
    return Preprocess.from_pretrained_cfg({**config["pretrained_cfg"], **mode})


def file_config(model_path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """An ONNX file's own config: the preprocessing and labels nfnet-hub writes into its metadata, else the
    config.json beside it."""
    if "nfnet_hub.preprocessing" in metadata:
        return {"pretrained_cfg": json.loads(metadata["nfnet_hub.preprocessing"]),
                "label_names": json.loads(metadata.get("nfnet_hub.labels", "null"))}
    if (model_path.parent / "config.json").is_file():
        return read_bundle_config(model_path.parent / "config.json")
    raise UsageError(f"{model_path} carries no preprocessing metadata (not exported by nfnet-hub) and has no "
                     "config.json beside it: load it from its bundle folder, whose config.json says how to preprocess")


def refuse_unexported(path: Path, source: str) -> None:
    """Weights not yet exported to ONNX (a model timm saved with ``save_for_hf``, a training run's folder, a
    checkpoint file) are told the command that bundles them."""
    if is_weights_file(path):
        raise UsageError(f"{path} holds weights, not an ONNX export: bundle them first, `nfnet-hub bundle "
                         f"{run_model(path.parent)} --checkpoint {path} --out BUNDLE`")
    if not path.is_dir():
        return
    held = {p.name for p in path.iterdir()}
    if any(n.lower().endswith(".onnx") for n in held):
        return
    if "config.json" in held and {"model.safetensors", "pytorch_model.bin"} & held:
        raise UsageError(f"{path} holds a model timm saved (config.json and weights), not an ONNX export: "
                         f"bundle it first, `nfnet-hub bundle local-dir:{source} --out BUNDLE`")
    if best := best_checkpoint(path):
        raise UsageError(f"{path} is a training run (args.yaml and checkpoints), not an ONNX export: bundle its best "
                         f"weights first, `nfnet-hub bundle {run_model(path)} --checkpoint {best} --out BUNDLE`")


def precision_file(source: str, precision: str) -> str:
    """The ONNX file that ``--precision`` (of serve and triton) chooses in a source: among a bundle folder's files
    (saying which precisions it has), the file itself for a lone ONNX file (which has one precision only)."""
    where, local = parse_source(source)
    path, filename = Path(where).expanduser(), ONNX_FILES[precision]
    if local and path.is_file():
        if precision != "fp32":
            raise UsageError(f"--precision chooses among a bundle's files, but {where} is one file: give it without "
                             "--precision, or give its bundle folder")
        return path.name
    if local and path.is_dir() and not (path / filename).is_file():
        refuse_unexported(path, where)
        have = sorted(p for p, f in ONNX_FILES.items() if (path / f).is_file())
        raise UsageError(f"bundle {where} has no {precision} model ({filename}); it has: {', '.join(have) or 'none'}")
    return filename


def no_model_at(source: str) -> UsageError:
    """The error for a local source that is not there; a bare name may be a model name, which is run once exported."""
    bare = "/" not in source and os.sep not in source
    return UsageError(f"no bundle folder or ONNX file at {source}" + (
        ", nor is it a Hub repo id (ORG/NAME); a timm model name runs here once exported: `nfnet-hub bundle NAME "
        "--checkpoint CKPT --out BUNDLE`, then give BUNDLE" if bare else ""))


def resolve_files(source: str | os.PathLike, *, filename: str = "model.onnx", revision: str | None = None,
                  cache_dir: str | os.PathLike | None = None,
                  token: str | bool | None = None) -> tuple[Path, Path | None]:
    """The ONNX file and config.json a model source names (see ``OnnxClassifier.from_pretrained``), a Hub
    repository's two files downloaded through huggingface_hub's cache; no config.json for a lone ONNX file."""
    source, local = parse_source(str(source))
    path = Path(source).expanduser()
    if local and path.is_file():
        if path.suffix.lower() != ".onnx":
            refuse_unexported(path, source)
            raise UsageError(f"{path} is a file but not an ONNX model: give a bundle folder or a .onnx file")
        if filename not in ("model.onnx", path.name):
            raise UsageError(f"{path} is one ONNX file, so it cannot also be {filename}: give the bundle folder "
                             f"to choose its {filename}, or that file itself")
        return path, None
    if local:
        if not path.is_dir():
            raise no_model_at(source)
        if not (path / filename).is_file():
            refuse_unexported(path, source)
            held = sorted(p.name for p in path.iterdir())
            raise UsageError(f"{path} holds no {filename}: is it a bundle folder? (it holds: "
                             f"{', '.join(held) or 'nothing'})")
        return path / filename, path / "config.json"
    from huggingface_hub import hf_hub_download

    from .hubclient import check_repo_id, hub_errors

    repo_id, revision = split_revision(source, revision)
    try:
        check_repo_id(repo_id)
    except UsageError:
        raise UsageError(f"{source!r} is neither a bundle folder nor a Hub repo id of the form ORG/NAME"
                         "[@REVISION]") from None
    from huggingface_hub.errors import RemoteEntryNotFoundError

    kw = dict(revision=revision, cache_dir=cache_dir, token=token)
    with hub_errors(f"downloading {source}"):
        config_file = Path(hf_hub_download(repo_id, "config.json", **kw))
        try:
            return Path(hf_hub_download(repo_id, filename, **kw)), config_file
        except RemoteEntryNotFoundError:
            if filename != "model.onnx":
                raise UsageError(f"{source} on the Hub has no {filename}: that precision was not published") from None
            raise UsageError(f"{source} on the Hub has no model.onnx, so it is not an nfnet-hub bundle (a model timm "
                             f"saved?): bundle it first, `nfnet-hub bundle hf-hub:{source} --out BUNDLE`") from None


class OnnxClassifier:
    """Image classifier over an exported ``model.onnx`` and its ``config.json`` (by default the preprocessing and
    labels nfnet-hub writes into the ONNX file, else the ``config.json`` beside it)."""

    def __init__(self, model_path: str | os.PathLike, config: dict[str, Any] | None = None, *,
                 providers: Sequence[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.model_path = model_path = Path(model_path)
        if not model_path.is_file():
            raise UsageError(f"no ONNX model at {model_path}")
        options = ort.SessionOptions()
        if threads:  # intra-op threads of one run (default: ONNX Runtime's, one per physical core)
            options.intra_op_num_threads = threads
        providers = _choose_providers(providers)
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for corrupt graphs
            raise UsageError(f"{model_path} is not a loadable ONNX model: {str(e).splitlines()[0]}"
                             f"{damaged_note(model_path)}") from None
        if config is None:
            config = file_config(model_path, self.session.get_modelmeta().custom_metadata_map)
        self.config = config
        self.preprocess = config_preprocess(config)
        num_classes = self.session.get_outputs()[0].shape[-1]
        labels = config_labels(config)
        if labels and isinstance(num_classes, int) and len(labels) != num_classes:
            raise UsageError(f"{model_path.name} scores {num_classes} classes, but its config names {len(labels)}: "
                             "the config is not the one exported with this model")
        self.labels = list(labels or [str(i) for i in range(num_classes)])
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = shape = self.session.get_inputs()[0].shape  # [name of the batch dim, C, H, W]
        if len(shape) == 4 and shape[1] != self.preprocess.channels:
            raise UsageError(f"{model_path.name} takes {shape[1]}-channel input, but its config's preprocessing gives "
                             f"{self.preprocess.channels}: the config is not the one exported with this model")
        if len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]) and \
                tuple(shape[2:]) != self.preprocess.input_size:
            raise UsageError(f"{model_path.name} takes {shape[2]}x{shape[3]} px, but its config's preprocessing gives "
                             f"{self.preprocess.describe().split(',')[0]}: the config is not the one exported with "
                             "this model")

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
                        cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                        threads: int | None = None) -> OnnxClassifier:
        """Load from a local bundle folder or a Hub repository id (``ORG/NAME``), named as timm names them or not
        (``local-dir:PATH``, ``hf-hub:ORG/NAME``; ``ORG/NAME@REVISION`` pins a branch, tag or commit, as in timm, or
        ``revision`` does), or from an ONNX file that nfnet-hub exported (it carries its
        preprocessing and labels), such as ``export``'s ``out/model.onnx``.

        A name that looks like a path (it exists, starts with ``.``, ``/`` or ``~``, has more than one
        ``/``, or its parent folder exists here) is a local folder, and a missing one is a local error:
        it never turns into a Hub download."""
        model_file, config_file = resolve_files(repo_or_dir, filename=filename, revision=revision,
                                                cache_dir=cache_dir, token=token)
        config = read_bundle_config(config_file) if config_file is not None and config_file.is_file() else None
        return cls(model_file, config, providers=providers, threads=threads)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits of a preprocessed NCHW float32 batch (``preprocess.batch(images)`` makes one). Integer pixels
        are refused: cast to float, unnormalised, they give confident nonsense."""
        batch = np.asarray(batch)
        fits = batch.ndim == len(self.input_shape) and all(
            not isinstance(d, int) or d == n for d, n in zip(self.input_shape[1:], batch.shape[1:]))
        if batch.dtype.kind not in "f" or not fits:
            dims = ", ".join(str(d) for d in self.input_shape[1:])
            raise UsageError(f"logits takes a preprocessed float batch [N, {dims}] (NCHW: preprocess.batch(images) "
                             f"makes one), got {batch.dtype} {list(batch.shape)}"
                             + ("; images as uint8 pixels go to predict()" if batch.dtype.kind in "biu" else ""))
        return self.session.run(None, {self.input_name: batch.astype(np.float32, copy=False)})[0]

    def predict(self, images: ImageSource | Iterable[ImageSource], *, top_k: int = 5,
                batch_size: int = 16) -> list[list[Prediction]]:
        """Top-k labels and probabilities for each image, in order (a list of one for a single image). An image is
        a file path, an encoded file's bytes, a PIL image or a uint8 RGB array (``ImageSource``)."""
        if isinstance(images, np.ndarray):
            raise UsageError("predict takes images, and a bare array could be one image or several: pass [array] "
                             "for one HxWx3 image, a list of them for several, or a preprocessed batch to logits()")
        one = isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)) or \
            callable(getattr(images, "read", None))  # a file object is one image, not an iterable of its lines
        if not one and not isinstance(images, Iterable):
            raise UsageError(f"predict takes an image or a list of them (file paths, encoded bytes, file objects, PIL "
                             f"images, uint8 arrays), not {type(images).__name__}")
        images = [images] if one else list(images)
        if not images:
            raise UsageError("no images given")
        if batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, got {batch_size}")
        results = []
        for start in range(0, len(images), batch_size):
            results += self.predictions(self.preprocess.batch(images[start:start + batch_size]), top_k=top_k)
        return results

    def predictions(self, batch: np.ndarray, *, top_k: int = 5) -> list[list[Prediction]]:
        """Top-k labels and probabilities for each row of a preprocessed batch (as ``logits`` takes it)."""
        if top_k < 1:
            raise UsageError(f"top_k must be at least 1, got {top_k}")
        probs = _softmax(self.logits(batch).astype(np.float64))
        return [[Prediction(self.labels[i], int(i), float(row[i])) for i in np.argsort(-row)[:top_k]] for row in probs]
