"""timm ``train.py`` arguments (same names, same meaning) and ``--config`` YAML files, checked before
any work starts."""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from ..errors import UsageError
from ..files import check_writable_folder

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DIGITS = "digits"
RECORDED = {"data_config"}  # written into args.yaml by a run for the record; not an option


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless it says it in words or the option is required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or "(default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    a = p.add_argument
    a("--config", "-c", default="", help="YAML file of argument defaults: a path (an args.yaml of an earlier run "
      "works), or a recipe name (f0 ... f7)")
    # data
    a("--data-dir", default=None, help="dataset root; for image folders it holds train/ and validation/ "
      "(one folder per class in each)")
    a("--dataset", default="", help="'' for image folders under --data-dir, 'digits' for scikit-learn's bundled "
      "digits, 'hfds/NAME' or 'wds/NAME' as in timm")
    a("--train-split", default="train", help="training split (folder name for image folders)")
    a("--val-split", default="validation", help="validation split (folder name for image folders)")
    a("--num-classes", type=_at_least(1), default=None, help="classes (default: read from the dataset)")
    a("--img-size", type=_at_least(1), default=None, help="input size (default: the model's train size)")
    a("--workers", "-j", type=_at_least(0), default=2, help="data loader processes per training process")
    a("--pin-mem", action="store_true", help="pin loader memory (faster copies to a GPU)")
    # model
    a("--model", default="nfnet_hub_nano", help="model name in timm's factory")
    a("--pretrained", action="store_true", help="start from the model's pretrained weights")
    a("--initial-checkpoint", default="", help="start from the weights of this file (safetensors or .pth)")
    a("--resume", default="", help="training checkpoint to resume (a last.pth.tar), or 'auto' for "
      "OUTPUT/EXPERIMENT/last.pth.tar")
    a("--drop", type=float, default=None, help="dropout rate before the classifier (default: the variant's)")
    a("--drop-path", type=float, default=None, help="stochastic depth rate (default: none)")
    a("--channels-last", action="store_true", help="channels-last memory format")
    a("--grad-checkpointing", action="store_true", help="recompute activations in the backward pass")
    a("--torchcompile", nargs="?", const="inductor", default=None, help="torch.compile backend (bare: inductor)")
    # optimisation
    a("--batch-size", "-b", type=_at_least(1), default=128, help="per-process batch size")
    a("--grad-accum-steps", type=_at_least(1), default=1, help="micro-batches per optimiser step")
    a("--opt", default="sgd", help="optimiser, as timm's create_optimizer_v2 names it")
    a("--opt-eps", type=float, default=None, help="optimiser epsilon (default: the optimiser's)")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--weight-decay", type=float, default=2e-5, help="weight decay (none on gains and biases)")
    a("--clip-grad", type=float, default=None, help="clipping threshold (for agc: the clipping ratio)")
    a("--clip-mode", default="agc", choices=["agc", "norm", "value"], help="gradient clipping mode")
    a("--agc-partition", default="exclude_classifier", choices=["exclude_classifier", "authors"],
      help="which tensors AGC clips: all but the classifier, or the authors' grouping (classifier bias clipped)")
    a("--lr", type=float, default=None, help="learning rate (default: lr-base x global batch / lr-base-size)")
    a("--lr-base", type=float, default=0.1, help="learning rate for a global batch of lr-base-size")
    a("--lr-base-size", type=_at_least(1), default=256, help="global batch size that lr-base is for")
    a("--sched", default="cosine", help="learning-rate schedule, as timm's create_scheduler_v2 names it")
    a("--epochs", type=_at_least(1), default=10, help="epochs to train (a resumed run trains up to this many)")
    a("--warmup-epochs", type=_at_least(0), default=0, help="epochs of linear warm-up")
    a("--warmup-lr", type=float, default=1e-5, help="learning rate at the start of warm-up")
    a("--min-lr", type=float, default=0.0, help="lowest learning rate of the schedule")
    a("--sched-on-updates", action="store_true", help="step the schedule every update instead of every epoch")
    # regularisation and augmentation
    a("--smoothing", type=float, default=0.1, help="label smoothing")
    a("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    a("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    a("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    a("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix instead of mixup")
    a("--aa", default=None, help="AutoAugment/RandAugment policy, e.g. rand-m5-n4")
    a("--scale", type=float, nargs=2, default=[0.08, 1.0], help="random resized crop area range")
    a("--hflip", type=float, default=0.5, help="horizontal flip probability")
    a("--model-ema", action="store_true", help="keep an exponential moving average of the weights")
    a("--model-ema-decay", type=float, default=0.9998, help="EMA decay per update")
    # precision and devices
    a("--amp", action="store_true", help="mixed precision")
    a("--amp-dtype", default="bfloat16", choices=["float16", "bfloat16"], help="mixed precision type")
    a("--device", default=None, help="device (default: this process's GPU, else the CPU)")
    a("--fsdp", action="store_true", help="shard the model with FSDP2 (fully_shard) instead of DDP")
    # bookkeeping
    a("--output", default="output", help="folder for runs")
    a("--experiment", default="", help="run folder name under --output (default: MODEL-DATASET)")
    a("--log-interval", type=_at_least(0), default=50, help="log every N steps without a progress bar (0: never)")
    a("--recovery-interval", type=_at_least(0), default=0, help="save last.pth.tar every N optimiser steps")
    a("--checkpoint-hist", type=_at_least(0), default=3, help="per-epoch checkpoints to keep")
    a("--seed", type=int, default=42, help="random seed")
    a("--no-progress", action="store_true", help="log lines instead of a progress bar")
    return p


def build_parser(prog: str = "nfnet-hub train") -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog=prog, description="Train an NFNet (timm train.py arguments).",
        formatter_class=DefaultsFormatter))


def _config_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    recipe = RECIPES / f"{name}.yaml"
    if recipe.is_file():
        return recipe
    known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise UsageError(f"no config file {name!r} (recipes: {known})")


def apply_config(parser: argparse.ArgumentParser, name: str) -> None:
    """Set ``parser``'s defaults from a YAML config; the command line still wins (as in timm's train.py)."""
    path = _config_path(name)
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a YAML file: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{path} is not a mapping of options")
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in cfg if k.replace("-", "_") not in known and k not in RECORDED)
    if unknown:
        raise UsageError(f"{name}: unknown options {', '.join(unknown)}")
    parser.set_defaults(**{k.replace("-", "_"): v for k, v in cfg.items() if k not in RECORDED})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse like timm's train.py: YAML defaults first, then the command line on top."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        apply_config(parser, pre.config)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before any work, what cannot give the run that was asked for."""
    if args.dataset == DIGITS and args.data_dir:
        raise UsageError(f"--data-dir {args.data_dir} and --dataset digits conflict: digits are bundled; drop one "
                         "(for image folders, --dataset '' is the default)")
    if args.dataset != DIGITS:
        if not args.data_dir:
            raise UsageError("no data: give --data-dir DIR (image folders DIR/train/CLASS/*.jpg and "
                             "DIR/validation/CLASS/*.jpg), or --dataset digits for the bundled digits")
        if not args.dataset.startswith("hfds/") and not Path(args.data_dir).is_dir():
            raise UsageError(f"--data-dir {args.data_dir} is not a folder")
    if args.resume and args.resume != "auto":
        path = Path(args.resume)
        if not path.is_file():
            raise UsageError(f"--resume {args.resume}: no such file (a run's last.pth.tar, or 'auto')")
    if args.initial_checkpoint and not Path(args.initial_checkpoint).is_file():
        raise UsageError(f"--initial-checkpoint {args.initial_checkpoint}: no such file")
    check_writable_folder(Path(args.output))
    if args.resume and args.initial_checkpoint:
        raise UsageError("--resume and --initial-checkpoint conflict: a resumed run takes its weights from the "
                         "checkpoint it resumes")
