"""MobileNetV2 (torchvision layer names: ``features.N.conv.M``) with a private BN per trained resolution."""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from ..nn.slimmable import SlimmableLinear, keep_full_width, set_channel_ratio
from ..nn.stage_resize import StageResize
from .base import ConvFactory, FeatureSequenceModel, NormFactory, make_divisible, resize_plan, scale_aware_norm
from .registry import register_model

# (expand ratio t, output channels c, repeats n, first stride s), MobileNetV2 Table 2.
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class ConvBNReLU(nn.Sequential):
    """Conv -> BN -> ReLU6, named ``0``, ``1``, ``2`` like torchvision's Conv2dNormActivation."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, norm: partial, conv: ConvFactory, groups: int = 1
    ) -> None:
        super().__init__(
            conv(cin, cout, kernel, stride, (kernel - 1) // 2, groups),
            norm(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int, norm: partial, conv: ConvFactory) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(cin, hidden, 1, 1, norm, conv))
        layers += [
            ConvBNReLU(hidden, hidden, 3, stride, norm, conv, groups=hidden),
            conv(hidden, cout, 1, 1, 0),
            norm(cout),
        ]
        self.conv = nn.Sequential(*layers)
        # Width-slimmable: the expanded channels are expand_ratio x the (rounded) input channels at every
        # width, as in the official US-Net, not hidden * width rounded on its own.
        t = expand_ratio
        dw, project = layers[-3], layers[-2:]
        modules, ratio_in, ratio_out = [dw[0], dw[1], *project], [t, t, t, 1], [t, t, 1, 1]
        if expand_ratio != 1:
            modules, ratio_in, ratio_out = [layers[0][0], layers[0][1], *modules], [1, t, *ratio_in], [t, t, *ratio_out]
        set_channel_ratio(modules, ratio_in, ratio_out)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(FeatureSequenceModel):
    def __init__(
        self,
        num_classes: int = 1000,
        train_resolutions: list[int] | tuple[int, ...] = (224,),
        width_mult: float = 1.0,
        dropout: float = 0.2,
        meta_conv: bool = False,
        scale_divisor: float = 320.0,
        slimmable: bool = False,
        width_range: tuple[float, float] = (0.25, 1.0),
        slim_divisor: int = 8,
        channel_rounding: str = "official",
        slim_head: bool = False,
        resizable: bool = False,
        scale_factors: tuple[float, ...] = (0.45, 0.65, 0.85, 1.0),
        norm_layer: NormFactory | None = None,
        conv_layer: ConvFactory | None = None,
    ) -> None:
        super().__init__(
            train_resolutions,
            scale_divisor if meta_conv else None,
            width_range if slimmable else None,
            scale_factors if resizable else None,
        )
        norm, conv = self.layer_factories(meta_conv, slimmable, slim_divisor, norm_layer, conv_layer)
        cin = make_divisible(32 * width_mult, 8)
        last = make_divisible(1280 * max(1.0, width_mult), 8)
        strides = [2] + [s if i == 0 else 1 for _, _, n, s in _SETTINGS for i in range(n)] + [1]
        self.resize_at, bn_stage, stage_strides = resize_plan(strides)
        if resizable:  # scale-aware BN: each block's BNs keyed by the factor of the stage it runs in
            norms = [scale_aware_norm(self.scale_factors, st, self.train_resolutions) for st in bn_stage]
            self.stage_resizers = nn.ModuleList(StageResize(st, i) for i, st in enumerate(stage_strides))
        else:
            norms = [norm] * len(strides)
        features: list[nn.Module] = [ConvBNReLU(3, cin, 3, 2, norms[0], conv)]
        for t, c, n, s in _SETTINGS:
            cout = make_divisible(c * width_mult, 8)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, norms[len(features)], conv))
                cin = cout
        features.append(ConvBNReLU(cin, last, 1, 1, norms[len(features)], conv))
        if not slim_head:  # the official US-Net / MutualNet: last 1x1 conv and classifier at full size
            keep_full_width(features[-1])
        self.features = nn.Sequential(*features)
        self.num_features = last
        linear = (
            SlimmableLinear(last, num_classes, slim_divisor, slim_in=slim_head)
            if slimmable
            else nn.Linear(last, num_classes)
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), linear)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        if slimmable:
            self.use_channel_rounding(channel_rounding, slim_head=slim_head)


@register_model
def mobilenet_v2(**kwargs) -> MobileNetV2:
    return MobileNetV2(**kwargs)


@register_model
def san_mobilenet_v2(**kwargs) -> MobileNetV2:
    """SAN: every conv a MetaConv2d whose weight is generated from the scale encoding."""
    return MobileNetV2(meta_conv=True, **kwargs)


@register_model
def us_mobilenet_v2(**kwargs) -> MobileNetV2:
    """Universally slimmable MobileNetV2 (US-Net / MutualNet): any width in ``width_range``.

    As in the official code, the last 1x1 conv (1280 channels) and the classifier keep their full size at
    every width; ``slim_head=True`` slims them too (flexres before 2026-12)."""
    return MobileNetV2(slimmable=True, **kwargs)


@register_model
def resizable_mobilenet_v2(**kwargs) -> MobileNetV2:
    """Resizable MobileNetV2: five stages (one per feature-map resolution), each resized by a factor."""
    return MobileNetV2(resizable=True, **kwargs)
