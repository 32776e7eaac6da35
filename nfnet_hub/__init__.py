"""nfnet-hub: NFNets for the timm ecosystem, from training to production.

Importing the package registers the ``nfnet_hub_*`` models in timm's factory.
"""
from . import models
from .fold import fold

__version__ = "0.1.0"
__all__ = ["fold", "models", "__version__"]
