"""LQ-Nets' pre-activation ResNet-18/34/50 (the network of LQ-Nets' and RS-Nets' Table 3 2/2 results), with a private
BN per trained resolution.

The layout of LQ-Nets' ``preresnet_group`` (microsoft/LQ-Nets, resnet_model.py), for w-bit weights and a-bit
activations, the stem conv and the classifier in full precision:

- a block: [BN-ReLU-quantize] conv1 BN-ReLU-quantize conv2 BN, plus its shortcut (a 1x1 conv and BN when the shape
  changes). The bracket depends on where the block sits: every block but a stage's first applies BN-ReLU-quantize to
  the residual stream (the identity shortcut branches off before it); the first block of the first stage only
  quantizes (the stem already ended in BN-ReLU); the first block of a later stage takes the previous stage's output
  as it is (already BN-ReLU-quantized).
- a stage ends with an extra BN-ReLU, and (except the last stage) the quantizer its successor reads.

Activation quantizers are layers of their own (one basis for all resolutions, or one per resolution, as the BNs),
so a quantized activation that feeds two convolutions (a stage's output, into the next block's conv1 and its shortcut)
is quantized once, as in LQ-Nets; the convolutions quantize their weights only.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ..nn.quantize import FULL_PRECISION, LQQuantizer
from .base import AdaptiveModel, ConvFactory, NormFactory, make_divisible, quantized_conv_factory
from .registry import register_model
from .resnet import ResNet

ActivationQuantizer = Callable[[], nn.Module]
PREACT = ("bnrelu", "quantize", "none")  # what a block does to its input before conv1 (see the module docstring)


def shortcut(cin: int, cout: int, stride: int, norm: NormFactory, conv: ConvFactory) -> nn.Module | None:
    """LQ-Nets' type-B shortcut: a 1x1 conv and BN when the shape changes, else the identity (None)."""
    return nn.Sequential(conv(cin, cout, 1, stride, 0), norm(cout)) if stride != 1 or cin != cout else None


class PreActBlockInput(nn.Module):
    """What a block does to the residual stream before its first conv: BN-ReLU-quantize, quantize only, or nothing."""

    def __init__(self, cin: int, preact: str, norm: NormFactory, quantize: ActivationQuantizer) -> None:
        super().__init__()
        if preact not in PREACT:
            raise ValueError(f"preact must be one of {', '.join(PREACT)}, got {preact!r}")
        self.bn = norm(cin) if preact == "bnrelu" else None
        self.relu = nn.ReLU() if preact == "bnrelu" else None
        self.quantize = quantize() if preact != "none" else None

    def forward(self, x: Tensor) -> Tensor:
        if self.bn is not None:
            x = self.relu(self.bn(x))
        return self.quantize(x) if self.quantize is not None else x


class PreActBasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        cin: int,
        planes: int,
        stride: int,
        preact: str,
        norm: NormFactory,
        conv: ConvFactory,
        quantize: ActivationQuantizer,
    ) -> None:
        super().__init__()
        self.preact = PreActBlockInput(cin, preact, norm, quantize)
        self.conv1 = conv(cin, planes, 3, stride, 1)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU()
        self.quant2 = quantize()
        self.conv2 = conv(planes, planes, 3, 1, 1)
        self.bn2 = norm(planes)
        self.shortcut = shortcut(cin, planes, stride, norm, conv)

    def forward(self, x: Tensor) -> Tensor:
        # the shortcut reads the stream before the pre-activation, except after "quantize"-only, where LQ-Nets' basic
        # block also branches before it
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.quant2(self.relu(self.bn1(self.conv1(self.preact(x)))))
        return self.bn2(self.conv2(out)) + identity


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        cin: int,
        planes: int,
        stride: int,
        preact: str,
        norm: NormFactory,
        conv: ConvFactory,
        quantize: ActivationQuantizer,
    ) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.preact = PreActBlockInput(cin, preact, norm, quantize)
        self.conv1 = conv(cin, planes, 1, 1, 0)
        self.bn1 = norm(planes)
        self.quant2 = quantize()
        self.conv2 = conv(planes, planes, 3, stride, 1)  # stride on the 3x3 (fb.resnet.torch, as LQ-Nets)
        self.bn2 = norm(planes)
        self.quant3 = quantize()
        self.conv3 = conv(planes, cout, 1, 1, 0)
        self.bn3 = norm(cout)
        self.relu = nn.ReLU()
        self.shortcut = shortcut(cin, cout, stride, norm, conv)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.quant2(self.relu(self.bn1(self.conv1(self.preact(x)))))
        out = self.quant3(self.relu(self.bn2(self.conv2(out))))
        return self.bn3(self.conv3(out)) + identity


class StageEnd(nn.Module):
    """The extra BN-ReLU that ends every stage, then the quantizer the next stage reads (none after the last)."""

    def __init__(self, channels: int, norm: NormFactory, quantize: ActivationQuantizer | None) -> None:
        super().__init__()
        self.bn = norm(channels)
        self.relu = nn.ReLU()
        self.quantize = quantize() if quantize is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.quantize(self.relu(self.bn(x)))


class PreActResNet(AdaptiveModel):
    def __init__(
        self,
        block: type[PreActBasicBlock] | type[PreActBottleneck],
        layers: list[int],
        num_classes: int = 1000,
        train_resolutions: list[int] | tuple[int, ...] = (224,),
        width_mult: float = 1.0,
        w_bits: int = 2,
        a_bits: int = 2,
        activation_bases: str = "shared",
        norm_layer: NormFactory | None = None,
        conv_layer: ConvFactory | None = None,
    ) -> None:
        super().__init__(train_resolutions)
        if activation_bases not in ("shared", "private"):
            raise ValueError(f"activation_bases must be 'shared' or 'private', got {activation_bases!r}")
        norm, plain_conv = self.layer_factories(norm_layer=norm_layer, conv_layer=conv_layer)
        conv = conv_layer or quantized_conv_factory(w_bits, FULL_PRECISION, 1)  # weights only: activations below
        bases = len(self.train_resolutions) if activation_bases == "private" else 1

        def quantize() -> nn.Module:
            return LQQuantizer(a_bits, signed=False, num_bases=bases)

        widths = [make_divisible(c * width_mult, 8) for c in (64, 128, 256, 512)]
        self.conv1 = plain_conv(3, widths[0], 7, 2, 3)  # full precision, as LQ-Nets
        self.bn1 = norm(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, (planes, n) in enumerate(zip(widths, layers)):
            blocks: list[nn.Module] = []
            for j in range(n):
                preact = "bnrelu" if j > 0 else ("quantize" if i == 0 else "none")
                blocks.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1, preact, norm, conv, quantize))
                cin = planes * block.expansion
            blocks.append(StageEnd(cin, norm, quantize if i < len(layers) - 1 else None))
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = cin
        self.fc = nn.Linear(cin, num_classes)  # full precision
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    stem = ResNet.stem  # the same stem (conv1, bn1, relu, maxpool) and head (avgpool, fc) as the post-activation family
    forward_head = ResNet.forward_head

    def feature_blocks(self) -> list[tuple[int | None, Callable[[Tensor], Tensor]]]:
        blocks: list[tuple[int | None, Callable[[Tensor], Tensor]]] = [(None, self.stem)]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            blocks += [(None, blk) for blk in layer]
        return blocks


@register_model
def preact_resnet18(**kwargs) -> PreActResNet:
    """LQ-Nets' pre-activation ResNet-18 (2/2 by default: ``w_bits``, ``a_bits``)."""
    return PreActResNet(PreActBasicBlock, [2, 2, 2, 2], **kwargs)


@register_model
def preact_resnet34(**kwargs) -> PreActResNet:
    return PreActResNet(PreActBasicBlock, [3, 4, 6, 3], **kwargs)


@register_model
def preact_resnet50(**kwargs) -> PreActResNet:
    return PreActResNet(PreActBottleneck, [3, 4, 6, 3], **kwargs)
