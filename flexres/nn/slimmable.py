"""Width-slimmable layers (US-Net / MutualNet): a sub-network of width w runs on the first channels of every layer.

Each layer holds the full-width weights. ``set_width(w)`` makes it use the first
``slim_channels(C, w)`` output (and input) channels: C * w rounded to a multiple of ``divisor``, never
above C. Producer and consumer of a tensor round the same base count, so their slices always agree.
BN statistics depend on the width and the resolution, so ``SlimmableBatchNorm2d`` normalises with
batch statistics while training and, in evaluation, with post-statistics re-estimated for each
(resolution, width) on training images (MutualNet Sec. 3.4), cached per operating point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .switchable_bn import _MomentAccumulator


def slim_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Channels a layer of ``channels`` uses at ``width``: a multiple of ``divisor`` near channels * width."""
    if width >= 1.0:
        return channels
    c = max(divisor, int(channels * width + divisor / 2) // divisor * divisor)
    return min(channels, c)


class SlimmableConv2d(nn.Conv2d):
    """nn.Conv2d whose active input/output channels follow the width.

    slim_in=False for the stem (3 RGB channels). A depthwise conv (groups == channels) slices its groups.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, slim_in: bool = True, slim_out: bool = True, divisor: int = 8) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.depthwise = groups > 1 and groups == in_channels == out_channels
        if groups > 1 and not self.depthwise:
            raise ValueError("SlimmableConv2d supports dense (groups=1) and depthwise convolutions")
        self.slim_in, self.slim_out, self.divisor = slim_in, slim_out, divisor
        self.active_in, self.active_out = in_channels, out_channels

    def set_width(self, width: float) -> None:
        self.active_in = slim_channels(self.in_channels, width, self.divisor) if self.slim_in else self.in_channels
        self.active_out = slim_channels(self.out_channels, width, self.divisor) if self.slim_out else self.out_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.depthwise:
            w = self.weight[: self.active_out]
            return F.conv2d(x, w, None, self.stride, self.padding, 1, self.active_out)
        w = self.weight[: self.active_out, : self.active_in]
        return F.conv2d(x, w, None, self.stride, self.padding, 1, 1)

    def to_conv2d(self) -> nn.Conv2d:
        groups = self.active_out if self.depthwise else 1
        conv = nn.Conv2d(self.active_in, self.active_out, self.kernel_size, self.stride, self.padding, groups=groups, bias=False)
        with torch.no_grad():
            conv.weight.copy_(self.weight[: self.active_out] if self.depthwise else self.weight[: self.active_out, : self.active_in])
        return conv.to(self.weight.device)


class SlimmableLinear(nn.Linear):
    """nn.Linear on the first ``slim_channels(in_features, width)`` inputs; all outputs (the classes)."""

    def __init__(self, in_features: int, out_features: int, divisor: int = 8) -> None:
        super().__init__(in_features, out_features)
        self.divisor = divisor
        self.active_in = in_features

    def set_width(self, width: float) -> None:
        self.active_in = slim_channels(self.in_features, width, self.divisor)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight[:, : self.active_in], self.bias)

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.active_in, self.out_features)
        with torch.no_grad():
            lin.weight.copy_(self.weight[:, : self.active_in])
            lin.bias.copy_(self.bias)
        return lin.to(self.weight.device)


class SlimmableBatchNorm2d(nn.Module):
    """BN over the first channels; shared affine parameters, statistics per (resolution, width).

    Training normalises with the batch's statistics. Evaluation needs post-statistics for the active
    operating point (``calibrated[(resolution, width)]``, filled by ``flexres.calibrate_bn``); there
    are no running statistics worth using, since every width and resolution shares this one layer.
    """

    def __init__(self, num_features: int, divisor: int = 8, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.divisor, self.eps = num_features, divisor, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.active = num_features
        self.key: tuple[int, float] = (0, 1.0)
        self.calibrated: dict[tuple[int, float], tuple[Tensor, Tensor]] = {}
        self._accumulator: _MomentAccumulator | None = None
        # Cost measurements (MACs, latency) need a forward pass, not correct statistics.
        self.placeholder_statistics = False

    def set_width(self, width: float) -> None:
        self.active = slim_channels(self.num_features, width, self.divisor)

    def set_key(self, resolution: int, width: float) -> None:
        self.key = (int(resolution), float(width))

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight[: self.active], self.bias[: self.active]
        if self._accumulator is not None:
            self._accumulator.update(x)
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        if self.training:
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        if self.key not in self.calibrated:
            if self.placeholder_statistics:
                ones = self.weight.new_ones(self.active)
                return F.batch_norm(x, ones * 0, ones, w, b, False, 0.0, self.eps)
            raise LookupError(
                f"operating point {self.key[0]}px @ width {self.key[1]:g} has no post-statistics BN; run "
                "flexres.calibrate_bn for it in Python; `flexres eval RUN --width W`, `flexres table` and "
                "`flexres export` calibrate it for you"
            )
        mean, var = self.calibrated[self.key]
        return F.batch_norm(x, mean, var, w, b, False, 0.0, self.eps)

    @staticmethod
    def calibration_key(resolution: int, width: float) -> tuple[int, float]:
        return (int(resolution), float(width))

    @staticmethod
    def key_to_str(key: tuple[int, float]) -> str:
        return f"{key[0]}@{key[1]:g}"

    @staticmethod
    def key_from_str(text: str) -> tuple[int, float]:
        r, w = text.split("@")
        return (int(r), float(w))

    def begin_calibration(self, key: tuple[int, float], across_ranks: bool = False) -> None:
        self.key = key
        self._accumulator = _MomentAccumulator(across_ranks)

    def end_calibration(self) -> None:
        mean, var = self._accumulator.result()
        self.calibrated[self.key] = (mean.to(self.weight), var.to(self.weight))
        self._accumulator = None

    def abort_calibration(self) -> None:
        self._accumulator = None

    def to_batchnorm(self) -> nn.BatchNorm2d:
        if self.key in self.calibrated:
            mean, var = self.calibrated[self.key]
        elif self.placeholder_statistics:  # cost measurement only
            mean, var = self.weight.new_zeros(self.active), self.weight.new_ones(self.active)
        else:
            raise LookupError(f"operating point {self.key[0]}px @ width {self.key[1]:g} has no post-statistics BN to export; "
                              "calibrate it first (flexres export does so when given --data)")
        bn = nn.BatchNorm2d(self.active, eps=self.eps)
        with torch.no_grad():
            bn.weight.copy_(self.weight[: self.active])
            bn.bias.copy_(self.bias[: self.active])
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        return bn.to(self.weight.device).eval()

    def extra_repr(self) -> str:
        return f"{self.num_features}, divisor={self.divisor}"
