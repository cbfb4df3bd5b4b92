"""Export one operating point as a static model: plain Conv2d / BatchNorm2d / Linear, BN folded by default."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse

from .. import __version__
from ..analysis import count_macs, count_params
from ..data import EvalTransform, ImageFolderDataset, load_rgb, normalize_batch
from ..models import AdaptiveModel
from ..nn.meta_conv import MetaConv2d
from ..nn.slimmable import SlimmableBatchNorm2d, SlimmableConv2d, SlimmableLinear
from ..nn.stage_resize import FixedResize, StageResize
from ..nn.switchable_bn import SwitchableBatchNorm2d
from ..operating_point import OperatingPoint

PARITY_TOLERANCE = 1e-4


class StaticClassifier(nn.Module):
    """A materialised network without operating-point state: ``head(features(x))``."""

    def __init__(self, net: AdaptiveModel) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_head(self.net.forward_features(x))


def _make_static(module: nn.Module) -> None:
    """Swap every adaptive layer for the plain layer it currently computes."""
    for name, child in module.named_children():
        if isinstance(child, (SwitchableBatchNorm2d, SlimmableBatchNorm2d)):
            setattr(module, name, child.to_batchnorm())
        elif isinstance(child, (MetaConv2d, SlimmableConv2d)):
            setattr(module, name, child.to_conv2d())
        elif isinstance(child, SlimmableLinear):
            setattr(module, name, child.to_linear())
        elif isinstance(child, StageResize):
            setattr(module, name, FixedResize(child.size) if child.size is not None else nn.Identity())
        else:
            _make_static(child)


@torch.no_grad()
def to_static(model: AdaptiveModel, op: OperatingPoint | int, bn_policy: str | None = None, scale_policy: str | None = None,
              fold_bn: bool = True) -> nn.Module:
    """The sub-network serving ``op`` as plain Conv2d / BatchNorm2d / Linear layers (SAN weights generated,
    slimmable layers sliced, the selected BN); with ``fold_bn`` every BN is folded into its conv."""
    net = copy.deepcopy(model).eval()
    net.set_operating_point(op, bn_policy, scale_policy)
    _make_static(net)
    static = StaticClassifier(net).eval()
    return fuse(static) if fold_bn else static


def reference_images(resolution: int, data: str | Path | None, count: int = 8, crop_fraction: float = 0.875) -> Tensor:
    """``count`` real images at ``resolution`` (uint8): from ``data`` (an image folder) or the bundled sample."""
    from ..cli import sample_data_dir

    root = Path(data) if data else sample_data_dir() / "val"
    if (root / "val").is_dir():
        root = root / "val"
    ds = ImageFolderDataset(root)
    step = max(1, len(ds) // count)
    t = EvalTransform(resolution, crop_fraction)
    return torch.stack([t(load_rgb(ds.samples[i][0])) for i in range(0, len(ds), step)[:count]])


def preprocessing(resolution: int, meta: dict[str, Any]) -> dict[str, Any]:
    crop_fraction = meta.get("crop_fraction", 0.875)
    norm = meta.get("normalization", {})
    return {"resolution": resolution, "resize_short_side": int(resolution / crop_fraction), "center_crop": resolution,
            "interpolation": "bilinear", "antialias": True, "input": "RGB, float, N x 3 x H x W",
            "mean": norm.get("mean", [0.485, 0.456, 0.406]), "std": norm.get("std", [0.229, 0.224, 0.225])}


@torch.no_grad()
def export(model: AdaptiveModel, meta: dict[str, Any], op: OperatingPoint | int, fmt: str, out: str | Path,
           bn_policy: str | None = None, scale_policy: str | None = None, fold_bn: bool = True,
           data: str | Path | None = None) -> dict[str, Any]:
    """Write ``out`` (ONNX or TorchScript) and ``out`` + ``.json``; verify it against ``model`` on real images."""
    op = OperatingPoint.coerce(op)
    out = Path(out)
    model = model.cpu().eval()
    static = to_static(model, op, bn_policy, scale_policy, fold_bn)
    images = normalize_batch(reference_images(op.resolution, data, crop_fraction=meta.get("crop_fraction", 0.875)))
    with model.at(op, bn_policy=bn_policy, scale_policy=scale_policy):
        expected = model(images)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = images[:1]
    if fmt == "onnx":
        import onnxruntime as ort

        torch.onnx.export(static, (example,), str(out), input_names=["image"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True, verbose=False)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"image": images.numpy()})[0])
    elif fmt == "torchscript":
        scripted = torch.jit.trace(static, example)
        torch.jit.save(scripted, str(out))
        got = torch.jit.load(str(out))(images)
    else:
        raise ValueError(f"unknown export format {fmt!r} (onnx or torchscript)")
    diff = float((got - expected).abs().max())
    if diff >= PARITY_TOLERANCE:
        out.unlink()
        raise RuntimeError(f"exported model differs from the adaptive model by {diff:.2e} (>= {PARITY_TOLERANCE}) at {op}; "
                           "nothing was written")
    info = {
        "format": fmt, "file": out.name, "operating_point": {"resolution": op.resolution, "width": op.width, "scales": op.scales},
        "bn_policy": model.bn_policy if bn_policy is None else bn_policy, "scale_policy": scale_policy, "bn_folded": fold_bn,
        "preprocessing": preprocessing(op.resolution, meta), "classes": meta.get("classes"),
        "macs": count_macs(model, op), "params": sum(p.numel() for p in static.parameters()) if not fold_bn else
        count_params(model, op),
        "parity_max_abs_diff": diff, "parity_images": int(images.shape[0]), "source_arch": model.arch,
        "source_epoch": meta.get("epoch"), "flexres_version": __version__,
    }
    Path(str(out) + ".json").write_text(json.dumps(info, indent=2) + "\n")
    return info
