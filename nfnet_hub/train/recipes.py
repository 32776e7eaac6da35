"""The authors' ImageNet recipe (``experiment_nfnets.py``), per variant, derived from the variant table.

Global batch = batch size x processes; lr = 0.1 x global batch / 256 (timm's ``--lr-base``); set the
batch per process on the command line. AGC clipping 0.01 is for a global batch of 4096: the paper uses
larger values for smaller batches. timm's ``sgd`` is SGD with Nesterov momentum, as the authors'. The authors mix
every batch half by MixUp (alpha 0.2), half by CutMix (uniform area), each image with its own ratio: timm's
``elem`` mode (each image its own ratio and, with even odds, its own kind) comes closest.
"""
from __future__ import annotations

from typing import Any

from ..models.variants import VARIANTS, model_name

__all__ = ["RECIPES", "recipe"]

_SHARED = dict(epochs=360, batch_size=512, opt="sgd", momentum=0.9, lr_base=0.1, lr_base_size=256, sched="cosine",
               sched_on_updates=True, warmup_epochs=5, weight_decay=2e-5, smoothing=0.1, clip_mode="agc",
               clip_grad=0.01, mixup=0.2, cutmix=1.0, mixup_mode="elem", train_interpolation="bicubic",
               drop_path=0.25, model_ema=True, model_ema_decay=0.99999, model_ema_authors_warmup=True, amp=True,
               amp_dtype="bfloat16", dataset="")
RECIPES = [name for name in VARIANTS if name != "nano"]


def recipe(name: str) -> dict[str, Any]:
    """``--config`` values for a variant: the shared recipe, its train size, RandAugment and dropout."""
    v = VARIANTS[name]
    layers, magnitude = v.randaug
    return {**_SHARED, "model": model_name(name), "img_size": v.train_size, "aa": f"rand-m{magnitude}-n{layers}",
            "drop": v.drop_rate}
