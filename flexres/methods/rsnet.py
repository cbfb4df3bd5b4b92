"""RS-Nets (Wang et al., ECCV 2020): individual, parallel (Eq. 2) and MRED (Eq. 5-10) training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import AdaptiveModel
from .base import Method, StepOutput, register_method


def kl_divergence(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(p_teacher || p_student), batch mean; the teacher is detached (no gradient flows to it)."""
    return F.kl_div(
        F.log_softmax(student_logits.float(), dim=1),
        F.log_softmax(teacher_logits.detach().float(), dim=1),
        reduction="batchmean",
        log_target=True,
    )


@register_method
class Individual(Method):
    """The I-Net baseline: one network trained at one resolution."""

    name = "individual"

    def __init__(self, resolutions: list[int] | tuple[int, ...], label_smoothing: float = 0.0) -> None:
        super().__init__(resolutions, label_smoothing)
        if len(self.resolutions) != 1:
            raise ValueError(f"method 'individual' trains at exactly one resolution, got {list(self.resolutions)}")

    def forward(self, model: AdaptiveModel, inputs: tuple[Tensor, ...], labels: Tensor) -> StepOutput:
        (logits,) = self.align(self.run_all(model, inputs), labels)
        loss = self.cross_entropy(logits, labels)
        return StepOutput(loss, {"cls": loss.detach()}, {self.resolutions[0]: logits.detach()})


@register_method
class Parallel(Method):
    """Parallel training: the sum of the cross-entropies at every resolution (RS-Nets Eq. 2)."""

    name = "parallel"

    def __init__(
        self, resolutions: list[int] | tuple[int, ...], label_smoothing: float = 0.0, reduction: str = "sum"
    ) -> None:
        super().__init__(resolutions, label_smoothing, reduction)

    def forward(self, model: AdaptiveModel, inputs: tuple[Tensor, ...], labels: Tensor) -> StepOutput:
        logits = self.align(self.run_all(model, inputs), labels)
        loss = sum(self.cross_entropy(z, labels) for z in logits)
        return StepOutput(
            self.reduce(loss), {"cls": loss.detach()}, {r: z.detach() for r, z in zip(self.resolutions, logits)}
        )


@register_method
class RSNet(Method):
    """Parallel training + multi-resolution ensemble distillation (MRED).

    L = L_cls + L_ens + L_dis (Eq. 9). alpha = softmax(scores) (Eq. 5) is learned by L_ens alone:
    the logits are detached for it, and the ensemble teacher is detached inside L_dis, so alpha
    receives no gradient from L_cls or L_dis and the network none from L_ens.
    mred="vanilla": L_dis = sum_s KL(p_0 || p_s) (Eq. 8).
    mred="full": L_dis = 2/(S+1) sum_{t=0}^{S-1} sum_{s=t+1}^{S} KL(p_t || p_s) (Eq. 10), index 0 the
    ensemble and 1..S the resolutions from largest to smallest.
    """

    name = "rsnet"

    def __init__(
        self,
        resolutions: list[int] | tuple[int, ...],
        mred: str = "full",
        label_smoothing: float = 0.0,
        reduction: str = "sum",
    ) -> None:
        super().__init__(resolutions, label_smoothing, reduction)
        if mred not in ("full", "vanilla"):
            raise ValueError(f"mred must be 'full' or 'vanilla', got {mred!r}")
        if len(self.resolutions) < 2:
            raise ValueError("method 'rsnet' needs at least two resolutions")
        self.mred = mred
        self.alpha_scores = nn.Parameter(torch.zeros(len(self.resolutions)))

    @property
    def alpha(self) -> Tensor:
        return torch.softmax(self.alpha_scores, dim=0)

    def mred_losses(self, logits: list[Tensor], labels: Tensor) -> dict[str, Tensor]:
        """L_cls, L_ens and L_dis from the per-resolution logits (largest resolution first)."""
        l_cls = sum(self.cross_entropy(z, labels) for z in logits)
        stacked = torch.stack([z.detach().float() for z in logits])  # S x N x C (x H x W for dense logits)
        z0 = torch.einsum("s,s...->...", self.alpha, stacked)
        l_ens = F.cross_entropy(z0, labels, ignore_index=self.ignore_index if self.ignore_index is not None else -100)
        if self.mred == "vanilla":
            l_dis = sum(self.kl(z0, z, labels) for z in logits)
        else:
            chain = [z0, *logits]
            S = len(logits)
            l_dis = (
                2.0 / (S + 1) * sum(self.kl(chain[t], chain[s], labels) for t in range(S) for s in range(t + 1, S + 1))
            )
        return {"cls": l_cls, "ens": l_ens, "dis": l_dis}

    def forward(self, model: AdaptiveModel, inputs: tuple[Tensor, ...], labels: Tensor) -> StepOutput:
        logits = self.align(self.run_all(model, inputs), labels)
        terms = self.mred_losses(logits, labels)
        # L_ens reaches only alpha, so the reduction (a step size for the shared weights) leaves it alone.
        loss = self.reduce(terms["cls"] + terms["dis"]) + terms["ens"]
        return StepOutput(
            loss, {k: v.detach() for k, v in terms.items()}, {r: z.detach() for r, z in zip(self.resolutions, logits)}
        )

    def log_values(self) -> dict[str, object]:
        return {"alpha": {str(r): round(float(a), 4) for r, a in zip(self.resolutions, self.alpha.detach().tolist())}}
