"""What a task (classification, segmentation) decides in training: its data, the checks on model and method, the
training transform, how a batch is scored, the validation metric, and what the run records. The trainer asks the
task; it has no task branches of its own. Metrics carry their true names: a segmenter's are pixel accuracy and mIoU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from ..data import ImageFolderDataset, MultiResolutionCrop, split_dir
from ..errors import ConfigError


class Task:
    name = ""
    train_metric = ""  # metrics.jsonl key of the training score per resolution
    val_metric = ""  # ... and of the validation score
    train_label = ""  # how the epoch line names them
    val_label = ""

    def datasets(self, d: dict[str, Any], t: dict[str, Any], progress: bool, log: Callable[[str], None]):
        raise NotImplementedError

    def prepare(self, cfg: dict[str, Any], model, method, train_ds) -> list[str]:
        """Check model and method, set the training transform; returns the class names the run records."""
        raise NotImplementedError

    def correct(self, logits: Tensor, labels: Tensor, method) -> float:
        """The batch's share of the training score: correct images (classification) or pixel accuracy x images."""
        raise NotImplementedError

    def validate(
        self, cfg: dict[str, Any], model, method, train_ds, val_ds, preprocessing: dict[str, Any]
    ) -> dict[str, float]:
        raise NotImplementedError

    def record(self, train_ds) -> dict[str, Any]:
        """What the run's sidecar keeps about the task."""
        return {"task": self.name}


class Classification(Task):
    name, train_metric, val_metric, train_label, val_label = (
        "classification",
        "train_top1",
        "val_top1",
        "top-1",
        "top-1",
    )

    def datasets(self, d, t, progress, log):
        train_ds = ImageFolderDataset(
            split_dir(d["root"], d["train_split"]),
            cache=d["cache"],
            skip_unreadable=d["skip_unreadable"],
            progress=progress,
        )
        if train_ds.unreadable:
            log(f"skipping {len(train_ds.unreadable)} unreadable training images, e.g. {train_ds.unreadable[0]}")
        val_ds = None
        if t["eval_every"] and (Path(d["root"]) / d["val_split"]).is_dir():
            val_ds = ImageFolderDataset(
                split_dir(d["root"], d["val_split"]),
                cache=d["cache"],
                skip_unreadable=d["skip_unreadable"],
                progress=False,
            )
        return train_ds, val_ds

    def prepare(self, cfg, model, method, train_ds):
        from .trainer import class_names

        d = cfg["data"]
        train_ds.transform = MultiResolutionCrop(
            method.resolutions, d["scale"], d["ratio"], hflip=d["hflip"], on_device=d["resize_on"] == "device"
        )
        return class_names(d, train_ds.classes)  # checked before anything is written

    def correct(self, logits, labels, method):
        return float((logits.argmax(1) == labels).sum())

    def validate(self, cfg, model, method, train_ds, val_ds, preprocessing):
        from .evaluate import calibrate, evaluate

        t, d = cfg["train"], cfg["data"]
        if model.width_range is not None:  # slimmable: full width, post-statistics BN from the current weights
            model.clear_calibration()
            calibrate(
                model,
                train_ds,
                list(method.resolutions),
                min(cfg["eval"]["calibration_images"], 1000),
                cfg["eval"]["batch_size"],
                d["scale"],
                d["ratio"],
                seed=t["seed"],
            )
        res = evaluate(
            model,
            val_ds,
            list(method.resolutions),
            crop_fraction=d["crop_fraction"],
            batch_size=cfg["eval"]["batch_size"],
            mean=preprocessing["mean"],
            std=preprocessing["std"],
            interpolation=preprocessing["interpolation"],
        )
        model.clear_calibration()
        return {str(r): round(v["top1"], 2) for r, v in res.items()}


class Segmentation(Task):
    name, train_metric, val_metric, train_label, val_label = (
        "segmentation",
        "train_pixel_accuracy",
        "val_miou",
        "pixel acc",
        "mIoU",
    )

    def datasets(self, d, t, progress, log):
        from ..data.segmentation import SegmentationDataset

        train_ds = SegmentationDataset(split_dir(d["root"], d["train_split"]), cache=d["cache"])
        train_ds.unreadable = []
        val_dir = Path(d["root"]) / d["val_split"]
        val_ds = SegmentationDataset(val_dir, cache=d["cache"]) if t["eval_every"] and val_dir.is_dir() else None
        return train_ds, val_ds

    def prepare(self, cfg, model, method, train_ds):
        from ..data.segmentation import JointMultiResolutionCrop

        d = cfg["data"]
        if method.name not in ("individual", "parallel", "rsnet"):
            raise ConfigError(
                f"method {method.name!r} trains classifiers; segmentation has individual, parallel and rsnet"
            )
        if d["resize_on"] != "cpu" or d["persistent_workers"]:
            raise ConfigError("data.resize_on: device and data.persistent_workers are for classification data")
        if getattr(model, "task", "classification") != "segmentation":
            raise ConfigError(
                f"data.task is segmentation but {cfg['model']['name']} is a classifier (use seg_resnet18, ...)"
            )
        method.ignore_index = train_ds.info.ignore_index
        train_ds.transform = JointMultiResolutionCrop(method.resolutions, d["seg_scale"], hflip=d["hflip"])
        return train_ds.classes

    def correct(self, logits, labels, method):  # pixel accuracy over the valid pixels, weighted by images like top-1
        valid = labels != method.ignore_index
        return float(((logits.argmax(1) == labels) & valid).sum() / valid.sum().clamp_min(1)) * labels.shape[0]

    def validate(self, cfg, model, method, train_ds, val_ds, preprocessing):
        from .evaluate import evaluate_segmentation

        res = evaluate_segmentation(
            model, val_ds, list(method.resolutions), mean=preprocessing["mean"], std=preprocessing["std"]
        )
        return {str(r): round(v["miou"], 2) for r, v in res.items()}

    def record(self, train_ds):
        return {
            "task": self.name,
            "class_colors": [list(c) for c in train_ds.info.colors],
            "ignore_index": train_ds.info.ignore_index,
        }


TASKS: dict[str, Task] = {"classification": Classification(), "segmentation": Segmentation()}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"data.task must be one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name]
