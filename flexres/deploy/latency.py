"""Latency of an operating point as deployed (plain layers, BN folded: what ``flexres export`` ships), or of the
adaptive model itself, measured on this machine."""

from __future__ import annotations

import torch

from ..analysis.latency import time_call
from ..models import AdaptiveModel
from ..operating_point import OperatingPoint
from .static import to_static


@torch.no_grad()
def measure_latency(
    model: AdaptiveModel,
    op: OperatingPoint | int,
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 30,
    bn_policy: str = "nearest",
    deployed: bool = True,
) -> float:
    """Median forward latency (ms) at ``op`` for a batch of ``batch_size`` images.

    deployed=True times what ``flexres export`` ships for that point (plain layers, BN folded); False
    times the adaptive model itself.
    """
    op = OperatingPoint.coerce(op)
    device = next(model.parameters()).device
    x = torch.randn(batch_size, 3, op.resolution, op.resolution, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    with model.measuring_cost(), model.at(op, bn_policy=bn_policy):
        net = to_static(model, op, bn_policy) if deployed else model
        return time_call(lambda: net(x), warmup, repeats, sync)
