import json

import pytest
import torch

import flexres
from flexres import OperatingPoint
from flexres.analysis import count_macs
from flexres.cli import main
from flexres.deploy import to_static
from flexres.methods import create_method
from flexres.methods.resizable import fair_configurations, random_configurations
from flexres.nn.stage_resize import StageResize, stage_size

L = (0.45, 0.65, 0.85, 1.0)


def test_fair_sampling_uses_every_factor_exactly_once_per_stage_per_step():
    g = torch.Generator().manual_seed(0)
    seen_orders = set()
    for _ in range(20):
        configs = fair_configurations(L, 4, g)
        assert len(configs) == len(L)
        for stage in range(4):
            assert sorted(c[stage] for c in configs) == sorted(L)
        seen_orders.add(tuple(configs))
    assert len(seen_orders) > 1  # the permutations are random


def test_resizable_loss_sums_cross_entropy_over_the_sampled_configurations():
    model = flexres.create_model("resizable_resnet18", num_classes=5, train_resolutions=[64], width_mult=0.25).train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    losses = {}
    for reduction in ("sum", "mean"):
        m = create_method("resizable", resolutions=[64], reduction=reduction)
        m.rng.manual_seed(0)
        configs = m.sample(model)
        m.rng.manual_seed(0)
        losses[reduction] = m(model, (x,), y).loss
    expect = 0.0
    for sc in configs:
        model.set_operating_point(OperatingPoint(64, scales=sc))
        expect = expect + torch.nn.functional.cross_entropy(model(x), y)
    torch.testing.assert_close(losses["sum"], expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["mean"], expect / len(L), rtol=1e-5, atol=1e-5)


def test_random_sampling_does_not_balance_factors():
    g = torch.Generator().manual_seed(0)
    unbalanced = 0
    for _ in range(20):
        configs = random_configurations(L, 4, 4, g)
        unbalanced += any(sorted(c[s] for c in configs) != sorted(L) for s in range(4))
    assert unbalanced > 15


def test_papers_random_baseline_trains_one_configuration_per_step():
    """App. D.3: one random configuration per step (trained |L| times as long); the equal-compute control draws |L|."""
    model = flexres.create_model("resizable_resnet18", num_classes=3, train_resolutions=[64], width_mult=0.25).train()
    single = create_method("resizable", resolutions=[64], sampling="random", configs_per_step=1)
    single.rng.manual_seed(0)
    draws = [single.sample(model) for _ in range(64)]
    assert all(len(d) == 1 for d in draws)
    assert len({d[0] for d in draws}) > 30  # different configurations from step to step, every factor at every stage
    assert all({d[0][s] for d in draws} == set(L) for s in range(4))
    assert len(create_method("resizable", resolutions=[64], sampling="random").sample(model)) == len(L)
    with pytest.raises(ValueError, match="applies to sampling 'random' only"):
        create_method("resizable", resolutions=[64], sampling="fair", configs_per_step=1)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    single.rng.manual_seed(0)
    (scales,) = single.sample(model)
    single.rng.manual_seed(0)
    out = single(model, (x,), y)
    model.set_operating_point(OperatingPoint(64, scales=scales))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v1", "shufflenet_v2"])
def test_all_factors_one_equals_the_plain_network(name):
    kw = {"dropout": 0.0} if "mobilenet" in name else {}
    res = flexres.create_model(
        f"resizable_{name}", num_classes=10, train_resolutions=[112], width_mult=0.25, **kw
    ).train()
    plain = flexres.create_model(name, num_classes=10, train_resolutions=[112], width_mult=0.25, **kw).train()
    # the resizable model's BNs per factor all start from the plain model's one BN
    from flexres.models import load_single_bn_weights

    load_single_bn_weights(res, {k.replace(".bns.0", ""): v for k, v in plain.state_dict().items()})
    x = torch.randn(4, 3, 112, 112)
    n = res.num_stages
    res.set_operating_point(OperatingPoint(112, scales=(1.0,) * n))
    torch.testing.assert_close(res(x), plain(x))
    res.set_operating_point(OperatingPoint(112, scales=(0.45,) + (1.0,) * (n - 1)))
    assert not torch.allclose(res(x), plain(x))


def test_macs_follow_the_configuration_and_stage_sizes():
    m = flexres.create_model("resizable_resnet18", num_classes=10, train_resolutions=[112], width_mult=0.25)
    full = count_macs(m, OperatingPoint(112, scales=(1.0,) * 4))
    assert full == count_macs(
        flexres.create_model("resnet18", num_classes=10, train_resolutions=[112], width_mult=0.25), 112
    )
    smaller = [count_macs(m, OperatingPoint(112, scales=(f,) * 4)) for f in L]
    assert smaller == sorted(smaller) and smaller[0] < 0.5 * full
    # shrinking a later stage saves less than shrinking an early one of the same factor: stages cost alike,
    # but the early resize also shrinks the strided block that opens the next stage
    early = count_macs(m, OperatingPoint(112, scales=(0.45, 1.0, 1.0, 1.0)))
    assert early < full
    assert stage_size(112, 4, 0.45) == 13 and stage_size(112, 32, 1.0) == 4
    m.set_operating_point(OperatingPoint(112, scales=(0.45, 0.65, 0.85, 1.0)))
    assert [r.size for r in m.stage_resizers] == [13, 9, 6, 4]


def test_scale_aware_bn_selects_the_bn_of_each_stages_factor():
    m = flexres.create_model("resizable_resnet18", num_classes=10, train_resolutions=[112], width_mult=0.25)
    m.set_operating_point(OperatingPoint(112, scales=(0.45, 0.65, 0.85, 1.0)))
    key = lambda bn: bn.resolutions[bn._choice.index]  # noqa: E731
    assert (
        key(m.layer1[0].bn1) == 45 and key(m.layer2[0].bn1) == 45
    )  # strided block before the resize: stage 1's factor
    assert key(m.layer2[1].bn1) == 65 and key(m.layer3[1].bn2) == 85 and key(m.layer4[0].downsample[1]) == 85
    assert key(m.layer4[1].bn1) == 100 and key(m.bn1) == 112  # the stem keeps its resolution BN
    with pytest.raises(ValueError, match="gives 3 scales; this model has 4 stages"):
        m.set_operating_point(OperatingPoint(112, scales=(1.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="outside the trained factors"):
        m.set_operating_point(OperatingPoint(112, scales=(0.2, 1.0, 1.0, 1.0)))


@pytest.mark.parametrize("name", ["resizable_resnet18", "resizable_mobilenet_v2", "resizable_shufflenet_v2"])
def test_static_export_of_a_configuration_matches(name):
    m = flexres.create_model(name, num_classes=10, train_resolutions=[112], width_mult=0.25).eval()
    op = OperatingPoint(112, scales=(0.45, 1.0, 0.65, 0.85, 1.0)[: m.num_stages])
    x = torch.randn(2, 3, 112, 112)
    static = to_static(m, op)
    with torch.no_grad(), m.at(op):
        torch.testing.assert_close(static(x), m(x), atol=1e-5, rtol=0)
    assert not any(isinstance(mod, StageResize) for mod in static.modules())


def test_resizable_method_trains_every_sampled_configuration(tmp_path, small_data):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(
        "model: {name: resizable_resnet18, width_mult: 0.25}\nmethod: {name: resizable, resolutions: [48]}\n"
        "data: {cache: true, num_workers: 0}\n"
        "train: {epochs: 1, batch_size: 4, lr: 0.05, progress: false, eval_every: 0}\n"
        "eval: {resolutions: [48]}\n"
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--data", str(small_data), "--out", str(out)]) == 0
    model, _ = flexres.load_checkpoint(out)
    for bn in model.switchable_bns():  # fair sampling: every factor's BN of every stage was trained each step
        if bn.scale_stage is not None:
            assert len({int(b.num_batches_tracked) for b in bn.bns}) == 1 and int(bn.bns[0].num_batches_tracked) == 3
    assert main(["table", str(out), "--data", str(small_data), "--scales", "5"]) == 0
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert len(rows) == 5 and all(len(r["scales"]) == 4 for r in rows)
    assert len({r["macs"] for r in rows}) > 1


def test_resizable_aug_switches_to_the_target_configuration_after_two_thirds():
    m = flexres.create_model("resizable_resnet18", num_classes=10, train_resolutions=[64], width_mult=0.25)
    aug = create_method("resizable", resolutions=[64], target_scales=[1.0, 1.0, 1.0, 1.0], finetune_from=2 / 3)
    aug.progress = 0.5
    assert len(aug.sample(m)) == 4
    aug.progress = 0.7
    assert aug.sample(m) == [(1.0, 1.0, 1.0, 1.0)]
    fixed = create_method("resizable", resolutions=[64], sampling="fixed", target_scales=[0.45, 0.65, 0.85, 1.0])
    assert fixed.sample(m) == [(0.45, 0.65, 0.85, 1.0)]


def test_nas_fine_tuning_starts_from_the_trained_weights(tmp_path, small_data):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(
        "model: {name: resizable_resnet18, width_mult: 0.25}\nmethod: {name: resizable, resolutions: [48]}\n"
        "data: {cache: true, num_workers: 0}\n"
        "train: {epochs: 1, batch_size: 4, lr: 0.05, progress: false, eval_every: 0}\n"
    )
    assert main(["train", "--config", str(cfg), "--data", str(small_data), "--out", str(tmp_path / "a")]) == 0
    ft = [
        "train",
        "--config",
        str(cfg),
        "--data",
        str(small_data),
        "--out",
        str(tmp_path / "b"),
        "--set",
        f"init_from={tmp_path / 'a'}",
        "--set",
        "method.kwargs={sampling: fixed, target_scales: [0.45, 0.65, 0.85, 1.0]}",
        "--set",
        "lr=0.0",
    ]
    assert main(ft) == 0
    from safetensors.torch import load_file

    a, b = (
        load_file(str(tmp_path / "a" / "checkpoint.safetensors")),
        load_file(str(tmp_path / "b" / "checkpoint.safetensors")),
    )
    assert torch.equal(a["model.conv1.weight"], b["model.conv1.weight"])  # lr 0: the fine-tune kept the trained weights


def test_adaptive_routing_never_exceeds_the_budget(small_data):
    import itertools

    from flexres.analysis.adapt import adapt_report
    from flexres.data import ImageFolderDataset
    from flexres.methods.adapt import best_config_labels

    assert best_config_labels(
        torch.tensor([[False, True, True], [False, False, False]]), torch.tensor([[0.9, 0.4, 0.6], [0.2, 0.5, 0.1]])
    ).tolist() == [2, 1]
    model = flexres.create_model("resizable_resnet18", num_classes=3, train_resolutions=[48], width_mult=0.25).eval()
    configs = list(itertools.product(L, repeat=4))[::17]
    costs = sorted(count_macs(model, OperatingPoint(48, scales=c)) for c in configs)
    budget = costs[len(costs) // 2]
    train = ImageFolderDataset(small_data / "train")
    val = ImageFolderDataset(small_data / "val")
    rep = adapt_report(model, train, val, 48, configs, budget, epochs=2)
    assert rep["candidates"] == sum(c <= budget for c in costs)
    assert float(rep["chosen_macs"].max()) <= budget and rep["adapt"]["max_macs"] <= budget
    assert rep["nas"]["macs"] <= budget and 0 <= rep["adapt"]["top1"] <= rep["oracle_top1"] <= 100
    with pytest.raises(ValueError, match="no scaling configuration fits"):
        adapt_report(model, train, val, 48, configs, costs[0] - 1)


def test_adapt_from_one_scoring_of_every_configuration_matches_scoring_per_budget(small_data):
    """The benchmark scores every configuration once and reads each budget's candidates from those columns:
    that must give what scoring only the budget's candidates gives."""
    import itertools

    from flexres.analysis.adapt import Candidates, adapt_report, compare_adapt_nas, score_candidates
    from flexres.data import ImageFolderDataset

    torch.manual_seed(0)
    model = flexres.create_model("resizable_resnet18", num_classes=3, train_resolutions=[48], width_mult=0.25).eval()
    configs = list(itertools.product(L, repeat=4))[::29]
    every = Candidates(configs, [count_macs(model, OperatingPoint(48, scales=c)) for c in configs])
    budget = sorted(every.macs)[len(configs) // 2]
    train, val = ImageFolderDataset(small_data / "train"), ImageFolderDataset(small_data / "val")
    tr, va = (score_candidates(model, ds, 48, every) for ds in (train, val))
    sub, cols = every.within(budget)
    assert cols == [i for i, m in enumerate(every.macs) if m <= budget] and sub.scales == [configs[i] for i in cols]
    assert every.probe in cols  # the cheapest configuration fits any budget that anything fits: same probe features
    reused = compare_adapt_nas(sub, tr.subset(cols), va.subset(cols), epochs=2)
    direct = adapt_report(model, train, val, 48, configs, budget, epochs=2)
    assert reused["candidates"] == direct["candidates"] == len(cols)
    assert reused["adapt"] == direct["adapt"] and reused["nas"] == direct["nas"]
    assert torch.equal(reused["chosen_macs"], direct["chosen_macs"])


def test_adapt_cli_reports_and_saves_the_router(tmp_path, small_data, capsys):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(
        "model: {name: resizable_resnet18, width_mult: 0.25}\nmethod: {name: resizable, resolutions: [48]}\n"
        "data: {cache: true, num_workers: 0}\n"
        "train: {epochs: 1, batch_size: 4, lr: 0.05, progress: false, eval_every: 0}\n"
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--data", str(small_data), "--out", str(run)]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "adapt",
                str(run),
                "--data",
                str(small_data),
                "--max-macs",
                "5M",
                "--configs",
                "12",
                "--label-images",
                "8",
                "--epochs",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Resizable-Adapt under 5.0 MMACs" in out and "oracle" in out
    rep = json.loads((run / "adapt.json").read_text())
    assert rep["adapt"]["max_macs"] <= 5e6 and rep["train_images"] == 8
    assert (run / "adapt_router.safetensors").exists()


def test_calibrating_one_configuration_changes_exactly_the_bns_it_runs_through():
    """Scale-aware BNs store calibrated statistics per (resolution, factors up to their stage): calibrating one
    configuration fills exactly the BNs it uses, under its own keys, with the batch statistics of their inputs
    at that configuration; other configurations keep the trained BNs."""
    from flexres.nn import calibrate_bn
    from flexres.nn.stage_resize import factor_key

    torch.manual_seed(0)
    m = flexres.create_model("resizable_resnet18", num_classes=10, train_resolutions=[96], width_mult=0.25).eval()
    for bn in m.switchable_bns():  # trained statistics that differ from what calibration will find
        for sub in bn.bns:
            sub.running_mean.uniform_(-1, 1)
            sub.running_var.uniform_(0.5, 2)
    trained = {k: v.clone() for k, v in m.state_dict().items()}
    x, other_x = torch.randn(8, 3, 96, 96), torch.randn(2, 3, 96, 96)
    config = OperatingPoint(96, scales=(0.45, 0.65, 0.85, 1.0))
    shares_two = OperatingPoint(96, scales=(0.45, 0.65, 1.0, 1.0))  # same first two stages, then differs
    with torch.no_grad(), m.at(shares_two, bn_policy="calibrate"):
        before_shared = m(other_x)
    calibrate_bn(m, iter([x]), config, 8)
    # Exactly one new entry per BN, under the configuration's key; the trained BNs are untouched.
    for bn in m.switchable_bns():
        expect = 96 if bn.scale_stage is None else (96, config.scales[: bn.scale_stage + 1])
        assert list(bn.calibrated) == [expect]
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, trained[k], msg=k)
    assert m.is_calibrated(config) and not m.is_calibrated(shares_two)
    # Served under calibrate: each BN with the affine parameters of its stage's factor and the statistics of its
    # input in a train-mode forward at this configuration.
    inputs = {}
    hooks = [
        bn.register_forward_pre_hook(lambda mod, a: inputs.setdefault(mod, a[0].detach())) for bn in m.switchable_bns()
    ]
    m.train()
    with torch.no_grad(), m.at(config, bn_policy="nearest"):
        for bn in m.switchable_bns():
            bn.begin_calibration(bn.calibration_key(m.resolve(config)))
        m(x)
        for bn in m.switchable_bns():
            bn.abort_calibration()
    m.eval()
    for h in hooks:
        h.remove()
    m.set_operating_point(config, bn_policy="calibrate")
    for bn in m.switchable_bns():
        w, _, mean, var = bn.selected_parameters()
        trained_key = 96 if bn.scale_stage is None else factor_key(config.scales[bn.scale_stage])
        assert w is bn.bns[bn.resolutions.index(trained_key)].weight
        torch.testing.assert_close(mean, inputs[bn].mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(var, inputs[bn].var((0, 2, 3)), rtol=1e-4, atol=1e-5)
    # A configuration sharing the first two stages reuses their calibrated statistics (same input to those BNs);
    # from its third stage on it runs on the trained BNs, and its output changed because its early stages did.
    m.set_operating_point(shares_two, bn_policy="calibrate")
    kinds = {bn.scale_stage: bn._choice.kind for bn in m.switchable_bns()}
    assert kinds == {None: "calibrated", 0: "calibrated", 1: "calibrated", 2: "trained", 3: "trained"}
    with torch.no_grad():
        assert not torch.allclose(m(other_x), before_shared)
    # Calibrated keys survive the sidecar's string form.
    for bn in m.switchable_bns():
        for key in bn.calibrated:
            assert bn.key_from_str(bn.key_to_str(key)) == key


@pytest.mark.parametrize("name", ["resizable_resnet18", "resizable_mobilenet_v2", "resizable_shufflenet_v2"])
def test_prefix_tree_gives_every_configuration_exactly_what_its_own_forward_gives(name):
    """Evaluating configurations as a prefix tree (shared stages once, branches batched) changes no output."""
    from flexres.models.config_tree import forward_configurations, stage_segments
    from tests.conftest import distinct_bn_statistics

    kw = {"dropout": 0.0} if "mobilenet" in name else {}
    model = flexres.create_model(name, num_classes=5, train_resolutions=[96], width_mult=0.25, **kw)
    distinct_bn_statistics(model)
    assert len(stage_segments(model)) == model.num_stages + 1
    g = torch.Generator().manual_seed(0)
    configs = random_configurations(L, model.num_stages, 12, g) + [(0.55,) * model.num_stages]  # 0.55: interpolated BNs
    x = torch.randn(3, 3, 96, 96)
    before = model.operating_point
    got = forward_configurations(model, x, 96, configs)
    assert model.operating_point == before
    for sc in configs:
        with model.at(OperatingPoint(96, scales=sc)):
            torch.testing.assert_close(got[tuple(sc)], model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="calibrated per configuration"):
        forward_configurations(model, x, 96, configs, bn_policy="calibrate")


def test_table_as_a_tree_equals_the_table_one_by_one(tmp_path, small_data):
    cfg = {
        "model": {"name": "resizable_resnet18", "width_mult": 0.25},
        "method": {"name": "resizable", "resolutions": [64]},
        "data": {"root": str(small_data), "cache": True, "num_workers": 0},
        "train": {"epochs": 1, "batch_size": 6, "progress": False, "eval_every": 0},
    }
    flexres.train(cfg, tmp_path / "run", log=lambda s: None)
    tree = flexres.table(tmp_path / "run", small_data, scales="12", write=False)
    flat = flexres.table(tmp_path / "run", small_data, scales="12", write=False, tree=False)
    assert len(tree) == 12 and tree == flat


def test_prefix_tree_batch_counts_every_branch_against_memory(monkeypatch):
    import importlib

    ev = importlib.import_module(
        "flexres.engine.evaluate"
    )  # the module (flexres.engine.evaluate is also a function's name)

    model = flexres.create_model("resizable_resnet18", num_classes=5, train_resolutions=[64], width_mult=0.25).eval()
    configs = [tuple(c) for c in random_configurations(L, 4, 40, torch.Generator().manual_seed(0))]
    branches = max(sum(c[-1] == f for c in configs) for f in L)
    asked = {}

    def fit(model, op, requested, device, **kw):
        asked["requested"] = requested
        return 3 * branches + 1  # room for three trees of images, not four

    monkeypatch.setattr(ev, "fit_batch_size", fit)
    assert ev.tree_batch_size(model, 64, configs, 64, torch.device("cpu")) == 3
    assert asked["requested"] == 64 * branches
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        from flexres.models.config_tree import forward_configurations

        forward_configurations(model, torch.randn(1, 3, 64, 64), 64, configs)
