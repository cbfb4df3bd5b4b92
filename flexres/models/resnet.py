"""ResNet-18/34/50 (ImageNet layout, torchvision layer names) with a private BN per trained resolution."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor, nn

from ..nn.slimmable import SlimmableLinear
from ..nn.stage_resize import StageResize
from .base import AdaptiveModel, ConvFactory, NormFactory, make_divisible, scale_aware_norm
from .registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, norm: partial, conv: ConvFactory) -> None:
        super().__init__()
        self.conv1 = conv(cin, planes, 3, stride, 1)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(planes, planes, 3, 1, 1)
        self.bn2 = norm(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(conv(cin, planes, 1, stride, 0), norm(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, norm: partial, conv: ConvFactory) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = conv(cin, planes, 1, 1, 0)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, 3, stride, 1)  # stride on the 3x3, as torchvision (ResNet v1.5)
        self.bn2 = norm(planes)
        self.conv3 = conv(planes, cout, 1, 1, 0)
        self.bn3 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(conv(cin, cout, 1, stride, 0), norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(AdaptiveModel):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        train_resolutions: list[int] | tuple[int, ...] = (224,),
        width_mult: float = 1.0,
        zero_init_residual: bool = False,
        meta_conv: bool = False,
        scale_divisor: float = 320.0,
        slimmable: bool = False,
        width_range: tuple[float, float] = (0.25, 1.0),
        slim_divisor: int = 8,
        channel_rounding: str = "official",
        resizable: bool = False,
        scale_factors: tuple[float, ...] = (0.45, 0.65, 0.85, 1.0),
        w_bits: int = 32,
        a_bits: int = 32,
        activation_bases: str = "shared",
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
        widths = [make_divisible(c * width_mult, 8) for c in (64, 128, 256, 512)]
        self.conv1 = conv(3, widths[0], 7, 2, 3)
        # LQ-Nets (quantized RS-Nets, RS-Nets Table 3): every conv after the stem quantized; stem and fc full precision.
        quantized = self.use_quantization(w_bits, a_bits, activation_bases)
        if quantized is not None:
            if meta_conv or slimmable or resizable:
                raise ValueError(
                    "quantized ResNets (w_bits / a_bits < 32) are plain RS-Net ResNets: not SAN, slimmable or resizable"
                )
            conv = quantized
        self.bn1 = norm(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        # Resizable: each stage resizes at its first non-strided block (Resizable App. B.1), so the
        # strided first block of layer2-4 still sees the previous stage's scale, and its BNs are keyed
        # by that stage's factor (scale-aware BN).
        self.resize_at = [0, 1, 1, 1]
        for i, (planes, n) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(n):
                stage_norm = (
                    norm
                    if not resizable
                    else scale_aware_norm(
                        self.scale_factors, i if j >= self.resize_at[i] else i - 1, self.train_resolutions
                    )
                )
                blocks.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1, stage_norm, conv))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        if resizable:
            self.stage_resizers = nn.ModuleList(StageResize(stride, i) for i, stride in enumerate((4, 8, 16, 32)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = cin
        self.fc = SlimmableLinear(cin, num_classes, slim_divisor) if slimmable else nn.Linear(cin, num_classes)
        if slimmable:
            self.use_channel_rounding(channel_rounding)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                last = (
                    getattr(m, "bn3", None)
                    if isinstance(m, Bottleneck)
                    else getattr(m, "bn2", None)
                    if isinstance(m, BasicBlock)
                    else None
                )
                for bn in getattr(last, "bns", [last] if last is not None else []):
                    nn.init.zeros_(bn.weight)

    def stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def feature_blocks(self) -> list[tuple[int | None, Callable[[Tensor], Tensor]]]:
        blocks: list[tuple[int | None, Callable[[Tensor], Tensor]]] = [(None, self.stem)]
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            blocks += [(i if j == self.resize_at[i] else None, blk) for j, blk in enumerate(layer)]
        return blocks

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


@register_model
def san_resnet18(**kwargs) -> ResNet:
    """SAN: every conv a MetaConv2d whose weight is generated from the scale encoding."""
    return ResNet(BasicBlock, [2, 2, 2, 2], meta_conv=True, **kwargs)


@register_model
def san_resnet34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], meta_conv=True, **kwargs)


@register_model
def san_resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], meta_conv=True, **kwargs)


@register_model
def us_resnet18(**kwargs) -> ResNet:
    """Universally slimmable ResNet-18 (US-Net / MutualNet): any width in ``width_range``."""
    return ResNet(BasicBlock, [2, 2, 2, 2], slimmable=True, **kwargs)


@register_model
def us_resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], slimmable=True, **kwargs)


@register_model
def resizable_resnet18(**kwargs) -> ResNet:
    """Resizable ResNet-18: each stage's feature map resized by a factor from ``scale_factors``."""
    return ResNet(BasicBlock, [2, 2, 2, 2], resizable=True, **kwargs)


@register_model
def resizable_resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], resizable=True, **kwargs)
