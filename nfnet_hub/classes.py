"""Class names for a model's outputs: a file of names, or timm's names of an ImageNet subset.

timm's configs name classes in ``label_names`` (for ImageNet, WordNet ids such as ``n01440764``) and may describe
them in ``label_descriptions`` (id -> words), which timm's inference.py prints. The weights of a pretrained tag
that name no classes are named as that script names them: by their class count, ImageNet's.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from torch import nn

from .errors import UsageError
from .files import read_text

IMAGENET_SUBSETS = ("imagenet-1k", "imagenet-12k", "imagenet-21k", "imagenet-22k", "imagenet-22k-ms",
                    "imagenet-21k-goog", "imagenet-21k-miil")  # timm's ImageNetInfo knows these


def imagenet_subset(name: str) -> str | None:
    """The ImageNet subset a name means, spelt as timm spells them (``ImageNet_1k`` is ``imagenet-1k``)."""
    key = re.sub(r"[-_\s]", "", name.lower())
    return next((s for s in IMAGENET_SUBSETS if s.replace("-", "") == key), None)


def not_utf8(names: Any) -> list[str]:
    """The names that UTF-8 cannot write, shown by their bytes (``caf\\xe9``): a folder named in another encoding,
    which Python reads as surrogates. The checkpoint keeps them, but JSON, ONNX metadata and the Hub hold UTF-8 only."""
    bad = []
    for name in map(str, names):
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            try:
                raw = name.encode("utf-8", "surrogateescape")  # the bytes of the folder's name
            except UnicodeEncodeError:
                raw = name.encode("utf-8", "backslashreplace")
            bad.append(raw.decode("utf-8", "backslashreplace"))
    return bad


def imagenet_classes(subset: str) -> dict[str, Any]:
    """timm's ``label_names`` (WordNet ids) and ``label_descriptions`` of an ImageNet subset."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo(subset)
    return {"label_names": info.label_names(), "label_descriptions": info.label_descriptions(as_dict=True)}


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line (blank lines skipped), each once."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no labels file at {path}")
    try:
        labels = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a text file of labels (one per line)") from None
    if not labels:
        raise UsageError(f"{path} holds no labels (one per line)")
    if repeated := sorted(label for label, n in Counter(labels).items() if n > 1):
        raise UsageError(f"{path} names {', '.join(map(repr, repeated[:5]))} more than once: each class needs a name "
                         "of its own")
    return labels


def set_class_names(model: nn.Module, labels: str) -> None:
    """``--labels``: a text file of names, one per line, or an ImageNet subset (``imagenet-1k`` ...), whose names
    timm gives. They go into the model's ``pretrained_cfg``, from which export and bundle take them."""
    subset = imagenet_subset(labels) if not Path(labels).is_file() else None
    if not subset and not Path(labels).exists():
        raise UsageError(f"--labels {labels}: no such file, nor an ImageNet subset whose names timm gives "
                         f"({', '.join(IMAGENET_SUBSETS)})")
    classes = imagenet_classes(subset) if subset else {"label_names": read_labels(labels)}
    if len(classes["label_names"]) != model.num_classes:
        raise UsageError(f"--labels {labels} names {len(classes['label_names'])} classes, but the model has "
                         f"{model.num_classes}")
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "label_descriptions"}
    model.pretrained_cfg = {**cfg, **classes}
    describe_wordnet_ids(model)


def unnamed_classes_note(model: nn.Module) -> str | None:
    """What to say when the weights name no classes: their predictions will name them by index."""
    from timm.data import infer_imagenet_subset

    if model.pretrained_cfg.get("label_names"):
        return None
    subset = infer_imagenet_subset(model)
    return (f"note: the weights name none of their {model.num_classes} classes, so predictions name them by index: "
            "--labels FILE names them" + (f" (--labels {subset} if they are {subset}'s)" if subset else ""))


def describe_wordnet_ids(model: nn.Module) -> str | None:
    """Describe class names that are WordNet ids (ImageNet's folders are named by them: a run trained on ImageNet's
    folders names its classes so) as timm describes them; what was done, in words (None: nothing)."""
    from timm.data import ImageNetInfo

    names = model.pretrained_cfg.get("label_names")
    if model.pretrained_cfg.get("label_descriptions") or not isinstance(names, list) or not all(
            isinstance(n, str) and re.fullmatch(r"n\d{8}", n) for n in names):
        return None
    info = ImageNetInfo()  # its words for every WordNet id of ImageNet-22k
    try:
        descriptions = {n: info.label_name_to_description(n) for n in names}
    except KeyError:  # not ImageNet's
        return None
    model.pretrained_cfg = {**model.pretrained_cfg, "label_descriptions": descriptions}
    return f"the weights name {len(names)} by WordNet id ({names[0]} ...), described as timm describes them"


def name_pretrained_classes(model: nn.Module) -> str | None:
    """Give ImageNet weights that name no classes (a pretrained tag's, the authors') ImageNet's names, chosen by
    class count as timm's inference.py chooses them; what was done, in words (None: nothing)."""
    from timm.data import infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if model.pretrained_cfg.get("label_names") or subset is None:
        return None
    model.pretrained_cfg = {**model.pretrained_cfg, **imagenet_classes(subset)}
    return (f"{subset}'s {model.num_classes}, as timm names them (its inference.py names a pretrained model's "
            "classes by their count)")
