"""Run configuration: nested defaults, YAML recipes, and ``--set key=value`` overrides."""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, UnknownNameError
from ..methods import list_methods
from ..models import list_models
from ..nn.switchable_bn import BN_POLICIES

DEFAULTS: dict[str, dict[str, Any]] = {
    # pretrained (timm:<name> / torchvision:<name> models): true for the library's download, or a local weights file
    # (.safetensors, or a PyTorch state dict read with weights_only) or an installed package that ships one.
    # head: "new" (a fresh classifier when the file's has another number of classes) or "pretrained_rows" (the rows of
    # the file's ImageNet classifier named by the data's class folders, ImageNet wnids such as Imagenette's).
    # backbone_from (segmenters): a classification run or ResNet weights file whose backbone initialises the encoder
    "model": {
        "name": "resnet18",
        "width_mult": 1.0,
        "num_classes": None,
        "pretrained": None,
        "head": "new",
        "kwargs": {},
        "backbone_from": None,
    },
    "method": {"name": "rsnet", "resolutions": [224, 192, 160, 128, 96], "kwargs": {}},
    "data": {
        "root": None,
        "train_split": "train",
        "val_split": "val",
        "cache": False,
        "num_workers": 4,
        "skip_unreadable": False,
        "hflip": True,
        "scale": [0.08, 1.0],
        "ratio": [0.75, 1.3333333333333333],
        "crop_fraction": None,  # eval centre crop; None: the model's pretrained config (timm, torchvision), else 0.875
        "class_names": None,
        # segmentation: root/<split>/images + labels and root/classes.tsv (flexres.data.segmentation); square training
        # crops of seg_scale x the short side, so a random zoom, resized to every training resolution
        "task": "classification",
        "seg_scale": [0.5, 1.0],
        # resize_on: "cpu" (each loader worker resizes its crop to every training resolution) or "device" (workers
        # resize it to the largest only; the others are made from it on the training device, a batch at a time)
        "resize_on": "cpu",
        # persistent_workers: loader processes live the whole run (no start-up per epoch); each sample's augmentation is
        # then seeded by (seed, epoch, index), so it is the same whichever worker makes it and wherever a run resumes.
        # prefetch_factor: batches each persistent worker prepares ahead.
        "persistent_workers": False,
        "prefetch_factor": 2,
    },
    "train": {
        "epochs": 120,
        "batch_size": 256,
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 1e-4,
        "warmup_epochs": 0.0,
        "lr_milestones": None,
        "label_smoothing": 0.0,
        "seed": 0,
        "amp": True,
        "channels_last": True,
        "deterministic": False,
        "device": "auto",
        "accumulate_steps": 1,
        "sync_bn": False,
        "compile": False,
        # compile_quantizers: each LQ quantizer's step through torch.compile (few fused kernels instead of about 50
        # operators per call: on a GPU the launches, not the arithmetic, bound a quantized step)
        "compile_quantizers": False,
        # bn_stats: "update" (BN in training mode) or "frozen" (running statistics kept, affine parameters still
        # trained: the usual way to fine-tune a pretrained network on a few classes or small batches)
        "bn_stats": "update",
        "init_from": None,
        "eval_every": 1,
        "progress": True,
        # weight_decay_on: "all" parameters, or "weights": convolution and linear weights only (tensors of 2 or more
        # dimensions), no BN scales or shifts, biases or quantizer parameters (LQ-Nets' recipe; timm's default)
        "weight_decay_on": "all",
    },
    "eval": {"resolutions": None, "bn_policy": "interpolate", "calibration_images": 2000, "batch_size": 256},
}


# What a key whose default is None takes besides null (the type of every other key is its default's).
NULLABLE: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "num_classes"): ("int",),
    ("model", "pretrained"): ("bool", "str"),
    ("data", "root"): ("str",),
    ("data", "crop_fraction"): ("float",),
    ("data", "class_names"): ("list", "str"),
    ("train", "lr_milestones"): ("list of float",),
    ("train", "init_from"): ("str",),
    ("model", "backbone_from"): ("str",),
    ("eval", "resolutions"): ("list of int",),
}
# Keys with a fixed set of values, checked with the types (before a run starts, not when it is evaluated).
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("eval", "bn_policy"): BN_POLICIES,
    ("train", "bn_stats"): ("update", "frozen"),
    ("train", "weight_decay_on"): ("all", "weights"),
    ("data", "resize_on"): ("cpu", "device"),
}

__all__ = ["ConfigError", "DEFAULTS", "check_names", "load_config", "make_config"]


def _kind(default: Any) -> str:
    """The type a key takes, read off its default: int, float, bool, str, mapping, list or 'list of <kind>'."""
    if isinstance(default, list):
        kinds = {_kind(v) for v in default}
        return f"list of {kinds.pop()}" if len(kinds) == 1 else "list"
    return {bool: "bool", int: "int", float: "float", str: "str", dict: "mapping"}[type(default)]


def _fits(value: Any, kind: str) -> bool:
    if kind.startswith("list"):
        return isinstance(value, (list, tuple)) and (
            kind == "list" or all(_fits(v, kind[len("list of ") :]) for v in value)
        )
    if kind in ("int", "float") and isinstance(value, bool):  # YAML's true is no number, though Python's True is 1
        return False
    return isinstance(
        value, {"int": int, "float": (int, float), "bool": bool, "str": str, "mapping": dict, "null": type(None)}[kind]
    )


_SAID = {
    "int": "an int",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "mapping": "a mapping",
    "null": "null",
    "list": "a list",
    "list of int": "a list of ints",
    "list of float": "a list of numbers",
    "list of str": "a list of strings",
}


def _got(value: Any) -> str:
    what = {
        bool: "true/false",
        int: "an int",
        float: "a number",
        str: "a string",
        list: "a list",
        tuple: "a list",
        dict: "a mapping",
        type(None): "null",
    }.get(type(value), type(value).__name__)
    if isinstance(value, str) and "e" in value.lower() and _is_number(value):
        what += "; YAML reads 1e-4 as a string: write 1.0e-4"
    return f"{value!r} ({what})"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_value(section: str, key: str, value: Any) -> str | None:
    """What is wrong with ``value`` for ``section.key`` (its expected type or choices), or None."""
    default = DEFAULTS[section][key]
    kinds = NULLABLE.get((section, key), ()) + ("null",) if default is None else (_kind(default),)
    if not any(_fits(value, k) for k in kinds):
        return f"{section}.{key} must be {' or '.join(_SAID[k] for k in kinds)}, got {_got(value)}"
    choices = CHOICES.get((section, key))
    if choices and value not in choices:
        return f"{section}.{key} must be one of {', '.join(choices)}, got {value!r}"
    return None


def _check_types(cfg: dict[str, Any], where: Any) -> None:
    """Raise ConfigError for the first wrongly typed value; ``where(section, key)`` says where it was written."""
    for section, keys in DEFAULTS.items():
        for key in keys:
            problem = check_value(section, key, cfg[section][key])
            if problem:
                raise ConfigError(f"{where(section, key)}: {problem}")


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
    """DEFAULTS with ``override`` merged in; raises ConfigError for an unknown key or a wrongly typed value."""
    cfg = _merge(DEFAULTS, override or {}, "")
    _check_types(cfg, lambda section, key: "config")
    return cfg


def _yaml_problem(e: yaml.YAMLError) -> tuple[str, str]:
    """(':LINE:COLUMN' or '', what is wrong) of a YAML error, without PyYAML's lines about "<unicode string>"."""
    mark = getattr(e, "problem_mark", None)
    if mark is None or not getattr(e, "problem", None):  # e.g. a ReaderError (a control character)
        return "", str(e).split("\n")[0]
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    started = f" ({context} from line {context_mark.line + 1})" if context and context_mark else ""
    return f":{mark.line + 1}:{mark.column + 1}", f"{e.problem}{started}"


def _key_line(text: str, section: str, key: str) -> int | None:
    """The line of ``section: {key: ...}`` in a YAML text, for messages."""
    node = yaml.compose(text)
    for name in (section, key):
        if not isinstance(node, yaml.MappingNode):
            return None
        node = next((v for k, v in node.value if k.value == name), None)
    return node.start_mark.line + 1 if node is not None else None


def load_config(path: str | Path, sets: list[str] | None = None) -> dict[str, Any]:
    """A YAML recipe merged into DEFAULTS, then ``sets`` (``--set``) applied. Everything is checked here, before a run
    starts: ConfigError names the file, the line (YAML syntax) or key, and the type a wrongly typed value should
    have."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        raw = yaml.safe_load(text) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text: {e}") from None
    except yaml.YAMLError as e:
        where, what = _yaml_problem(e)
        raise ConfigError(f"{path}{where}: YAML syntax error: {what}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    try:
        cfg = _merge(DEFAULTS, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    _check_types(cfg, lambda section, key: f"{path}" + (f":{line}" if (line := _key_line(text, section, key)) else ""))
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
            raise ConfigError(f"--set {key}: value {text!r} is not valid YAML: {_yaml_problem(e)[1]}") from None
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
        if len(parts) == 2:  # a schema key (deeper ones are method or model kwargs, checked by what takes them)
            problem = check_value(parts[0], parts[1], value)
            if problem:
                raise ConfigError(f"--set {item}: {problem}")
        node[parts[-1]] = value
    return cfg


def check_names(cfg: dict[str, Any]) -> None:
    """Raise UnknownNameError for a method, model or model source that does not exist. Training calls this first: a
    typo should not wait for the training set to be read."""
    method = cfg["method"]["name"]
    if method not in list_methods():
        raise UnknownNameError(f"unknown method {method!r} (method.name); available: {', '.join(list_methods())}")
    check_model_name(cfg["model"]["name"])


def check_model_name(name: str) -> None:
    """``name`` is a registered model, ``timm:<name>`` of the installed timm or ``torchvision:<name>``."""
    if ":" not in name:
        if name not in list_models():
            raise UnknownNameError(
                f"unknown model {name!r} (model.name); available: {', '.join(list_models())}, "
                "or timm:<name> / torchvision:<name>"
            )
        return
    source, _, arch = name.partition(":")
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise ConfigError(f"model.name {name!r}: timm models need timm: pip install 'flexres[timm]'") from None
        # hf-hub:<repo> and local-dir:<path> name weights elsewhere; timm finds (or refuses) them when it builds.
        if ":" not in arch and not timm.is_model(arch):
            raise UnknownNameError(
                f"unknown timm model {arch!r} (model.name {name!r})"
                f"{_did_you_mean(arch, timm.list_models())}; timm.list_models() names them all"
            )
    elif source == "torchvision":
        import torchvision

        known = torchvision.models.list_models()
        if arch.lower() not in known:
            raise UnknownNameError(
                f"unknown torchvision model {arch!r} (model.name {name!r}){_did_you_mean(arch, known)}; "
                "torchvision.models.list_models() names them all"
            )
    else:
        raise UnknownNameError(f"unknown model source {source!r} in model.name {name!r}; known: timm, torchvision")


def _did_you_mean(name: str, known: list[str]) -> str:
    """Close names from a list too long to print (timm has over a thousand)."""
    close = difflib.get_close_matches(name, known, n=3)
    return f" (close: {', '.join(close)})" if close else ""


DATA_VARIABLE = "FLEXRES_DATA"


def resolve_data_root(root: str | Path) -> str:
    """``data.root`` with ``~`` and environment variables expanded. The bundled configs name their data as
    ``$FLEXRES_DATA/imagenette-224``: the folder that holds your datasets, set once per machine."""
    text = os.path.expanduser(os.path.expandvars(str(root)))
    if "$" in text:
        missing = re.findall(r"\$\{?(\w+)", text)
        hint = (
            f"export {DATA_VARIABLE}=/path/to/datasets (the folder holding imagenette-224/, camvid/, ...)"
            if DATA_VARIABLE in missing
            else f"set {', '.join(missing)}"
        )
        raise ConfigError(
            f"data.root {root!r} names an environment variable that is not set: pass --data DIR or {hint}"
        )
    return text
