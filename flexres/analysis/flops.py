"""MACs and parameters per operating point, from PyTorch's own flop counter."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models import AdaptiveModel
from ..nn.adaptive import deployed_params
from ..operating_point import OperatingPoint


@torch.no_grad()
def count_macs(model: AdaptiveModel, op: OperatingPoint | int, aspect: float = 1.0) -> int:
    """Multiply-accumulates of one forward pass of one image (convolutions and linear layers).

    The papers' "FLOPs" are MACs; PyTorch counts a multiply-add as 2 FLOPs, hence the halving. ``aspect`` (width /
    height, >= 1) counts a non-square input whose short side is the resolution (segmentation: CamVid is 4/3).
    """
    op = OperatingPoint.coerce(op)
    device = next(model.parameters()).device
    size = (op.resolution, int(round(op.resolution * aspect)))
    with model.measuring_cost(), model.at(op, bn_policy="nearest"), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, *size, device=device))
    return counter.get_total_flops() // 2


def count_params(model: AdaptiveModel, op: OperatingPoint | int | None = None) -> int:
    """Parameters of the network deployed at one operating point (default: the active one):
    one BN set, not all of them, and for slimmable models only the channels that width uses."""
    if op is not None:
        with model.at(op, bn_policy="nearest"):
            return count_params(model)
    return deployed_params(model)
