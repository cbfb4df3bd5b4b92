"""MetaConv2d: SAN's convolution whose weight is generated from a scale encoding, W(eps) = A * eps + B."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adaptive import AdaptiveLayer, PointSetting


def scale_encoding(resolution: int, divisor: float = 320.0) -> float:
    """SAN's scale encoding eps(r) = r / divisor (the reference code's 320: 224 -> 0.7, 96 -> 0.3)."""
    return resolution / divisor


class MetaConv2d(nn.Module, AdaptiveLayer):
    """A conv layer with a per-layer affine weight generator (SAN Eq. 2a; the reference code's
    ``nn.Linear(1, Cout*Cin*k*k)``): ``A`` and ``B`` are shaped like the weight, W(eps) = A * eps + B.

    The generated weight is cached per eps when no gradient is needed (inference, calibration), so
    running at a fixed resolution costs what a plain convolution costs. The cache is keyed on the
    version counters of A and B, which every in-place optimiser step bumps, so a training step
    invalidates it. While training, W is generated afresh at each forward (one multiply-add over the
    weights) so gradients reach A and B.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if bias:
            raise ValueError("MetaConv2d generates bias-free convolutions (BN follows every conv in SAN)")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups
        shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        self.A = nn.Parameter(torch.empty(shape))
        self.B = nn.Parameter(torch.empty(shape))
        self.eps = 1.0
        self._cache: dict[float, Tensor] = {}
        self._cache_key: tuple[int, int, torch.device, torch.dtype] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A and B drawn alike, as the reference code's Linear(1, N) draws its weight and bias alike,
        # but at He scale (every conv is followed by BN, so only the relative scale matters).
        fan_out = self.out_channels * self.kernel_size * self.kernel_size // self.groups
        nn.init.normal_(self.B, 0.0, math.sqrt(2.0 / fan_out))
        nn.init.normal_(self.A, 0.0, math.sqrt(2.0 / fan_out))

    def set_scale(self, eps: float) -> None:
        self.eps = float(eps)

    def weight_at(self, eps: float) -> Tensor:
        """W(eps) = A * eps + B."""
        if torch.is_grad_enabled() and (self.A.requires_grad or self.B.requires_grad):
            return torch.add(self.B, self.A, alpha=eps)
        key = (self.A._version, self.B._version, self.A.device, self.A.dtype)
        if key != self._cache_key:
            self._cache.clear()
            self._cache_key = key
        w = self._cache.get(eps)
        if w is None:
            with torch.no_grad():
                w = torch.add(self.B, self.A, alpha=eps)
            self._cache[eps] = w
        return w

    @property
    def weight(self) -> Tensor:
        return self.weight_at(self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight_at(self.eps), None, self.stride, self.padding, 1, self.groups)

    def apply_point(self, setting: PointSetting) -> bool:
        if setting.scale_eps is None:
            raise ValueError(
                "a MetaConv2d generates its weight from the scale encoding: the model gave none (not a SAN model?)"
            )
        self.set_scale(setting.scale_eps)
        return False

    def to_static(self) -> nn.Module:
        return self.to_conv2d()

    def deployed_params(self) -> int:
        return self.A.numel()  # one generated weight, the shape of A

    def materialize_into(self, target: nn.Module) -> None:
        target.weight.copy_(self.weight_at(self.eps))  # a plain Conv2d

    def to_conv2d(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the weight generated at the current eps."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            groups=self.groups,
            bias=False,
        )
        with torch.no_grad():
            conv.weight.copy_(torch.add(self.B, self.A, alpha=self.eps))
        return conv.to(self.A.device)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, eps={self.eps:.4g}"
        )
