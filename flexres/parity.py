"""Does a converted model compute what its source computes? One criterion for export, packing and materialise.

An absolute tolerance does not fit every model: float32 round-off grows with the logits (BN folding, another runtime's
kernels), so the difference is judged relative to the logit scale. A quantized model adds a discrete effect: an
activation a hair from a level threshold may land on the other level after round-off, moving the logits far more than
round-off alone; that is accepted (up to a bound no wrong conversion stays under) when every image keeps its top-1
class.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .errors import ParityError

RELATIVE_TOLERANCE = 1e-4  # round-off: float32 differences are ~1e-6 of the logit scale, a wrong weight ~1e-1
QUANTIZED_RELATIVE_TOLERANCE = (
    1e-2  # a few activations across a level threshold; a full-precision or wrong-basis copy moves more
)


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    relative_diff: float  # max_abs_diff / max(1, max |expected|)
    top1_disagreements: int
    images: int


def measure_parity(got: Tensor, expected: Tensor) -> Parity:
    """How far logits ``got`` (N x C, or N x C x ... for dense outputs) are from ``expected``."""
    got, expected = got.detach().float().cpu(), expected.detach().float().cpu()
    diff = float((got - expected).abs().max())
    scale = max(1.0, float(expected.abs().max()))  # logits near 0: the absolute difference, not a ratio of tiny numbers
    flips = int((got.argmax(1) != expected.argmax(1)).sum())  # dim 1: the classes (also for segmentation logits)
    return Parity(diff, diff / scale, flips, int(expected.shape[0]))


def parity_holds(p: Parity, quantized: bool = False) -> bool:
    if p.relative_diff < RELATIVE_TOLERANCE:
        return True
    return quantized and p.top1_disagreements == 0 and p.relative_diff < QUANTIZED_RELATIVE_TOLERANCE


def check_parity(got: Tensor, expected: Tensor, what: str, quantized: bool = False, consequence: str = "") -> Parity:
    """The parity of ``got`` against ``expected``; a ParityError (one sentence naming ``what`` was compared) when it
    does not hold. ``consequence`` ends the sentence (e.g. "nothing was written")."""
    p = measure_parity(got, expected)
    if parity_holds(p, quantized):
        return p
    top1 = f", top-1 differs on {p.top1_disagreements} of {p.images} inputs" if quantized else ""
    tol = QUANTIZED_RELATIVE_TOLERANCE if quantized and p.top1_disagreements == 0 else RELATIVE_TOLERANCE
    end = f"; {consequence}" if consequence else ""
    raise ParityError(
        f"{what}: max |diff| {p.max_abs_diff:.2e} is {p.relative_diff:.2e} of the logit scale "
        f"(tolerance {tol:.0e}){top1}{end}"
    )
