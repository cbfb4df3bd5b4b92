"""MACs and parameters per operating point, from PyTorch's own flop counter."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models import AdaptiveModel
from ..nn.switchable_bn import SwitchableBatchNorm2d
from ..operating_point import OperatingPoint


@torch.no_grad()
def count_macs(model: AdaptiveModel, op: OperatingPoint | int) -> int:
    """Multiply-accumulates of one forward pass of one image (convolutions and linear layers).

    The papers' "FLOPs" are MACs; PyTorch counts a multiply-add as 2 FLOPs, hence the halving.
    """
    op = OperatingPoint.coerce(op)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with model.at(op, bn_policy="nearest"), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, op.resolution, op.resolution, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_params(model: AdaptiveModel) -> int:
    """Parameters of the network deployed at one operating point: one BN set, not all of them."""
    bns = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    in_bns = {id(p) for m in bns for p in m.parameters()}
    shared = sum(p.numel() for p in model.parameters() if id(p) not in in_bns)
    return shared + sum(sum(p.numel() for p in m.bns[0].parameters()) for m in bns)
