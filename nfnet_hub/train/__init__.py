"""The trainer: timm's train.py arguments, timm's library pieces, AGC done right, torchrun-ready.

``args`` imports no torch (the CLI builds its parser from it at every start); the loop loads on first use."""
from __future__ import annotations

import importlib
from typing import Any

from .args import build_parser, parse_args

__all__ = ["TrainingDiverged", "build_parser", "parse_args", "train"]


def __getattr__(name: str) -> Any:
    if name in ("TrainingDiverged", "train"):
        return getattr(importlib.import_module(f"{__name__}.loop"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
