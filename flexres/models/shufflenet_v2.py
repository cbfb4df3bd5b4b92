"""ShuffleNetV2 (Ma et al. 2018), torchvision layer names (``stage2.0.branch2.3``); plain or resizable."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from ..nn.stage_resize import StageResize
from ..nn.switchable_bn import SwitchableBatchNorm2d
from .base import AdaptiveModel, make_divisible, resize_plan, scale_aware_norm
from .registry import register_model

# torchvision's stage widths for the four published multipliers; others are scaled from x1.0.
_PRESETS = {
    0.5: [24, 48, 96, 192, 1024],
    1.0: [24, 116, 232, 464, 1024],
    1.5: [24, 176, 352, 704, 1024],
    2.0: [24, 244, 488, 976, 2048],
}
_REPEATS = [4, 8, 4]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """torchvision's ShuffleNetV2 InvertedResidual: split (stride 1) or two branches (stride 2), concat, shuffle."""

    def __init__(self, cin: int, cout: int, stride: int, norm) -> None:
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                norm(cin),
                nn.Conv2d(cin, branch, 1, bias=False),
                norm(branch),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(cin if stride > 1 else branch, branch, 1, bias=False),
            norm(branch),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False),
            norm(branch),
            nn.Conv2d(branch, branch, 1, bias=False),
            norm(branch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(AdaptiveModel):
    def __init__(
        self,
        num_classes: int = 1000,
        train_resolutions: list[int] | tuple[int, ...] = (224,),
        width_mult: float = 1.0,
        resizable: bool = False,
        scale_factors: tuple[float, ...] = (0.45, 0.65, 0.85, 1.0),
    ) -> None:
        super().__init__(train_resolutions, None, None, scale_factors if resizable else None)
        widths = _PRESETS.get(width_mult) or [24] + [make_divisible(c * width_mult, 8) for c in (116, 232, 464)] + [
            1024
        ]
        strides = [4] + [s for n in _REPEATS for s in [2] + [1] * (n - 1)] + [1]  # stem (conv + max-pool), units, conv5
        self.resize_at, bn_stage, stage_strides = resize_plan(strides)
        if resizable:
            norms = [scale_aware_norm(self.scale_factors, st, self.train_resolutions) for st in bn_stage]
            self.stage_resizers = nn.ModuleList(StageResize(st, i) for i, st in enumerate(stage_strides))
        else:
            norms = [partial(SwitchableBatchNorm2d, resolutions=self.train_resolutions)] * len(strides)
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), norms[0](widths[0]), nn.ReLU(inplace=True)
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, b = widths[0], 1
        for i, (n, cout) in enumerate(zip(_REPEATS, widths[1:4])):
            units = []
            for j in range(n):
                units.append(ShuffleUnit(cin, cout, 2 if j == 0 else 1, norms[b]))
                cin, b = cout, b + 1
            setattr(self, f"stage{i + 2}", nn.Sequential(*units))
        self.conv5 = nn.Sequential(
            nn.Conv2d(cin, widths[-1], 1, bias=False), norms[b](widths[-1]), nn.ReLU(inplace=True)
        )
        self.num_features = widths[-1]
        self.fc = nn.Linear(widths[-1], num_classes)

    def stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.conv1(x))

    def feature_blocks(self) -> list[tuple[int | None, Callable[[Tensor], Tensor]]]:
        units = (*self.stage2, *self.stage3, *self.stage4, self.conv5)
        return [(None, self.stem)] + [(self.resize_at.get(b), unit) for b, unit in enumerate(units, start=1)]

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(x.mean((2, 3)))


@register_model
def shufflenet_v2(**kwargs) -> ShuffleNetV2:
    return ShuffleNetV2(**kwargs)


@register_model
def resizable_shufflenet_v2(**kwargs) -> ShuffleNetV2:
    """Resizable ShuffleNetV2: stages 2-4 resized by a factor at their first non-strided unit."""
    return ShuffleNetV2(resizable=True, **kwargs)
