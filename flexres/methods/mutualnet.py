"""MutualNet (Yang et al., ECCV 2020) and its width-only ancestor US-Net (Yu & Huang, ICCV 2019).

Sandwich rule + inplace distillation: each step trains the full width at the largest resolution
with cross-entropy to the labels, and the smallest width plus n-2 random widths, each at a random
training resolution (US-Net: always the one resolution), with KL to the full network's prediction
(teacher detached). Their gradients add up into one optimiser step (MutualNet Eq. 2-4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import AdaptiveModel
from ..operating_point import OperatingPoint
from .base import Method, StepOutput, register_method
from .rsnet import kl_divergence


@register_method
class MutualNet(Method):
    name = "mutualnet"

    def __init__(
        self,
        resolutions: list[int] | tuple[int, ...],
        width_range: tuple[float, float] | list[float] = (0.25, 1.0),
        num_subnets: int = 4,
        label_smoothing: float = 0.0,
        reduction: str = "sum",
    ) -> None:
        super().__init__(resolutions, label_smoothing, reduction)
        lo, hi = float(width_range[0]), float(width_range[1])
        if not 0 < lo < hi <= 1.0:
            raise ValueError(f"width_range must satisfy 0 < min < max <= 1, got {list(width_range)}")
        if num_subnets < 2:
            raise ValueError(
                "the sandwich rule needs at least the largest and the smallest sub-network (num_subnets >= 2)"
            )
        self.width_range = (lo, hi)
        self.num_subnets = int(num_subnets)

    def sample(self) -> list[OperatingPoint]:
        """[full width @ largest resolution, smallest width @ random res, n-2 random widths @ random res]."""
        lo, hi = self.width_range
        widths = [lo] + [
            lo + (hi - lo) * float(torch.rand((), generator=self.rng)) for _ in range(self.num_subnets - 2)
        ]
        picks = torch.randint(len(self.resolutions), (len(widths),), generator=self.rng).tolist()
        return [OperatingPoint(self.resolutions[0], hi)] + [
            OperatingPoint(self.resolutions[i], w) for i, w in zip(picks, widths)
        ]

    def forward(self, model: AdaptiveModel, inputs: tuple[Tensor, ...], labels: Tensor) -> StepOutput:
        points = self.sample()
        by_res = dict(zip(self.resolutions, inputs))
        model.set_operating_point(points[0])
        full = model(by_res[points[0].resolution])
        l_cls = self.cross_entropy(full, labels)
        l_kd = sum(self._student(model, op, by_res, full) for op in points[1:])
        return StepOutput(
            self.reduce(l_cls + l_kd, len(points)),
            {"cls": l_cls.detach(), "kd": l_kd.detach()},
            {points[0].resolution: full.detach()},
        )

    @staticmethod
    def _student(model: AdaptiveModel, op: OperatingPoint, by_res: dict[int, Tensor], teacher: Tensor) -> Tensor:
        model.set_operating_point(op)
        return kl_divergence(teacher, model(by_res[op.resolution]))


@register_method
class USNet(MutualNet):
    """US-Net: the sandwich rule over widths at one fixed resolution (the baseline MutualNet beats)."""

    name = "usnet"

    def __init__(
        self,
        resolutions: list[int] | tuple[int, ...],
        width_range: tuple[float, float] | list[float] = (0.25, 1.0),
        num_subnets: int = 4,
        label_smoothing: float = 0.0,
        reduction: str = "sum",
    ) -> None:
        super().__init__(resolutions, width_range, num_subnets, label_smoothing, reduction)
        if len(self.resolutions) != 1:
            raise ValueError(f"method 'usnet' trains at one resolution, got {list(self.resolutions)}")
