"""The trainer: timm's train.py arguments, timm's library pieces, AGC done right, torchrun-ready."""
from .args import build_parser, parse_args
from .loop import TrainingDiverged, train

__all__ = ["TrainingDiverged", "build_parser", "parse_args", "train"]
