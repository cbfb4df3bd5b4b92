import pytest
import torch
import torchvision

import flexres
from flexres import OperatingPoint
from flexres.analysis import count_macs, count_params
from tests.conftest import tiny_model


def test_registry_lists_the_families():
    assert {"resnet18", "resnet34", "resnet50", "mobilenet_v2"} <= set(flexres.list_models())
    with pytest.raises(KeyError, match="unknown model 'resnet19'"):
        flexres.create_model("resnet19")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "shufflenet_v2"])
def test_layer_names_and_params_follow_torchvision(name):
    ours = flexres.create_model(name, num_classes=1000, train_resolutions=[224])
    theirs = getattr(torchvision.models, name if name != "shufflenet_v2" else "shufflenet_v2_x1_0")()
    assert {k.replace(".bns.0", "") for k in ours.state_dict()} == set(theirs.state_dict())
    assert count_params(ours) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "mobilenet_v2"])
def test_forward_at_every_trained_resolution(name):
    model = tiny_model(name, resolutions=(64, 32)).eval()
    for r in (64, 48, 32):
        with model.at(r):
            assert model(torch.randn(2, 3, r, r)).shape == (2, 5)
    assert model.operating_point == OperatingPoint(64)


def test_operating_point_lives_on_the_instance_and_switching_is_explicit():
    a, b = tiny_model(resolutions=(64, 32)), tiny_model(resolutions=(64, 32))
    a.set_operating_point(32)
    assert a.operating_point.resolution == 32 and b.operating_point.resolution == 64
    assert a.trained_operating_points == (OperatingPoint(64), OperatingPoint(32))
    with pytest.raises(ValueError, match=r"does not match the operating point 32px"):
        a(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="adapts resolution only"):
        a.set_operating_point(OperatingPoint(64, width=0.5))
    with pytest.raises(ValueError, match="unknown bn_policy"):
        a.set_operating_point(64, bn_policy="magic")


def test_private_bn_per_resolution_gives_different_outputs():
    model = tiny_model(resolutions=(64, 32)).train()
    x = torch.randn(4, 3, 64, 64)
    with model.at(64):
        model(x)  # updates only the 64 px BN's running statistics
    for m in model.switchable_bns():
        assert int(m.bns[0].num_batches_tracked) == 1 and int(m.bns[1].num_batches_tracked) == 0
        assert not torch.equal(m.bns[0].running_mean, m.bns[1].running_mean)


def test_macs_scale_with_resolution_squared():
    model = tiny_model(resolutions=(256, 128))
    # multiples of 64 keep every feature map exact after the five stride-2 stages; only the
    # resolution-independent classifier breaks the r^2 law, and it is tiny
    m256, m128, m64 = (count_macs(model, r) for r in (256, 128, 64))
    assert 3.95 < m256 / m128 <= 4.0
    assert 3.9 < m128 / m64 <= 4.0
    # odd sizes round feature maps up (SAN App. I), so 224 vs 112 is only close to 4
    assert 3.5 < count_macs(model, 224) / count_macs(model, 112) < 4.0
    # full-width resnet18 at 224: the well-known 1.82 GMACs
    full = flexres.create_model("resnet18", train_resolutions=[224])
    assert abs(count_macs(full, 224) / 1e9 - 1.82) < 0.01


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2"])
def test_torchvision_weights_load_into_every_bn_set_and_give_torchvision_outputs(name):
    from flexres.models import load_single_bn_weights

    theirs = getattr(torchvision.models, name if name != "shufflenet_v2" else "shufflenet_v2_x1_0")(
        num_classes=7
    ).eval()
    with torch.no_grad():  # non-trivial BN statistics so a wrong mapping shows
        for m in theirs.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ours = flexres.create_model(name, num_classes=7, train_resolutions=[96, 64]).eval()
    load_single_bn_weights(ours, theirs.state_dict())
    for r in (96, 64):
        x = torch.randn(2, 3, r, r)
        with ours.at(r):
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="lacks"):
        load_single_bn_weights(ours, dict(list(theirs.state_dict().items())[1:]))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_residual_zeroes_each_blocks_last_bn_in_every_set_so_blocks_start_as_their_shortcut(name):
    # LQ-Nets' 2/32 recipe (and Goyal et al.): the last BN's scale of every residual block starts at zero
    model = tiny_model(name, resolutions=(64, 48), zero_init_residual=True).eval()
    blocks = [m for m in model.modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")]
    assert len(blocks) == (8 if name == "resnet18" else 16)
    for block in blocks:
        last = block.bn2 if name == "resnet18" else block.bn3
        assert len(last.bns) == 2 and all(torch.count_nonzero(bn.weight) == 0 for bn in last.bns)
        assert all(torch.count_nonzero(bn.weight) > 0 for bn in block.bn1.bns)  # the others keep their init
    for res in (64, 48):
        model.set_operating_point(res)
        for block in blocks:  # the residual branch ends in BN(.) = 0 * x_hat + 0: the block is relu(shortcut)
            h = torch.randn(1, block.conv1.in_channels, 8, 8)
            short = h if block.downsample is None else block.downsample(h)
            torch.testing.assert_close(block(h), torch.relu(short))
    plain = tiny_model(name, resolutions=(64, 48))
    assert all(torch.count_nonzero(bn.weight) > 0 for bn in plain.switchable_bns() for bn in bn.bns)
