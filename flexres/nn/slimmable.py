"""Width-slimmable layers (US-Net / MutualNet): a sub-network of width w runs on the first channels of every layer.

Each layer holds the full-width weights. ``set_width(w)`` makes it use the first
``slim_channels(C, w)`` output (and input) channels: C * w rounded as the official slimmable-networks
code rounds it (``make_divisible``: a multiple of ``divisor``, never below ``divisor``, never more than
10 % under C * w), never above C. A layer whose channels are ``ratio`` times a block's input (MobileNetV2's
expanded channels) rounds the input's count and multiplies it back, as the official US-Net does. Producer
and consumer of a tensor round the same base count, so their slices always agree. Layers built with
``slim_out=False`` (``slim=False`` for BN) keep their full size at every width: MobileNetV2's last 1x1
conv and every classifier stay full-size in the official US-Net / MutualNet models.
BN statistics depend on the width and the resolution, so ``SlimmableBatchNorm2d`` normalises with
batch statistics while training and, in evaluation, with post-statistics re-estimated for each
(resolution, width) on training images (MutualNet Sec. 3.4), cached per operating point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..operating_point import OperatingPoint
from .adaptive import AdaptiveLayer, PointSetting
from .switchable_bn import _MomentAccumulator


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor``, at least ``min_value`` (default ``divisor``),
    and never more than 10 % down (the TF-slim / slimmable-networks rule)."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


ROUNDING_RULES = ("official", "legacy")


def slim_channels(channels: int, width: float, divisor: int = 8, ratio: int = 1, rule: str = "official") -> int:
    """Channels a layer of ``channels`` uses at ``width``: ``make_divisible(channels / ratio * width) * ratio``,
    never above ``channels``. ``rule="legacy"`` is flexres's rounding before 2026-12 (nearest multiple of
    ``divisor``, at least ``divisor``, no 10 % rule, no ratio), kept so runs trained with it load unchanged."""
    if width >= 1.0:
        return channels
    if rule == "legacy":
        return min(channels, max(divisor, int(channels * width + divisor / 2) // divisor * divisor))
    if rule != "official":
        raise ValueError(f"unknown channel rounding {rule!r}; choose one of {', '.join(ROUNDING_RULES)}")
    if channels % ratio:
        raise ValueError(f"{channels} channels are not a multiple of the channel ratio {ratio}")
    return min(channels, make_divisible(channels // ratio * width, divisor) * ratio)


class SlimmableConv2d(nn.Conv2d, AdaptiveLayer):
    """nn.Conv2d whose active input/output channels follow the width.

    slim_in=False for the stem (3 RGB channels), slim_out=False for a full-size head. A depthwise conv
    (groups == channels) slices its groups. ``ratio_in`` / ``ratio_out``: see ``slim_channels``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        slim_in: bool = True,
        slim_out: bool = True,
        divisor: int = 8,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.depthwise = groups > 1 and groups == in_channels == out_channels
        if groups > 1 and not self.depthwise:
            raise ValueError("SlimmableConv2d supports dense (groups=1) and depthwise convolutions")
        self.slim_in, self.slim_out, self.divisor = slim_in, slim_out, divisor
        self.ratio_in = self.ratio_out = 1
        self.rounding = "official"
        self.active_in, self.active_out = in_channels, out_channels

    def set_width(self, width: float) -> None:
        r = self.rounding
        self.active_in = (
            slim_channels(self.in_channels, width, self.divisor, self.ratio_in, r) if self.slim_in else self.in_channels
        )
        self.active_out = (
            slim_channels(self.out_channels, width, self.divisor, self.ratio_out, r)
            if self.slim_out
            else self.out_channels
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.depthwise:
            w = self.weight[: self.active_out]
            return F.conv2d(x, w, None, self.stride, self.padding, 1, self.active_out)
        w = self.weight[: self.active_out, : self.active_in]
        return F.conv2d(x, w, None, self.stride, self.padding, 1, 1)

    def apply_point(self, setting: PointSetting) -> bool:
        self.set_width(setting.op.width)
        return False

    def to_static(self) -> nn.Module:
        return self.to_conv2d()

    def to_conv2d(self) -> nn.Conv2d:
        groups = self.active_out if self.depthwise else 1
        conv = nn.Conv2d(
            self.active_in, self.active_out, self.kernel_size, self.stride, self.padding, groups=groups, bias=False
        )
        with torch.no_grad():
            conv.weight.copy_(
                self.weight[: self.active_out] if self.depthwise else self.weight[: self.active_out, : self.active_in]
            )
        return conv.to(self.weight.device)


class SlimmableLinear(nn.Linear, AdaptiveLayer):
    """nn.Linear on the first ``slim_channels(in_features, width)`` inputs (all of them with
    ``slim_in=False``); all outputs (the classes)."""

    def __init__(self, in_features: int, out_features: int, divisor: int = 8, slim_in: bool = True) -> None:
        super().__init__(in_features, out_features)
        self.divisor, self.slim_in = divisor, slim_in
        self.rounding = "official"
        self.active_in = in_features

    def set_width(self, width: float) -> None:
        self.active_in = (
            slim_channels(self.in_features, width, self.divisor, 1, self.rounding) if self.slim_in else self.in_features
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight[:, : self.active_in], self.bias)

    def apply_point(self, setting: PointSetting) -> bool:
        self.set_width(setting.op.width)
        return False

    def to_static(self) -> nn.Module:
        return self.to_linear()

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.active_in, self.out_features)
        with torch.no_grad():
            lin.weight.copy_(self.weight[:, : self.active_in])
            lin.bias.copy_(self.bias)
        return lin.to(self.weight.device)


class SlimmableBatchNorm2d(nn.Module, AdaptiveLayer):
    """BN over the first channels; shared affine parameters, statistics per (resolution, width).

    Training normalises with the batch's statistics. Evaluation needs post-statistics for the active
    operating point (``calibrated[(resolution, width)]``, filled by ``flexres.calibrate_bn``); there
    are no running statistics worth using, since every width and resolution shares this one layer.
    """

    def __init__(self, num_features: int, divisor: int = 8, eps: float = 1e-5, slim: bool = True) -> None:
        super().__init__()
        self.num_features, self.divisor, self.eps, self.slim = num_features, divisor, eps, slim
        self.ratio = 1
        self.rounding = "official"
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.active = num_features
        self.key: tuple[int, float] = (0, 1.0)
        self.calibrated: dict[tuple[int, float], tuple[Tensor, Tensor]] = {}
        self._accumulator: _MomentAccumulator | None = None
        # Cost measurements (MACs, latency) need a forward pass, not correct statistics.
        self.placeholder_statistics = False

    def set_width(self, width: float) -> None:
        self.active = self.channels_at(width)

    def channels_at(self, width: float) -> int:
        return (
            slim_channels(self.num_features, width, self.divisor, self.ratio, self.rounding)
            if self.slim
            else self.num_features
        )

    def set_key(self, resolution: int, width: float) -> None:
        self.key = (int(resolution), float(width))

    def apply_point(self, setting: PointSetting) -> bool:
        self.set_width(setting.op.width)
        self.set_key(setting.op.resolution, setting.op.width)
        return False

    def to_static(self) -> nn.Module:
        return self.to_batchnorm()

    def deployed_params(self) -> int:
        return 2 * self.active  # the active channels' scale and shift (to_batchnorm needs statistics for the point)

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
    def calibration_key(op: OperatingPoint) -> tuple[int, float]:
        return (int(op.resolution), float(op.width))

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
            raise LookupError(
                f"operating point {self.key[0]}px @ width {self.key[1]:g} has no post-statistics BN to export; "
                "calibrate it first (flexres export does so when given --data)"
            )
        bn = nn.BatchNorm2d(self.active, eps=self.eps)
        with torch.no_grad():
            bn.weight.copy_(self.weight[: self.active])
            bn.bias.copy_(self.bias[: self.active])
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        return bn.to(self.weight.device).eval()

    def extra_repr(self) -> str:
        return f"{self.num_features}, divisor={self.divisor}" + ("" if self.slim else ", slim=False")


def keep_full_width(module: nn.Module) -> None:
    """Make every slimmable layer inside ``module`` keep its full output size at every width (a full-size
    head, as the official US-Net / MutualNet models have); their inputs still follow the width."""
    for m in module.modules():
        if isinstance(m, SlimmableConv2d):
            m.slim_out = False
        elif isinstance(m, SlimmableBatchNorm2d):
            m.slim = False


def set_channel_ratio(convs_and_bns: list[nn.Module], ratio_in: list[int], ratio_out: list[int]) -> None:
    """Set each slimmable layer's channel ratio (``slim_channels``); BNs take their ``ratio_out``.
    Plain (non-slimmable) layers are skipped, so model code can call it unconditionally."""
    for m, r_in, r_out in zip(convs_and_bns, ratio_in, ratio_out):
        if isinstance(m, SlimmableConv2d):
            m.ratio_in, m.ratio_out = r_in, r_out
        elif isinstance(m, SlimmableBatchNorm2d):
            m.ratio = r_out


def set_rounding(module: nn.Module, rule: str) -> None:
    """Set the channel rounding rule (``slim_channels``) of every slimmable layer inside ``module``."""
    if rule not in ROUNDING_RULES:
        raise ValueError(f"unknown channel rounding {rule!r}; choose one of {', '.join(ROUNDING_RULES)}")
    for m in module.modules():
        if isinstance(m, (SlimmableConv2d, SlimmableLinear, SlimmableBatchNorm2d)):
            m.rounding = rule
