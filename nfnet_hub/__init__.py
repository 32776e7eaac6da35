"""nfnet-hub: NFNets for the timm ecosystem, from training to production.

``import nfnet_hub`` registers the ``nfnet_hub_*`` models in timm's factory: at once if timm is
already imported, else the moment timm is. Until then nothing imports torch, so the torch-free
runtime (``nfnet_hub.runtime``) can be imported in serving images without torch.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"
__all__ = ["fold", "models", "__version__"]


class _RegisterWhenTimmLoads(importlib.abc.MetaPathFinder):
    """Finds timm as usual, and registers our models right after timm's own import finishes."""

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            importlib.import_module(f"{__name__}.models.nfnet")

        spec.loader.exec_module = exec_and_register
        return spec


if "timm" in sys.modules:
    importlib.import_module(f"{__name__}.models.nfnet")
elif not any(isinstance(f, _RegisterWhenTimmLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTimmLoads())


def __getattr__(name: str) -> Any:
    if name == "fold":
        from .folding import fold

        globals()["fold"] = fold
        return fold
    if name == "models":
        importlib.import_module(f"{__name__}.models.nfnet")  # registers the models
        return importlib.import_module(f"{__name__}.models")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
