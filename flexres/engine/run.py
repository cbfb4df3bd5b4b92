"""A run, typed: what a checkpoint's metadata says about the model (in the spirit of timm's PretrainedCfg), and the
opened run (model, description, directory). Every later layer reads a run through these instead of dict keys, and
the defaults for runs written by earlier versions (no interpolation recorded, no task...) live here only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..data import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, normalize_batch
from ..models import AdaptiveModel
from .config import DEFAULTS

CROP_FRACTION = 0.875  # the eval centre crop of runs that record none (ImageNet's 224 of 256)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input at evaluation: short side resized to resolution / crop_fraction
    (antialiased, ``interpolation``), centre crop, then standardised with ``mean`` / ``std`` (0-1 scale)."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_fraction: float = CROP_FRACTION
    interpolation: str = "bilinear"

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Preprocessing:
        norm = meta.get("normalization") or {}
        return cls(
            tuple(norm.get("mean") or IMAGENET_MEAN),
            tuple(norm.get("std") or IMAGENET_STD),
            float(meta.get("crop_fraction") or CROP_FRACTION),
            meta.get("interpolation") or "bilinear",
        )

    def transform(self, resolution: int) -> EvalTransform:
        return EvalTransform(resolution, self.crop_fraction, self.interpolation)

    def normalize(self, x: Tensor) -> Tensor:
        return normalize_batch(x, self.mean, self.std)

    def describe(self, resolution: int) -> dict[str, Any]:
        """What an exported model's sidecar says a caller must do to an image."""
        return {
            "resolution": resolution,
            "resize_short_side": int(resolution / self.crop_fraction),
            "center_crop": resolution,
            "interpolation": self.interpolation,
            "antialias": True,
            "input": "RGB, float, N x 3 x H x W",
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass(frozen=True)
class RunInfo:
    """What a run's metadata says: architecture, task, classes, preprocessing, method and the points it was trained
    and is evaluated at."""

    arch: dict[str, Any]
    task: str
    classes: list[str]
    class_names: list[str]
    preprocessing: Preprocessing
    method: dict[str, Any]
    train_resolutions: tuple[int, ...]
    eval_resolutions: tuple[int, ...] | None
    bn_policy: str
    epoch: int | None
    config: dict[str, Any] = field(repr=False)
    ignore_index: int = 255
    class_colors: list[tuple[int, int, int]] = field(default_factory=list, repr=False)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> RunInfo:
        cfg = meta.get("config") or {}
        classes = list(meta.get("classes") or [])
        evals = cfg.get("eval", {}).get("resolutions")
        return cls(
            arch=dict(meta.get("arch") or {}),
            task=meta.get("task") or "classification",
            classes=classes,
            class_names=list(meta.get("class_names") or classes),
            preprocessing=Preprocessing.from_meta(meta),
            method=dict(meta.get("method") or {}),
            train_resolutions=tuple(meta.get("train_resolutions") or ()),
            eval_resolutions=tuple(evals) if evals else None,
            bn_policy=cfg.get("eval", {}).get("bn_policy") or DEFAULTS["eval"]["bn_policy"],
            epoch=meta.get("epoch"),
            config=cfg,
            ignore_index=int(meta.get("ignore_index", 255)),
            class_colors=[tuple(c) for c in meta.get("class_colors") or []],
        )

    @property
    def data_root(self) -> str | None:
        return (self.config.get("data") or {}).get("root")

    @property
    def train_split(self) -> str:
        return (self.config.get("data") or {}).get("train_split") or "train"


@dataclass
class Run:
    """An opened run: its model (weights and BN calibration loaded), description, checkpoint file and raw metadata.
    What the commands ask of a run lives here: its evaluation resolutions, its BN policy, its calibration cache."""

    model: AdaptiveModel
    info: RunInfo
    checkpoint: Path
    meta: dict[str, Any] = field(repr=False)

    @classmethod
    def open(cls, path: str | Path) -> Run:
        from .checkpoint import load_checkpoint, resolve_checkpoint

        model, meta = load_checkpoint(path)
        return cls(model, RunInfo.from_meta(meta), resolve_checkpoint(path), meta)

    @property
    def directory(self) -> Path:
        return self.checkpoint.parent

    def config(self) -> dict[str, Any]:
        """The run's full config; a run that recorded none (an imported model) gets the defaults."""
        from .config import make_config

        return self.info.config or make_config()

    def bn_policy(self, given: str | None = None) -> str:
        """``given`` (the caller's, e.g. ``--bn``), else the run's recorded ``eval.bn_policy``, else the default."""
        return given or self.info.bn_policy

    def eval_resolutions(self, given=None) -> list[int]:
        """``given``, else the run's ``eval.resolutions``, else the resolutions it was trained at."""
        return list(given or self.info.eval_resolutions or self.model.train_resolutions)

    def summary(self) -> dict[str, Any]:
        """What an evaluation report says about the run itself."""
        return {
            "checkpoint": str(self.checkpoint),
            "train_resolutions": list(self.model.train_resolutions),
            "method": self.info.method,
            "epoch": self.info.epoch,
        }

    def calibrate(
        self,
        train_ds,
        points: list,
        num_images: int,
        batch_size: int,
        scale,
        ratio,
        data: str,
        workers: int = 0,
        note=None,
    ) -> None:
        """BN statistics at ``points`` not yet in the run's cache, from ``num_images`` training crops (``scale`` and
        ``ratio`` of the random-resized crop), saved with the run (CALIBRATION next to the checkpoint). A cache made
        from another number of images is dropped first: it is not what was asked for."""
        from .checkpoint import CALIBRATION, clear_calibration, save_calibration
        from .evaluate import calibrate

        if self.meta.get("calibration", {}).get("num_images") not in (None, num_images):
            clear_calibration(self.model)
        pre = self.info.preprocessing
        new = calibrate(
            self.model,
            train_ds,
            points,
            num_images,
            batch_size,
            scale,
            ratio,
            mean=pre.mean,
            std=pre.std,
            workers=workers,
            note=note,
        )
        if new:
            save_calibration(
                self.model,
                self.directory / CALIBRATION,
                {"num_images": num_images, "data": data, "checkpoint_digest": self.meta["checkpoint_digest"]},
            )
            self.meta["calibration"] = {"num_images": num_images}
