"""Latency measured on this machine: warm-up, then the median of repeated timed forwards."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ..models import AdaptiveModel
from ..models.static import to_static
from ..operating_point import OperatingPoint


def time_call(
    fn: Callable[[], object], warmup: int = 5, repeats: int = 30, sync: Callable[[], None] | None = None
) -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


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
