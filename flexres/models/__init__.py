from . import mobilenet_v2, resnet  # noqa: F401  (registers the families)
from .base import AdaptiveModel, load_single_bn_weights, make_divisible
from .registry import create_model, list_models, register_model

__all__ = ["AdaptiveModel", "create_model", "load_single_bn_weights", "list_models", "make_divisible", "register_model"]
