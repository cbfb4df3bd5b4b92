"""A training recipe: given the model and a batch, run the operating points of this step, return named losses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.base import AdaptiveModel


@dataclass
class StepOutput:
    loss: Tensor  # what the engine back-propagates
    terms: dict[str, Tensor]  # named loss terms, for logging
    logits: dict[int, Tensor] = field(default_factory=dict)  # per resolution, for training accuracy


class Method(nn.Module):
    """Base class. ``resolutions`` are the inputs the data pipeline must produce, largest first.

    A method may own parameters (RS-Nets' ensemble scores alpha); the engine optimises them
    without weight decay and saves them in the checkpoint under ``method.``.
    """

    name: str = ""

    def __init__(
        self, resolutions: list[int] | tuple[int, ...], label_smoothing: float = 0.0, reduction: str = "sum"
    ) -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(
                f"reduction must be 'sum' (the papers' equations) or 'mean' (divided by the number of "
                f"resolutions or sub-networks in a step), got {reduction!r}"
            )
        # "sum" is the papers' loss; "mean" divides the network's loss by the number of forward passes it adds up
        # (resolutions, sampled sub-networks), so one step moves the shared weights as far as a single-network
        # step does at the same learning rate.
        self.reduction = reduction
        if not resolutions:
            raise ValueError(f"method {self.name!r} needs at least one resolution")
        self.resolutions: tuple[int, ...] = tuple(sorted({int(r) for r in resolutions}, reverse=True))
        self.label_smoothing = float(label_smoothing)
        # Draw any random operating point from this generator: the engine seeds it from (seed, step)
        # before every micro-batch, so every DDP rank samples the same sub-networks in a step.
        self.rng = torch.Generator()
        # Fraction of training done before this step (set by the engine): for schedules such as Resizable-Aug.
        self.progress = 0.0

    # Dense prediction (segmentation): the label this many pixels carry is scored by no loss (void). The engine sets
    # it from the dataset; None for classification.
    ignore_index: int | None = None

    def cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy, averaged over images (classification) or over the valid pixels (segmentation)."""
        return F.cross_entropy(
            logits,
            labels,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index if self.ignore_index is not None else -100,
        )

    def kl(self, teacher_logits: Tensor, student_logits: Tensor, labels: Tensor) -> Tensor:
        """KL(p_teacher || p_student), the teacher detached: the batch mean, or for dense logits the mean over the
        valid pixels of the per-pixel KL (summed over classes)."""
        if student_logits.dim() == 2:
            return F.kl_div(
                F.log_softmax(student_logits.float(), dim=1),
                F.log_softmax(teacher_logits.detach().float(), dim=1),
                reduction="batchmean",
                log_target=True,
            )
        log_t = F.log_softmax(teacher_logits.detach().float(), dim=1)
        per_pixel = (log_t.exp() * (log_t - F.log_softmax(student_logits.float(), dim=1))).sum(1)
        valid = (
            labels != self.ignore_index if self.ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
        )
        return (per_pixel * valid).sum() / valid.sum().clamp_min(1)

    @staticmethod
    def align(logits: list[Tensor], labels: Tensor) -> list[Tensor]:
        """Dense logits resized (bilinear) to the label map, which is at the largest training resolution: every
        resolution's loss and the ensemble are computed there (RS-Nets App. B, Fig. 7). Classification: unchanged."""
        if labels.dim() != 3:
            return logits
        size = labels.shape[-2:]
        return [
            z if z.shape[-2:] == size else F.interpolate(z, size=size, mode="bilinear", align_corners=False)
            for z in logits
        ]

    def reduce(self, loss: Tensor, terms: int | None = None) -> Tensor:
        """``loss`` summed over ``terms`` forward passes (default: one per resolution), reduced as configured."""
        return loss / (terms or len(self.resolutions)) if self.reduction == "mean" else loss

    def run_all(self, model: AdaptiveModel, inputs: tuple[Tensor, ...]) -> list[Tensor]:
        """Logits at every training resolution; ``inputs[i]`` is the batch at ``resolutions[i]``."""
        logits = []
        for r, x in zip(self.resolutions, inputs, strict=True):
            model.set_operating_point(r)
            logits.append(model(x))
        return logits

    def forward(self, model: AdaptiveModel, inputs: tuple[Tensor, ...], labels: Tensor) -> StepOutput:
        raise NotImplementedError

    def log_values(self) -> dict[str, Any]:
        """Extra scalars to log each epoch (e.g. alpha)."""
        return {}


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_METHODS)


def create_method(name: str, **kwargs: Any) -> Method:
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    try:
        return _METHODS[name](**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad options for method {name!r} (method.kwargs): {e}") from e
