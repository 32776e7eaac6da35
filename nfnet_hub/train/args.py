"""The arguments of timm's ``train.py``: the same names, types and defaults, one line each.

Every option of train.py (timm 1.0.x, main branch) is known, so any ``args.yaml`` it writes is accepted.
An option is either implemented as train.py implements it, a no-op for NFNets (BatchNorm options: an
NFNet has none; a note says so), or refused by name when set away from its default, before any work.
nfnet-hub's own choices (the authors' recipes) live in the recipes (``--config f0``), not in these
defaults. Imports no torch: the CLI builds this parser at every start.
"""
from __future__ import annotations

import argparse
import ast
import os
from pathlib import Path
from typing import Any

import yaml

from ..argtypes import at_least, split_name
from ..errors import UsageError, folder_given
from ..files import check_writable_folder, read_text
from .values import check_ranges, typed_config

DIGITS = "digits"
# what reads and transforms images: the bundled digits are arrays scaled to the input size, and take none of it
IMAGE_PIPELINE = ("input_img_mode", "train_split", "val_split", "train_num_samples", "val_num_samples", "class_map",
                  "crop_pct", "mean", "std", "interpolation", "train_crop_mode", "scale", "ratio", "hflip", "vflip",
                  "color_jitter", "color_jitter_prob", "grayscale_prob", "gaussian_blur_prob", "aa", "aug_repeats",
                  "reprob", "remode", "recount", "train_interpolation")
RECORDED = {"data_config"}  # written into args.yaml by a run for the record; not an option
OURS = "(nfnet-hub)"  # marks an option train.py does not have
BN_NOTE = "NFNets have no BatchNorm"


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless it says it in words or the option is required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or "(default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class _Kwargs(argparse.Action):
    """``key=value ...`` into a dict, values read as Python literals where they are (as train.py reads them)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep:
                raise argparse.ArgumentError(self, f"expected key=value, got {item!r}")
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


# (support, flags, argparse keywords). support: "" implemented as in train.py; "no-op: why"; "refused: why".
def _o(*flags: str, **kw: Any) -> tuple[str, tuple[str, ...], dict]:
    return "", flags, kw


def _noop(why: str, *flags: str, **kw: Any) -> tuple[str, tuple[str, ...], dict]:
    return f"no-op: {why}", flags, kw


def _no(why: str, *flags: str, **kw: Any) -> tuple[str, tuple[str, ...], dict]:
    return f"refused: {why}", flags, kw


_NAFLEX = "NaFlex loaders are for patch-based models"
_SCHEDULED = "scheduled-resolution loaders are not implemented; use nfnet-hub timm-train"
_KD = "knowledge distillation is not implemented; use nfnet-hub timm-train"
OPTIONS = [
    # data
    _o("data", nargs="?", default=None, help="dataset root (train.py's deprecated positional form of --data-dir)"),
    _o("--data-dir", default=None, help="dataset root; image folders: train/ and validation/, a folder per class"),
    _o("--dataset", default="", help="'' for image folders, 'digits' (scikit-learn's, bundled), hfds/NAME, wds/NAME"),
    _o("--train-split", type=split_name, default="train", help="training split (folder name for image folders)"),
    _o("--val-split", type=split_name, default="validation", help="validation split (folder name for image folders)"),
    _o("--train-num-samples", type=int, default=None, help="samples in the training split (iterable datasets)"),
    _o("--val-num-samples", type=int, default=None, help="samples in the validation split (iterable datasets)"),
    _o("--dataset-download", action="store_true", default=False, help="let torch/ and tfds/ datasets download"),
    _o("--class-map", default="", help="file mapping class names to indices"),
    _o("--input-img-mode", default=None, help="image mode (default: RGB, L for one input channel)"),
    _o("--input-key", default=None, help="dataset key of the images (hfds/)"),
    _o("--target-key", default=None, help="dataset key of the labels (hfds/)"),
    _o("--dataset-trust-remote-code", action="store_true", default=False, help="let hfds/ datasets run their code"),
    # model
    _o("--model", default="nfnet_hub_nano", help="model name in timm's factory (train.py's default: resnet50)"),
    _o("--pretrained", action="store_true", default=False, help="start from the model's pretrained weights"),
    _o("--pretrained-path", default=None, help="weights to start from as if pretrained (implies --pretrained); a "
       "different --num-classes re-initialises only the classifier"),
    _o("--initial-checkpoint", default="", help="weights to load after the model is built (exact fit)"),
    _o("--resume", default="", help="training checkpoint to resume (a last.pth.tar of this trainer or of timm's "
       "train.py), or 'auto' for OUTPUT/EXPERIMENT/last.pth.tar"),
    _o("--no-resume-opt", action="store_true", default=False, help="resume the model, not the optimiser state"),
    _o("--num-classes", type=at_least(1), default=None, help="classes (default: read from the dataset)"),
    _o("--gp", default=None, help="global pool type (default: the model's)"),
    _o("--img-size", type=at_least(1), default=None, help="input size (default: the model's train size)"),
    _o("--in-chans", type=at_least(1), default=None, help="input channels (default: 3)"),
    _o("--input-size", type=int, nargs=3, default=None, help="input C H W (default: the model's)"),
    _o("--crop-pct", type=float, default=None, help="validation centre-crop fraction (default: the model's)"),
    _o("--mean", type=float, nargs="+", default=None, help="normalisation mean (default: the model's)"),
    _o("--std", type=float, nargs="+", default=None, help="normalisation std (default: the model's)"),
    _o("--interpolation", default="", help="resize interpolation (default: the model's)"),
    _o("--batch-size", "-b", type=at_least(1), default=128, help="per-process batch size"),
    _o("--validation-batch-size", "-vb", type=at_least(1), default=None, help="validation batch size "
       "(default: --batch-size)"),
    _o("--channels-last", action="store_true", default=False, help="channels-last memory format"),
    _no("TorchScript fusers are not used", "--fuser", default="", help="TorchScript fuser"),
    _o("--grad-accum-steps", type=at_least(1), default=1, help="micro-batches per optimiser step"),
    _o("--grad-checkpointing", action="store_true", default=False, help="recompute activations in the backward"),
    _noop("NFNets have no normalisation layers", "--fast-norm", action="store_true", default=False,
          help="timm's fast normalisation layers"),
    _o("--model-kwargs", nargs="*", default={}, action=_Kwargs, help="extra model arguments, key=value"),
    _o("--head-init-scale", type=float, default=None, help="scale of the classifier's initial weights and bias"),
    _o("--head-init-bias", type=float, default=None, help="initial value of the classifier's bias"),
    _o("--torchcompile-mode", default=None, help="torch.compile mode"),
    _o("--torchscript", action="store_true", default=False, help="torch.jit.script the model"),
    _o("--torchcompile", nargs="?", const="inductor", default=None, help="torch.compile backend (bare: inductor)"),
    # devices
    _o("--device", default="cuda", help="device; without CUDA the CPU is used, and a note says so"),
    _o("--amp", action="store_true", default=False, help="mixed precision"),
    _o("--amp-dtype", default="float16", choices=["float16", "bfloat16"], help="mixed precision type (the recipes: "
       "bfloat16)"),
    _no("only float32 weights are trained here", "--model-dtype", default=None, help="model dtype"),
    _noop("an NFNet has no buffers to broadcast", "--no-ddp-bb", action="store_true", default=False,
          help="no DDP buffer broadcast"),
    _o("--synchronize-step", action="store_true", default=False, help="synchronise the device after every step"),
    _o("--local_rank", type=int, default=0, help="set by torch.distributed.launch; torchrun's LOCAL_RANK is read"),
    _o("--device-modules", nargs="+", default=None, help="modules to import for a device backend"),
    # optimiser
    _o("--opt", default="sgd", help="optimiser, as timm's create_optimizer_v2 names it"),
    _o("--opt-eps", type=float, default=None, help="optimiser epsilon (default: the optimiser's)"),
    _o("--opt-betas", type=float, nargs="+", default=None, help="optimiser betas (default: the optimiser's)"),
    _o("--momentum", type=float, default=0.9, help="SGD momentum"),
    _o("--weight-decay", type=float, default=2e-5, help="weight decay (none on gains and biases)"),
    _o("--clip-grad", type=float, default=None, help="clipping threshold (for agc: the clipping ratio)"),
    _o("--clip-mode", default="norm", choices=["agc", "norm", "value"], help="gradient clipping (the recipes: agc)"),
    _o("--layer-decay", type=float, default=None, help="layer-wise learning-rate decay"),
    _o("--layer-decay-min-scale", type=float, default=0, help="lowest layer-wise learning-rate scale"),
    _o("--layer-decay-no-opt-scale", type=float, default=None, help="layer scale below which layers are frozen"),
    _o("--opt-kwargs", nargs="*", default={}, action=_Kwargs, help="extra optimiser arguments, key=value"),
    _o("--agc-partition", default="exclude_classifier", choices=["exclude_classifier", "authors"],
       help=f"{OURS} which tensors AGC clips: all but the classifier, or the authors' grouping (classifier bias "
       "clipped)"),
    # learning-rate schedule
    _o("--sched", default="cosine", help="learning-rate schedule, as timm's create_scheduler_v2 names it"),
    _o("--sched-on-updates", action="store_true", default=False, help="step the schedule every update"),
    _o("--lr", type=float, default=None, help="learning rate (default: lr-base scaled by the global batch)"),
    _o("--lr-base", type=float, default=0.1, help="learning rate for a global batch of lr-base-size"),
    _o("--lr-base-size", type=at_least(1), default=256, help="global batch that lr-base is for"),
    _o("--lr-base-scale", default="", help="'linear' or 'sqrt' (default: sqrt for ada* and lamb, else linear)"),
    _o("--lr-noise", type=float, nargs="+", default=None, help="learning-rate noise on/off epoch fractions"),
    _o("--lr-noise-pct", type=float, default=0.67, help="learning-rate noise limit"),
    _o("--lr-noise-std", type=float, default=1.0, help="learning-rate noise std"),
    _o("--lr-cycle-mul", type=float, default=1.0, help="cycle length multiplier"),
    _o("--lr-cycle-decay", type=float, default=0.5, help="decay of each cycle"),
    _o("--lr-cycle-limit", type=int, default=1, help="cycles (more than 1 enables them)"),
    _o("--lr-k-decay", type=float, default=1.0, help="k-decay of cosine and poly schedules"),
    _o("--warmup-lr", type=float, default=1e-5, help="learning rate at the start of warm-up"),
    _o("--min-lr", type=float, default=0, help="lowest learning rate of the schedule"),
    _o("--epochs", type=at_least(1), default=300, help="epochs to train (a resumed run trains up to this many)"),
    _no("epoch repeats are not implemented", "--epoch-repeats", type=float, default=0.0, help="dataset repeats"),
    _o("--start-epoch", type=at_least(0), default=None, help="epoch to start at (overrides a resumed one)"),
    _o("--decay-milestones", type=int, nargs="+", default=[90, 180, 270], help="multistep decay epochs"),
    _o("--decay-epochs", type=float, default=90, help="epochs between step decays"),
    _o("--warmup-epochs", type=at_least(0), default=5, help="epochs of linear warm-up"),
    _o("--warmup-prefix", action="store_true", default=False, help="warm-up before, not within, the schedule"),
    _o("--cooldown-epochs", type=at_least(0), default=0, help="epochs at min-lr after the schedule"),
    _o("--patience-epochs", type=int, default=10, help="plateau schedule's patience"),
    _o("--decay-rate", "--dr", type=float, default=0.1, help="learning-rate decay factor"),
    # augmentation and regularisation
    _o("--no-aug", action="store_true", default=False, help="no training augmentation"),
    _o("--train-crop-mode", default=None, help="training crop mode"),
    _o("--scale", type=float, nargs="+", default=[0.08, 1.0], help="random resized crop area range"),
    _o("--ratio", type=float, nargs="+", default=[3.0 / 4.0, 4.0 / 3.0], help="random resized crop aspect range"),
    _o("--hflip", type=float, default=0.5, help="horizontal flip probability"),
    _o("--vflip", type=float, default=0.0, help="vertical flip probability"),
    _o("--color-jitter", type=float, default=0.4, help="colour jitter strength"),
    _o("--color-jitter-prob", type=float, default=None, help="probability of colour jitter"),
    _o("--grayscale-prob", type=float, default=None, help="probability of greyscale conversion"),
    _o("--gaussian-blur-prob", type=float, default=None, help="probability of Gaussian blur"),
    _o("--aa", default=None, help="AutoAugment/RandAugment policy, e.g. rand-m5-n4"),
    _o("--aug-repeats", type=float, default=0, help="repeated augmentation count (distributed)"),
    _no("augmentation splits are not implemented", "--aug-splits", type=int, default=0, help="augmentation splits"),
    _no("needs --aug-splits", "--jsd-loss", action="store_true", default=False, help="Jensen-Shannon loss"),
    _o("--bce-loss", action="store_true", default=False, help="binary cross-entropy loss"),
    _o("--bce-sum", action="store_true", default=False, help="sum BCE over classes"),
    _o("--bce-target-thresh", type=float, default=None, help="binarise soft BCE targets at this threshold"),
    _o("--bce-pos-weight", type=float, default=None, help="BCE positive weight"),
    _o("--reprob", type=float, default=0.0, help="random erasing probability"),
    _o("--remode", default="pixel", help="random erasing mode"),
    _o("--recount", type=int, default=1, help="random erasing count"),
    _no("needs --aug-splits", "--resplit", action="store_true", default=False, help="no erasing on the first split"),
    _o("--mixup", type=float, default=0.0, help="mixup alpha (0: off)"),
    _o("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)"),
    _o("--cutmix-minmax", type=float, nargs="+", default=None, help="cutmix box ratio range (enables cutmix)"),
    _o("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch"),
    _o("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix instead of mixup"),
    _o("--mixup-mode", default="batch", help="mixup per batch, pair or elem"),
    _o("--mixup-off-epoch", type=int, default=0, help="epoch from which mixup is off (0: never)"),
    _o("--smoothing", type=float, default=0.1, help="label smoothing"),
    _o("--train-interpolation", default="random", help="training resize interpolation"),
    _o("--drop", type=float, default=0.0, help="dropout before the classifier (the recipes: the variant's)"),
    _no("deprecated in train.py: use --drop-path", "--drop-connect", type=float, default=None, help="drop connect"),
    _o("--drop-path", type=float, default=None, help="stochastic depth rate"),
    _no("NFNets have no DropBlock", "--drop-block", type=float, default=None, help="DropBlock rate"),
    _noop(BN_NOTE, "--bn-momentum", type=float, default=None, help="BatchNorm momentum"),
    _noop(BN_NOTE, "--bn-eps", type=float, default=None, help="BatchNorm epsilon"),
    _noop(BN_NOTE, "--sync-bn", action="store_true", default=False, help="synchronised BatchNorm"),
    _noop(BN_NOTE, "--dist-bn", default="reduce", help="BatchNorm statistics across processes"),
    _noop(BN_NOTE, "--split-bn", action="store_true", default=False, help="BatchNorm per augmentation split"),
    # EMA
    _o("--model-ema", action="store_true", default=False, help="keep an exponential moving average of the weights"),
    _o("--model-ema-force-cpu", action="store_true", default=False, help="keep the EMA on the CPU"),
    _o("--model-ema-decay", type=float, default=0.9998, help="EMA decay per update"),
    _o("--model-ema-warmup", action="store_true", default=False, help="warm the EMA decay up"),
    _o("--model-ema-authors-warmup", action="store_true", default=False,
       help=f"{OURS} the authors' EMA warm-up (TF1's): decay min(--model-ema-decay, (1 + t) / (10 + t)) at update t "
       "(the recipes)"),
    # bookkeeping
    _o("--seed", type=int, default=42, help="random seed"),
    _o("--worker-seeding", default="all", help="loader worker seeding"),
    _o("--log-interval", type=at_least(0), default=50, help="log every N steps without a progress bar (0: never)"),
    _o("--val-interval", type=at_least(1), default=1, help="epochs between validations and checkpoints"),
    _o("--recovery-interval", type=at_least(0), default=0, help="save last.pth.tar every N optimiser steps"),
    _o("--checkpoint-hist", type=at_least(0), default=10, help="per-epoch checkpoints to keep"),
    _o("--workers", "-j", type=at_least(0), default=4, help="data loader processes per training process"),
    _no("saving input batches is not implemented", "--save-images", action="store_true", default=False,
        help="save input batches"),
    _o("--pin-mem", action="store_true", default=False, help="pin loader memory"),
    _o("--no-prefetcher", action="store_true", default=False, help="no GPU prefetcher (normalisation on the GPU)"),
    _o("--output", default="", help="folder for runs (default: ./output/train)"),
    _o("--experiment", default="", help="run folder name under --output (default: MODEL-DATASET; train.py's "
       "has a timestamp, which --resume auto could not find again)"),
    _o("--eval-metric", default="top1", help="metric that chooses model_best (top1, top5 or loss)"),
    _no("test-time augmentation is not implemented", "--tta", type=int, default=0, help="test-time augmentation"),
    _o("--use-multi-epochs-loader", action="store_true", default=False, help="keep loader workers across epochs"),
    _o("--log-wandb", action="store_true", default=False, help="log to Weights & Biases (if wandb is installed)"),
    _o("--wandb-project", default=None, help="wandb project"),
    _o("--wandb-tags", nargs="+", default=[], help="wandb tags"),
    _o("--wandb-resume-id", default="", help="wandb run to resume"),
    _o("--no-progress", action="store_true", default=False, help=f"{OURS} log lines, not a bar (as off a terminal)"),
    _o("--fsdp", action="store_true", default=False, help=f"{OURS} shard the model with FSDP2 instead of DDP"),
    _no(_SCHEDULED, "--train-img-sizes", type=int, nargs="+", default=None, help="scheduled image sizes"),
    _no(_SCHEDULED, "--train-batch-sizes", type=int, nargs="+", default=None, help="scheduled batch sizes"),
    _no(_SCHEDULED, "--train-size-probs", type=float, nargs="+", default=None, help="scheduled size weights"),
    _no(_SCHEDULED, "--train-size-schedule", default="constant", help="resolution schedule"),
    _no(_SCHEDULED, "--train-size-schedule-spread", type=float, default=0.65, help="progressive spread"),
    _no(_SCHEDULED, "--train-size-random-mix", type=float, default=0.1, help="progressive random mix"),
    _no(_SCHEDULED, "--train-batches-per-epoch", "--train-steps-per-epoch", type=int, default=None,
        help="loader batches per epoch"),
    _no(_SCHEDULED, "--variable-batch-loss-scale", default="none", help="loss scale for variable batches"),
    _no(_NAFLEX, "--naflex-loader", action="store_true", default=False, help="NaFlex loader"),
    _no(_NAFLEX, "--naflex-train-seq-lens", type=int, nargs="+", default=[128, 256, 576, 784, 1024],
        help="NaFlex sequence lengths"),
    _no(_NAFLEX, "--naflex-max-seq-len", type=int, default=576, help="NaFlex validation sequence length"),
    _no(_NAFLEX, "--naflex-patch-sizes", type=int, nargs="+", default=None, help="NaFlex patch sizes"),
    _no(_NAFLEX, "--naflex-patch-size-probs", type=float, nargs="+", default=None, help="NaFlex patch weights"),
    _no(_NAFLEX, "--naflex-loss-scale", default="linear", help="NaFlex loss scale"),
    _no(_NAFLEX, "--naflex-patchify-channels-first", action="store_true", default=False, help="NaFlex layout"),
    _no(_KD, "--kd-model-name", default=None, help="teacher model"),
    _no(_KD, "--kd-distill-type", default="logit", help="distillation type"),
    _no(_KD, "--kd-loss-type", default="kl", help="distillation loss"),
    _no(_KD, "--distill-loss-weight", type=float, default=None, help="distillation loss weight"),
    _no(_KD, "--task-loss-weight", type=float, default=None, help="task loss weight"),
    _no(_KD, "--kd-temperature", type=float, default=4.0, help="distillation temperature"),
    _no(_KD, "--kd-student-feature-dim", type=int, default=None, help="student feature width"),
    _no(_KD, "--kd-teacher-feature-dim", type=int, default=None, help="teacher feature width"),
    _no(_KD, "--kd-token-distill-type", default="soft", help="token distillation type"),
]


def _dest(flags: tuple[str, ...]) -> str:
    long = next((f for f in flags if f.startswith("--")), flags[0])
    return long.lstrip("-").replace("-", "_")


SUPPORT = {_dest(flags): support for support, flags, _ in OPTIONS}


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", "-c", default="", help="YAML of option defaults: any args.yaml of timm's train.py or "
                   "of this trainer, or a recipe name (f0 ... f7, f0_plus ...)")
    for _, flags, kw in OPTIONS:
        p.add_argument(*flags, **kw)
    return p


def build_parser(prog: str = "nfnet-hub train") -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog=prog, description="Train an NFNet (timm train.py arguments).", formatter_class=DefaultsFormatter))


def _config(name: str) -> dict[str, Any]:
    from .recipes import RECIPES, recipe

    path = Path(name)
    if not path.is_file():
        if name in RECIPES:
            return recipe(name)
        raise UsageError(f"no config file {name!r} (recipes: {', '.join(RECIPES)})")
    try:
        cfg = yaml.safe_load(read_text(path)) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a YAML file: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{path} is not a mapping of options")
    return cfg


def apply_config(parser: argparse.ArgumentParser, name: str) -> None:
    """Set ``parser``'s defaults from a YAML config; the command line still wins (as in timm's train.py)."""
    cfg = _config(name)
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in cfg if k.replace("-", "_") not in known and k not in RECORDED)
    unset = [k for k in unknown if _unset(cfg[k])]  # a newer train.py's option, left off: nothing to do
    refused = [f"{k}={cfg[k]!r}" for k in unknown if k not in unset]
    if refused:
        raise UsageError(f"{name}: unknown options {', '.join(refused)} (nfnet-hub train knows every option of "
                         "timm's train.py as of timm 1.0.28; nfnet-hub timm-train runs a newer train.py itself)")
    if unset and os.environ.get("RANK", "0") == "0":
        print(f"note: {name}: {', '.join(unset)}: not options nfnet-hub train knows, and unset there: ignored",
              flush=True)
    given = {k.replace("-", "_"): v for k, v in cfg.items() if k not in RECORDED and k not in unset and k != "config"}
    parser.set_defaults(**typed_config(parser, given, name))


def _unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse like timm's train.py: YAML defaults first, then the command line on top."""
    parser = build_parser()
    if (pre := parser.parse_known_args(argv)[0]).config:
        apply_config(parser, pre.config)
    return parser.parse_args(argv)


def _defaults() -> dict[str, Any]:
    return {_dest(flags): kw.get("default") for _, flags, kw in OPTIONS}


def noted_options(args: argparse.Namespace) -> list[str]:
    """Options set away from their default that are no-ops for NFNets, with why."""
    defaults = _defaults()
    return [f"--{k.replace('_', '-')} {getattr(args, k)!r}: ignored ({s.removeprefix('no-op: ')})"
            for k, s in SUPPORT.items() if s.startswith("no-op") and getattr(args, k, None) != defaults[k]]


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before any work, what cannot give the run that was asked for."""
    defaults = _defaults()
    refused = [f"--{k.replace('_', '-')} {getattr(args, k)!r}: {s.removeprefix('refused: ')}"
               for k, s in SUPPORT.items() if s.startswith("refused") and getattr(args, k, None) != defaults[k]]
    if refused:
        raise UsageError(f"{len(refused)} option(s) of timm's train.py that nfnet-hub train does not implement "
                         "(nfnet-hub timm-train runs train.py itself):", details=refused)
    if args.data and not args.data_dir:
        args.data_dir = args.data
    if args.dataset == DIGITS and args.data_dir:
        raise UsageError(f"--data-dir {args.data_dir} and --dataset digits conflict: digits are bundled; drop one "
                         "(for image folders, --dataset '' is the default)")
    unused = [f"--{k.replace('_', '-')} {getattr(args, k)!r}" for k in IMAGE_PIPELINE
              if getattr(args, k) != defaults[k] and getattr(args, k) not in (0, None, "")]  # asking for none is fine
    if args.dataset == DIGITS and unused:
        raise UsageError(f"{len(unused)} option(s) that --dataset digits would ignore: the bundled digits are arrays "
                         "scaled to the input size, read and augmented by none of timm's image transforms (train on "
                         "them as image folders to use these: `nfnet-hub quickstart` leaves them in "
                         "artifacts/quickstart/digits, for --data-dir)", details=unused)
    if args.dataset != DIGITS:
        if not args.data_dir:
            raise UsageError("no data: give --data-dir DIR (image folders DIR/train/CLASS/*.jpg and "
                             "DIR/validation/CLASS/*.jpg), or --dataset digits for the bundled digits")
        downloads_into = args.dataset_download and args.dataset.startswith(("torch/", "tfds/"))
        if not (args.dataset.startswith("hfds/") or downloads_into or Path(args.data_dir).is_dir()):
            raise UsageError(f"--data-dir {args.data_dir} is not a folder")
    if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
        raise UsageError(f"--resume {args.resume}: no such file (a run's last.pth.tar, or 'auto')")
    for option in ("initial_checkpoint", "pretrained_path", "class_map"):
        value = getattr(args, option)
        if value and not Path(value).is_file():
            weights = option != "class_map" and Path(value).is_dir()
            raise UsageError(f"--{option.replace('_', '-')} " + (folder_given(Path(value), "a checkpoint file")
                                                                  if weights else f"{value}: no such file"))
    check_writable_folder(Path(args.output or "output/train"))
    if args.torchscript and args.torchcompile:
        raise UsageError("--torchscript and --torchcompile conflict (as in train.py): choose one")
    check_ranges(args)
    if args.eval_metric not in ("top1", "top5", "loss"):
        raise UsageError(f"--eval-metric {args.eval_metric!r}: choose top1, top5 or loss")
