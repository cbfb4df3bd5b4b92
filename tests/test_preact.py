"""LQ-Nets' pre-activation ResNet: the block layout of its preresnet_group, and at 32/32 a plain pre-activation
ResNet."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flexres
from flexres.models.preact_resnet import StageEnd
from flexres.nn import LQQuantizer, QuantConv2d, SwitchableBatchNorm2d
from tests.conftest import distinct_bn_statistics


def make(w_bits=2, a_bits=2, name="preact_resnet18", **kw):
    return flexres.create_model(
        name, num_classes=5, train_resolutions=[64, 48], width_mult=0.25, w_bits=w_bits, a_bits=a_bits, **kw
    )


def call_order(model, module, x):
    """The layers ``module`` runs, in order: BN, ReLU, activation quantizer, quantized conv (a conv's own quantizers
    are inside it and not listed)."""
    inner = {
        id(q) for m in model.modules() if isinstance(m, QuantConv2d) for q in (m.weight_quantizer, m.input_quantizer)
    }
    names = {SwitchableBatchNorm2d: "bn", nn.ReLU: "relu", LQQuantizer: "quant", QuantConv2d: "conv", nn.Identity: "id"}
    seen, hooks = [], []
    for m in module.modules():
        if type(m) in names and id(m) not in inner:
            tag = names[type(m)]
            hooks.append(m.register_forward_pre_hook(lambda mod, args, tag=tag: seen.append(tag)))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_blocks_and_stage_ends_follow_lq_nets_preresnet_layout():
    model = make().train()
    x = torch.randn(2, 3, 64, 64)
    assert call_order(model, model.layer1[0], x) == [
        "quant",
        "conv",
        "bn",
        "relu",
        "quant",
        "conv",
        "bn",
    ]  # stage 1, block 1
    assert call_order(model, model.layer1[1], x) == ["bn", "relu", "quant", "conv", "bn", "relu", "quant", "conv", "bn"]
    # a later stage's first block: its input is the previous stage's quantized output, read by the shortcut (conv, BN)
    # and by conv1 as it is
    assert call_order(model, model.layer2[0], x) == ["conv", "bn", "conv", "bn", "relu", "quant", "conv", "bn"]
    for i, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        assert isinstance(layer[-1], StageEnd)  # the extra BN-ReLU of every stage, then the next stage's quantizer
        assert call_order(model, layer[-1], x) == ["bn", "relu", "quant" if i < 3 else "id"]
    assert not isinstance(model.conv1, QuantConv2d) and isinstance(model.fc, nn.Linear)  # stem and classifier: fp32
    bottleneck = make(name="preact_resnet50").train()
    assert call_order(bottleneck, bottleneck.layer1[1], x) == [
        "bn",
        "relu",
        "quant",
        "conv",
        "bn",
        "relu",
        "quant",
        "conv",
        "bn",
        "relu",
        "quant",
        "conv",
        "bn",
    ]


def _bn(bn: SwitchableBatchNorm2d, x):
    b = bn.bns[bn.index] if hasattr(bn, "index") else bn.to_batchnorm()
    return F.batch_norm(x, b.running_mean, b.running_var, b.weight, b.bias, False, 0.0, b.eps)


@torch.no_grad()
def test_at_32_32_it_is_a_plain_preactivation_resnet():
    model = distinct_bn_statistics(make(32, 32))
    assert not any(q.enabled for q in model.modules() if isinstance(q, LQQuantizer))
    x = torch.randn(2, 3, 48, 48)
    model.set_operating_point(48)

    def conv(c, h):
        return F.conv2d(h, c.weight, None, c.stride, c.padding)

    def bn(m, h):
        return _bn(m, h)

    h = F.max_pool2d(F.relu(bn(model.bn1, conv(model.conv1, x))), 3, 2, 1)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for blk in stage[:-1]:
            identity = h if blk.shortcut is None else bn(blk.shortcut[1], conv(blk.shortcut[0], h))
            z = F.relu(bn(blk.preact.bn, h)) if blk.preact.bn is not None else h  # pre-activation (not on the shortcut)
            z = F.relu(bn(blk.bn1, conv(blk.conv1, z)))
            h = bn(blk.bn2, conv(blk.conv2, z)) + identity  # no ReLU after the sum: the stream stays linear
        h = F.relu(bn(stage[-1].bn, h))
    want = F.linear(h.mean((2, 3)), model.fc.weight, model.fc.bias)
    torch.testing.assert_close(model(x), want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_private_activation_bases_switch_with_the_resolution_and_export_statically():
    model = make(activation_bases="private").train()
    for r in (64, 48):  # one training-mode pass per resolution fits each resolution's basis
        model.set_operating_point(r)
        model(torch.randn(4, 3, r, r) + 1)
    quants = [q for q in model.activation_quantizers()]
    assert quants and all(q.basis.shape[0] == 2 and bool(q.initialized.all()) for q in quants)
    model.eval()
    for r, index in ((64, 0), (48, 1), (56, 0)):
        model.set_operating_point(r)
        assert {q.index for q in quants} == {index}
    static = flexres.to_static(model, 48)
    x = torch.randn(2, 3, 48, 48)
    model.set_operating_point(48)
    torch.testing.assert_close(static(x), model(x), atol=1e-4, rtol=1e-4)


def test_options_are_checked():
    with pytest.raises(ValueError, match="activation_bases must be 'shared' or 'private'"):
        make(activation_bases="each")
