"""Train and eval transforms on uint8 CHW tensors; normalisation happens per batch on the device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MultiResolutionCrop:
    """ONE random-resized crop (+ h-flip) per image, resized to every training resolution.

    RS-Nets Table 6: resizing a single crop to all resolutions (rather than a crop per resolution)
    is what lets the resolutions distil into each other. Returns a tuple of uint8 tensors, one per
    resolution, in the order given. ``on_device``: the crop is resized to the largest resolution only (a 1-tuple),
    and ``resize_batch`` makes the others from it on the training device: one resize per image on the CPU instead
    of one per resolution, and one tensor per image through the loader.
    """

    def __init__(
        self,
        resolutions: list[int] | tuple[int, ...],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        on_device: bool = False,
    ) -> None:
        self.resolutions = tuple(int(r) for r in resolutions)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.on_device = on_device

    def __call__(self, img: Tensor) -> tuple[Tensor, ...]:
        top, left, h, w = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        crop = img[..., top : top + h, left : left + w]
        if self.hflip and torch.rand(()) < 0.5:
            crop = crop.flip(-1)
        sizes = (max(self.resolutions),) if self.on_device else self.resolutions
        return tuple(TF.resize(crop, [r, r], antialias=True) for r in sizes)

    def __repr__(self) -> str:
        return f"MultiResolutionCrop(resolutions={list(self.resolutions)}, scale={self.scale}, ratio={self.ratio}" + (
            ", on_device=True)" if self.on_device else ")"
        )


def resize_batch(x: Tensor, resolutions: tuple[int, ...] | list[int]) -> tuple[Tensor, ...]:
    """A batch of crops at the largest resolution (uint8 or float, N x 3 x R x R) at every one of ``resolutions``, as
    float on its device (antialiased bilinear, as the CPU path's resize; the largest passes through)."""
    x = x.float()
    return tuple(
        x
        if (r, r) == tuple(x.shape[-2:])
        else F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        for r in resolutions
    )


INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


class EvalTransform:
    """Resize the short side to ``resolution / crop_fraction`` (antialiased; ``interpolation`` as the weights were
    evaluated with: timm's pretrained configs say bicubic for many), center-crop ``resolution``."""

    def __init__(self, resolution: int, crop_fraction: float = 0.875, interpolation: str = "bilinear") -> None:
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.resolution = int(resolution)
        self.resize_to = int(resolution / crop_fraction)
        self.interpolation = interpolation

    def __call__(self, img: Tensor) -> Tensor:
        img = TF.resize(img, self.resize_to, interpolation=INTERPOLATIONS[self.interpolation], antialias=True)
        return TF.center_crop(img, [self.resolution, self.resolution])

    def __repr__(self) -> str:
        return (
            f"EvalTransform(resolution={self.resolution}, resize_to={self.resize_to}, "
            f"interpolation={self.interpolation!r})"
        )


def normalize_batch(
    x: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> Tensor:
    """uint8 N x 3 x H x W -> float, scaled to [0, 1] and standardised with ``mean``/``std``."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1) * 255.0
    return (x.float() - m) / s
