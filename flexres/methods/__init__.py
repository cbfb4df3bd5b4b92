from . import mutualnet, resizable, rsnet, san  # noqa: F401  (registers the recipes)
from .base import Method, StepOutput, create_method, list_methods, register_method

__all__ = ["Method", "StepOutput", "create_method", "list_methods", "register_method"]
