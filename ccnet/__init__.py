"""CCNet: criss-cross attention for semantic segmentation, in plain PyTorch.

This package depends on torch and torchvision only; the training pipeline lives in ``pipeline/``.
"""

from ccnet.attention import AxialAttention, CrissCrossAttention, NonLocal2d, RecurrentAttention
from ccnet.models import CCNet, CCNetConfig, build_ccnet, list_models, model_config

__all__ = [
    "AxialAttention",
    "CCNet",
    "CCNetConfig",
    "CrissCrossAttention",
    "NonLocal2d",
    "RecurrentAttention",
    "build_ccnet",
    "list_models",
    "model_config",
]
__version__ = "0.1.0"
