"""Every scaling configuration of a Resizable network on one batch, as a prefix tree.

Configurations that agree on the factors of their first k stages compute the same features up to stage
k, so each distinct prefix runs once: a stem pass, then per stage one pass per (prefix, factor). The
branches of one stage and factor all enter that stage at the same size (StageResize depends only on the
resolution and the factor), so they run as one batch. For all 4^4 configurations of L = (0.45, 0.65,
0.85, 1.0) that is 4 + 16 + 64 + 256 stage passes instead of 256 full networks.

Exact under the trained and interpolated BN policies, where a stage's BNs depend only on that stage's
factor. Statistics calibrated per configuration (``bn_policy="calibrate"``) depend on the whole prefix,
so that policy is refused here; evaluate such configurations one by one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..operating_point import OperatingPoint
from .base import AdaptiveModel

Config = tuple[float, ...]


def stage_segments(model: AdaptiveModel) -> list[list[Callable[[Tensor], Tensor]]]:
    """The feature blocks cut at the resizes: [stem blocks, stage 0 blocks, ..., stage S-1 blocks]."""
    segments: list[list[Callable[[Tensor], Tensor]]] = [[]]
    for stage, block in model.feature_blocks():
        if stage is not None:
            if stage != len(segments) - 1:
                raise ValueError(f"{type(model).__name__}: stage {stage} resizes out of order")
            segments.append([])
        segments[-1].append(block)
    return segments


def _run(blocks: list[Callable[[Tensor], Tensor]], x: Tensor) -> Tensor:
    for block in blocks:
        x = block(x)
    return x


@torch.no_grad()
def forward_configurations(
    model: AdaptiveModel,
    x: Tensor,
    resolution: int,
    configs: Sequence[Config],
    bn_policy: str = "interpolate",
    features: bool = False,
) -> dict[Config, Tensor]:
    """Logits (or, with ``features``, last-stage features) of every configuration in ``configs`` for the batch
    ``x`` (already at ``resolution``). Leaves the model at the operating point it had."""
    if model.scale_factors is None or model.stage_resizers is None:
        raise ValueError(f"{type(model).__name__} has no per-stage scales: nothing to evaluate as a tree")
    if model.training:
        raise ValueError(
            "prefix-tree evaluation needs eval mode (model.eval()): in training mode BN would normalise the "
            "batched branches together"
        )
    if bn_policy == "calibrate":
        raise ValueError(
            "prefix-tree evaluation serves trained or interpolated BNs; statistics calibrated per configuration "
            "depend on the whole prefix: evaluate those configurations one by one"
        )
    configs = [tuple(float(f) for f in c) for c in configs]
    segments = stage_segments(model)
    stages = len(segments) - 1
    bad = [c for c in configs if len(c) != stages]
    if bad:
        raise ValueError(f"configuration {bad[0]} gives {len(bad[0])} factors; this model has {stages} stages")
    previous = (model.operating_point, model.bn_policy, model.scale_policy)
    n = x.shape[0]
    try:
        model.set_operating_point(OperatingPoint(resolution, scales=configs[0]), bn_policy)
        level: dict[Config, Tensor] = {(): _run(segments[0], x)}  # the stem: no factor involved yet
        for k in range(stages):
            by_factor: dict[float, list[Config]] = defaultdict(list)
            for prefix in sorted({c[: k + 1] for c in configs}):
                by_factor[prefix[k]].append(prefix)
            nxt: dict[Config, Tensor] = {}
            for prefixes in by_factor.values():
                # Any configuration with this prefix sets stage k's BNs and resize; later stages do not run here.
                representative = next(c for c in configs if c[: k + 1] == prefixes[0])
                model.set_operating_point(OperatingPoint(resolution, scales=representative), bn_policy)
                resize = model.stage_resizers[k]
                out = _run(segments[k + 1], torch.cat([resize(level[p[:k]]) for p in prefixes]))
                nxt.update(zip(prefixes, out.split(n)))
            level = nxt
        if features:
            return {c: level[c] for c in configs}
        return {c: model.forward_head(level[c]) for c in configs}
    finally:
        model.set_operating_point(*previous)
