"""Evaluation across resolutions and BN policies: top-1/top-5, train x test matrices, hit/miss matrices."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..data import EvalTransform, ImageFolderDataset, MultiResolutionCrop, normalize_batch
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..models import AdaptiveModel
from ..models.config_tree import forward_configurations
from ..nn import calibrate_bn
from ..operating_point import OperatingPoint
from .memory import fit_batch_size


def _batches(
    ds: Dataset, batch_size: int, device: torch.device, mean, std, workers: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers)
    for x, y in loader:
        if isinstance(x, (tuple, list)):
            (x,) = x
        # NHWC: oneDNN's (and cuDNN's) fast layout; a model in NCHW takes it too
        yield normalize_batch(x.to(device), mean, std).contiguous(memory_format=torch.channels_last), y.to(device)


def _batch_size_that_fits(
    model: AdaptiveModel,
    op: OperatingPoint,
    batch_size: int,
    device: torch.device,
    workers: int,
    note: Callable[[str], None] | None,
) -> int:
    """``batch_size``, or less where a batch at ``op`` would not fit in ``device``'s memory.

    The data side holds only what the batch needs: datasets cache decoded source images (uint8, at their
    own size), never images transformed to ``op``'s resolution; each is resized as it is loaded. Of those,
    the loader's uint8 batch (3 r^2 bytes per image) stays alive while the model runs on its normalised
    copy, and on the CPU each worker also holds its prefetched batches in the same memory.
    """
    in_flight = 1 + (2 * workers if device.type == "cpu" else 0)  # DataLoader's default prefetch_factor is 2
    fitted = fit_batch_size(model, op, batch_size, device, images_bytes_per_image=in_flight * 3 * op.resolution**2)
    if fitted < batch_size and note is not None:
        label = f"{op.resolution} px" if op == OperatingPoint(op.resolution) else str(op)
        note(f"{label}: batch reduced from {batch_size} to {fitted} to fit memory")
    return fitted


def _hits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per image: right at top-1, right within the top-5 (on the CPU)."""
    hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])
    return hit[:, 0].cpu(), hit.any(1).cpu()


def _accuracy(hits: list[tuple[Tensor, Tensor]]) -> dict[str, Any]:
    """top-1 / top-5 (%), image count and per-image correctness (dataset order) from the batches' ``_hits``."""
    c1, c5 = torch.cat([h[0] for h in hits]), torch.cat([h[1] for h in hits])
    return {
        "top1": 100.0 * c1.float().mean().item(),
        "top5": 100.0 * c5.float().mean().item(),
        "n": int(c1.numel()),
        "correct": c1,
        "correct5": c5,
    }


@torch.no_grad()
def evaluate(
    model: AdaptiveModel,
    dataset: ImageFolderDataset,
    resolutions: list[int],
    bn_policy: str = "interpolate",
    batch_size: int = 256,
    crop_fraction: float = 0.875,
    mean=None,
    std=None,
    progress: bool = False,
    scale_policy: str | None = None,
    workers: int = 0,
    width: float = 1.0,
    scales: tuple[float, ...] | None = None,
    note: Callable[[str], None] | None = None,
    interpolation: str = "bilinear",
) -> dict[int, dict[str, Any]]:
    """Top-1/top-5 (%) of ``model`` on ``dataset`` at each resolution; also per-image correctness.

    ``batch_size`` is an upper bound: at a resolution where that many images would not fit in the
    device's memory the batch shrinks (``note``, if given, is told once per resolution); in eval mode
    the batch size does not change the results. Raises ``ResolutionTooLargeError`` when not even one
    image fits. Returns {resolution: {"top1", "top5", "n", "correct", "correct5" (bool tensors, dataset order), "bn"}}.
    """
    mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    device = next(model.parameters()).device
    model.eval()
    results: dict[int, dict[str, Any]] = {}
    saved_transform = dataset.transform
    try:
        for r in tqdm(resolutions, desc="eval", disable=not progress, leave=False):
            dataset.transform = EvalTransform(r, crop_fraction, interpolation)
            op = OperatingPoint(r, width, scales)
            loader_workers = 0 if dataset.cached else workers
            batch = _batch_size_that_fits(model, op, batch_size, device, loader_workers, note)
            with model.at(op, bn_policy=bn_policy, scale_policy=scale_policy):
                hits = [_hits(model(x), y) for x, y in _batches(dataset, batch, device, mean, std, loader_workers)]
            results[r] = {
                **_accuracy(hits),
                "bn": "post-statistics" if model.width_range else describe_bn(model, r, bn_policy),
            }
    finally:
        dataset.transform = saved_transform
    return results


def confusion_matrix(pred: Tensor, labels: Tensor, num_classes: int, ignore_index: int | None) -> Tensor:
    """num_classes x num_classes counts (row: true class, column: predicted), void pixels left out."""
    valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    idx = labels[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(conf: Tensor, names: list[str]) -> dict[str, Any]:
    """RS-Nets Table 7's metrics from a confusion matrix: pixel accuracy, mean class accuracy, mean IoU (%), and the
    IoU of each class; a class absent from both labels and predictions is left out of the means."""
    conf = conf.double()
    tp, true, pred = conf.diag(), conf.sum(1), conf.sum(0)
    union = true + pred - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.zeros_like(tp))
    acc = torch.where(true > 0, tp / true.clamp_min(1), torch.zeros_like(tp))
    return {
        "pixel_acc": 100 * float(tp.sum() / conf.sum().clamp_min(1)),
        "mean_acc": 100 * float(acc[true > 0].mean()),
        "miou": 100 * float(iou[present].mean()),
        "per_class_iou": {n: round(100 * float(v), 2) for n, v, ok in zip(names, iou, present) if ok},
        "pixels": int(conf.sum()),
    }


@torch.no_grad()
def evaluate_segmentation(
    model: AdaptiveModel,
    dataset: Dataset,
    resolutions: list[int],
    bn_policy: str = "interpolate",
    batch_size: int = 8,
    mean=None,
    std=None,
    progress: bool = False,
) -> dict[int, dict[str, Any]]:
    """Pixel accuracy, mean class accuracy, mean IoU and per-class IoU at each resolution (the image's short side):
    each image resized so, its logits resized back to the label's own size (bilinear) before the argmax."""
    from ..data.segmentation import SegmentationEvalTransform

    mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    device = next(model.parameters()).device
    info = dataset.info
    model.eval()
    out = {}
    for r in resolutions:
        model.set_operating_point(r, bn_policy=bn_policy)
        dataset.transform = SegmentationEvalTransform(r)
        conf = torch.zeros(len(info.names), len(info.names), dtype=torch.long)
        loader = DataLoader(dataset, batch_size=batch_size)  # one size per batch: all images of a split share it here
        for x, y in tqdm(loader, desc=f"{r}px", disable=not progress, leave=False):
            logits = model(normalize_batch(x.to(device), mean, std))
            logits = torch.nn.functional.interpolate(
                logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False
            )
            conf += confusion_matrix(logits.argmax(1).cpu(), y, len(info.names), info.ignore_index)
        out[r] = {**segmentation_scores(conf, info.names), "n": len(dataset), "bn": describe_bn(model, r, bn_policy)}
    dataset.transform = None
    return out


def tree_batch_size(
    model: AdaptiveModel, resolution: int, configs: list[tuple[float, ...]], batch_size: int, device: torch.device
) -> int:
    """Images per prefix-tree pass that fit in memory: the widest pass (the last stage) holds the maps of every
    configuration that shares its last factor, so ``batch_size`` images count that many times over."""
    branches = max(sum(1 for c in configs if c[-1] == f) for f in {c[-1] for c in configs})
    largest = OperatingPoint(resolution, scales=max(configs, key=sum))
    return max(1, min(batch_size, fit_batch_size(model, largest, batch_size * branches, device) // branches))


@torch.no_grad()
def evaluate_configurations(
    model: AdaptiveModel,
    dataset: ImageFolderDataset,
    resolution: int,
    configs: list[tuple[float, ...]],
    bn_policy: str = "interpolate",
    batch_size: int = 64,
    crop_fraction: float = 0.875,
    workers: int = 0,
    progress: bool = False,
) -> dict[tuple[float, ...], dict[str, Any]]:
    """Top-1/top-5 of every Resizable scaling configuration in ``configs`` at ``resolution``, computed as a
    prefix tree (``flexres.models.config_tree``): shared stages run once per batch, the branches of a stage
    as one batch. ``batch_size`` counts images; a tree pass holds up to ``len(configs)`` times as many
    feature maps. Returns {configuration: {"top1", "top5", "n", "correct", "correct5"}} (per-image, dataset order)."""
    device = next(model.parameters()).device
    model.eval()
    configs = [tuple(float(f) for f in c) for c in configs]
    batch_size = tree_batch_size(model, resolution, configs, batch_size, device)
    hits: dict[tuple[float, ...], list[tuple[Tensor, Tensor]]] = {c: [] for c in configs}
    saved_transform = dataset.transform
    try:
        dataset.transform = EvalTransform(resolution, crop_fraction)
        batches = _batches(dataset, batch_size, device, IMAGENET_MEAN, IMAGENET_STD, 0 if dataset.cached else workers)
        for x, y in tqdm(
            batches,
            total=-(-len(dataset) // batch_size),
            desc=f"{len(configs)} configurations",
            disable=not progress,
            leave=False,
        ):
            for c, logits in forward_configurations(model, x, resolution, configs, bn_policy).items():
                hits[c].append(_hits(logits, y))
    finally:
        dataset.transform = saved_transform
    return {c: _accuracy(hits[c]) for c in configs}


def describe_bn(model: AdaptiveModel, resolution: int, bn_policy: str) -> str:
    if resolution in model.train_resolutions:
        return "trained"
    lo, hi = min(model.train_resolutions), max(model.train_resolutions)
    if bn_policy == "interpolate" and not lo < resolution < hi:
        return "nearest (outside trained range)"
    return bn_policy


def calibrate(
    model: AdaptiveModel,
    train_dataset: ImageFolderDataset,
    points: list[OperatingPoint | int],
    num_images: int,
    batch_size: int = 256,
    scale=(0.08, 1.0),
    ratio=(0.75, 4 / 3),
    mean=None,
    std=None,
    seed: int = 0,
    workers: int = 0,
    note: Callable[[str], None] | None = None,
) -> list[OperatingPoint]:
    """Calibrate BN statistics at each operating point not yet calibrated, on a seeded random subset of
    ``num_images`` training images with the training augmentation. Returns the points it calibrated.

    ``batch_size`` is an upper bound, shrunk per point to what fits in memory (``note``, if given, is
    told). The statistics are exact means over all images whatever the batch; a smaller batch changes
    only the batch statistics the BNs normalise with while gathering, which at the resolutions where
    memory runs short still span many pixels per channel. Raises ``ResolutionTooLargeError`` when not even
    one image fits."""
    mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    device = next(model.parameters()).device
    done = []
    saved_transform = train_dataset.transform
    pick = torch.randperm(len(train_dataset), generator=torch.Generator().manual_seed(seed))[:num_images]
    subset = Subset(train_dataset, pick.tolist())
    try:
        for op in map(OperatingPoint.coerce, points):
            if model.is_calibrated(op):
                continue
            # The augmentation is the training one, so calibrated statistics are comparable with
            # the statistics the trained BNs gathered.
            if getattr(train_dataset, "info", None) is not None:  # segmentation: the joint square crop of training
                from ..data.segmentation import JointMultiResolutionCrop

                train_dataset.transform = JointMultiResolutionCrop([op.resolution], scale)
            else:
                train_dataset.transform = MultiResolutionCrop([op.resolution], scale, ratio)
            loader_workers = 0 if train_dataset.cached else workers
            batch = _batch_size_that_fits(model, op, batch_size, device, loader_workers, note)
            rng_state = torch.get_rng_state()
            torch.manual_seed(seed + op.resolution)
            try:
                batches = (x for x, _ in _batches(subset, batch, device, mean, std, loader_workers))
                calibrate_bn(model, batches, op, num_images)
            finally:
                torch.set_rng_state(rng_state)
            done.append(op)
    finally:
        train_dataset.transform = saved_transform
    return done


def accuracy_matrix(
    rows: dict[str, dict[int, dict[str, Any]]], resolutions: list[int], metric: str = "top1"
) -> dict[str, dict[int, float]]:
    """Train x test matrix: {row label: {test resolution: accuracy}}."""
    return {label: {r: res[r][metric] for r in resolutions if r in res} for label, res in rows.items()}


def hit_miss_matrix(correct: dict[int, Tensor]) -> dict[int, dict[int, float]]:
    """RS-Nets Table 1: m[j][i] = % of images right at resolution i but wrong at resolution j (i != j)."""
    out: dict[int, dict[int, float]] = {}
    for j, cj in correct.items():
        out[j] = {}
        for i, ci in correct.items():
            if i != j:
                out[j][i] = 100.0 * (ci & ~cj).float().mean().item()
    return out


def format_table(header: list[str], rows: list[list[Any]], title: str | None = None) -> str:
    cells = [[str(h) for h in header]] + [
        [c if isinstance(c, str) else f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title] if title else []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    fmt = [[c if isinstance(c, str) else f"{c:.1f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in fmt]
    return "\n".join(lines)


__all__ = [
    "accuracy_matrix",
    "calibrate",
    "evaluate",
    "evaluate_configurations",
    "format_table",
    "hit_miss_matrix",
    "markdown_table",
    "tree_batch_size",
]
