"""The one interface every adaptive layer implements: how it applies an operating point, and which plain layer it is
at the point it applies. The model switches points, exports static sub-networks and counts deployed parameters by
looping over this interface, so a new kind of adaptive layer needs no change in the model, export or analysis code."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..operating_point import OperatingPoint


@dataclass(frozen=True)
class PointSetting:
    """What a layer may need to apply an operating point.

    op: the point, scales spelled out on a resizable network; scales: the per-stage factors (all 1.0 when the point
    names none); train_resolutions: the model's, largest first; bn_policy: how an untrained resolution is served;
    scale_eps: SAN's scale encoding for generated weights (None on other models)."""

    op: OperatingPoint
    scales: tuple[float, ...]
    train_resolutions: tuple[int, ...]
    bn_policy: str
    scale_eps: float | None = None


class AdaptiveLayer:
    """Mixin of every layer whose computation depends on the operating point (or, like a quantized convolution, that
    must become plain layers to be exported)."""

    def apply_point(self, setting: PointSetting) -> bool:
        """Switch to ``setting.op``. Returns True when the layer served it by a fall-back (a BN outside the trained
        range of resolutions), so the model can say so once."""
        return False

    def to_static(self) -> nn.Module:
        """The plain layer(s) this layer computes at the point it applies now."""
        raise NotImplementedError(f"{type(self).__name__} has no plain form of its own (its parent layer has one)")

    def deployed_params(self) -> int:
        """Parameters of the layer as deployed at its current point (what ``to_static`` would hold)."""
        return sum(p.numel() for p in self.to_static().parameters())

    def materialize_into(self, target: nn.Module) -> None:
        """Write what the layer computes at its current point into ``target``, the layer of the same name in a plain
        family member trained at that one point (one BN set, one basis, plain weights). By default the layer's own
        parameters and buffers, then its children (a quantized convolution: its weight, then its quantizers)."""
        _copy_own_state(self, target)
        for name, child in self.named_children():
            materialize_into(child, getattr(target, name))


def adaptive_layers(module: nn.Module) -> list[AdaptiveLayer]:
    return [m for m in module.modules() if isinstance(m, AdaptiveLayer)]


def deployed_params(module: nn.Module) -> int:
    """Parameters of ``module`` deployed at its current operating point: an adaptive layer counts as its plain form
    (one BN set, the active channels, one generated weight), every other layer as itself."""
    if isinstance(module, AdaptiveLayer):
        return module.deployed_params()
    return sum(p.numel() for p in module.parameters(recurse=False)) + sum(deployed_params(c) for c in module.children())


def _copy_own_state(module: nn.Module, target: nn.Module) -> None:
    for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        getattr(target, name).copy_(t)


def materialize_into(module: nn.Module, target: nn.Module) -> None:
    """Copy ``module`` at its current point into ``target`` (same layer names, one point): adaptive layers write what
    they compute (AdaptiveLayer.materialize_into), every other layer its own parameters and buffers."""
    if isinstance(module, AdaptiveLayer):
        module.materialize_into(target)
        return
    _copy_own_state(module, target)
    for name, child in module.named_children():
        materialize_into(child, getattr(target, name))


def make_static(module: nn.Module) -> None:
    """Swap, in place, every adaptive layer under ``module`` for the plain layer it currently computes."""
    for name, child in module.named_children():
        if isinstance(child, AdaptiveLayer):
            setattr(module, name, child.to_static())
        else:
            make_static(child)
