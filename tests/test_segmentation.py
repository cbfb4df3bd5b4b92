"""Resolution-switchable segmentation (RS-Nets App. B) on the bundled CamVid sample: labels never interpolated, void
ignored by every loss and metric, mIoU against a hand-computed confusion matrix, logits resized to the largest
training resolution before MRED, and a switch that selects the right BNs in encoder and decoder."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

import flexres
from flexres.data import sample_segmentation_dir
from flexres.data.segmentation import JointMultiResolutionCrop, SegmentationDataset, SegmentationEvalTransform, colorize
from flexres.engine.evaluate import confusion_matrix, segmentation_scores
from flexres.methods import create_method
from flexres.nn import SwitchableBatchNorm2d

VOID = 11


@pytest.fixture(scope="module")
def train_split():
    return SegmentationDataset(sample_segmentation_dir() / "train", cache=True)


def test_classes_and_void_come_from_classes_tsv(train_split):
    info = train_split.info
    assert (
        info.ignore_index == VOID
        and len(info.names) == 11
        and info.names[0] == "sky"
        and info.colors[3] == (128, 64, 128)
    )


def test_joint_crop_never_interpolates_labels(train_split):
    torch.manual_seed(0)
    crop = JointMultiResolutionCrop([64, 48, 32], scale=(0.3, 1.0))
    for i in range(len(train_split)):
        img, lab = train_split._cache[i]
        allowed = set(lab.unique().tolist())
        for _ in range(10):
            inputs, label = crop(img, lab)
            assert [tuple(x.shape) for x in inputs] == [(3, 64, 64), (3, 48, 48), (3, 32, 32)] and label.shape == (
                64,
                64,
            )
            assert set(label.unique().tolist()) <= allowed <= set(range(12))  # only values the label map had: no blends


def test_flip_and_crop_are_the_same_for_image_and_label():
    img = torch.zeros(3, 40, 60, dtype=torch.uint8)
    img[:, :, :30] = 255  # left half white; the label says class 1 there, class 2 on the right
    lab = torch.full((1, 40, 60), 2, dtype=torch.uint8)
    lab[:, :, :30] = 1
    torch.manual_seed(1)
    crop = JointMultiResolutionCrop([40], scale=(1.0, 1.0))
    for _ in range(20):
        (x,), y = crop(img, lab)
        assert torch.equal(x[0] > 127, y == 1) and bool((y == 1).any()) and bool((y == 2).any())


def test_eval_transform_keeps_the_aspect_with_the_short_side_at_the_resolution(train_split):
    img, lab = train_split._cache[0]
    x, y = SegmentationEvalTransform(48)(img, lab)
    assert tuple(x.shape) == (3, 48, 64) and tuple(y.shape) == (360, 480)


def test_miou_against_a_hand_computed_confusion_matrix():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, VOID, VOID]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    conf = confusion_matrix(pred, labels, 3, VOID)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # void pixels left out whatever was predicted there
    s = segmentation_scores(conf, ["a", "b", "c"])
    # IoU: a 1/(2+2-1) = 1/3, b 2/(2+3-2) = 2/3, c 1/(2+1-1) = 1/2; accuracy: a 1/2, b 1, c 1/2
    assert s["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert s["pixel_acc"] == pytest.approx(100 * 4 / 6) and s["mean_acc"] == pytest.approx(100 * (0.5 + 1 + 0.5) / 3)
    assert s["per_class_iou"] == {"a": 33.33, "b": 66.67, "c": 50.0}


def test_void_pixels_change_no_loss():
    torch.manual_seed(2)
    method = create_method("rsnet", resolutions=[32, 16])
    method.ignore_index = VOID
    labels = torch.randint(0, 5, (2, 32, 32))
    labels[:, :8] = VOID
    logits = [torch.randn(2, 5, 32, 32), torch.randn(2, 5, 16, 16)]
    terms = method.mred_losses(method.align(logits, labels), labels)
    changed = [z.clone() for z in logits]
    changed[0][:, :, :8] = 100 * torch.randn(2, 5, 8, 32)  # anything at void pixels (rows 0-7 of the 32 px map)
    changed[1][:, :, :3] = 100 * torch.randn(2, 5, 3, 16)  # rows 0-2 of the 16 px map upsample only into rows 0-7
    again = method.mred_losses(method.align(changed, labels), labels)
    for k in ("cls", "ens", "dis"):
        assert torch.allclose(terms[k], again[k], atol=1e-5), k


def test_logits_are_resized_to_the_largest_resolution_before_the_losses_and_mred():
    torch.manual_seed(3)
    method = create_method("rsnet", resolutions=[32, 16], mred="vanilla")
    method.ignore_index = VOID
    labels = torch.randint(0, 4, (2, 32, 32))
    small = torch.randn(2, 4, 8, 8)  # a 16 px input's logits at stride 2... any size: they meet the labels at 32 x 32
    big = torch.randn(2, 4, 16, 16)
    aligned = method.align([big, small], labels)
    assert all(z.shape[-2:] == (32, 32) for z in aligned)
    up = [F.interpolate(z, size=(32, 32), mode="bilinear", align_corners=False) for z in (big, small)]
    terms = method.mred_losses(aligned, labels)
    cls = sum(F.cross_entropy(z, labels) for z in up)
    z0 = method.alpha[0] * up[0] + method.alpha[1] * up[1]
    kl = sum((F.softmax(z0, 1) * (F.log_softmax(z0, 1) - F.log_softmax(z, 1))).sum(1).mean() for z in up)
    assert torch.allclose(terms["cls"], cls, atol=1e-5) and torch.allclose(
        terms["ens"], F.cross_entropy(z0, labels), atol=1e-5
    )
    assert torch.allclose(terms["dis"], kl, atol=1e-5)


def test_switch_selects_the_right_bns_in_encoder_and_decoder():
    model = flexres.create_model("seg_resnet18", num_classes=11, train_resolutions=[64, 48], width_mult=0.25).eval()
    bns = dict((n, m) for n, m in model.named_modules() if isinstance(m, SwitchableBatchNorm2d))
    assert any(n.startswith("layer") for n in bns) and any(n.startswith(("laterals", "fuse")) for n in bns)
    x48 = torch.randn(1, 3, 48, 64)
    x64 = torch.randn(1, 3, 64, 85)
    model.set_operating_point(48)
    assert all(m._choice.index == 1 for m in bns.values())
    before48 = model(x48)
    model.set_operating_point(64)
    before64 = model(x64)
    with torch.no_grad():  # the decoder's BN of 48 px only: 48 px outputs change, 64 px ones do not
        model.fuse[1].bns[1].bias.add_(1.0)
    model.set_operating_point(48)
    assert not torch.allclose(model(x48), before48)
    model.set_operating_point(64)
    assert torch.equal(model(x64), before64)
    with pytest.raises(ValueError, match="short side"):
        model(x48)


def test_train_evaluate_and_reload_a_segmentation_rsnet(tmp_path):
    data = tmp_path / "camvid"
    shutil.copytree(sample_segmentation_dir(), data)
    cfg = {
        "model": {"name": "seg_resnet18", "width_mult": 0.25},
        "method": {"name": "rsnet", "resolutions": [64, 48]},
        "data": {"root": str(data), "task": "segmentation", "cache": True, "num_workers": 0},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.05, "progress": False, "eval_every": 1},
    }
    metrics = flexres.train(cfg, tmp_path / "run", log=lambda s: None)
    assert set(metrics["val_miou"]) == {"64", "48"} and metrics["task"] == "segmentation"  # metrics named as they are
    assert "val_top1" not in metrics and "train_top1" not in metrics
    assert all(0 <= v <= 100 for v in metrics["train_pixel_accuracy"].values())  # pixel accuracy, per image
    rep = flexres.evaluate(tmp_path / "run", data, [64, 56, 48])
    res = rep["runs"]["run"]["results"]
    assert set(res) == {"64", "56", "48"} and res["48"]["macs"] < res["64"]["macs"]
    assert res["64"]["miou"] == metrics["val_miou"]["64"]  # the trainer's validation is this evaluation
    assert "mean IoU %" in flexres.format_eval_report(rep)
    cal = flexres.evaluate(tmp_path / "run", data, [56], "calibrate")["runs"]["run"]["results"]["56"]
    assert "calibrat" in cal["bn"] and (tmp_path / "run" / "bn_calibration.safetensors").is_file()
    model, meta = flexres.load_checkpoint(tmp_path / "run")
    assert meta["task"] == "segmentation" and meta["ignore_index"] == VOID and len(meta["class_colors"]) == 11
    with pytest.raises(flexres.engine.config.ConfigError, match="segmentation has individual, parallel and rsnet"):
        flexres.train({**cfg, "method": {"name": "san", "resolutions": [64, 48]}}, tmp_path / "bad", log=lambda s: None)


def test_colorize_uses_the_class_colours(train_split):
    info = train_split.info
    mask = colorize(torch.tensor([[0, 3], [VOID, 8]]), info.colors, info.ignore_index)
    assert (
        mask[:, 0, 1].tolist() == [128, 64, 128]
        and mask[:, 1, 0].tolist() == [0, 0, 0]
        and mask[:, 1, 1].tolist() == [64, 0, 128]
    )


def test_predict_writes_mask_and_overlay_and_export_matches(tmp_path):
    from PIL import Image

    data = sample_segmentation_dir()
    cfg = {
        "model": {"name": "seg_resnet18", "width_mult": 0.25},
        "method": {"name": "individual", "resolutions": [48]},
        "data": {"root": str(data), "task": "segmentation", "cache": True, "num_workers": 0},
        "train": {"epochs": 1, "batch_size": 4, "lr": 0.05, "progress": False, "eval_every": 0},
    }
    flexres.train(cfg, tmp_path / "run", log=lambda s: None)
    image = sorted((data / "val" / "images").iterdir())[0]
    out = flexres.predict(tmp_path / "run", [image, tmp_path / "missing.jpg"], resolution=48, out=tmp_path / "pred")
    first, missing = out["predictions"]
    assert "no such file" in missing["error"]
    mask = Image.open(first["mask"])
    assert mask.size == Image.open(image).size == Image.open(first["overlay"]).size  # back at the image's own size
    model, meta = flexres.load_checkpoint(tmp_path / "run")
    palette = {tuple(c) for c in meta["class_colors"]}
    assert {tuple(c) for _, c in mask.convert("RGB").getcolors(100_000)} <= palette
    assert sum(first["classes"].values()) == pytest.approx(100, abs=0.1)
    info = flexres.export(tmp_path / "run", 48, out=tmp_path / "seg48.onnx", data=data / "val")
    assert info["parity_max_abs_diff"] < 1e-4


def test_report_shows_miou_and_the_example_at_every_resolution(tmp_path):
    data = sample_segmentation_dir()
    cfg = {
        "model": {"name": "seg_resnet18", "width_mult": 0.25},
        "method": {"name": "parallel", "resolutions": [48, 32]},
        "data": {"root": str(data), "task": "segmentation", "cache": True, "num_workers": 0},
        "train": {"epochs": 1, "batch_size": 4, "lr": 0.05, "progress": False, "eval_every": 0},
    }
    flexres.train(cfg, tmp_path / "run", log=lambda s: None)
    index = flexres.report(tmp_path / "run", data, tmp_path / "report", [48, 40, 32])
    page = index.read_text()
    assert (
        "mean IoU (%)" in page
        and "segmentation_run.png" in page
        and (tmp_path / "report" / "segmentation_run.png").stat().st_size > 0
    )


def test_a_segmenter_starts_from_a_classification_rsnets_backbone(tmp_path, small_data):
    """RS-Nets App. B segments from a pretrained backbone: the encoder takes every backbone tensor of a classification
    RS-Net (each of the segmenter's resolutions the BN of the classifier's nearest one), the decoder stays fresh, the
    classifier's fc is listed unused, and the segmenter then trains."""
    from flexres.engine.checkpoint import load_backbone

    flexres.train(
        {
            "model": {"name": "resnet18", "width_mult": 0.25},
            "method": {"name": "rsnet", "resolutions": [64, 48]},
            "data": {"root": str(small_data), "cache": True, "num_workers": 0},
            "train": {"epochs": 1, "batch_size": 6, "lr": 0.05, "progress": False, "eval_every": 0},
        },
        tmp_path / "cls",
        log=lambda s: None,
    )
    classifier, _ = flexres.load_checkpoint(tmp_path / "cls")
    seg = flexres.create_model("seg_resnet18", num_classes=11, train_resolutions=[80, 56, 40], width_mult=0.25)
    decoder_before = {
        k: v.clone() for k, v in seg.state_dict().items() if k.startswith(("laterals", "fuse", "classifier"))
    }
    got = load_backbone(seg, tmp_path / "cls")
    assert got["fresh"] == ["classifier", "fuse", "laterals"] and got["unused"] == ["fc.bias", "fc.weight"]
    src, dst = classifier.state_dict(), seg.state_dict()
    assert torch.equal(dst["stem_conv.weight"], src["conv1.weight"])
    assert torch.equal(dst["layer3.1.conv2.weight"], src["layer3.1.conv2.weight"])
    for i, nearest in ((0, 0), (1, 0), (2, 1)):  # 80 -> 64 px BN; 56, a tie, -> the larger, 64; 40 -> 48
        assert torch.equal(dst[f"layer2.0.bn1.bns.{i}.running_mean"], src[f"layer2.0.bn1.bns.{nearest}.running_mean"])
        assert torch.equal(dst[f"stem_bn.bns.{i}.weight"], src[f"bn1.bns.{nearest}.weight"])
    assert all(torch.equal(dst[k], v) for k, v in decoder_before.items())
    data = tmp_path / "camvid"
    shutil.copytree(sample_segmentation_dir(), data)
    metrics = flexres.train(
        {
            "model": {"name": "seg_resnet18", "width_mult": 0.25, "backbone_from": str(tmp_path / "cls")},
            "method": {"name": "rsnet", "resolutions": [64, 48]},
            "data": {"root": str(data), "task": "segmentation", "cache": True, "num_workers": 0},
            "train": {"epochs": 1, "batch_size": 4, "lr": 0.05, "progress": False, "eval_every": 0},
        },
        tmp_path / "seg",
        log=lambda s: None,
    )
    assert set(metrics["train_pixel_accuracy"]) == {"64", "48"}


def test_a_resnet_weights_file_initialises_the_backbone_and_a_reshaped_key_is_named(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    from flexres.engine.checkpoint import load_backbone
    from flexres.errors import CheckpointMismatchError

    weights = resnet18().state_dict()  # torchvision's layout (timm's resnet18 has the same names)
    save_file(weights, str(tmp_path / "r18.safetensors"))
    seg = flexres.create_model("seg_resnet18", num_classes=11, train_resolutions=[64, 48])
    got = load_backbone(seg, tmp_path / "r18.safetensors")
    assert got["unused"] == ["fc.bias", "fc.weight"] and got["loaded"] > 100
    assert torch.equal(
        seg.state_dict()["layer4.1.bn2.bns.1.weight"], weights["layer4.1.bn2.weight"]
    )  # one BN, every resolution
    weights["layer2.0.downsample.0.weight"] = weights["layer2.0.downsample.0.weight"][:, :32].contiguous()
    save_file(weights, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"layer2\.0\.downsample\.0\.weight: source \(128, 32, 1, 1\)"):
        load_backbone(seg, tmp_path / "bad.safetensors")
