"""NFNet models; importing this package registers them in timm."""
from .nfnet import NFNet, NFNetCfg, model_cfg
from .variants import VARIANTS, model_name

__all__ = ["NFNet", "NFNetCfg", "VARIANTS", "model_cfg", "model_name"]
