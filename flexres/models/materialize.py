"""Materialise one operating point of an adaptive model as a plain, single-BN model of the same family."""

from __future__ import annotations

import torch

from ..nn.adaptive import materialize_into
from ..nn.quantize import is_quantized
from ..operating_point import OperatingPoint
from ..parity import check_parity
from .base import AdaptiveModel
from .registry import create_model

_ADAPTIVE_KWARGS = ("train_resolutions", "scale_divisor")


def plain_arch(model: AdaptiveModel) -> tuple[str, dict]:
    """The registry name and kwargs of the plain family member (``san_resnet18`` -> ``resnet18``)."""
    name = model.arch["name"].removeprefix("san_")
    kwargs = {k: v for k, v in model.arch["kwargs"].items() if k not in _ADAPTIVE_KWARGS}
    return name, kwargs


@torch.no_grad()
def materialize(
    model: AdaptiveModel, op: OperatingPoint | int, bn_policy: str | None = None, scale_policy: str | None = None
) -> AdaptiveModel:
    """A model with plain ``nn.Conv2d`` weights (SAN: generated at the selected eps) and one BN set (the
    BN that serves ``op`` under ``bn_policy``), whose outputs equal ``model``'s at ``op``.

    The result is an ordinary flexres model trained at ``op.resolution`` alone: it saves, loads and
    exports like any other. Checked: on random inputs at ``op`` its outputs match ``model``'s
    (flexres.parity; a ParityError otherwise).
    """
    op = OperatingPoint.coerce(op)
    if model.width_range is not None or model.scale_factors is not None:
        raise ValueError(
            f"{model.arch['name']} is width-slimmable or resizable: its sub-networks have no plain family "
            "member with the same layers; use flexres.deploy.to_static(model, op) instead"
        )
    name, kwargs = plain_arch(model)
    plain = create_model(name, train_resolutions=[op.resolution], **kwargs)
    plain.to(next(model.parameters()).device)
    with model.at(op, bn_policy=bn_policy, scale_policy=scale_policy):
        for name, child in model.named_children():  # each adaptive layer writes what it computes at op
            materialize_into(child, getattr(plain, name))
        plain.eval()
        check_materialized(model, plain, op)
    return plain


def check_materialized(model: AdaptiveModel, plain: AdaptiveModel, op: OperatingPoint, batch: int = 2) -> None:
    """ParityError unless ``plain`` computes ``model``'s outputs at ``op`` (which ``model`` is set to), on a fixed
    random batch: a layer the copy missed (a quantizer basis, a BN buffer) shows as a difference, not a silent drift."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, op.resolution, op.resolution, generator=gen).to(device)
    was_training = model.training
    model.eval()
    try:
        expected = model(x)
    finally:
        model.train(was_training)
    check_parity(
        plain(x),
        expected,
        f"the materialised model does not compute the source model's outputs at {op}",
        quantized=is_quantized(model),
    )
