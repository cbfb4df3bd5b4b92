"""Resizable networks (ICLR 2020 submission): fair sampling of per-stage scaling configurations (Alg. 1)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import AdaptiveModel
from ..operating_point import OperatingPoint
from .base import Method, StepOutput, register_method


def fair_configurations(
    factors: tuple[float, ...], num_stages: int, generator: torch.Generator
) -> list[tuple[float, ...]]:
    """|L| configurations in which, at every stage, each factor appears exactly once (a random permutation per
    stage)."""
    perms = [torch.randperm(len(factors), generator=generator).tolist() for _ in range(num_stages)]
    return [tuple(factors[perms[s][k]] for s in range(num_stages)) for k in range(len(factors))]


def random_configurations(
    factors: tuple[float, ...], num_stages: int, count: int, generator: torch.Generator
) -> list[tuple[float, ...]]:
    """``count`` configurations with every stage's factor drawn independently (the baseline fair sampling beats)."""
    picks = torch.randint(len(factors), (count, num_stages), generator=generator).tolist()
    return [tuple(factors[i] for i in row) for row in picks]


@register_method
class Resizable(Method):
    """Each step trains |L| scaling configurations at the one training resolution (cross-entropy each),
    their gradients summed into one optimiser step.

    sampling: "fair" (Alg. 1: every factor once per stage per step), "random" (iid factors), or
    "fixed" (only ``target_scales``: fine-tuning a Resizable-NAS pick).
    configs_per_step: configurations a random step trains (default |L|, the equal-compute control). The
    paper's own random baseline (App. D.3) is ``sampling="random", configs_per_step=1`` trained for |L| times
    the epochs: the same number of configuration passes as fair sampling, one per optimiser step.
    Resizable-Aug: ``target_scales`` plus ``finetune_from=2/3``: fair sampling for the first 2/3 of
    training, then only the target configuration (default all 1.0, the plain network).
    """

    name = "resizable"

    def __init__(
        self,
        resolutions: list[int] | tuple[int, ...],
        sampling: str = "fair",
        target_scales: list[float] | None = None,
        finetune_from: float | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "sum",
        configs_per_step: int | None = None,
    ) -> None:
        super().__init__(resolutions, label_smoothing, reduction)
        if len(self.resolutions) != 1:
            raise ValueError(f"method 'resizable' trains at one input resolution, got {list(self.resolutions)}")
        if sampling not in ("fair", "random", "fixed"):
            raise ValueError(f"sampling must be 'fair', 'random' or 'fixed', got {sampling!r}")
        if finetune_from is not None and not 0.0 <= finetune_from <= 1.0:
            raise ValueError(f"finetune_from is a fraction of training in [0, 1], got {finetune_from}")
        if configs_per_step is not None and (sampling != "random" or configs_per_step < 1):
            raise ValueError(
                f"configs_per_step (a positive int) applies to sampling 'random' only; got {configs_per_step} "
                f"with sampling {sampling!r}"
            )
        self.sampling = sampling
        self.configs_per_step = configs_per_step
        self.target_scales = tuple(float(f) for f in target_scales) if target_scales is not None else None
        self.finetune_from = finetune_from

    def sample(self, model: AdaptiveModel) -> list[tuple[float, ...]]:
        if model.scale_factors is None:
            raise ValueError(
                f"method 'resizable' needs a resizable model (e.g. resizable_resnet18), got {model.arch['name']}"
            )
        target = self.target_scales or (1.0,) * model.num_stages
        if self.sampling == "fixed" or (self.finetune_from is not None and self.progress >= self.finetune_from):
            return [target]
        factors = model.scale_factors
        if self.sampling == "fair":
            return fair_configurations(factors, model.num_stages, self.rng)
        return random_configurations(factors, model.num_stages, self.configs_per_step or len(factors), self.rng)

    def forward(self, model: AdaptiveModel, inputs: tuple[Tensor, ...], labels: Tensor) -> StepOutput:
        (x,) = inputs
        losses, first = [], None
        for scales in self.sample(model):
            model.set_operating_point(OperatingPoint(self.resolutions[0], scales=scales))
            logits = model(x)
            first = logits if first is None else first
            losses.append(self.cross_entropy(logits, labels))
        total = sum(losses)  # logged before the reduction, as every method logs its loss terms
        return StepOutput(
            self.reduce(total, len(losses)), {"cls": total.detach()}, {self.resolutions[0]: first.detach()}
        )
