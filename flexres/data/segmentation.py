"""Semantic segmentation data: image / label-map pairs, joint augmentation, and the resolution rule.

Layout (CamVid as in ../shared/data/camvid): ``root/<split>/images/<name>.jpg`` and ``root/<split>/labels/<name>.png``
(one uint8 class index per pixel), and ``root/classes.tsv`` (``label  name  r  g  b``); the class named ``void`` is
ignored in every loss and metric.

Resolution: the **short side**. Training crops are square (``r x r``); evaluation resizes the whole image so its short
side is ``r``, aspect kept (CamVid's 360 x 480 at r = 96 is 96 x 128), and scores the logits resized back to the
label's own size. Labels are only ever cropped, flipped and resized by nearest neighbour: never interpolated.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from .dataset import load_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class SegmentationClasses:
    names: list[str]  # the classes scored, in label order
    colors: list[tuple[int, int, int]]  # display colour of each
    ignore_index: int  # the label no loss or metric counts (void)


def read_segmentation_classes(root: str | os.PathLike) -> SegmentationClasses:
    """``classes.tsv`` at the data root: ``label name r g b`` per line (a header line is allowed)."""
    path = Path(root) / "classes.tsv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: a segmentation dataset needs classes.tsv (label, name, r, g, b per line)"
        )
    rows = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split("\t")
        if not line.strip() or parts[0] == "label":
            continue
        if len(parts) != 5:
            raise ValueError(f"{path}:{n}: expected 5 tab-separated fields (label, name, r, g, b), got {len(parts)}")
        rows[int(parts[0])] = (parts[1], tuple(int(c) for c in parts[2:]))
    void = [k for k, (name, _) in rows.items() if name.lower() in ("void", "ignore", "unlabelled", "unlabeled")]
    ignore = void[0] if void else 255
    scored = sorted(k for k in rows if k != ignore)
    if scored != list(range(len(scored))):
        raise ValueError(f"{path}: the scored labels must be 0..{len(scored) - 1}, got {scored}")
    return SegmentationClasses([rows[k][0] for k in scored], [rows[k][1] for k in scored], ignore)


def load_label(path: str | os.PathLike) -> Tensor:
    """A label PNG as a 1 x H x W uint8 tensor of class indices (palette or grey: the stored index, not a colour)."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P"):
            raise ValueError(f"label {path} is {im.mode}: expected one class index per pixel (mode L or P)")
        return torch.from_numpy(np.array(im, dtype=np.uint8)).unsqueeze(0)


class SegmentationDataset(Dataset):
    """Pairs ``images/<name>.*`` with ``labels/<name>.png``; items are ``transform(image, label)``
    (default: the uint8 image 3 x H x W and the label H x W as int64)."""

    def __init__(
        self,
        split_root: str | os.PathLike,
        transform: Callable[[Tensor, Tensor], Any] | None = None,
        cache: bool = False,
        classes_root: str | os.PathLike | None = None,
    ) -> None:
        self.root = Path(split_root)
        images, labels = self.root / "images", self.root / "labels"
        if not images.is_dir() or not labels.is_dir():
            raise FileNotFoundError(f"{self.root} must hold images/ and labels/ (a segmentation split)")
        self.samples = []
        for f in sorted(images.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            lab = labels / f"{f.stem}.png"
            if not lab.is_file():
                raise FileNotFoundError(f"{f} has no label {lab}")
            self.samples.append((str(f), str(lab)))
        if not self.samples:
            raise FileNotFoundError(f"no images in {images}")
        self.info = read_segmentation_classes(classes_root or self.root.parent)
        self.classes = self.info.names
        self.transform = transform
        self._cache = [self._load(i) for i in range(len(self.samples))] if cache else None

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def _load(self, index: int) -> tuple[Tensor, Tensor]:
        img_path, lab_path = self.samples[index]
        img, lab = load_rgb(img_path), load_label(lab_path)
        if img.shape[-2:] != lab.shape[-2:]:
            raise ValueError(
                f"{img_path} is {tuple(img.shape[-2:])} but its label {lab_path} is {tuple(lab.shape[-2:])}"
            )
        return img, lab

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        img, lab = self._cache[index] if self._cache is not None else self._load(index)
        if self.transform is not None:
            return self.transform(img, lab)
        return img, lab[0].long()


class JointMultiResolutionCrop:
    """ONE random square crop (a side of ``scale`` x the short side, so a zoom of 1/scale) and flip, applied to image
    and label alike; the image crop resized to every training resolution (bilinear, antialiased), the label crop to
    the largest one by nearest neighbour (RS-Nets App. B: one crop for all resolutions, losses at the largest)."""

    def __init__(
        self, resolutions: list[int] | tuple[int, ...], scale: tuple[float, float] = (0.5, 1.0), hflip: bool = True
    ) -> None:
        self.resolutions = tuple(int(r) for r in resolutions)
        self.scale, self.hflip = tuple(scale), hflip

    def __call__(self, img: Tensor, lab: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
        h, w = img.shape[-2:]
        side = max(1, int(round(min(h, w) * float(torch.empty(()).uniform_(*self.scale)))))
        top = int(torch.randint(0, h - side + 1, ()))
        left = int(torch.randint(0, w - side + 1, ()))
        img, lab = img[..., top : top + side, left : left + side], lab[..., top : top + side, left : left + side]
        if self.hflip and torch.rand(()) < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        inputs = tuple(TF.resize(img, [r, r], antialias=True) for r in self.resolutions)
        big = max(self.resolutions)
        label = TF.resize(lab, [big, big], interpolation=InterpolationMode.NEAREST)
        return inputs, label[0].long()


class SegmentationEvalTransform:
    """The whole image with its short side resized to ``resolution`` (aspect kept); the label untouched."""

    def __init__(self, resolution: int) -> None:
        self.resolution = int(resolution)

    def __call__(self, img: Tensor, lab: Tensor) -> tuple[Tensor, Tensor]:
        return TF.resize(img, self.resolution, antialias=True), lab[0].long()


def colorize(label_map: Tensor, colors: list[tuple[int, int, int]], ignore_index: int) -> Tensor:
    """H x W class indices -> 3 x H x W uint8 colours (black for the ignored label)."""
    palette = torch.zeros(max(len(colors), ignore_index + 1), 3, dtype=torch.uint8)
    palette[: len(colors)] = torch.tensor(colors, dtype=torch.uint8)
    return palette[label_map.long().clamp(0, len(palette) - 1)].permute(2, 0, 1)
