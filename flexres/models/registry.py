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


def create_model(
    name: str, pretrained: bool | str | None = None, pretrained_rows: list[int] | None = None, **kwargs: Any
) -> AdaptiveModel:
    """Build a registered model, or ``timm:<name>`` / ``torchvision:<name>`` made switchable (``pretrained``: True for
    the library's download, or a local weights file or an installed package that ships one; ``pretrained_rows``: the
    file's classifier rows that become the model's classes). The name and kwargs are recorded on ``model.arch`` so a
    checkpoint rebuilds the model (the pretrained weights are not needed again: the checkpoint holds the weights)."""
    if ":" in name:
        from .converted import create_converted

        model = create_converted(name, pretrained=pretrained, pretrained_rows=pretrained_rows, **kwargs)
    elif name not in _MODELS:
        raise KeyError(
            f"unknown model {name!r}; available: {', '.join(list_models())}, or timm:<name> / torchvision:<name>"
        )
    elif pretrained:
        raise ValueError(
            f"{name}: 'pretrained' loads timm or torchvision weights into timm:<name> / torchvision:<name> models; "
            "to start a flexres model from a run, use train.init_from"
        )
    else:
        model = _MODELS[name](**kwargs)
    model.arch = {"name": name, "kwargs": {**kwargs, **getattr(model, "arch_defaults", {})}}
    return model
