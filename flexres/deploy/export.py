"""Export one operating point as a static model: plain Conv2d / BatchNorm2d / Linear, BN folded by default."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..analysis import count_macs, count_params
from ..data import EvalTransform, ImageFolderDataset, sample_data_dir
from ..engine.run import RunInfo
from ..errors import ConfigError, MissingFileError, ParityError
from ..models import AdaptiveModel
from ..nn.quantize import is_quantized
from ..operating_point import OperatingPoint
from ..parity import RELATIVE_TOLERANCE, check_parity
from ..version import __version__
from .static import StaticClassifier, to_static

# File suffix per export format; every suffix a static model can have (TorchScript's alternative ".ts" included).
FORMAT_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
EXPORTED_SUFFIXES = (".onnx", ".pt", ".ts")

__all__ = [
    "EXPORTED_SUFFIXES",
    "FORMAT_SUFFIX",
    "PARITY_TOLERANCE",
    "StaticClassifier",
    "export",
    "export_packed",
    "reference_images",
    "to_static",
    "torchscript_quietly",
]

PARITY_TOLERANCE = RELATIVE_TOLERANCE  # of the logit scale: flexres.parity judges every exported file


def _check_file(out: Path, got: Tensor, expected: Tensor, what: str, quantized: bool) -> dict[str, Any]:
    """Parity of a written file's outputs; on failure the file is removed first, so nothing half-checked stays."""
    try:
        p = check_parity(got, expected, what, quantized, consequence="nothing was written")
    except ParityError:
        out.unlink(missing_ok=True)
        raise
    return {
        "parity_max_abs_diff": p.max_abs_diff,
        "parity_relative_diff": p.relative_diff,
        "parity_top1_disagreements": p.top1_disagreements,
    }


@contextmanager
def torchscript_quietly() -> Iterator[None]:
    """torch.jit's deprecation FutureWarnings (trace, trace_method, save, load) silenced, only these and only inside.

    TorchScript is a format the user asked for by name; four warnings per export or load tell them nothing they can act
    on there (ONNX is the other format), and every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def reference_images(
    resolution: int,
    data: str | Path | None,
    count: int = 8,
    crop_fraction: float = 0.875,
    interpolation: str = "bilinear",
) -> Tensor:
    """``count`` real images at ``resolution`` (uint8): from ``data`` (an image folder) or the bundled sample."""
    root = Path(data) if data else sample_data_dir() / "val"
    if (root / "val").is_dir():
        root = root / "val"
    ds = ImageFolderDataset(root)
    step = max(1, len(ds) // count)
    t = EvalTransform(resolution, crop_fraction, interpolation)
    return torch.stack([t(ds.image(i)) for i in range(0, len(ds), step)[:count]])


def calibration_batches(
    resolution: int, meta: dict[str, Any], data: str | Path | None, images: int = 128, batch: int = 32, seed: int = 0
) -> list[Tensor]:
    """Normalised training images at ``resolution`` (the eval transform of the run), for int8 calibration: ``images``
    drawn with ``seed`` from the train split of ``data``, else of the data the run was trained on."""
    from ..data import ImageFolderDataset, split_dir
    from ..engine.config import resolve_data_root

    info = RunInfo.from_meta(meta)
    root = data or info.data_root
    if not root or not Path(resolve_data_root(root)).is_dir():
        raise MissingFileError(
            f"int8 calibration reads training images: the run's data ({root}) is not here; pass data (a folder)"
        )
    ds = ImageFolderDataset(split_dir(resolve_data_root(root), info.train_split), progress=False)
    pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    t = info.preprocessing.transform(resolution)
    x = info.preprocessing.normalize(torch.stack([t(ds.image(i)) for i in pick]))
    return list(x.split(batch))


@torch.no_grad()
def export(
    model: AdaptiveModel,
    meta: dict[str, Any],
    op: OperatingPoint | int,
    fmt: str,
    out: str | Path,
    bn_policy: str | None = None,
    scale_policy: str | None = None,
    fold_bn: bool = True,
    data: str | Path | None = None,
    int8: bool = False,
    int8_ranges: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``out`` (ONNX or TorchScript) and ``out`` + ``.json``; verify it against ``model`` on real images.

    ``int8`` (ONNX only): the float file, checked, is then quantized by ONNX Runtime (QDQ), calibrated on training
    images at the point's own resolution (flexres.deploy.runtime says why); the int8 file is judged by the top-1 it
    keeps of the float file's on the reference images (int8 moves logits by more than round-off). ``int8_ranges``: an
    activation-range file; an existing one is used instead of calibrating (a calibration shared by resolutions,
    ``runtime.merge_ranges``), a new one receives this point's ranges."""
    op = OperatingPoint.coerce(op)
    out = Path(out)
    model = model.cpu().eval()
    static = to_static(model, op, bn_policy, scale_policy, fold_bn)
    run_info = RunInfo.from_meta(meta)
    pre = run_info.preprocessing
    images = pre.normalize(
        reference_images(op.resolution, data, crop_fraction=pre.crop_fraction, interpolation=pre.interpolation)
    )
    with model.at(op, bn_policy=bn_policy, scale_policy=scale_policy):
        expected = model(images)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = images[:1]
    files = [out]
    if int8 and fmt != "onnx":
        raise ConfigError("int8 is ONNX Runtime's quantization: export with format onnx")
    if fmt == "onnx":
        from .runtime import export_onnx, onnx_session, quantize_int8, session_runner

        files = export_onnx(static, example, out)
        got = session_runner(onnx_session(out))(images)
    elif fmt == "torchscript":
        with torchscript_quietly():
            scripted = torch.jit.trace(static, example)
            torch.jit.save(scripted, str(out))
            got = torch.jit.load(str(out))(images)
    else:
        raise ValueError(f"unknown export format {fmt!r} (onnx or torchscript)")
    parity = _check_file(
        out, got, expected, f"the exported {fmt} model does not match the adaptive model at {op}", is_quantized(model)
    )
    if int8:  # judged against the float file by the top-1 it keeps
        shared = int8_ranges is not None and Path(int8_ranges).is_file()
        quantize_int8(out, out, None if shared else calibration_batches(op.resolution, meta, data), ranges=int8_ranges)
        q = session_runner(onnx_session(out))(images)
        parity.update(
            int8_max_abs_diff=float((q - got).abs().max()),
            int8_top1_agreement=float((q.argmax(1) == got.argmax(1)).float().mean()),
            int8_calibration=f"ranges from {Path(int8_ranges).name}"
            if shared
            else f"{op.resolution} px, 128 training images",
        )
    info = {
        "format": fmt,
        "file": out.name,
        "files": [f.name for f in files],
        "int8": int8,
        "operating_point": {"resolution": op.resolution, "width": op.width, "scales": op.scales},
        "bn_policy": model.bn_policy if bn_policy is None else bn_policy,
        "scale_policy": scale_policy,
        "bn_folded": fold_bn,
        "preprocessing": pre.describe(op.resolution),
        "classes": run_info.classes or None,
        "class_names": run_info.class_names or None,
        "macs": count_macs(model, op),
        "params": sum(p.numel() for p in static.parameters()) if not fold_bn else count_params(model, op),
        **parity,
        "parity_images": int(images.shape[0]),
        "source_arch": model.arch,
        "source_epoch": run_info.epoch,
        "flexres_version": __version__,
    }
    Path(str(out) + ".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


@torch.no_grad()
def export_packed(run: str | Path, out: str | Path, data: str | Path | None = None) -> dict[str, Any]:
    """The quantized model of ``run`` with every LQ-Nets weight bit-packed (flexres.engine.packed), checked: the file
    loads back to the same outputs as the training-time (fake-quantized) model at every trained resolution, on real
    images (flexres.parity), or nothing is written."""
    from ..engine.checkpoint import load_checkpoint, save_tensors
    from ..engine.packed import PACKED, pack_state, storage_bytes

    model, meta = load_checkpoint(run)
    tensors, layout = pack_state(model)
    keep = (
        "arch",
        "train_resolutions",
        "method",
        "classes",
        "class_names",
        "normalization",
        "crop_fraction",
        "interpolation",
        "task",
        "epoch",
        "flexres_version",
    )
    out = Path(out)
    save_tensors(out, tensors, {**{k: meta[k] for k in keep if k in meta}, "format": PACKED, "packed": layout})
    packed_model, _ = load_checkpoint(out)
    diff = 0.0
    pre = RunInfo.from_meta(meta).preprocessing
    for r in model.train_resolutions:
        x = pre.normalize(reference_images(r, data, crop_fraction=pre.crop_fraction, interpolation=pre.interpolation))
        model.set_operating_point(r)
        packed_model.set_operating_point(r)
        parity = _check_file(
            out, packed_model(x), model(x), f"the packed model does not match the trained one at {r} px", quantized=True
        )
        diff = max(diff, parity["parity_max_abs_diff"])
    weights = sum(int(np.prod(v["shape"])) for v in layout.values())
    full = {f"model.{k}": v for k, v in model.state_dict().items()}
    return {
        "format": "packed",
        "bytes": out.stat().st_size,
        "tensor_bytes": storage_bytes(tensors),
        "fp32_tensor_bytes": storage_bytes(full),
        "quantized_weights": weights,
        "bits": sorted({v["bits"] for v in layout.values()}),
        "resolutions": list(model.train_resolutions),
        "parity_max_abs_diff": diff,
    }
