"""A new kind of adaptive layer, defined only here, goes through flexres end to end: the model family takes it as its
``norm_layer``, and switching, training, evaluation, ONNX export and MAC / parameter counting work through the
flexres.nn.adaptive interface, with no change in flexres.models or flexres.deploy."""

import shutil

import pytest
import torch
from torch import nn

import flexres
from flexres.analysis import count_macs, count_params
from flexres.data import sample_data_dir
from flexres.engine.checkpoint import load_checkpoint
from flexres.models import register_model
from flexres.models.resnet import BasicBlock, ResNet
from flexres.nn.adaptive import AdaptiveLayer, PointSetting


class ResolutionGainNorm(nn.BatchNorm2d, AdaptiveLayer):
    """A BN whose output is scaled by a learnt gain of the nearest trained resolution: y = g_r * BN(x)."""

    def __init__(self, num_features: int, resolutions: tuple[int, ...]) -> None:
        super().__init__(num_features)
        self.resolutions = tuple(resolutions)
        self.gains = nn.Parameter(torch.ones(len(self.resolutions)))
        self.active = 0

    def apply_point(self, setting: PointSetting) -> bool:
        r = setting.op.resolution
        self.active = min(range(len(self.resolutions)), key=lambda i: abs(self.resolutions[i] - r))
        return False

    def forward(self, x):
        return self.gains[self.active] * super().forward(x)

    @torch.no_grad()
    def to_static(self) -> nn.Module:
        bn = nn.BatchNorm2d(self.num_features, eps=self.eps).to(self.weight)
        bn.load_state_dict({k: v for k, v in self.state_dict().items() if k != "gains"})
        bn.weight.mul_(self.gains[self.active])  # g * (w * xhat + b) is a BN with weight g*w and bias g*b
        bn.bias.mul_(self.gains[self.active])
        return bn.eval()


@register_model
def gain_resnet18(train_resolutions=(224,), **kwargs) -> ResNet:
    return ResNet(
        BasicBlock,
        [2, 2, 2, 2],
        train_resolutions=train_resolutions,
        norm_layer=lambda c: ResolutionGainNorm(c, tuple(train_resolutions)),
        **kwargs,
    )


@pytest.fixture(scope="module")
def gain_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gain")
    data = root / "data"
    shutil.copytree(sample_data_dir(), data)
    flexres.train(
        {
            "model": {"name": "gain_resnet18", "width_mult": 0.25},
            "method": {"name": "rsnet", "resolutions": [64, 48]},
            "data": {"root": str(data), "cache": True, "num_workers": 0},
            "train": {"epochs": 1, "batch_size": 25, "lr": 0.05, "progress": False, "eval_every": 0},
        },
        root / "run",
        log=lambda s: None,
    )
    return root / "run", data


def test_switching_reaches_the_new_layer_and_training_moves_each_resolutions_gain(gain_run):
    model, _ = load_checkpoint(gain_run[0])
    layers = [m for m in model.modules() if isinstance(m, ResolutionGainNorm)]
    assert len(layers) == 20  # every BN of the ResNet-18
    for r, want in ((64, 0), (48, 1), (40, 1), (70, 0)):
        model.set_operating_point(r)
        assert {m.active for m in layers} == {want}
    gains = torch.stack([m.gains.detach() for m in layers])
    assert not torch.allclose(gains, torch.ones_like(gains))  # trained: the gains left their initial 1
    assert not torch.allclose(gains[:, 0], gains[:, 1])  # and apart per resolution


def test_evaluation_export_and_counting_go_through_the_interface(gain_run, tmp_path):
    run, data = gain_run
    report = flexres.evaluate(run, data, resolutions=[64, 48])
    results = next(iter(report["runs"].values()))["results"]
    assert set(results) == {"64", "48"} and all(0 <= v["top1"] <= 100 for v in results.values())
    info = flexres.export(run, 48, out=tmp_path / "g48.onnx", data=data)  # parity-checked against the adaptive model
    assert info["parity_max_abs_diff"] < 1e-3
    model, _ = load_checkpoint(run)
    plain = flexres.create_model("resnet18", num_classes=10, train_resolutions=[48], width_mult=0.25)
    assert count_macs(model, 48) == count_macs(plain, 48)  # a gain costs no MACs the counter sees (BN, elementwise)
    assert count_params(model, 48) == count_params(plain, 48)  # deployed: a plain BN, the gains folded in
