"""Parameter and multiply-add counts, computed on the meta device so even F7 costs no memory."""
from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ModelStats:
    params: int
    gmacs: float  # multiply-adds at the given size, in billions (the paper's "FLOPs")


def model_stats(name: str, img_size: int | tuple[int, int], **kwargs) -> ModelStats:
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs).eval()
        hw = (img_size, img_size) if isinstance(img_size, int) else img_size
        x = torch.empty(1, kwargs.get("in_chans", 3), *hw)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
    return ModelStats(sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 2e9)
