"""A static sub-network (OFA's get_active_subnet): the plain layers one operating point computes."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..models.base import AdaptiveModel
from ..nn.adaptive import make_static
from ..operating_point import OperatingPoint


class StaticClassifier(nn.Module):
    """A materialised network without operating-point state: ``head(features(x))``."""

    def __init__(self, net: AdaptiveModel) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_head(self.net.forward_features(x))


class _ConvLeafTracer(fx.Tracer):
    """Traces a network with every convolution as a leaf, whatever its class: timm's Conv2dSame computes its padding
    from the input's size in Python, which fx cannot trace through, and it folds a BN like any Conv2d."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, qualname)


@torch.no_grad()
def fold_batchnorms(module: nn.Module) -> fx.GraphModule:
    """``module`` with every BatchNorm2d that only follows a convolution folded into it (eval statistics)."""
    gm = fx.GraphModule(module, _ConvLeafTracer().trace(module))
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        conv = node.args[0]
        if not (
            isinstance(conv, fx.Node)
            and conv.op == "call_module"
            and isinstance(modules[conv.target], nn.Conv2d)
            and len(conv.users) == 1
            and modules[node.target].track_running_stats
        ):
            continue
        parent, _, attr = conv.target.rpartition(".")
        setattr(
            gm.get_submodule(parent) if parent else gm,
            attr,
            fuse_conv_bn_eval(modules[conv.target], modules[node.target]),
        )
        node.replace_all_uses_with(conv)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


@torch.no_grad()
def to_static(
    model: AdaptiveModel,
    op: OperatingPoint | int,
    bn_policy: str | None = None,
    scale_policy: str | None = None,
    fold_bn: bool = True,
) -> nn.Module:
    """The sub-network serving ``op`` as plain Conv2d / BatchNorm2d / Linear layers (SAN weights generated,
    slimmable layers sliced, the selected BN); with ``fold_bn`` every BN is folded into its conv."""
    net = copy.deepcopy(model).eval()
    net.set_operating_point(op, bn_policy, scale_policy)
    make_static(net)
    static = StaticClassifier(net).eval()
    return fold_batchnorms(static) if fold_bn else static
