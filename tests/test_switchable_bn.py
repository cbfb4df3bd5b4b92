import warnings

import pytest
import torch

from flexres.nn import SwitchableBatchNorm2d, plan_bn
from tests.conftest import tiny_model


def make_bn():
    """Three trained resolutions with distinct, known parameters per BN."""
    bn = SwitchableBatchNorm2d(2, resolutions=[96, 64, 32])
    with torch.no_grad():
        for i, b in enumerate(bn.bns):
            b.weight.copy_(torch.tensor([1.0 + i, 2.0 + i]))
            b.bias.copy_(torch.tensor([10.0 * i, -1.0]))
            b.running_mean.copy_(torch.tensor([0.5 * i, 1.0]))
            b.running_var.copy_(torch.tensor([1.0 + 3 * i, 4.0]))
    return bn.eval()


def manual_bn(x, w, b, mean, var, eps=1e-5):
    shape = (1, -1, 1, 1)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * w.view(shape) + b.view(shape)


def test_trained_resolution_uses_its_private_bn():
    bn = make_bn()
    x = torch.randn(3, 2, 5, 5)
    bn.select(64, "interpolate")
    b = bn.bns[1]
    torch.testing.assert_close(bn(x), manual_bn(x, b.weight, b.bias, b.running_mean, b.running_var))


def test_nearest_policy_picks_the_nearest_trained_bn_and_ties_go_up():
    trained = (96, 64, 32)
    assert plan_bn(70, trained, "nearest").index == 1  # 64
    assert plan_bn(90, trained, "nearest").index == 0  # 96
    assert plan_bn(80, trained, "nearest").index == 0  # tie 64/96 -> 96
    assert plan_bn(200, trained, "nearest").index == 0
    assert plan_bn(8, trained, "nearest").index == 2


def test_interpolate_matches_hand_computed_values():
    bn = make_bn()
    # 72 lies between 64 (bns[1]) and 96 (bns[0]): t = (72 - 64) / (96 - 64) = 0.25 towards 96.
    bn.select(72, "interpolate")
    w, b, mean, var = bn.selected_parameters()
    torch.testing.assert_close(w, torch.tensor([0.75 * 2.0 + 0.25 * 1.0, 0.75 * 3.0 + 0.25 * 2.0]))
    torch.testing.assert_close(b, torch.tensor([0.75 * 10.0 + 0.25 * 0.0, -1.0]))
    torch.testing.assert_close(mean, torch.tensor([0.75 * 0.5 + 0.25 * 0.0, 1.0]))
    torch.testing.assert_close(var, torch.tensor([0.75 * 4.0 + 0.25 * 1.0, 4.0]))
    x = torch.randn(2, 2, 4, 4)
    torch.testing.assert_close(bn(x), manual_bn(x, w, b, mean, var))


def test_interpolate_outside_range_falls_back_to_nearest_with_one_plain_note(caplog):
    from flexres.notes import forget_notes

    forget_notes()
    model = tiny_model(resolutions=(64, 48)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a note, not a Python warning
        with caplog.at_level("WARNING", logger="flexres"):
            model.set_operating_point(96, bn_policy="interpolate")
            model.set_operating_point(96, bn_policy="interpolate")
            model.set_operating_point(56, bn_policy="interpolate")  # inside the range: no note
    for m in model.switchable_bns():
        assert m._choice.kind == "trained" and m.resolutions[m._choice.index] == 56 or m._choice.kind == "interpolate"
    assert [r.getMessage() for r in caplog.records] == [
        "96 px is outside the trained range [48, 64]: bn_policy 'interpolate' serves it with the nearest trained BN"
    ]
    model.set_operating_point(96, bn_policy="interpolate")
    for m in model.switchable_bns():
        assert m._choice.kind == "trained" and m.resolutions[m._choice.index] == 64


def test_calibrate_policy_requires_statistics_and_uses_them():
    bn = make_bn()
    with pytest.raises(LookupError, match="resolution 72 has no calibrated BN statistics"):
        bn.select(72, "calibrate")
    bn.calibrated[72] = (torch.tensor([3.0, -2.0]), torch.tensor([9.0, 0.25]))
    bn.select(72, "calibrate")
    x = torch.randn(2, 2, 4, 4)
    near = bn.bns[1]  # 72 is nearest to 64
    torch.testing.assert_close(
        bn(x), manual_bn(x, near.weight, near.bias, torch.tensor([3.0, -2.0]), torch.tensor([9.0, 0.25]))
    )


def test_calibration_gives_exact_statistics_of_the_first_layer():
    """calibrate_bn's stats for the stem BN equal mean/var computed directly over the stem conv output."""
    from flexres.nn import calibrate_bn

    model = tiny_model(resolutions=(64, 32)).eval()
    images = [torch.randn(5, 3, 48, 48), torch.randn(3, 3, 48, 48)]
    used = calibrate_bn(model, iter(images), 48, num_images=7)  # the last image is not used
    assert used == 7
    with torch.no_grad():
        feats = model.conv1(torch.cat(images)[:7])
    flat = feats.transpose(0, 1).reshape(feats.shape[1], -1).double()
    mean, var = model.bn1.calibrated[48]
    torch.testing.assert_close(mean.double(), flat.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), flat.var(1, unbiased=True), rtol=1e-5, atol=1e-6)
    assert model.operating_point.resolution == 64  # restored


def test_training_at_an_untrained_resolution_is_refused():
    bn = make_bn().train()
    bn.select(72, "interpolate")
    with pytest.raises(RuntimeError, match="resolution 72 is not a trained resolution"):
        bn(torch.randn(2, 2, 4, 4))


def test_to_batchnorm_exports_the_selected_bn():
    bn = make_bn()
    bn.select(48, "interpolate")
    plain = bn.to_batchnorm()
    x = torch.randn(2, 2, 4, 4)
    torch.testing.assert_close(plain(x), bn(x))
    assert isinstance(plain, torch.nn.BatchNorm2d)
