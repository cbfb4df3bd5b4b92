"""MobileNetV1 (Howard et al. 2017): a 3x3 stem and 13 depthwise-separable blocks; plain, or width-slimmable."""

from __future__ import annotations

from functools import partial

from torch import nn

from ..nn.slimmable import SlimmableLinear, keep_full_width
from ..nn.stage_resize import StageResize
from .base import ConvFactory, FeatureSequenceModel, NormFactory, make_divisible, resize_plan, scale_aware_norm
from .mobilenet_v2 import ConvBNReLU
from .registry import register_model

# (output channels, stride) of the 13 depthwise-separable blocks.
_BLOCKS = [
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
]


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv-BN-ReLU6 (``0``), then 1x1 pointwise conv-BN-ReLU6 (``1``)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: partial, conv) -> None:
        super().__init__(
            ConvBNReLU(cin, cin, 3, stride, norm, conv, groups=cin), ConvBNReLU(cin, cout, 1, 1, norm, conv)
        )


class MobileNetV1(FeatureSequenceModel):
    def __init__(
        self,
        num_classes: int = 1000,
        train_resolutions: list[int] | tuple[int, ...] = (224,),
        width_mult: float = 1.0,
        dropout: float = 0.0,
        slimmable: bool = False,
        width_range: tuple[float, float] = (0.25, 1.0),
        slim_divisor: int = 8,
        slim_head: bool = False,
        channel_rounding: str = "official",
        resizable: bool = False,
        scale_factors: tuple[float, ...] = (0.45, 0.65, 0.85, 1.0),
        norm_layer: NormFactory | None = None,
        conv_layer: ConvFactory | None = None,
    ) -> None:
        super().__init__(
            train_resolutions, None, width_range if slimmable else None, scale_factors if resizable else None
        )
        norm, conv = self.layer_factories(
            slimmable=slimmable, slim_divisor=slim_divisor, norm_layer=norm_layer, conv_layer=conv_layer
        )
        self.resize_at, bn_stage, stage_strides = resize_plan([2] + [s for _, s in _BLOCKS])
        norms = [norm] * (len(_BLOCKS) + 1)
        if resizable:
            norms = [scale_aware_norm(self.scale_factors, st, self.train_resolutions) for st in bn_stage]
            self.stage_resizers = nn.ModuleList(StageResize(st, i) for i, st in enumerate(stage_strides))
        cin = make_divisible(32 * width_mult, 8)
        layers: list[nn.Module] = [ConvBNReLU(3, cin, 3, 2, norms[0], conv)]
        for c, s in _BLOCKS:
            cout = make_divisible(c * width_mult, 8)
            layers.append(DepthwiseSeparable(cin, cout, s, norms[len(layers)], conv))
            cin = cout
        if not slim_head:  # the classifier sees every channel at every width: the last pointwise conv stays full
            keep_full_width(layers[-1][1])
        self.features = nn.Sequential(*layers)
        self.num_features = cin
        linear = (
            SlimmableLinear(cin, num_classes, slim_divisor, slim_in=slim_head)
            if slimmable
            else nn.Linear(cin, num_classes)
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), linear)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        if slimmable:
            self.use_channel_rounding(channel_rounding, slim_head=slim_head)


@register_model
def mobilenet_v1(**kwargs) -> MobileNetV1:
    return MobileNetV1(**kwargs)


@register_model
def us_mobilenet_v1(**kwargs) -> MobileNetV1:
    """Universally slimmable MobileNetV1 (US-Net / MutualNet): any width in ``width_range``.

    The classifier keeps its full size at every width (and so the last pointwise conv's output);
    ``slim_head=True`` slims both."""
    return MobileNetV1(slimmable=True, **kwargs)


@register_model
def resizable_mobilenet_v1(**kwargs) -> MobileNetV1:
    """Resizable MobileNetV1: five stages (one per feature-map resolution), each resized by a factor."""
    return MobileNetV1(resizable=True, **kwargs)
