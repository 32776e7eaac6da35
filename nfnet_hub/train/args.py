"""timm ``train.py`` arguments (same names, same meaning) and ``--config`` YAML files."""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nfnet-hub train", description="Train an NFNet (timm train.py arguments).")
    a = p.add_argument
    a("--config", "-c", default="", help="YAML file of argument defaults (a path, or a recipe name like f0)")
    # data
    a("--data-dir", default=None, help="dataset root (image folders: train/ and validation/)")
    a("--dataset", default="digits",
      help="'digits' (scikit-learn, bundled), '' for image folders, 'hfds/NAME' or 'wds/NAME' as in timm")
    a("--train-split", default="train")
    a("--val-split", default="validation")
    a("--num-classes", type=int, default=None)
    a("--img-size", type=int, default=None)
    a("--workers", "-j", type=int, default=2)
    a("--pin-mem", action="store_true")
    # model
    a("--model", default="nfnet_hub_nano")
    a("--pretrained", action="store_true")
    a("--initial-checkpoint", default="")
    a("--resume", default="", help="checkpoint to resume, or 'auto' for OUTPUT/EXPERIMENT/last.pth.tar")
    a("--drop", type=float, default=None, help="dropout rate (default: the variant's)")
    a("--drop-path", type=float, default=None)
    a("--channels-last", action="store_true")
    a("--grad-checkpointing", action="store_true")
    a("--torchcompile", nargs="?", const="inductor", default=None)
    # optimisation
    a("--batch-size", "-b", type=int, default=128, help="per-process batch size")
    a("--grad-accum-steps", type=int, default=1)
    a("--opt", default="sgd")
    a("--opt-eps", type=float, default=None)
    a("--momentum", type=float, default=0.9)
    a("--weight-decay", type=float, default=2e-5)
    a("--clip-grad", type=float, default=None)
    a("--clip-mode", default="agc", choices=["agc", "norm", "value"])
    a("--agc-partition", default="exclude_classifier", choices=["exclude_classifier", "authors"])
    a("--lr", type=float, default=None)
    a("--lr-base", type=float, default=0.1)
    a("--lr-base-size", type=int, default=256)
    a("--sched", default="cosine")
    a("--epochs", type=int, default=10)
    a("--warmup-epochs", type=int, default=0)
    a("--warmup-lr", type=float, default=1e-5)
    a("--min-lr", type=float, default=0.0)
    a("--sched-on-updates", action="store_true")
    # regularisation and augmentation
    a("--smoothing", type=float, default=0.1)
    a("--mixup", type=float, default=0.0)
    a("--cutmix", type=float, default=0.0)
    a("--mixup-prob", type=float, default=1.0)
    a("--mixup-switch-prob", type=float, default=0.5)
    a("--aa", default=None, help="AutoAugment/RandAugment policy, e.g. rand-m5-n4")
    a("--scale", type=float, nargs=2, default=[0.08, 1.0], help="random resized crop area range")
    a("--hflip", type=float, default=0.5)
    a("--model-ema", action="store_true")
    a("--model-ema-decay", type=float, default=0.9998)
    # precision and devices
    a("--amp", action="store_true")
    a("--amp-dtype", default="bfloat16", choices=["float16", "bfloat16"])
    a("--device", default=None)
    a("--fsdp", action="store_true", help="shard the model with FSDP2 (fully_shard) instead of DDP")
    # bookkeeping
    a("--output", default="output")
    a("--experiment", default="")
    a("--log-interval", type=int, default=50)
    a("--recovery-interval", type=int, default=0, help="save last.pth.tar every N optimiser steps")
    a("--checkpoint-hist", type=int, default=3)
    a("--seed", type=int, default=42)
    a("--no-progress", action="store_true", help="log lines instead of a progress bar")
    return p


def _config_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    recipe = RECIPES / f"{name}.yaml"
    if recipe.is_file():
        return recipe
    known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise ValueError(f"no config file {name!r} (recipes: {known})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse like timm's train.py: YAML defaults first, then the command line on top."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        cfg = yaml.safe_load(_config_path(pre.config).read_text()) or {}
        known = {a.dest for a in parser._actions}
        unknown = sorted(k for k in cfg if k.replace("-", "_") not in known)
        if unknown:
            raise ValueError(f"{pre.config}: unknown options {', '.join(unknown)}")
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in cfg.items()})
    return parser.parse_args(argv)
