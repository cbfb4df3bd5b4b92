"""Any CNN made switchable (make_switchable, timm:<name>, torchvision:<name>): the converted model computes what the
original computed at every training resolution, trains with the resolution recipes, rebuilds from its checkpoint,
starts from a local pretrained file, and refuses what it cannot convert, naming it."""

from __future__ import annotations

import re
import shutil

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import flexres
from flexres.models import ConvertedModel, create_model, make_switchable
from flexres.nn import MetaConv2d

ARCHS = [
    "timm:resnet18",
    "timm:efficientnet_b0",
    "timm:mobilenetv3_small_050",
    "timm:regnetx_002",
    "torchvision:resnet50",
    "torchvision:mobilenet_v3_small",
]
RESOLUTIONS = [64, 48]


def original(qualified: str, num_classes: int = 10) -> nn.Module:
    source, _, name = qualified.partition(":")
    torch.manual_seed(0)
    build = timm.create_model if source == "timm" else torchvision.models.get_model
    net = build(name, num_classes=num_classes)
    with (
        torch.no_grad()
    ):  # statistics and affine parameters unlike a fresh BN, so copying them is what makes outputs equal
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_model_equals_the_original_at_every_training_resolution(arch):
    net = original(arch)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    model = make_switchable(net, RESOLUTIONS).eval()
    assert len(model.switchable_bns()) == bns and all(len(bn.bns) == 2 for bn in model.switchable_bns())
    inner = {id(b) for sw in model.switchable_bns() for b in sw.bns}  # every BN now lives inside a switchable one
    assert all(id(m) in inner for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    for r in RESOLUTIONS:
        x = torch.randn(2, 3, r, r)
        with torch.no_grad():
            model.set_operating_point(r)
            assert float((model(x) - net(x)).abs().max()) < 1e-5


def test_san_conversion_keeps_the_pretrained_weights_at_every_eps():
    net = original("timm:resnet18")
    model = make_switchable(net, RESOLUTIONS, san=True).eval()
    convs = [m for m in model.modules() if isinstance(m, MetaConv2d)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in net.modules()) and all(
        float(c.A.detach().abs().max()) == 0 for c in convs
    )
    for r in (64, 56, 48):  # 56: eps between the trained ones, W(eps) = B still
        x = torch.randn(2, 3, r, r)
        with torch.no_grad():
            model.set_operating_point(r, bn_policy="nearest")
            assert model.meta_convs()[0].eps == pytest.approx(r / 64)
            if r in RESOLUTIONS:
                assert float((model(x) - net(x)).abs().max()) < 1e-5


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.norm(self.bn(self.conv(x)).relu()))


def test_per_image_norms_are_refused_by_name_or_kept_shared():
    with pytest.raises(
        ValueError, match=r"^norm \(GroupNorm\) normalises each image by its own statistics.*other_norms='share'"
    ):
        make_switchable(WithLayerNorm(), RESOLUTIONS)
    net = WithLayerNorm().eval()
    model = make_switchable(net, RESOLUTIONS, other_norms="share").eval()
    assert model.shared_norms == ["norm", "head.2"] and len(model.switchable_bns()) == 1
    x = torch.randn(2, 3, 48, 48)
    model.set_operating_point(48)
    with torch.no_grad():
        assert float((model(x) - net(x)).abs().max()) < 1e-6


def test_norms_that_cannot_switch_are_refused_by_name():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"^4 \(BatchNorm1d\) is a normalisation flexres cannot make switchable"):
        make_switchable(net, RESOLUTIONS)
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), torchvision.ops.FrozenBatchNorm2d(4))
    with pytest.raises(ValueError, match=r"^1 \(FrozenBatchNorm2d\)"):
        make_switchable(frozen, RESOLUTIONS)
    with pytest.raises(ValueError, match=r"^1 \(FrozenBatchNorm2d\) is a frozen BatchNorm"):
        make_switchable(frozen, RESOLUTIONS)
    with pytest.raises(ValueError, match="has no BatchNorm: there is nothing to switch"):
        make_switchable(nn.Sequential(nn.Conv2d(3, 4, 3)), RESOLUTIONS)
    # a BN-free model with a per-image norm: the same one message, not the other_norms suggestion that then fails
    with pytest.raises(ValueError, match="has no BatchNorm: there is nothing to switch"):
        make_switchable(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), RESOLUTIONS)
    with pytest.raises(ValueError, match=r"^0 .*has a bias"):
        make_switchable(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), RESOLUTIONS, san=True)


def test_a_partly_frozen_timm_model_is_refused_by_name():
    net = timm.create_model("mobilenetv3_small_050", num_classes=10)
    net.blocks[1] = timm.layers.freeze_batch_norm_2d(
        net.blocks[1]
    )  # timm's way: BatchNormAct2d -> FrozenBatchNormAct2d
    frozen = [n for n, m in net.named_modules() if type(m).__name__ == "FrozenBatchNormAct2d"]
    assert frozen and frozen[0].startswith("blocks.1.")
    with pytest.raises(ValueError, match=rf"^{re.escape(frozen[0])} \(FrozenBatchNormAct2d\) is a frozen BatchNorm"):
        make_switchable(net, RESOLUTIONS)


class SharedBN(nn.Module):
    """One BN module applied after two convolutions (its statistics and parameters are one set)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, momentum=None)
        self.block = nn.Sequential(self.conv2, self.bn)  # the same BN again, under another name

    def forward(self, x):
        return self.block(self.bn(self.conv1(x))).mean((2, 3))


def test_one_bn_used_twice_stays_one_and_momentum_none_is_kept():
    model = make_switchable(SharedBN(), RESOLUTIONS)
    assert model.net.bn is model.net.block[1]  # still one module: a step at either place updates the same statistics
    assert len(model.switchable_bns()) == 1
    assert all(bn.momentum is None for bn in model.net.bn.bns)  # a cumulative average stays one, not 0.1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("converted") / "data"
    shutil.copytree(flexres.sample_data_dir(), root)
    return root


def train_cfg(arch: str, data, **model) -> dict:
    return {
        "model": {"name": arch, **model},
        "method": {"name": "rsnet", "resolutions": RESOLUTIONS, "kwargs": {"mred": "full"}},
        "data": {"root": str(data), "cache": True, "num_workers": 0},
        "train": {"epochs": 1, "batch_size": 100, "lr": 0.01, "progress": False, "eval_every": 0, "warmup_epochs": 0},
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_one_rsnet_step_trains_each_resolution_own_bn(arch, data, tmp_path):
    metrics = flexres.train(train_cfg(arch, data), tmp_path / "run", log=lambda s: None)
    assert metrics["epoch"] == 1 and torch.isfinite(torch.tensor(metrics["loss"]))
    model, meta = flexres.load_checkpoint(tmp_path / "run")
    assert isinstance(model, ConvertedModel) and meta["arch"]["name"] == arch
    bn = model.switchable_bns()[0]  # one step saw a 64 px and a 48 px batch: the two statistics moved apart
    assert not torch.equal(bn.bns[0].running_mean, bn.bns[1].running_mean)
    assert not torch.equal(bn.bns[0].running_mean, torch.zeros_like(bn.bns[0].running_mean))


def test_frozen_bn_statistics_stay_while_the_affine_parameters_train(data, tmp_path):
    cfg = train_cfg("timm:mobilenetv3_small_050", data)
    cfg["train"]["bn_stats"] = "frozen"
    flexres.train(cfg, tmp_path / "run", log=lambda s: None)
    model, _ = flexres.load_checkpoint(tmp_path / "run")
    bns = [b for sw in model.switchable_bns() for b in sw.bns]
    assert all(
        torch.equal(b.running_mean, torch.zeros_like(b.running_mean)) for b in bns
    )  # a fresh BN's, never updated
    assert all(torch.equal(b.running_var, torch.ones_like(b.running_var)) for b in bns)
    assert any(not torch.equal(b.weight, torch.ones_like(b.weight)) for b in bns)  # gamma trained
    cfg["train"]["bn_stats"] = "sometimes"
    with pytest.raises(ValueError, match="train.bn_stats must be one of update, frozen, got 'sometimes'"):
        flexres.train(cfg, tmp_path / "run2", log=lambda s: None)


@pytest.mark.slow
def test_checkpoint_rebuilds_the_same_model_and_it_exports(data, tmp_path):
    arch = "timm:mobilenetv3_small_050"
    flexres.train(train_cfg(arch, data), tmp_path / "run", log=lambda s: None)
    a, meta = flexres.load_checkpoint(tmp_path / "run")
    b, _ = flexres.load_checkpoint(tmp_path / "run")
    assert meta["crop_fraction"] == timm.create_model("mobilenetv3_small_050").pretrained_cfg["crop_pct"]
    assert (
        meta["interpolation"] == timm.create_model("mobilenetv3_small_050").pretrained_cfg["interpolation"]
    )  # bicubic
    x = torch.randn(3, 3, 48, 48)
    a.eval().set_operating_point(48)
    b.eval().set_operating_point(48)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    info = flexres.export(
        tmp_path / "run", 48, out=tmp_path / "m48.onnx", data=data
    )  # checks parity on real images itself
    assert info["parity_max_abs_diff"] < 1e-4
    pred = flexres.predict(tmp_path / "m48.onnx", sorted((data / "val").rglob("*.JPEG"))[:2])
    assert all(len(p["top"]) == 5 for p in pred["predictions"])


@pytest.mark.parametrize("arch", ["timm:resnet18", "torchvision:resnet18"])
def test_pretrained_weights_from_a_local_safetensors_file(arch, data, tmp_path):
    source, _, name = arch.partition(":")
    lib = timm.create_model if source == "timm" else torchvision.models.get_model

    def build(n):
        return lib(name, num_classes=n)

    torch.manual_seed(1)
    imagenet = build(1000).state_dict()
    imagenet["bn1.running_var"] = torch.rand_like(imagenet["bn1.running_var"]) + 0.5  # unlike a fresh BN's ones
    save_file({k: v.contiguous() for k, v in imagenet.items()}, str(tmp_path / "in1k.safetensors"))
    model = create_model(
        arch, num_classes=10, train_resolutions=RESOLUTIONS, pretrained=str(tmp_path / "in1k.safetensors")
    )
    state = model.net.state_dict()
    assert torch.equal(state["conv1.weight"], imagenet["conv1.weight"])
    assert torch.equal(state["bn1.bns.1.running_var"], imagenet["bn1.running_var"])
    assert state["fc.weight"].shape == (10, 512)  # 1000 ImageNet classes: the classifier starts afresh
    own = build(10).state_dict()  # a file fine-tuned on 10 classes keeps its classifier
    save_file({k: v.contiguous() for k, v in own.items()}, str(tmp_path / "mine.safetensors"))
    mine = create_model(
        arch, num_classes=10, train_resolutions=RESOLUTIONS, pretrained=str(tmp_path / "mine.safetensors")
    )
    assert torch.equal(mine.net.state_dict()["fc.weight"], own["fc.weight"])
    assert "pretrained" not in mine.arch["kwargs"]  # the checkpoint holds the weights: rebuilding needs no file
    (tmp_path / "x.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"x\.pth cannot be read as tensors only"):
        create_model(arch, num_classes=10, train_resolutions=RESOLUTIONS, pretrained=str(tmp_path / "x.pth"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        create_model(
            arch, num_classes=10, train_resolutions=RESOLUTIONS, pretrained=str(tmp_path / "missing.safetensors")
        )


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model source 'keras'"):
        create_model("keras:resnet", num_classes=10, train_resolutions=RESOLUTIONS)
    with pytest.raises(ValueError, match="width_mult applies to flexres's own families"):
        create_model("timm:resnet18", num_classes=10, train_resolutions=RESOLUTIONS, width_mult=0.5)
    with pytest.raises(ValueError, match="use train.init_from"):
        create_model("resnet18", num_classes=10, train_resolutions=RESOLUTIONS, pretrained=True)


def test_init_from_a_single_resolution_run_starts_every_bn_from_its_bn(data, tmp_path):
    cfg = train_cfg("resnet18", data, width_mult=0.25)
    cfg["method"] = {"name": "individual", "resolutions": [64]}
    flexres.train(cfg, tmp_path / "inet", log=lambda s: None)
    inet, _ = flexres.load_checkpoint(tmp_path / "inet")
    rsnet = create_model("resnet18", num_classes=10, train_resolutions=[64, 56, 48], width_mult=0.25).eval()
    flexres.engine.checkpoint.load_into(rsnet, tmp_path / "inet")
    for r in (64, 56, 48):  # every resolution's BN is the I-Net's one BN, so all compute what the I-Net computes
        x = torch.randn(2, 3, r, r)
        inet.set_operating_point(r, bn_policy="nearest")
        rsnet.set_operating_point(r)
        with torch.no_grad():
            assert float((rsnet(x) - inet(x)).abs().max()) < 1e-5
