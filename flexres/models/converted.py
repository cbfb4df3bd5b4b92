"""Any CNN made resolution-switchable: model surgery on a timm, torchvision or user ``nn.Module``.

Every ``BatchNorm2d`` becomes a ``SwitchableBatchNorm2d`` whose per-resolution BNs all start as copies of the original
(affine parameters and running statistics), so at every resolution the converted model first computes exactly what
the original computed; training then lets each resolution's BN drift to its own statistics (RS-Nets). For SAN,
every ``Conv2d`` becomes a ``MetaConv2d`` with A = 0 and B = the pretrained weight, so W(eps) = A eps + B equals the
pretrained weight at every eps until training moves A.

Normalisations that compute statistics per image (LayerNorm, GroupNorm, InstanceNorm) have no running statistics
to keep per resolution: ``other_norms="share"`` keeps them shared, ``"refuse"`` (the default) stops and names them,
so nobody believes a LayerNorm model became an RS-Net. A BN over another input rank (BatchNorm1d / 3d) is always
refused.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.meta_conv import MetaConv2d
from ..nn.switchable_bn import SwitchableBatchNorm2d
from ..notes import note
from .base import AdaptiveModel
from .pretrained import classifier_rows, map_state_dict, read_state_dict, resolve_weights

PER_IMAGE_NORMS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LocalResponseNorm,
)
SOURCES = ("timm", "torchvision")


def _switchable_from(bn: nn.BatchNorm2d, resolutions: Sequence[int]) -> SwitchableBatchNorm2d:
    if not bn.affine or not bn.track_running_stats:
        raise ValueError(
            f"a BatchNorm2d without affine parameters or running statistics ({bn}) cannot be made switchable"
        )
    # momentum None (a cumulative average of every batch) is kept: each private BN averages the same way
    sw = SwitchableBatchNorm2d(bn.num_features, resolutions, eps=bn.eps, momentum=bn.momentum)
    sw.load_state_dict(
        {f"bns.{i}.{k}": v.detach().clone() for i in range(len(sw.bns)) for k, v in bn.state_dict().items()},
        strict=True,
    )
    return sw.to(bn.weight.device)


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and not list(module.children())


def _convert_norm(name: str, child: nn.Module, resolutions: Sequence[int], other_norms: str) -> nn.Module | None:
    """The replacement for ``child`` (None: keep it as it is)."""
    if "FrozenBatchNorm" in type(child).__name__:  # timm's FrozenBatchNormAct2d, torchvision's FrozenBatchNorm2d
        raise ValueError(
            f"{name} ({type(child).__name__}) is a frozen BatchNorm: its statistics never change, so no resolution "
            "can get its own; unfreeze the model's BNs first (timm.layers.unfreeze_batch_norm_2d) or build it "
            "without freezing"
        )
    if isinstance(child, nn.BatchNorm2d):  # SyncBatchNorm is not a BatchNorm2d: refused below
        sw = _switchable_from(child, resolutions)
        # timm's BatchNormAct2d is a BatchNorm2d that also applies dropout and an activation: keep those after it.
        extra = [
            m
            for m in (getattr(child, "drop", None), getattr(child, "act", None))
            if m is not None and not isinstance(m, nn.Identity)
        ]
        return nn.Sequential(sw, *extra) if extra else sw
    if isinstance(child, PER_IMAGE_NORMS):
        if other_norms == "share":
            return None
        raise ValueError(
            f"{name} ({type(child).__name__}) normalises each image by its own statistics, so there is nothing to keep "
            "per resolution; pass other_norms='share' to keep it shared across resolutions (the BNs still switch)"
        )
    if isinstance(child, (nn.modules.batchnorm._NormBase, nn.SyncBatchNorm)) or _is_norm(child):
        raise ValueError(
            f"{name} ({type(child).__name__}) is a normalisation flexres cannot make switchable; only BatchNorm2d "
            "(and timm's BatchNormAct2d) are (convert SyncBatchNorm back with a plain BatchNorm2d first)"
        )
    return None


def _meta_from(conv: nn.Conv2d, name: str) -> MetaConv2d:
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    square = k[0] == k[1] and s[0] == s[1] and not isinstance(p, str) and p[0] == p[1]
    if type(conv) is not nn.Conv2d or not square or d != (1, 1) or conv.padding_mode != "zeros":
        raise ValueError(
            f"{name} ({conv}) is not a plain square, undilated, zero-padded Conv2d: SAN's MetaConv2d cannot replace it"
        )
    if conv.bias is not None:
        raise ValueError(
            f"{name} has a bias: SAN's MetaConv2d generates bias-free weights (a BN follows every conv in SAN)"
        )
    meta = MetaConv2d(conv.in_channels, conv.out_channels, k[0], s[0], p[0], conv.groups)
    with torch.no_grad():
        meta.A.zero_()
        meta.B.copy_(conv.weight)
    return meta.to(conv.weight.device)


def _convert(
    module: nn.Module,
    prefix: str,
    resolutions: Sequence[int],
    other_norms: str,
    san: bool,
    done: dict[int, nn.Module] | None = None,
) -> None:
    """Replace, in place, every BN (and for SAN every conv) below ``module``. ``done`` maps a module already
    replaced to its replacement, so a module used at two places stays one module (its parameters shared)."""
    done = {} if done is None else done
    for child_name, child in list(module.named_children()):
        name = f"{prefix}{child_name}"
        if id(child) in done:
            setattr(module, child_name, done[id(child)])
            continue
        new = (
            _meta_from(child, name)
            if san and isinstance(child, nn.Conv2d)
            else _convert_norm(name, child, resolutions, other_norms)
        )
        if new is not None:
            done[id(child)] = new
            setattr(module, child_name, new)
        else:
            done[id(child)] = child
            _convert(child, name + ".", resolutions, other_norms, san, done)


class ConvertedModel(AdaptiveModel):
    """A model from elsewhere with its BNs (and, for SAN, its convolutions) made switchable; ``self.net`` is the
    original module, converted in place. ``forward_features`` / ``forward_head`` are the source's where it has them
    (timm); otherwise the whole network runs as the head."""

    def __init__(
        self,
        net: nn.Module,
        train_resolutions: Sequence[int],
        *,
        other_norms: str = "refuse",
        san: bool = False,
        scale_divisor: float | None = None,
        preprocessing: dict[str, Any] | None = None,
    ) -> None:
        if other_norms not in ("refuse", "share"):
            raise ValueError(f"other_norms must be 'refuse' or 'share', got {other_norms!r}")
        super().__init__(train_resolutions, scale_divisor=(scale_divisor or max(train_resolutions)) if san else None)
        # Checked first: a model without BN gets this one message, not a suggestion about its other norms that then
        # fails.
        if not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(m).__name__ for m in net.modules()
        ):
            raise ValueError(
                f"{type(net).__name__} has no BatchNorm: there is nothing to switch per resolution (RS-Nets keeps "
                "private BN statistics per resolution; a model normalised per image needs no conversion)"
            )
        _convert(net, "", self.train_resolutions, other_norms, san)
        self.net = net
        # The source's eval transform (mean, std, crop fraction), e.g. timm's pretrained_cfg; None: flexres's defaults.
        self.preprocessing = preprocessing
        self.shared_norms = [n for n, m in net.named_modules() if isinstance(m, PER_IMAGE_NORMS)]

    def forward_features(self, x: Tensor) -> Tensor:
        return self.net.forward_features(x) if hasattr(self.net, "forward_features") else x

    def forward_head(self, x: Tensor) -> Tensor:
        return self.net.forward_head(x) if hasattr(self.net, "forward_features") else self.net(x)


def make_switchable(
    net: nn.Module,
    resolutions: Sequence[int],
    *,
    other_norms: str = "refuse",
    san: bool = False,
    scale_divisor: float | None = None,
    copy_model: bool = True,
) -> ConvertedModel:
    """``net`` (any CNN: timm, torchvision, your own) as a flexres model switchable over ``resolutions``.

    Outputs equal ``net``'s at every resolution until it is trained. ``san=True`` also turns every Conv2d into a
    MetaConv2d (scale encoding eps = resolution / ``scale_divisor``, default the largest resolution). The original
    is left untouched unless ``copy_model=False``. A model built this way trains, evaluates, calibrates and exports
    like any flexres model; to rebuild it from a checkpoint, build it through the registry
    (``create_model("timm:efficientnet_b0", ...)``), which records where the architecture came from."""
    return ConvertedModel(
        copy.deepcopy(net) if copy_model else net,
        resolutions,
        other_norms=other_norms,
        san=san,
        scale_divisor=scale_divisor,
    )


# --- building from timm / torchvision by name (the registry's "timm:<name>" and "torchvision:<name>") ---


def _last_linear(net: nn.Module) -> tuple[str, nn.Module, str, nn.Linear]:
    """The classifier: the last nn.Linear, as (qualified name, parent, attribute, layer)."""
    found = None
    for parent_name, parent in net.named_modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found = (f"{parent_name}.{child_name}" if parent_name else child_name, parent, child_name, child)
    if found is None:
        raise ValueError(f"{type(net).__name__} has no nn.Linear classifier to resize")
    return found


def load_pretrained(net: nn.Module, pretrained: str | Path, num_classes: int, rows: Sequence[int] | None = None) -> str:
    """Load a weights file (or an installed package's) into ``net``, keys mapped by structure and checked.

    The classifier: with ``rows``, those rows of the file's classifier (e.g. the ImageNet classes of the data's class
    folders); else the file's own when it has ``num_classes`` outputs; else ``net``'s fresh one. Returns which, for
    the run's log."""
    path = resolve_weights(pretrained)
    fc_name = _last_linear(net)[0]
    w, b = f"{fc_name}.weight", f"{fc_name}.bias"
    state = map_state_dict(read_state_dict(path), net.state_dict(), str(path), classifier=fc_name)
    classes = state[w].shape[0]
    if rows is not None:
        if max(rows, default=-1) >= classes or len(rows) != num_classes:
            raise ValueError(
                f"{path}: {len(rows)} classifier rows up to {max(rows, default=-1)} asked of a {classes}-class "
                f"classifier for a {num_classes}-class model"
            )
        state[w], bias = classifier_rows(state[w], state.get(b), rows)
        if bias is not None:
            state[b] = bias
        how = f"{fc_name}: {len(rows)} rows of the file's {classes}-class classifier"
    elif classes == num_classes:
        how = f"{fc_name}: the file's own ({classes} classes)"
    else:
        state.pop(w)
        state.pop(b, None)
        how = f"{fc_name}: new ({num_classes} classes; the file's has {classes})"
    net.load_state_dict(state, strict=False)  # every key but a new classifier's was checked by map_state_dict
    return how


def _timm_preprocessing(net: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=net)
    interpolation = cfg.get("interpolation", "bilinear")
    return {
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "crop_fraction": float(cfg["crop_pct"]),
        "interpolation": interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
    }


def _torchvision_preprocessing(name: str) -> dict[str, Any]:
    import torchvision

    try:  # the weights' eval transform is metadata (nothing is downloaded), so a resumed run gets the same one
        t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        interpolation = getattr(t.interpolation, "value", "bilinear")
        return {
            "mean": list(t.mean),
            "std": list(t.std),
            "crop_fraction": t.crop_size[0] / t.resize_size[0],
            "interpolation": interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
        }
    except (ValueError, KeyError, AttributeError):
        return {
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "crop_fraction": 0.875,
            "interpolation": "bilinear",
        }


def build_foreign(
    source: str,
    name: str,
    num_classes: int,
    pretrained: bool | str | None,
    pretrained_rows: Sequence[int] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The original model and its eval preprocessing (mean, std, crop_fraction), with pretrained weights when asked:
    ``True`` uses the library's own download path (needs internet); a path (.safetensors, or a PyTorch file read with
    weights_only) or an installed package that ships one loads local weights (``load_pretrained``)."""
    local = isinstance(pretrained, (str, Path))
    if pretrained_rows is not None and not local:
        raise ValueError(
            "classifier rows (model.head: pretrained_rows) come from a local weights file: set model.pretrained"
        )
    if source == "timm":
        try:
            import timm
        except ImportError as e:
            raise ImportError("timm models need timm: pip install 'flexres[timm]'") from e
        try:
            net = timm.create_model(name, num_classes=num_classes, pretrained=pretrained is True)
        except RuntimeError as e:
            raise RuntimeError(f"timm:{name}: {e}") from e
        if local:
            note(f"timm:{name}: {load_pretrained(net, pretrained, num_classes, pretrained_rows)}")
        return net, _timm_preprocessing(net)
    if source == "torchvision":
        import torchvision

        if pretrained is True:
            weights = torchvision.models.get_model_weights(name).DEFAULT
            net = torchvision.models.get_model(name, weights=weights)
            if num_classes != len(weights.meta["categories"]):
                _, parent, attr, fc = _last_linear(net)
                setattr(parent, attr, nn.Linear(fc.in_features, num_classes))
            return net, _torchvision_preprocessing(name)
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        if local:
            note(f"torchvision:{name}: {load_pretrained(net, pretrained, num_classes, pretrained_rows)}")
        return net, _torchvision_preprocessing(name)
    raise ValueError(f"unknown model source {source!r}; known: {', '.join(SOURCES)}")


def create_converted(
    qualified: str,
    num_classes: int = 1000,
    train_resolutions: Sequence[int] = (224,),
    width_mult: float = 1.0,
    pretrained: bool | str | None = None,
    other_norms: str = "refuse",
    san: bool = False,
    scale_divisor: float | None = None,
    pretrained_rows: Sequence[int] | None = None,
) -> ConvertedModel:
    """``timm:<name>`` or ``torchvision:<name>`` built by that library and made switchable."""
    source, _, name = qualified.partition(":")
    if width_mult != 1.0:
        raise ValueError(
            f"{qualified}: width_mult applies to flexres's own families; pick a smaller {source} model instead"
        )
    net, pre = build_foreign(source, name, num_classes, pretrained, pretrained_rows)
    return ConvertedModel(
        net, train_resolutions, other_norms=other_norms, san=san, scale_divisor=scale_divisor, preprocessing=pre
    )
