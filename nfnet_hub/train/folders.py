"""Image folders as timm's folder reader reads them, and what it would do there that no user means: the checks
and notes the trainer gives before a run starts (classes from folder names, splits, class maps)."""
from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

from torch.utils.data import Dataset

from ..classes import not_utf8
from ..errors import UsageError
from ..files import read_text
from ..preprocess import IMAGE_SUFFIXES


def read_class_map(path: str) -> dict[str, int] | str:
    """``--class-map``: a text file's names numbered by line, as timm numbers them, but read as ``read_text`` reads
    (timm's reader makes a Windows editor's byte-order mark part of the first name, whose folder is then left out);
    a pickled map (.pkl) as it is, for timm."""
    suffix = Path(path).suffix.lower()
    if suffix == ".pkl":
        return path
    if suffix != ".txt":
        raise UsageError(f"--class-map {path}: timm reads a class map from a .txt file (one class name per line) "
                         "or a pickled dict (.pkl)")
    try:
        names = [line.strip() for line in io.StringIO(read_text(path))]
    except UnicodeDecodeError:
        raise UsageError(f"--class-map {path} is not a text file (UTF-8, or UTF-16 with its byte-order mark)") from None
    if not any(names):
        raise UsageError(f"--class-map {path} names no class (one name per line)")
    return {name: index for index, name in enumerate(names)}


def check_class_folders(ds: Dataset, split: str, rank: int) -> None:
    """timm makes a class of every folder that holds images, named by its last part: of the split folder itself
    (the class ''), of hidden ones (.ipynb_checkpoints), of a class's subfolders, and one class of folders that
    share a name (cat/2019, dog/2019); none of which a user means. A folder of files it does not read (.heic
    photos) is no class at all: that is noted."""
    class_to_idx = class_to_idx_of(ds)
    if "" in class_to_idx:
        raise UsageError(f"images lie loose in the {split!r} split's folder: put each one in a folder named after "
                         f"its class ({split}/CLASS/image.jpg), or they train as a class named ''")
    hidden = sorted(c for c in class_to_idx if str(c).startswith("."))
    if hidden:
        raise UsageError(f"hidden folders of the {split!r} split hold images and would be classes ({some(hidden)}): "
                         "remove them, or name the classes with --class-map")
    if undecodable := not_utf8(class_to_idx):
        root = getattr(getattr(ds, "reader", None), "root", None) or "FOLDER"
        raise UsageError(f"class folders of the {split!r} split are not named in UTF-8 ({some(undecodable)}): class "
                         "names travel with the weights into ONNX metadata and the Hub's config.json, which hold UTF-8 "
                         f"only: rename them (convmv -f cp1252 -t utf-8 -r --notest {root}, or by hand)")
    reader = getattr(ds, "reader", None)
    if not isinstance(getattr(reader, "samples", None), list) or not getattr(reader, "root", None):
        return  # not a folder of images
    folders = {Path(os.path.relpath(d, reader.root)) for d in {os.path.dirname(f) for f, _ in reader.samples}}
    top = Path(reader.root).name  # the split's folder, which may be a synonym of its name (val for validation)
    by_name: dict[str, list[Path]] = {}
    for folder in sorted(folders):
        inside = next((p for p in folder.parents if p in folders), None)
        if inside is not None:
            raise UsageError(f"{top}/{folder} holds images inside {top}/{inside}, which holds images too: timm "
                             f"makes separate classes of them ({inside.name!r} and {folder.name!r}): keep each class's "
                             "images in one folder")
        by_name.setdefault(folder.name, []).append(folder)
    shared = next((f for f in by_name.values() if len(f) > 1), None)
    if shared:
        raise UsageError(f"{top}/{shared[0]} and {top}/{shared[1]} would be one class, {shared[0].name!r}: timm "
                         "names a class by the last folder of its path only: give each class a folder of its own "
                         "name")
    unread = unread_folders(Path(reader.root), {f.parts[0] for f in folders if f.parts})
    if rank == 0 and unread:
        print(f"note: {len(unread)} folder(s) of the {top!r} split hold no image read here "
              f"({', '.join(IMAGE_SUFFIXES)}), so they are no class: {some(unread)}", flush=True)


def note_left_out(ds: Dataset, class_map: str, rank: int) -> None:
    """timm reads only the folders that a --class-map names, and leaves out the others without a word (a class
    map may choose a subset of the classes, or hold a misspelt name): those left out are noted."""
    reader = getattr(ds, "reader", None)
    if rank or not isinstance(getattr(reader, "samples", None), list) or not getattr(reader, "root", None):
        return
    classes, left_out = class_to_idx_of(ds), {}
    for folder, _, files in os.walk(reader.root, followlinks=True):
        images = sum(os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES for f in files)
        if images and os.path.basename(os.path.relpath(folder, reader.root)) not in classes:
            left_out[os.path.relpath(folder, reader.root)] = images
    top = Path(reader.root).name
    if left_out:
        print(f"note: --class-map {class_map} names no class of {len(left_out)} folder(s) of {top}/, whose "
              f"{sum(left_out.values())} images are left out: " + some([f"{top}/{f} ({n})" for f, n in
                                                                           sorted(left_out.items())]), flush=True)
    found = {target for _, target in reader.samples}
    if empty := [name for name, index in classes.items() if index not in found]:
        print(f"note: --class-map {class_map} names {len(empty)} class(es) with no images in {top}/: {some(empty)}",
              flush=True)


def unread_folders(root: Path, classes: set[str]) -> list[str]:
    """The split's folders (with the suffixes of their files) that hold files but no image read, so no class."""
    unread = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in classes:
            suffixes = sorted({Path(f).suffix.lower() or "no suffix" for _, _, files in os.walk(entry.path)
                               for f in files if not f.startswith(".")})
            if suffixes:
                unread.append(f"{entry.name} ({', '.join(suffixes[:3])})")
    return unread


def class_to_idx_of(ds: Dataset) -> dict:
    return getattr(getattr(ds, "reader", ds), "class_to_idx", None) or {}


def missing_classes(train_classes: dict, val_classes: dict) -> list:
    """The training classes the validation split lacks. Each split of a folder dataset numbers its own classes
    (sorted folder names), so a split lacking one is scored against shifted labels (as timm's train.py does,
    silently), and a split with a class the training split lacks cannot be scored at all."""
    extra = sorted(set(val_classes) - set(train_classes))
    if extra:
        raise UsageError(f"the validation split has {len(extra)} class(es) that the training split lacks "
                         f"({some(extra)}): a model trained on it cannot predict them; remove them from the "
                         "validation split or add images of them to the training split")
    return sorted(set(train_classes) - set(val_classes))


def count_classes(args: argparse.Namespace, class_to_idx: dict, rank: int) -> int:
    """--num-classes where given (more than the data have is allowed, as in train.py, and said), else the data's
    count."""
    needed = max(class_to_idx.values(), default=-1) + 1
    if args.num_classes and args.num_classes < needed:
        raise UsageError(f"--num-classes {args.num_classes}, but the training data have {needed} classes "
                         f"({some(sorted(class_to_idx, key=class_to_idx.get))}): give at least {needed}, or leave "
                         "--num-classes out to take the data's count")
    if class_to_idx and args.num_classes and args.num_classes > needed and rank == 0:
        empty = f"class {needed} has" if args.num_classes == needed + 1 else \
            f"classes {needed} to {args.num_classes - 1} have"
        print(f"note: --num-classes {args.num_classes}, but the training data have {needed} classes: {empty} no "
              "images, and the run records no class names (its exports name classes by index; export's --labels FILE "
              "names them)", flush=True)
    return args.num_classes or needed


def class_names(class_to_idx: dict, num_classes: int) -> list | None:
    """The names of the model's classes in index order, where the data name every one of them."""
    return sorted(class_to_idx, key=class_to_idx.get) if len(class_to_idx) == num_classes else None


def some(names: list) -> str:
    return ", ".join(map(str, names[:10])) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


TRAIN_NAMES = ("train", "training")
EVAL_NAMES = ("validation", "val", "valid", "eval", "evaluation")


def split_folder(root: str, split: str, synonyms: tuple[str, ...]) -> Path:
    """The folder of a split, found as timm finds it (the split's name, or a synonym of it)."""
    names = (split, *synonyms) if split in synonyms else (split,)
    for name in names:
        if (Path(root) / name).is_dir():
            return Path(root) / name
    raise UsageError(f"no {split!r} split under {root}: expected {Path(root) / split}/CLASS/... "
                     f"(one folder per class; set --{'train' if synonyms is TRAIN_NAMES else 'val'}-split "
                     f"to the folder's name){_split_given(Path(root), names)}")


def _split_given(root: Path, names: tuple[str, ...]) -> str:
    """Where --data-dir names a split itself (its class folders hold the images), the folder it should name."""
    try:
        classes = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
        if not any(f.suffix.lower() in IMAGE_SUFFIXES for c in classes[:20] for f in c.iterdir()):
            return ""
    except OSError:  # a folder it may not read: no hint, the error above stands
        return ""
    parent = root.resolve().parent
    if any((parent / n).is_dir() for n in names):
        return f"; {root} looks like a split itself: give the folder above it, --data-dir {root.parent}"
    return (f"; {root} holds class folders of images, as one split does: --data-dir names the folder that holds the "
            "splits (DIR/train/CLASS/... and DIR/validation/CLASS/...)")
