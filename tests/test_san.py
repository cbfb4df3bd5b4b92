import pytest
import torch
import torch.nn.functional as F

import flexres
from flexres.analysis import meta_weight_ratios
from flexres.methods import create_method
from flexres.methods.san import scale_distillation
from flexres.models import SAN_MODES, materialize
from flexres.nn.meta_conv import MetaConv2d
from tests.conftest import distinct_bn_statistics


def san_model(name="san_resnet18", resolutions=(96, 64, 32)):
    return distinct_bn_statistics(
        flexres.create_model(name, num_classes=5, train_resolutions=list(resolutions), width_mult=0.25)
    )


def test_generated_weight_is_a_times_eps_plus_b():
    conv = MetaConv2d(4, 6, 3, padding=1)
    for eps in (0.1, 0.35, 0.7):
        torch.testing.assert_close(conv.weight_at(eps), conv.A * eps + conv.B)
    conv.set_scale(0.3)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.A * 0.3 + conv.B, padding=1))


def test_cache_returns_the_same_tensor_and_an_optimiser_step_invalidates_it():
    conv = MetaConv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        w1 = conv.weight_at(0.3)
        assert conv.weight_at(0.3) is w1
        assert conv.weight_at(0.2) is not w1
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    conv.set_scale(0.3)
    conv(torch.randn(2, 4, 8, 8)).square().mean().backward()
    opt.step()
    with torch.no_grad():
        w2 = conv.weight_at(0.3)
    assert w2 is not w1 and not torch.equal(w2, w1)
    torch.testing.assert_close(w2, conv.A * 0.3 + conv.B)


def test_gradients_reach_a_and_b():
    conv = MetaConv2d(3, 4, 3, padding=1)
    conv.set_scale(0.25)
    conv(torch.randn(2, 3, 6, 6)).sum().backward()
    # dL/dA = eps * dL/dW and dL/dB = dL/dW
    torch.testing.assert_close(conv.A.grad, 0.25 * conv.B.grad)
    assert conv.B.grad.abs().sum() > 0


def test_scale_distillation_matches_a_hand_computation():
    torch.manual_seed(0)
    z = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]  # largest resolution first
    p = [F.softmax(t, 1) for t in z]
    kl = lambda a, b: (a * (a.log() - b.log())).sum(1).mean()  # noqa: E731
    expect = kl(p[0], p[1]) + kl(p[0], p[2]) + kl(p[1], p[2])
    got = scale_distillation(z)
    torch.testing.assert_close(got, expect)
    got.backward()
    # the largest resolution is only a teacher: no gradient reaches it
    assert z[0].grad is None or z[0].grad.abs().sum() == 0
    assert z[2].grad.abs().sum() > 0


def test_san_method_sums_cross_entropies_and_distillation():
    model = san_model(resolutions=(48, 32)).train()
    method = create_method("san", resolutions=[48, 32])
    x = (torch.randn(4, 3, 48, 48), torch.randn(4, 3, 32, 32))
    y = torch.tensor([0, 1, 2, 3])
    out = method(model, x, y)
    z = [out.logits[48], out.logits[32]]
    expect = F.cross_entropy(z[0], y) + F.cross_entropy(z[1], y) + scale_distillation(z)
    torch.testing.assert_close(out.loss.detach(), expect)
    out.loss.backward()
    assert model.conv1.A.grad is not None and model.conv1.A.grad.abs().sum() > 0


def test_each_inference_mode_picks_its_eps_and_bn():
    model = san_model()
    # T = 72: nearest trained resolution S(T) = 64; neighbours 64 and 96.
    model.set_operating_point(72, **SAN_MODES["proxy"])
    assert model.conv1.eps == pytest.approx(64 / 320)
    assert model.bn1._choice.kind == "trained" and model.bn1.resolutions[model.bn1._choice.index] == 64

    model.set_operating_point(72, **SAN_MODES["data-free"])
    assert model.conv1.eps == pytest.approx(72 / 320)
    c = model.bn1._choice
    assert c.kind == "interpolate" and model.bn1.resolutions[c.index] == 64 and model.bn1.resolutions[c.upper] == 96
    assert c.t == pytest.approx(8 / 32)

    with pytest.raises(LookupError, match="no calibrated BN statistics"):
        model.set_operating_point(72, **SAN_MODES["ideal"])
    from flexres.nn import calibrate_bn

    calibrate_bn(model, iter([torch.randn(6, 3, 72, 72)]), 72, 6)
    model.set_operating_point(72, **SAN_MODES["ideal"])
    assert model.conv1.eps == pytest.approx(72 / 320)
    c = model.bn1._choice
    assert c.kind == "calibrated" and model.bn1.resolutions[c.index] == 64  # affine of BN^(S(T))
    # calibration ran with the weights generated at eps(72): its stem statistics are those of that conv
    x = torch.randn(3, 3, 72, 72)
    calibrate_bn(model, iter([x]), 72, 3)
    with torch.no_grad():
        feats = F.conv2d(x, model.conv1.A * (72 / 320) + model.conv1.B, stride=2, padding=3)
    torch.testing.assert_close(model.bn1.calibrated[72][0], feats.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["san_resnet18", "san_mobilenet_v2"])
@pytest.mark.parametrize(
    "mode,resolution", [("proxy", 72), ("data-free", 72), ("data-free", 96), ("proxy", 40), ("ideal", 72)]
)
def test_materialised_model_matches_the_san_model(name, mode, resolution):
    model = san_model(name)
    if mode == "ideal":
        from flexres.nn import calibrate_bn

        calibrate_bn(model, iter([torch.randn(6, 3, resolution, resolution)]), resolution, 6)
    x = torch.randn(2, 3, resolution, resolution)
    plain = materialize(model, resolution, **SAN_MODES[mode])
    assert not any(isinstance(m, MetaConv2d) for m in plain.modules())
    assert plain.arch["name"] == name.removeprefix("san_") and plain.train_resolutions == (resolution,)
    with torch.no_grad(), model.at(resolution, **SAN_MODES[mode]):
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-5)


def test_meta_weight_ratio_is_mean_abs_a_over_mean_abs_b():
    model = san_model()
    ratios = meta_weight_ratios(model)
    assert len(ratios) == sum(isinstance(m, MetaConv2d) for m in model.modules())
    c = model.layer1[0].conv1
    assert ratios["layer1.0.conv1"] == pytest.approx(float(c.A.abs().mean() / c.B.abs().mean()))
