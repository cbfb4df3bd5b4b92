from . import mobilenet_v1, mobilenet_v2, preact_resnet, resnet, segmentation, shufflenet_v2  # noqa: F401  (registers the families)
from .base import SAN_MODES, AdaptiveModel, load_single_bn_weights, make_divisible
from .converted import ConvertedModel, make_switchable
from .materialize import materialize
from .registry import create_model, list_models, register_model

__all__ = [
    "SAN_MODES",
    "AdaptiveModel",
    "ConvertedModel",
    "create_model",
    "list_models",
    "load_single_bn_weights",
    "make_divisible",
    "make_switchable",
    "materialize",
    "register_model",
]
