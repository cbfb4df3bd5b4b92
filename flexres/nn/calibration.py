"""Re-estimate BN statistics at a resolution that was not trained (SAN ideal / post-statistics BN)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..operating_point import OperatingPoint


class CalibratableModel(Protocol):
    """What calibration needs of a model (``flexres.AdaptiveModel`` has it): its BNs and its operating point."""

    operating_point: OperatingPoint
    bn_policy: str
    scale_policy: str
    training: bool

    def calibratable_bns(self) -> list[nn.Module]: ...
    def resolve(self, op: OperatingPoint) -> OperatingPoint: ...
    def set_operating_point(
        self, op: OperatingPoint, bn_policy: str | None = None, scale_policy: str | None = None
    ) -> Any: ...
    def eval(self) -> Any: ...
    def train(self, mode: bool = True) -> Any: ...
    def __call__(self, x: Tensor) -> Tensor: ...


@torch.no_grad()
def calibrate_bn(
    model: CalibratableModel,
    batches: Iterable[Tensor],
    op: OperatingPoint | int,
    num_images: int,
    across_ranks: bool = False,
) -> int:
    """Estimate every BN's statistics at the operating point ``op`` (a resolution, or for slimmable
    models a resolution and width) from ``num_images`` images.

    ``batches`` yields input tensors already at ``op``'s resolution. Statistics are the exact mean and
    unbiased variance over all pixels of all images seen (not a momentum average), each BN
    normalising with its batch statistics while they are gathered, with the affine parameters of
    the nearest trained BN. All other weights stay frozen. The result is cached on each BN under
    the operating point and served by ``bn_policy="calibrate"``. Returns the number of images used.
    With ``across_ranks`` (under torchrun, every rank calling it with its own shard of images) the
    statistics cover the images of all ranks. A Resizable network's scale-aware BNs store their statistics
    per configuration prefix (``SwitchableBatchNorm2d.calibration_key``): calibrating one configuration
    re-estimates the BNs it runs through, under its own keys, and serves it alone under ``bn_policy="calibrate"``.
    """
    op = model.resolve(OperatingPoint.coerce(op))
    bns = model.calibratable_bns()
    was_training = model.training
    model.eval()
    previous = (model.operating_point, model.bn_policy, model.scale_policy)
    seen = 0
    try:
        # Sets the input size and, for SAN models, the weights generated at eps(resolution) (SAN Alg. 2).
        model.set_operating_point(op, bn_policy="nearest", scale_policy="exact")
        for bn in bns:
            bn.begin_calibration(bn.calibration_key(op), across_ranks)
        for x in batches:
            if seen >= num_images:
                break
            x = x[: num_images - seen]
            model(x)
            seen += x.shape[0]
        if seen == 0:
            raise ValueError(f"BN calibration at {op} got no images")
        for bn in bns:
            bn.end_calibration()
    except BaseException:
        for bn in bns:
            bn.abort_calibration()
        raise
    finally:
        model.set_operating_point(*previous)
        model.train(was_training)
    return seen
