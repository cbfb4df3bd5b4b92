"""Run configuration: nested defaults, YAML recipes, and ``--set key=value`` overrides."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

DEFAULTS: dict[str, dict[str, Any]] = {
    # pretrained (timm:<name> / torchvision:<name> models): true for the library's download, or a local weights file
    # (.safetensors, or a PyTorch state dict read with weights_only) or an installed package that ships one.
    # head: "new" (a fresh classifier when the file's has another number of classes) or "pretrained_rows" (the rows of
    # the file's ImageNet classifier named by the data's class folders, ImageNet wnids such as Imagenette's).
    "model": {"name": "resnet18", "width_mult": 1.0, "num_classes": None, "pretrained": None, "head": "new", "kwargs": {}},
    "method": {"name": "rsnet", "resolutions": [224, 192, 160, 128, 96], "kwargs": {}},
    "data": {
        "root": None, "train_split": "train", "val_split": "val", "cache": False, "num_workers": 4,
        "skip_unreadable": False, "hflip": True, "scale": [0.08, 1.0], "ratio": [0.75, 1.3333333333333333],
        "crop_fraction": None,  # eval centre crop; None: the model's pretrained config (timm, torchvision), else 0.875
        "class_names": None,
        # segmentation: root/<split>/images + labels and root/classes.tsv (flexres.data.segmentation); square training
        # crops of seg_scale x the short side, so a random zoom, resized to every training resolution
        "task": "classification", "seg_scale": [0.5, 1.0],
    },
    "train": {
        "epochs": 120, "batch_size": 256, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False,
        "weight_decay": 1e-4, "warmup_epochs": 0.0, "lr_milestones": None, "label_smoothing": 0.0, "seed": 0, "amp": True,
        "channels_last": True, "deterministic": False, "device": "auto", "accumulate_steps": 1,
        "sync_bn": False, "compile": False,
        # bn_stats: "update" (BN in training mode) or "frozen" (running statistics kept, affine parameters still
        # trained: the usual way to fine-tune a pretrained network on a few classes or small batches)
        "bn_stats": "update", "init_from": None, "eval_every": 1, "progress": True,
    },
    "eval": {"resolutions": None, "bn_policy": "interpolate", "calibration_images": 2000, "batch_size": 256},
}


__all__ = ["ConfigError", "DEFAULTS", "load_config", "make_config"]


def _merge(base: dict[str, Any], override: dict[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base:
            raise ConfigError(f"unknown config key '{where}{key}' (known: {', '.join(sorted(base))})")
        if isinstance(base[key], dict) and key != "kwargs":
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}{key}' must be a mapping")
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def make_config(override: dict[str, Any] | None = None) -> dict[str, Any]:
    return _merge(DEFAULTS, override or {}, "")


def load_config(path: str | Path, sets: list[str] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    cfg = make_config(raw)
    return apply_overrides(cfg, sets or [])


def apply_overrides(cfg: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """``section.key=value`` or, when the key is unique across sections, ``key=value``; values are YAML."""
    cfg = copy.deepcopy(cfg)
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value {text!r} is not valid YAML: {e}") from e
        parts = key.strip().split(".")
        if len(parts) == 1:
            # A bare key means the training one when several sections have it (batch_size: train, eval).
            sections = [s for s in cfg if isinstance(cfg[s], dict) and parts[0] in cfg[s]]
            if not sections:
                raise ConfigError(f"--set {key}: no config section has '{key}'")
            if len(sections) > 1 and "train" not in sections:
                raise ConfigError(f"--set {key}: found in sections {', '.join(sections)}; write section.{key}")
            parts = ["train" if "train" in sections else sections[0], parts[0]]
        node = cfg
        for p in parts[:-1]:
            if not isinstance(node, dict) or p not in node:
                raise ConfigError(f"--set {key}: unknown key '{p}'")
            node = node[p]
        if not isinstance(node, dict) or (parts[-1] not in node and parts[-2] != "kwargs"):
            raise ConfigError(f"--set {key}: unknown key '{parts[-1]}'")
        node[parts[-1]] = value
    return cfg
