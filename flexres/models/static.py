"""A static sub-network (OFA's get_active_subnet): the plain layers one operating point computes."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse

from ..nn.meta_conv import MetaConv2d
from ..nn.quantize import QuantConv2d
from ..nn.slimmable import SlimmableBatchNorm2d, SlimmableConv2d, SlimmableLinear
from ..nn.stage_resize import FixedResize, StageResize
from ..nn.switchable_bn import SwitchableBatchNorm2d
from ..operating_point import OperatingPoint
from .base import AdaptiveModel


class StaticClassifier(nn.Module):
    """A materialised network without operating-point state: ``head(features(x))``."""

    def __init__(self, net: AdaptiveModel) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_head(self.net.forward_features(x))


def _make_static(module: nn.Module) -> None:
    """Swap every adaptive layer for the plain layer it currently computes."""
    for name, child in module.named_children():
        if isinstance(child, (SwitchableBatchNorm2d, SlimmableBatchNorm2d)):
            setattr(module, name, child.to_batchnorm())
        elif isinstance(child, QuantConv2d):  # LQ-Nets: quantized weights materialised, activations through fixed levels
            setattr(module, name, child.to_static())
        elif isinstance(child, (MetaConv2d, SlimmableConv2d)):
            setattr(module, name, child.to_conv2d())
        elif isinstance(child, SlimmableLinear):
            setattr(module, name, child.to_linear())
        elif isinstance(child, StageResize):
            setattr(module, name, FixedResize(child.size) if child.size is not None else nn.Identity())
        else:
            _make_static(child)


@torch.no_grad()
def to_static(model: AdaptiveModel, op: OperatingPoint | int, bn_policy: str | None = None, scale_policy: str | None = None,
              fold_bn: bool = True) -> nn.Module:
    """The sub-network serving ``op`` as plain Conv2d / BatchNorm2d / Linear layers (SAN weights generated,
    slimmable layers sliced, the selected BN); with ``fold_bn`` every BN is folded into its conv."""
    net = copy.deepcopy(model).eval()
    net.set_operating_point(op, bn_policy, scale_policy)
    _make_static(net)
    static = StaticClassifier(net).eval()
    return fuse(static) if fold_bn else static
