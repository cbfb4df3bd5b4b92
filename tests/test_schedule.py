"""The learning-rate schedule and the step plan of the trainer, against their definitions."""

import math

import pytest
import torch

from flexres.engine.config import ConfigError, make_config
from flexres.engine.trainer import build_optimizer, lr_at, plan_steps
from flexres.methods import create_method
from tests.conftest import tiny_model


def test_warmup_rises_linearly_to_the_peak_then_cosine_falls_to_zero():
    total, warmup, peak = 100, 10, 0.4
    assert [lr_at(s, total, warmup, peak) for s in range(warmup)] == pytest.approx(
        [peak * (s + 1) / warmup for s in range(warmup)]
    )
    assert lr_at(warmup, total, warmup, peak) == pytest.approx(peak)  # the cosine starts at the peak
    for s in (25, 55, 80, 99):
        progress = (s - warmup) / (total - warmup)
        assert lr_at(s, total, warmup, peak) == pytest.approx(0.5 * peak * (1 + math.cos(math.pi * progress)))
    assert lr_at(warmup + (total - warmup) // 2, total, warmup, peak) == pytest.approx(
        peak / 2
    )  # half-way: half the peak
    assert lr_at(total, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(total + 50, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)  # past the end it stays at zero
    lrs = [lr_at(s, total, warmup, peak) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone after warm-up


def test_without_warmup_the_first_step_is_at_the_peak():
    assert lr_at(0, 50, 0, 0.1) == pytest.approx(0.1)


def test_milestones_divide_by_ten_at_each():
    peak, ms = 0.1, [30, 60, 85]
    got = {s: lr_at(s, 120, 0, peak, ms) for s in (0, 29, 30, 59, 60, 84, 85, 119)}
    assert got == pytest.approx({0: 0.1, 29: 0.1, 30: 0.01, 59: 0.01, 60: 1e-3, 84: 1e-3, 85: 1e-4, 119: 1e-4})
    assert lr_at(2, 120, 5, peak, ms) == pytest.approx(peak * 3 / 5)  # warm-up comes first


def _t(**kw):
    return {"accumulate_steps": 1, "batch_size": 32, "epochs": 3, "warmup_epochs": 0.5, **kw}


def test_one_step_sees_the_batch_size_however_it_is_split():
    single = plan_steps(_t(batch_size=64), num_images=1000, world=1)
    assert (single.accumulate, single.micro_batch, single.steps_per_epoch) == (
        1,
        64,
        15,
    )  # 1000 // 64, last batch dropped
    assert single.total_steps == 45 and single.warmup_steps == round(0.5 * 15)
    accumulated = plan_steps(_t(batch_size=64, accumulate_steps=4), num_images=1000, world=1)
    spread = plan_steps(_t(batch_size=64), num_images=1000, world=4)
    for plan in (accumulated, spread):  # 4 micro-batches of 16 per step, on one device or four
        assert plan.micro_batch == 16
        assert plan.steps_per_epoch == (1000 // 4) // 16 == 15
    assert accumulated.accumulate == 4 and spread.accumulate == 1


def test_impossible_splits_are_refused_with_their_numbers():
    with pytest.raises(ValueError, match=r"batch_size=30 must divide by processes x accumulate_steps = 4"):
        plan_steps(_t(batch_size=30), num_images=1000, world=4)
    with pytest.raises(ValueError, match=r"batch_size 64 is larger than the training set \(50 images\)"):
        plan_steps(_t(batch_size=64), num_images=50, world=1)


def test_weight_decay_on_weights_spares_bn_biases_and_the_methods_scores():
    model = tiny_model()
    method = create_method("rsnet", resolutions=[64, 48, 32])
    decay = {}
    for on in ("all", "weights"):
        opt = build_optimizer(make_config({"train": {"weight_decay": 1e-4, "weight_decay_on": on}}), model, method)
        decay[on] = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        assert set(decay[on]) == {id(p) for p in model.parameters()} | {id(p) for p in method.parameters()}  # each once
    assert all(decay["all"][id(p)] == 1e-4 for p in model.parameters())
    for name, p in model.named_parameters():  # conv and fc weights decay; BN scales and shifts, the fc bias do not
        assert decay["weights"][id(p)] == (1e-4 if p.ndim >= 2 else 0.0), name
    assert any(p.ndim == 1 for p in model.parameters()) and any(p.ndim == 4 for p in model.parameters())
    with pytest.raises(ConfigError, match="train.weight_decay_on must be one of all, weights, got 'bn'"):
        make_config({"train": {"weight_decay_on": "bn"}})


@pytest.mark.parametrize("nesterov", [True, False])
def test_train_nesterov_gives_the_nesterov_update(nesterov):
    # SGD with momentum mu, first step (buffer = g): Nesterov moves by lr (g + mu g), heavy-ball by lr g
    model, method = tiny_model(), create_method("individual", resolutions=[32])
    cfg = make_config({"train": {"lr": 0.1, "momentum": 0.9, "nesterov": nesterov, "weight_decay": 0.0}})
    opt = build_optimizer(cfg, model, method)
    assert all(g["nesterov"] is nesterov for g in opt.param_groups)
    w = model.fc.weight
    before = w.detach().clone()
    grad = torch.randn_like(w)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    w.grad = grad.clone()
    opt.step()
    expected = before - 0.1 * (grad + 0.9 * grad if nesterov else grad)
    torch.testing.assert_close(w.detach(), expected)
