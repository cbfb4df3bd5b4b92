"""Model registry: ``create_model(name, **kwargs)`` and ``list_models()``, as in timm."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from .base import AdaptiveModel

_MODELS: dict[str, Callable[..., AdaptiveModel]] = {}


def register_model(fn: Callable[..., AdaptiveModel]) -> Callable[..., AdaptiveModel]:
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs: Any) -> AdaptiveModel:
    """Build a registered model; its name and kwargs are recorded on ``model.arch`` for checkpoints."""
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    model = _MODELS[name](**kwargs)
    model.arch = {"name": name, "kwargs": {**kwargs, **getattr(model, "arch_defaults", {})}}
    return model

