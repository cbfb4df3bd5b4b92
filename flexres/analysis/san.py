"""SAN App. B: how strongly each generated conv weight depends on the scale encoding."""

from __future__ import annotations

from ..models.base import AdaptiveModel
from ..nn.meta_conv import MetaConv2d


def meta_weight_ratios(model: AdaptiveModel) -> dict[str, float]:
    """mean|A| / mean|B| per MetaConv2d layer (W(eps) = A*eps + B); the paper reports ~0.5 on ImageNet."""
    return {
        name: float(m.A.abs().mean() / m.B.abs().mean())
        for name, m in model.named_modules()
        if isinstance(m, MetaConv2d)
    }
