"""Training run folders as timm's train.py lays them out (args.yaml and checkpoints), read without torch or
PyYAML, so that a run given where an export or a model name belongs is answered with the command that fits."""
from __future__ import annotations

import re
from pathlib import Path

WEIGHT_SUFFIXES = (".pth.tar", ".pth", ".pt", ".safetensors", ".bin", ".ckpt", ".npz")


def best_checkpoint(folder: Path) -> Path | None:
    """The checkpoint a run's metrics chose (else its last) if ``folder`` is a training run, else None."""
    try:
        held = {p.name for p in folder.iterdir()}
    except OSError:
        return None
    checkpoints = sorted(n for n in held if n.endswith(".pth.tar"))
    if "args.yaml" not in held or not checkpoints:
        return None
    return folder / next((n for n in ("model_best.pth.tar", "last.pth.tar") if n in held), checkpoints[-1])


def run_model(folder: Path) -> str:
    """The model a training run's args.yaml names, else MODEL."""
    try:
        text = (folder / "args.yaml").read_text("utf-8", "replace")
    except OSError:
        return "MODEL"
    match = re.search(r"^model:\s*['\"]?([^'\"\s#]+)", text, re.M)
    return match.group(1) if match else "MODEL"


def is_weights_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(WEIGHT_SUFFIXES)
