"""Resolution-switchable semantic segmentation: a registry ResNet backbone with its switchable BNs and a light
FPN-style decoder whose BNs are switchable too (RS-Nets App. B uses RefineNet on ResNet-101; on 2 CPU cores a
ResNet-18 with a top-down path of 1x1 laterals and one 3x3 fusion conv is the equivalent that trains in minutes).

The input's resolution is its short side (``OperatingPoint.resolution``); any aspect runs (fully convolutional).
The logits come out at 1/4 of the input: methods resize them to the label size before the losses (RS-Nets Fig. 7),
evaluation and prediction resize them to the image's own size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdaptiveModel, make_divisible
from .registry import register_model
from .resnet import BasicBlock, Bottleneck, ResNet


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), norm(cout), nn.ReLU(inplace=True)
        )


class SegmentationNet(AdaptiveModel):
    task = "segmentation"

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 11,
        train_resolutions: list[int] | tuple[int, ...] = (360,),
        width_mult: float = 1.0,
        decoder_channels: int = 128,
    ) -> None:
        super().__init__(train_resolutions)
        backbone = ResNet(block, layers, num_classes=1, train_resolutions=self.train_resolutions, width_mult=width_mult)
        self.stem_conv, self.stem_bn, self.stem_pool = backbone.conv1, backbone.bn1, backbone.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            backbone.layer1,
            backbone.layer2,
            backbone.layer3,
            backbone.layer4,
        )
        norm, _ = self.layer_factories()
        d = make_divisible(decoder_channels * width_mult, 8)
        widths = [make_divisible(c * width_mult, 8) * block.expansion for c in (64, 128, 256, 512)]
        self.laterals = nn.ModuleList(ConvBNReLU(c, d, 1, norm) for c in widths)
        self.fuse = ConvBNReLU(d, d, 3, norm)
        self.classifier = nn.Conv2d(d, num_classes, 1)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The backbone's four stage outputs (strides 4, 8, 16, 32)."""
        x = self.stem_pool(F.relu(self.stem_bn(self.stem_conv(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats

    def forward_head(self, feats: list[Tensor]) -> Tensor:
        """Top-down: each lateral plus the coarser map upsampled to it; logits at stride 4."""
        y = self.laterals[3](feats[3])
        for i in (2, 1, 0):
            y = self.laterals[i](feats[i]) + F.interpolate(
                y, size=feats[i].shape[-2:], mode="bilinear", align_corners=False
            )
        return self.classifier(self.fuse(y))

    def forward(self, x: Tensor) -> Tensor:
        r = self.operating_point.resolution
        if x.dim() != 4 or min(x.shape[-2:]) != r:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not match the operating point {self.operating_point} "
                f"(a segmentation model's resolution is the short side: expected N x C x H x W with min(H, W) = {r}); "
                f"call model.set_operating_point({min(x.shape[-2:])}) first"
            )
        return self.forward_head(self.forward_features(x))


@register_model
def seg_resnet18(**kwargs) -> SegmentationNet:
    """ResNet-18 backbone + light FPN decoder, switchable BNs throughout."""
    return SegmentationNet(BasicBlock, [2, 2, 2, 2], **kwargs)


@register_model
def seg_resnet50(**kwargs) -> SegmentationNet:
    """ResNet-50 backbone + light FPN decoder (for GPUs; RS-Nets App. B uses ResNet-101 with RefineNet)."""
    return SegmentationNet(Bottleneck, [3, 4, 6, 3], **kwargs)
