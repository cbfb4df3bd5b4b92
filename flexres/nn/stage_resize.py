"""StageResize (Resizable networks): bilinear resize of a stage's feature map to its configured size."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .adaptive import AdaptiveLayer, PointSetting


def factor_key(factor: float) -> int:
    """Scale-aware BN keys factors in hundredths (0.45 -> 45), so SwitchableBatchNorm2d can hold them."""
    return int(round(float(factor) * 100))


def stage_size(resolution: int, stride: int, factor: float) -> int:
    """The side of a stage's feature map: the plain network's ceil(resolution / stride), times the factor."""
    return max(1, int(round(math.ceil(resolution / stride) * factor)))


class StageResize(nn.Module, AdaptiveLayer):
    """Resize the incoming feature map to ``size`` x ``size`` (bilinear), where the model sets ``size`` from
    the operating point's factor for this stage. A map already at that size passes through untouched,
    so the configuration of all 1.0 is exactly the plain network."""

    def __init__(self, stride: int, stage: int) -> None:
        super().__init__()
        self.stride = stride  # of the plain network at this stage, relative to the input
        self.stage = stage  # which of the operating point's per-stage factors is this stage's
        self.size: int | None = None

    def set_target(self, resolution: int, factor: float) -> None:
        self.size = stage_size(resolution, self.stride, factor)

    def apply_point(self, setting: PointSetting) -> bool:
        self.set_target(setting.op.resolution, setting.scales[self.stage])
        return False

    def to_static(self) -> nn.Module:
        return FixedResize(self.size) if self.size is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.size is None or (x.shape[-1] == self.size and x.shape[-2] == self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, stage={self.stage}, size={self.size}"


class FixedResize(nn.Module):
    """The static form of a StageResize for export: always resizes to ``size`` (same-size bilinear is exact)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
