"""Data sources: scikit-learn's bundled digits (real, offline) and timm's datasets and loaders."""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from ..errors import TrainingError, UsageError
from ..preprocess import (
    DEFAULT_MODES,
    IMAGE_MODE,
    IMAGE_SUFFIXES,
    UNDECODABLE,
    WIDE_MODES,
    Preprocess,
    data_config,
    image_mode_bands,
    load_image,
)
from .folders import (
    EVAL_NAMES,
    TRAIN_NAMES,
    check_class_folders,
    class_names,
    class_to_idx_of,
    count_classes,
    missing_classes,
    note_left_out,
    read_class_map,
    some,
    split_folder,
    unread_folders,
)

DIGITS_MEAN, DIGITS_STD = 0.27, 0.38  # of digits scaled to [0, 1]
STREAMS = ("tfds/", "wds/", "hfids/")  # the data sources timm reads as iterable datasets


def digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as uint8 images, split once with a fixed seed (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return tuple(train_test_split(images, d.target, test_size=test_fraction, random_state=seed, stratify=d.target))


def digits_preprocess(size: int, channels: int = 3) -> Preprocess:
    """The eval transform of a digits model: the same one the ONNX runtime applies to an image file."""
    return Preprocess((size, size), crop_pct=1.0, crop_mode="squash", interpolation="bicubic",
                      mean=(DIGITS_MEAN,) * channels, std=(DIGITS_STD,) * channels, channels=channels)


def digits_to_tensor(images: np.ndarray, size: int, channels: int = 3) -> torch.Tensor:
    """uint8 (N, 8, 8) -> normalised float (N, channels, size, size), through the runtime's preprocessing."""
    pre = digits_preprocess(size, channels)
    return torch.from_numpy(pre.batch([Image.fromarray(img) for img in images]))


class GlobalBatchSampler(Sampler[int]):
    """Shuffles once per epoch and gives rank r the r-th slice of every global batch.

    The samples of global batch k are the same whatever the number of processes, so a run on
    N processes follows the same trajectory as a run on one with an N times larger batch.
    """

    def __init__(self, size: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0):
        self.size, self.batch_size, self.world, self.rank, self.seed = size, batch_size, world, rank, seed
        self.epoch = 0
        self.global_batches = size // (batch_size * world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        g, b = self.batch_size * self.world, self.batch_size
        for k in range(self.global_batches):
            yield from order[k * g + self.rank * b: k * g + (self.rank + 1) * b]

    def __len__(self) -> int:
        return self.global_batches * self.batch_size


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    num_classes: int
    shuffler: Sampler | Dataset | None  # what reshuffles each epoch: a sampler, or an iterable dataset (wds)
    data_config: dict  # the eval transform and class names, recorded in checkpoints (preprocess.data_config)
    mixup: Any = None  # timm's Mixup on batches, or FastCollateMixup inside the GPU prefetcher's loader
    mixup_on_batches: bool = False  # whether the loop applies ``mixup`` to each batch
    on_device: bool = False  # the prefetcher yields normalised batches already on the device


def _sampler(ds: Dataset, world: int, rank: int, shuffle: bool, seed: int):
    return DistributedSampler(ds, world, rank, shuffle=shuffle, seed=seed, drop_last=shuffle) if world > 1 else None


def _mixup_args(args: argparse.Namespace, num_classes: int) -> dict[str, Any] | None:
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    if args.mixup_mode not in ("batch", "pair", "elem"):
        raise UsageError(f"--mixup-mode {args.mixup_mode!r}: choose batch, pair or elem")
    if args.batch_size % 2:
        raise UsageError(f"--batch-size {args.batch_size}: MixUp and CutMix pair the images of a batch, so it must "
                         "be even")
    return dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                label_smoothing=args.smoothing, num_classes=num_classes)


def _digits(args: argparse.Namespace, world: int, rank: int) -> Loaders:
    from timm.data import Mixup

    if args.input_size and args.input_size[1] != args.input_size[2]:
        raise UsageError(f"--input-size {' '.join(map(str, args.input_size))}: --dataset digits trains at a square "
                         "size")
    size = args.input_size[-1] if args.input_size else args.img_size or 32  # as timm: --input-size over --img-size
    channels = input_channels(args)
    if channels not in DEFAULT_MODES:
        raise UsageError(f"the model takes {channels}-channel input; the digits are greyscale, made 1 or 3 channels")
    xtr, xte, ytr, yte = digits_split()
    train_ds = TensorDataset(digits_to_tensor(xtr, size, channels), torch.from_numpy(ytr).long())
    val_ds = TensorDataset(digits_to_tensor(xte, size, channels), torch.from_numpy(yte).long())
    sampler = GlobalBatchSampler(len(train_ds), args.batch_size, world, rank, args.seed)
    # own generators: creating an iterator must not draw from the global RNG (exact resumption)
    train = DataLoader(train_ds, args.batch_size, sampler=sampler, drop_last=True,
                       generator=torch.Generator().manual_seed(args.seed))
    val = DataLoader(val_ds, args.validation_batch_size or 256, sampler=_sampler(val_ds, world, rank, False, args.seed),
                     generator=torch.Generator().manual_seed(args.seed))
    pre = digits_preprocess(size, channels)
    classes = {str(i): i for i in range(10)}
    num_classes = count_classes(args, classes, rank)
    record = data_config({"input_size": (channels, *pre.input_size), "crop_pct": pre.crop_pct,
                          "crop_mode": pre.crop_mode, "interpolation": pre.interpolation, "mean": pre.mean,
                          "std": pre.std}, label_names=class_names(classes, num_classes))
    mixup = _mixup_args(args, num_classes)
    return Loaders(train, val, num_classes, sampler, record, Mixup(**mixup) if mixup else None, mixup is not None)


def create_loaders(args: argparse.Namespace, model_cfg: dict, world: int, rank: int,
                   device: torch.device) -> Loaders:
    """Per-process loaders, built as timm's train.py builds them; the global batch is ``batch_size * world``."""
    if args.dataset == "digits":
        return _digits(args, world, rank)
    if args.aug_repeats and (world == 1 or args.dataset.startswith(STREAMS)):  # timm's loader asserts
        raise UsageError(f"--aug-repeats {args.aug_repeats:g}: timm repeats each image on other processes, so it "
                         "needs a distributed run (torchrun --nproc-per-node N) on a dataset of files, not a stream")
    if sized := [o for o in ("train_num_samples", "val_num_samples") if getattr(args, o)]:  # timm ignores them here
        if not args.dataset.startswith(STREAMS):
            raise UsageError(f"--{sized[0].replace('_', '-')}: timm sizes only a streamed dataset ({', '.join(STREAMS)}"
                             f"); an epoch of {args.dataset or 'image folders'} reads every image")
    from timm.data import FastCollateMixup, Mixup, create_loader, resolve_data_config

    # timm's train.py gives the model --in-chans but the data the config's channels; here both take the model's,
    # with the mean and std adapted as timm's loader adapts them
    channels = input_channels(args)
    mode = _image_mode(args, channels)  # recorded where it is not the default, for export and serving to read in
    data_cfg = data_config({**resolve_data_config(vars(args), pretrained_cfg=model_cfg), IMAGE_MODE: mode},
                           channels=channels)
    folders = None
    if not args.dataset:  # image folders: both splits must be there, or timm would read the root for both
        folders = (split_folder(args.data_dir, args.train_split, TRAIN_NAMES),
                   split_folder(args.data_dir, args.val_split, EVAL_NAMES))
        if folders[0].resolve() == folders[1].resolve() and rank == 0:
            print(f"note: both splits are {folders[0]}: validation measures the images the run trains on", flush=True)
    # image folders are read as the runtime reads them: every suffix it takes (timm's: .png, .jpg, .jpeg) for a
    # folder reader's input_key, and 16-bit images rescaled (see ReadAsRuntime)
    input_key = args.input_key or (";".join(IMAGE_SUFFIXES) if not args.dataset else None)
    kw = dict(root=args.data_dir, class_map=args.class_map and read_class_map(args.class_map),
              download=args.dataset_download, batch_size=args.batch_size, input_img_mode=mode,
              input_key=input_key, target_key=args.target_key, trust_remote_code=args.dataset_trust_remote_code)
    train_ds = _from_source(args, args.train_split, folders and folders[0], is_training=True, seed=args.seed,
                            num_samples=args.train_num_samples, **kw)
    val_ds = _from_source(args, args.val_split, folders and folders[1], is_training=False,
                          num_samples=args.val_num_samples, **kw)
    class_to_idx = class_to_idx_of(train_ds)
    if args.class_map:
        for ds in (train_ds, val_ds):
            note_left_out(ds, args.class_map, rank)
    else:  # folder names are the classes; a class map numbers both splits alike
        check_class_folders(train_ds, args.train_split, rank)
        check_class_folders(val_ds, args.val_split, rank)
        val_ds = _labelled_as_training(val_ds, class_to_idx, args, kw, rank)
    num_classes = count_classes(args, class_to_idx, rank)
    if not num_classes:
        raise UsageError(f"cannot tell the number of classes of dataset {args.dataset!r} from its files "
                         "(webdataset shards name none): pass --num-classes")
    prefetch = not args.no_prefetcher  # as train.py: normalisation and erasing in the main process, on the device
    mixup = _mixup_args(args, num_classes)
    collate = FastCollateMixup(**mixup) if mixup and prefetch else None
    common = dict(input_size=tuple(data_cfg["input_size"]), mean=data_cfg["mean"], std=data_cfg["std"],
                  distributed=world > 1, pin_memory=args.pin_mem, device=device, use_prefetcher=prefetch)
    interpolation = data_cfg["interpolation"] if args.no_aug or not args.train_interpolation else \
        args.train_interpolation
    train = create_loader(
        train_ds, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, re_count=args.recount, train_crop_mode=args.train_crop_mode, scale=tuple(args.scale),
        ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob or 0.0,
        gaussian_blur_prob=args.gaussian_blur_prob or 0.0, auto_augment=args.aa, num_aug_repeats=int(args.aug_repeats),
        interpolation=interpolation, num_workers=args.workers, worker_seeding=args.worker_seeding,
        collate_fn=collate, use_multi_epochs_loader=args.use_multi_epochs_loader, **common)
    # validated with the eval transform it records, which export and serving use (train.py leaves crop_mode out, so
    # it validates a squash-cropped model with a centre crop: metrics of other pixels than the ones served)
    val = create_loader(val_ds, batch_size=args.validation_batch_size or args.batch_size, is_training=False,
                        interpolation=data_cfg["interpolation"], num_workers=args.workers,
                        crop_pct=data_cfg["crop_pct"], crop_mode=data_cfg["crop_mode"], **common)
    shuffler = train_ds if hasattr(train_ds, "set_epoch") else getattr(train, "sampler", None)
    record = {**data_cfg, "label_names": class_names(class_to_idx, num_classes)}
    return Loaders(train, val, num_classes, shuffler, record,
                   collate or (Mixup(**mixup) if mixup else None), mixup is not None and collate is None, prefetch)


def input_channels(args: argparse.Namespace) -> int:
    """The model's input channels: --in-chans, else the first of --input-size, else 3 (as timm's train.py)."""
    if args.in_chans and args.input_size and args.in_chans != args.input_size[0]:
        raise UsageError(f"--in-chans {args.in_chans} and --input-size {' '.join(map(str, args.input_size))} disagree: "
                         "the first value of --input-size is the channel count; give one of them, or make them agree")
    return args.in_chans or (args.input_size[0] if args.input_size else 3)


def _image_mode(args: argparse.Namespace, channels: int) -> str:
    """The PIL mode timm reads images in: --input-img-mode, else RGB for 3 channels and L otherwise (train.py's
    choice), refused where its images would not have the model's channels (a conv traceback in the first step)."""
    mode = args.input_img_mode or DEFAULT_MODES.get(channels, "L")
    try:
        bands = image_mode_bands(mode)
    except UsageError as e:
        raise UsageError(f"--input-img-mode: {e}") from None
    if bands != channels and args.input_img_mode:
        raise UsageError(f"--input-img-mode {mode} reads {bands}-channel images, but the model takes {channels} "
                         "(--in-chans, --input-size): give a mode of as many channels, or leave it out")
    if bands != channels:
        raise UsageError(f"the model takes {channels}-channel input, which images are not read as by default (RGB: "
                         "3, L: 1): pass --input-img-mode (RGBA or CMYK: 4, LA: 2)")
    return mode


class _Wrapper:
    """Stands in for ``inner`` (a timm reader, a dataset): what it does not define is ``inner``'s (samples,
    class_to_idx, filename ...), so timm and the checks here see the wrapped object's attributes."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (while unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)


_last_read: list = [None, None]  # (index, file) of the sample this process's reader handed over last


class _NameTheFile(logging.Filter):
    """timm's warning for a sample it skips gives its index only; the file is added. A truncated image fails while
    timm decodes it, after the reader handed it over, in the same process (a loader worker, or the main one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        index, file = _last_read
        message = record.getMessage()
        if file is not None and message.startswith(f"Skipped sample (index {index})") and file not in message:
            record.msg, record.args = f"{message} ({file})", ()
        return True


logging.getLogger("timm.data.dataset").addFilter(_NameTheFile())  # here: a spawned worker imports this module too


class ReadAsRuntime(_Wrapper):
    """A folder reader of timm's that hands over 16-bit and 32-bit images as the runtime reads them, rescaled to
    8 bits: timm converts them with PIL, which clips (most pixels turn white), so a model would train on other
    pixels than it is served. Other images pass through untouched. One that does not decode is skipped by timm's
    dataset, with a warning that names it (see ``_NameTheFile``), whatever Pillow raised (timm skips OSError only:
    a decompression bomb stopped its training)."""

    @classmethod
    def wrap(cls, ds: Dataset) -> Dataset:
        from timm.data.readers.reader_image_folder import ReaderImageFolder

        if isinstance(getattr(ds, "reader", None), ReaderImageFolder):
            ds.reader = cls(ds.reader)
        return ds

    def __getitem__(self, index: int) -> tuple:
        file, *rest = self.inner[index]
        _last_read[:] = index, self.inner.filename(index, absolute=True)
        try:
            img = Image.open(file)
            if img.mode in WIDE_MODES:
                out = io.BytesIO()
                load_image(img, "L").save(out, "BMP")  # lossless and quick to write and read
                file.close()
                out.seek(0)
                return (out, *rest)
        except UNDECODABLE as e:  # timm's dataset skips a sample whose reading raises OSError, and only such
            file.close()
            raise OSError(f"{_last_read[1]} is not a readable image: {e}") from None
        file.seek(0)
        return (file, *rest)


def _labelled_as_training(val_ds: Dataset, class_to_idx: dict, args: argparse.Namespace, kw: dict,
                          rank: int) -> Dataset:
    """The validation split with the training split's class indices, where folder names give the classes."""
    val_classes = class_to_idx_of(val_ds)
    if not (class_to_idx and val_classes) or val_classes == class_to_idx:
        return val_ds
    missing = missing_classes(class_to_idx, val_classes)
    if rank == 0 and missing:
        print(f"note: the validation split lacks {len(missing)} of the {len(class_to_idx)} training classes "
              f"({some(missing)}); it is labelled with the training split's class indices", flush=True)
    return _from_source(args, args.val_split, None, is_training=False, num_samples=args.val_num_samples,
                        **{**kw, "class_map": class_to_idx})


@contextlib.contextmanager
def _dataset_errors(args: argparse.Namespace, split: str, folder: Path | None):
    """timm's dataset factory answers a user's mistake with a traceback: a split of image folders without images
    (naming the wrong suffixes), a torchvision dataset not downloaded or unknown, webdataset shards without the
    split, a source whose package is missing. Each is said here in one line."""
    try:
        yield
    except ModuleNotFoundError as e:
        how = "pip install tensorflow tensorflow-datasets" if args.dataset.startswith("tfds/") else \
            'pip install "nfnet-hub[data]"'
        raise UsageError(f"--dataset {args.dataset} needs the Python package {e.name}, which is not installed: "
                         f"{how}") from None
    except (AssertionError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if folder is not None and first.startswith("Found 0 images"):
            unread = unread_folders(folder, set())
            raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {folder}"
                             + (f" that --class-map {args.class_map} names" if args.class_map else "")
                             + (f"; its folders hold {some(unread)}" if unread else "")) from None
        if not args.dataset.startswith(("torch/", "tfds/", "wds/")):
            raise
        download = "download=True" in first and not args.dataset_download
        raise UsageError(f"--dataset {args.dataset}, split {split!r}, under --data-dir {args.data_dir}: {first}"
                         + ("; --dataset-download lets torchvision download it there" if download else "")) from None


class ConvertImages(_Wrapper, Dataset):
    """A torchvision dataset (timm's ``torch/NAME``) whose images reach the transform in the model's mode, as timm's
    own readers convert them (``input_img_mode``): torchvision hands MNIST over in greyscale and CIFAR in RGB,
    whatever the model takes (an RGB model's first batch of MNIST failed in timm's prefetcher)."""

    def __init__(self, ds: Dataset, mode: str):
        super().__init__(ds)
        self.mode, self.transform = mode, None  # timm's create_loader sets the transform

    def __getitem__(self, index: int) -> tuple:
        img, target = self.inner[index]
        img = img.convert(self.mode)
        return (self.transform(img) if self.transform is not None else img), target


def _from_source(args: argparse.Namespace, split: str, folder: Path | None, **kw: Any) -> Dataset:
    """timm's dataset for a split, read as the runtime reads images."""
    from timm.data import create_dataset

    with _dataset_errors(args, split, folder):
        ds = create_dataset(args.dataset, split=split, **kw)
    if args.dataset.startswith("torch/"):
        return ConvertImages(ds, kw["input_img_mode"])
    return ReadAsRuntime.wrap(ds)


def check_sizes(loaders: Loaders, batch_size: int, world: int, grad_accum_steps: int) -> None:
    """Refuse data that would give a run of zero steps, or an evaluation of zero images."""
    if len(loaders.train) // grad_accum_steps == 0:
        raise TrainingError(f"the training set yields no full batch of {batch_size} x {world} process(es) x "
                            f"{grad_accum_steps} accumulation step(s): lower --batch-size or add images")
    if len(loaders.val) == 0:
        raise TrainingError("the validation set is empty: add images to it")
