"""SAN (Li et al., ECCV 2020): cross-entropy at every training resolution + scale distillation (Alg. 1, Eq. 4)."""

from __future__ import annotations

from torch import Tensor

from ..models.base import AdaptiveModel
from .base import Method, StepOutput, register_method
from .rsnet import kl_divergence


def scale_distillation(logits: list[Tensor]) -> Tensor:
    """sum over i < j of KL(p_i || p_j): every larger resolution (index i, largest first) teaches every
    smaller one; teachers are detached, so no gradient flows from a small resolution into a large one."""
    return sum(kl_divergence(logits[i], logits[j]) for i in range(len(logits)) for j in range(i + 1, len(logits)))


@register_method
class SAN(Method):
    """Un-weighted sum of the cross-entropies and the scale-distillation losses (SAN Eq. 4).

    Use with a SAN model (``san_resnet18`` ...): switching the operating point regenerates its
    convolution weights from the scale encoding eps(S_i), and selects BN^(S_i).
    """

    name = "san"

    def __init__(
        self, resolutions: list[int] | tuple[int, ...], label_smoothing: float = 0.0, reduction: str = "sum"
    ) -> None:
        super().__init__(resolutions, label_smoothing, reduction)
        if len(self.resolutions) < 2:
            raise ValueError("method 'san' needs at least two resolutions")

    def forward(self, model: AdaptiveModel, inputs: tuple[Tensor, ...], labels: Tensor) -> StepOutput:
        logits = self.run_all(model, inputs)
        l_cls = sum(self.cross_entropy(z, labels) for z in logits)
        l_sd = scale_distillation(logits)
        return StepOutput(
            self.reduce(l_cls + l_sd),
            {"cls": l_cls.detach(), "sd": l_sd.detach()},
            {r: z.detach() for r, z in zip(self.resolutions, logits)},
        )
