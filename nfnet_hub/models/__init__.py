"""NFNet models. The variant table (``variants``) imports no torch; ``nfnet`` registers the models in
timm when imported (``import nfnet_hub`` arranges that as soon as timm is imported)."""
from __future__ import annotations

import importlib
from typing import Any

from .variants import VARIANTS, model_name

__all__ = ["NFNet", "NFNetCfg", "VARIANTS", "model_cfg", "model_name"]


def __getattr__(name: str) -> Any:
    if name in ("NFNet", "NFNetCfg", "model_cfg"):
        return getattr(importlib.import_module(f"{__name__}.nfnet"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
