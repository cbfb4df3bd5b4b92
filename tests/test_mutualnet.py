import json

import pytest
import torch
import torch.nn.functional as F

import flexres
from flexres import OperatingPoint
from flexres.analysis import count_macs, count_params
from flexres.cli import main, parse_range
from flexres.methods import create_method
from flexres.nn import calibrate_bn
from flexres.nn.slimmable import SlimmableConv2d, SlimmableLinear, slim_channels
from flexres.operating_point import best_within as select
from flexres.operating_point import pareto_front


def official_make_divisible(v, divisor=8):
    """The slimmable-networks / TF-slim rule, written out independently of flexres."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def test_slim_channels_follow_the_official_rounding():
    assert slim_channels(64, 1.0) == 64
    assert slim_channels(64, 0.5) == 32
    assert slim_channels(64, 0.3) == 24  # 19.2 -> 16 would lose 17 %: one divisor more
    assert slim_channels(64, 0.35) == 24  # 22.4 -> 24
    assert slim_channels(64, 0.05) == 8  # never below 8
    assert slim_channels(16, 0.25) == 8  # 4 -> 8: the floor, not 4 channels
    assert slim_channels(20, 0.9) == 20  # 18 -> 24 by the 10 % rule, capped at the layer
    # MobileNetV2's expanded channels: expand ratio x the rounded input (official ratio=[1, t]).
    assert slim_channels(48, 0.25, ratio=6) == 48  # input 8 x 0.25 -> 8 (floor) -> 48
    assert slim_channels(96, 0.5, ratio=6) == 48
    assert slim_channels(96, 0.3, ratio=6) == 48
    for c in (8, 16, 24, 40, 80, 96, 160, 320, 1280):
        for w in torch.linspace(0.05, 0.99, 48).tolist():
            got = slim_channels(c, w)
            assert got == min(c, official_make_divisible(c * w))
            assert got == c or (got % 8 == 0 and got >= 8 and got >= 0.9 * c * w)


def test_slimmable_mobilenets_keep_the_head_at_full_size():
    """The official US-Net / MutualNet MobileNetV2 keep the last 1x1 conv (1280) and the classifier at full size;
    slim_head=True slims them as flexres did before."""
    m = flexres.create_model("us_mobilenet_v2", num_classes=10, train_resolutions=[64], width_mult=0.25)
    m.set_operating_point(OperatingPoint(64, 0.25))
    head_conv, head_bn = m.features[-1][0], m.features[-1][1]
    assert (head_conv.active_in, head_conv.active_out, head_bn.active) == (24, 1280, 1280)  # input: 80 x 0.25 -> 24
    assert m.classifier[1].active_in == 1280
    block = m.features[4]  # 8 -> 8 channels at base 0.25, expand ratio 6 (48 expanded)
    assert [block.conv[0][0].active_out, block.conv[1][0].active_out, block.conv[2].active_out] == [48, 48, 8]
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    old = flexres.create_model(
        "us_mobilenet_v2", num_classes=10, train_resolutions=[64], width_mult=0.25, slim_head=True
    )
    old.set_operating_point(OperatingPoint(64, 0.25))
    assert old.features[-1][0].active_out == 320 and old.classifier[1].active_in == 320
    v1 = flexres.create_model("us_mobilenet_v1", num_classes=10, train_resolutions=[64], width_mult=0.25)
    v1.set_operating_point(OperatingPoint(64, 0.5))
    assert v1.features[-1][1][0].active_out == 256 and v1.classifier[1].active_in == 256
    assert v1.features[-1][1][0].active_in == 128 and v1.features[-2][1][0].active_out == 128
    # Post-statistics BN still applies to the full-size head BN: it is keyed per (resolution, width).
    assert head_bn in m.calibratable_bns()


def test_slice_shapes_of_dense_depthwise_and_linear_layers():
    conv = SlimmableConv2d(32, 64, 3, padding=1)
    conv.set_width(0.5)
    x = torch.randn(2, 16, 8, 8)
    assert conv(x).shape == (2, 32, 8, 8)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight[:32, :16], padding=1))
    dw = SlimmableConv2d(64, 64, 3, padding=1, groups=64)
    dw.set_width(0.25)
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(dw(x), F.conv2d(x, dw.weight[:16], padding=1, groups=16))
    stem = SlimmableConv2d(3, 32, 3, slim_in=False)
    stem.set_width(0.25)
    assert stem(torch.randn(1, 3, 8, 8)).shape[1] == 8
    lin = SlimmableLinear(64, 10)
    lin.set_width(0.5)
    x = torch.randn(3, 32)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight[:, :32], lin.bias))


@pytest.mark.parametrize("name", ["us_resnet18", "us_mobilenet_v2", "us_mobilenet_v1"])
def test_width_one_equals_the_full_network(name):
    """At width 1.0 a slimmable network computes exactly what the plain network with the same weights does."""
    plain_name = name.removeprefix("us_")
    kw = {"dropout": 0.0} if "mobilenet" in name else {}  # no randomness in the comparison
    slim = flexres.create_model(name, num_classes=7, train_resolutions=[64], width_mult=0.5, **kw).train()
    plain = flexres.create_model(plain_name, num_classes=7, train_resolutions=[64], width_mult=0.5, **kw).train()
    state = {k.replace(".bns.0", ""): v for k, v in plain.state_dict().items()}
    missing = slim.load_state_dict({k: v for k, v in state.items() if k in slim.state_dict()}, strict=False)
    assert not missing.missing_keys
    x = torch.randn(4, 3, 64, 64)
    slim.set_operating_point(OperatingPoint(64, 1.0))
    torch.testing.assert_close(slim(x), plain(x))  # training mode: both normalise with batch statistics


def test_smaller_widths_cost_less_and_params_count_only_active_channels():
    model = flexres.create_model("us_mobilenet_v2", num_classes=10, train_resolutions=[96, 64], width_mult=0.5)
    macs = [count_macs(model, OperatingPoint(96, w)) for w in (1.0, 0.75, 0.5, 0.35)]
    assert macs == sorted(macs, reverse=True) and macs[0] > 2.5 * macs[-1]
    params = [count_params(model, OperatingPoint(96, w)) for w in (1.0, 0.5)]
    assert params[0] == sum(p.numel() for p in model.parameters()) and params[1] < 0.5 * params[0]
    with pytest.raises(ValueError, match="outside this model's width range"):
        model.set_operating_point(OperatingPoint(96, 0.1))


def test_post_statistics_bn_equals_statistics_computed_directly():
    model = flexres.create_model("us_resnet18", num_classes=5, train_resolutions=[48], width_mult=0.5).eval()
    images = [torch.randn(6, 3, 48, 48), torch.randn(4, 3, 48, 48)]
    op = OperatingPoint(48, 0.5)
    calibrate_bn(model, iter(images), op, 10)
    model.set_operating_point(op)
    with torch.no_grad():
        feats = model.conv1(torch.cat(images))
    assert feats.shape[1] == model.bn1.active == 16
    mean, var = model.bn1.calibrated[(48, 0.5)]
    torch.testing.assert_close(mean, feats.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, feats.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    # evaluation of an uncalibrated point is refused rather than served with meaningless statistics
    model.set_operating_point(OperatingPoint(48, 0.75))
    with pytest.raises(LookupError, match="no post-statistics BN"):
        model(torch.randn(1, 3, 48, 48))


def test_sandwich_rule_always_includes_the_smallest_and_largest_width():
    m = create_method("mutualnet", resolutions=[112, 96, 80, 64], width_range=[0.25, 1.0], num_subnets=4)
    for step in range(50):
        m.rng.manual_seed(step)
        pts = m.sample()
        assert len(pts) == 4
        assert pts[0] == OperatingPoint(112, 1.0)  # full width at the highest resolution
        assert pts[1].width == 0.25  # the smallest width
        assert all(0.25 <= p.width <= 1.0 and p.resolution in (112, 96, 80, 64) for p in pts)
    usnet = create_method("usnet", resolutions=[96], width_range=[0.25, 1.0])
    assert {p.resolution for p in usnet.sample()} == {96}


def test_mutualnet_loss_is_ce_of_the_full_network_plus_kl_of_the_others():
    model = flexres.create_model(
        "us_resnet18",
        num_classes=5,
        train_resolutions=[64, 48],
        width_mult=0.25,
        width_range=[0.5, 1.0],
        slim_divisor=4,
    ).train()
    m = create_method("mutualnet", resolutions=[64, 48], width_range=[0.5, 1.0], num_subnets=3)
    m.rng.manual_seed(0)
    pts = m.sample()
    x = {64: torch.randn(4, 3, 64, 64), 48: torch.randn(4, 3, 48, 48)}
    y = torch.tensor([0, 1, 2, 3])
    m.rng.manual_seed(0)
    out = m(model, (x[64], x[48]), y)
    outs = []
    for p in pts:
        model.set_operating_point(p)
        outs.append(model(x[p.resolution]))
    kl = lambda t, s: F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")  # noqa: E731
    expect = F.cross_entropy(outs[0], y) + kl(outs[0], outs[1]) + kl(outs[0], outs[2])
    torch.testing.assert_close(out.loss, expect, rtol=1e-5, atol=1e-5)
    # reduction="mean" divides by the sub-networks of the step, the same draw otherwise.
    mean = create_method("mutualnet", resolutions=[64, 48], width_range=[0.5, 1.0], num_subnets=3, reduction="mean")
    mean.rng.manual_seed(0)
    torch.testing.assert_close(mean(model, (x[64], x[48]), y).loss, expect / 3, rtol=1e-5, atol=1e-5)


def test_select_returns_a_pareto_optimal_point_and_refuses_an_impossible_budget():
    rows = [
        {"width": w, "resolution": r, "top1": a, "macs": c, "latency_ms": None}
        for w, r, a, c in [
            (1.0, 96, 80.0, 100e6),
            (0.5, 96, 70.0, 40e6),
            (1.0, 64, 74.0, 45e6),
            (0.75, 64, 72.0, 50e6),
            (0.5, 64, 65.0, 20e6),
        ]
    ]
    front = pareto_front(rows)
    assert [(r["width"], r["resolution"]) for r in front] == [(0.5, 64), (0.5, 96), (1.0, 64), (1.0, 96)]
    best = select(rows, max_macs=55e6)
    assert (best["width"], best["resolution"]) == (1.0, 64)  # 74% at 45M beats 72% at 50M and 70% at 40M
    assert best in front
    with pytest.raises(ValueError, match="no operating point fits a budget of 10.0 MMACs"):
        select(rows, max_macs=10e6)
    with pytest.raises(ValueError, match="no latency column"):
        select(rows, max_latency_ms=5)
    assert parse_range("0.25:1.0:0.25") == [0.25, 0.5, 0.75, 1.0]


def test_mutualnet_train_table_select_end_to_end(tmp_path, small_data, capsys):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        "model: {name: us_mobilenet_v2, width_mult: 0.35, kwargs: {slim_divisor: 4}}\n"
        "method: {name: mutualnet, resolutions: [48, 40, 32], kwargs: {width_range: [0.5, 1.0]}}\n"
        "data: {cache: true, num_workers: 0}\n"
        "train: {epochs: 1, batch_size: 4, lr: 0.05, progress: false, eval_every: 1}\n"
        "eval: {resolutions: [48, 32], calibration_images: 8}\n"
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--data", str(small_data), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.jsonl").read_text())
    assert {"loss_cls", "loss_kd"} <= set(metrics) and set(metrics["val_top1"]) == {
        "48",
        "40",
        "32",
    }  # evaluated in training
    assert main(["table", str(out), "--data", str(small_data), "--widths", "0.5:1.0:0.25"]) == 0
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert {(r["width"], r["resolution"]) for r in rows} == {(w, r) for w in (0.5, 0.75, 1.0) for r in (48, 32)}
    assert (out / "table.csv").exists() and (out / "table.md").exists()
    capsys.readouterr()
    budget = sorted(r["macs"] for r in rows)[2]
    assert main(["select", str(out), "--max-macs", str(budget), "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert chosen["macs"] <= budget
    assert chosen == flexres.select(out, max_macs=budget)  # the CLI prints what the Python function returns
    assert main(["select", str(out), "--max-macs", "1K"]) == 2
    assert "no operating point fits" in capsys.readouterr().err
    # the table's post-statistics were saved with the run and are reused
    model, meta = flexres.load_checkpoint(out)
    assert model.is_calibrated(OperatingPoint(32, 0.75))


@pytest.mark.parametrize("name,op", [("us_mobilenet_v2", OperatingPoint(48, 0.5)), ("resnet18", OperatingPoint(40))])
def test_calibrated_statistics_of_a_deep_bn_are_those_of_a_train_mode_forward(name, op):
    """With all images in one batch, every BN's calibrated statistics equal the batch statistics its input has in a
    train-mode forward (where the layers above also normalise with batch statistics)."""
    model = flexres.create_model(
        name,
        num_classes=5,
        train_resolutions=[48, 32],
        width_mult=0.5,
        **({"dropout": 0.0} if "mobilenet" in name else {}),
    ).eval()
    x = torch.randn(6, 3, op.resolution, op.resolution)
    calibrate_bn(model, iter([x]), op, 6)
    bns = model.calibratable_bns()
    deep = bns[len(bns) * 2 // 3]
    seen = {}
    handle = deep.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    model.train()
    with torch.no_grad(), model.at(op, bn_policy="nearest"):
        for bn in bns:  # train-mode forward without touching running statistics
            bn.begin_calibration(bn.calibration_key(op))
        model(x)
        for bn in bns:
            bn.abort_calibration()
    handle.remove()
    key = deep.calibration_key(op)
    mean, var = deep.calibrated[key]
    torch.testing.assert_close(mean, seen["x"].mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, seen["x"].var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)


def test_inplace_distillation_detaches_the_teacher():
    model = flexres.create_model(
        "us_resnet18", num_classes=5, train_resolutions=[48], width_mult=0.25, width_range=[0.5, 1.0], slim_divisor=4
    ).train()
    m = create_method("mutualnet", resolutions=[48], width_range=[0.5, 1.0], num_subnets=2)
    m.rng.manual_seed(0)
    out = m(model, (torch.randn(4, 3, 48, 48),), torch.tensor([0, 1, 2, 3]))
    kd = out.terms["kd"]
    assert kd > 0
    # the KD term alone must not move the parameters only the full width uses (the teacher's last channels)
    m.rng.manual_seed(0)
    pts = m.sample()
    x = torch.randn(4, 3, 48, 48)
    model.set_operating_point(pts[0])
    teacher = model(x)
    model.set_operating_point(pts[1])
    from flexres.methods.rsnet import kl_divergence

    kl_divergence(teacher, model(x)).backward()
    full_only = model.fc.weight.grad[:, model.fc.active_in :]
    assert full_only.abs().sum() == 0 and model.fc.weight.grad[:, : model.fc.active_in].abs().sum() > 0


def test_legacy_rounding_rebuilds_runs_trained_before_the_official_rule(tmp_path, caplog):
    """channel_rounding='legacy' is flexres's rule before 2026-12 (nearest multiple, no 10 % rule, no expand ratio);
    new models record their rounding and head in model.arch, and a checkpoint without them loads with today's
    defaults and a note that says so."""
    from flexres.engine.checkpoint import save_checkpoint
    from flexres.notes import forget_notes

    assert slim_channels(64, 0.3, rule="legacy") == 16 and slim_channels(64, 0.3) == 24
    old = flexres.create_model(
        "us_mobilenet_v2",
        num_classes=10,
        train_resolutions=[64],
        width_mult=0.25,
        channel_rounding="legacy",
        slim_head=True,
    )
    old.set_operating_point(OperatingPoint(64, 0.25))
    assert old.features[4].conv[0][0].active_out == 16  # 48 x 0.25 = 12, rounded on its own (official: 8 x 6 = 48)
    new = flexres.create_model("us_mobilenet_v2", num_classes=10, train_resolutions=[64], width_mult=0.25)
    assert new.arch["kwargs"]["channel_rounding"] == "official" and new.arch["kwargs"]["slim_head"] is False
    new.arch = {"name": "us_mobilenet_v2", "kwargs": {"num_classes": 10, "train_resolutions": [64], "width_mult": 0.25}}
    save_checkpoint(tmp_path, new, {"epoch": 1})
    forget_notes()
    with caplog.at_level("WARNING", logger="flexres"):
        loaded, _ = flexres.load_checkpoint(tmp_path)
    assert loaded.arch["kwargs"]["channel_rounding"] == "official"
    assert any("records no channel_rounding, slim_head" in r.getMessage() for r in caplog.records)
