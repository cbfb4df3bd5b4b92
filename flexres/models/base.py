"""AdaptiveModel: the operating-point state shared by every flexres model family."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from torch import Tensor, nn

from ..nn.adaptive import AdaptiveLayer, PointSetting, adaptive_layers
from ..nn.meta_conv import MetaConv2d
from ..nn.quantize import FULL_PRECISION, LQQuantizer, QuantConv2d, passing_uninitialized
from ..nn.slimmable import SlimmableBatchNorm2d, SlimmableConv2d, make_divisible, set_rounding
from ..nn.stage_resize import factor_key
from ..nn.switchable_bn import BN_POLICIES, SwitchableBatchNorm2d, nearest_index
from ..notes import note
from ..operating_point import OperatingPoint

__all__ = ["AdaptiveModel", "FeatureSequenceModel", "SAN_MODES", "load_single_bn_weights", "make_divisible"]

ConvFactory = Callable[..., nn.Module]  # (cin, cout, kernel, stride, padding, groups=1) -> bias-free conv
NormFactory = Callable[[int], nn.Module]  # channels -> normalisation layer
SCALE_POLICIES = ("exact", "nearest")
# SAN's three inference modes (Alg. 2-4) as (bn_policy, scale_policy).
SAN_MODES = {
    "proxy": {"bn_policy": "nearest", "scale_policy": "nearest"},
    "ideal": {"bn_policy": "calibrate", "scale_policy": "exact"},
    "data-free": {"bn_policy": "interpolate", "scale_policy": "exact"},
}


def _plain_conv(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)


def _meta_conv(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1) -> MetaConv2d:
    return MetaConv2d(cin, cout, kernel, stride, padding, groups=groups)


def conv_factory(meta: bool = False, slimmable_divisor: int | None = None) -> ConvFactory:
    """Plain, SAN (meta) or width-slimmable (``slimmable_divisor`` set) bias-free convolutions."""
    if slimmable_divisor is not None:

        def slim(
            cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1
        ) -> SlimmableConv2d:
            return SlimmableConv2d(
                cin, cout, kernel, stride, padding, groups, slim_in=cin != 3, divisor=slimmable_divisor
            )

        return slim
    return _meta_conv if meta else _plain_conv


def quantized_conv_factory(w_bits: int, a_bits: int, activation_bases: int) -> ConvFactory:
    """LQ-Nets convolutions: ``w_bits`` weights (a basis per output channel), ``a_bits`` inputs (``activation_bases``
    bases: 1 shared by every resolution, or one per trained resolution)."""

    def quant(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1) -> QuantConv2d:
        return QuantConv2d(
            cin, cout, kernel, stride, padding, groups, w_bits=w_bits, a_bits=a_bits, activation_bases=activation_bases
        )

    return quant


def scale_aware_norm(
    factors: tuple[float, ...], stage: int, train_resolutions: tuple[int, ...]
) -> Callable[[int], nn.Module]:
    """Resizable networks' scale-aware BN: one BN per factor of ``stage`` (keyed 45, 65, ...); stage -1
    (before the first resize) keeps one BN per training resolution."""

    def make(num_features: int) -> SwitchableBatchNorm2d:
        if stage < 0:
            return SwitchableBatchNorm2d(num_features, resolutions=train_resolutions)
        bn = SwitchableBatchNorm2d(num_features, resolutions=[factor_key(f) for f in factors])
        bn.scale_stage = stage
        return bn

    return make


def resize_plan(strides: list[int]) -> tuple[dict[int, int], list[int], list[int]]:
    """Resizable networks on a sequence of blocks with these strides (block 0 is the stem).

    Stages are runs of blocks at one feature-map resolution; each resizes at its first non-strided
    block (Resizable App. B.1). Returns (block index -> stage it resizes, the stage whose factor keys
    each block's BNs (-1: before any resize), the plain network's stride at each stage).
    """
    resize_at: dict[int, int] = {}
    bn_stage: list[int] = [-1]
    stage_strides: list[int] = []
    cumulative, stage, pending = strides[0], -1, True
    for b, s in enumerate(strides[1:], start=1):
        if s > 1:
            cumulative *= s
            pending = True
        elif pending:
            stage += 1
            resize_at[b] = stage
            stage_strides.append(cumulative)
            pending = False
        bn_stage.append(stage)
    return resize_at, bn_stage, stage_strides


class AdaptiveModel(nn.Module):
    """Base class: holds the trained resolutions and the active operating point.

    Subclasses build their layers with ``SwitchableBatchNorm2d(..., resolutions=self.train_resolutions)``
    and implement ``forward_features`` (input -> last feature map) and ``forward_head``
    (feature map -> logits).
    """

    # Filled in by the registry so a checkpoint can rebuild the model: {"name": ..., "kwargs": {...}}.
    arch: dict[str, Any]

    def __init__(
        self,
        train_resolutions: list[int] | tuple[int, ...],
        scale_divisor: float | None = None,
        width_range: tuple[float, float] | None = None,
        scale_factors: tuple[float, ...] | None = None,
    ):
        super().__init__()
        if not train_resolutions:
            raise ValueError("train_resolutions must name at least one resolution")
        bad = [r for r in train_resolutions if not isinstance(r, int) or r <= 0]
        if bad:
            raise ValueError(f"train_resolutions must be positive ints, got {bad}")
        # Largest first: index 0 is the largest resolution, as in the papers' equations.
        self.train_resolutions: tuple[int, ...] = tuple(sorted(set(train_resolutions), reverse=True))
        self.operating_point = OperatingPoint(self.train_resolutions[0])
        self.bn_policy = "interpolate"
        # SAN models: eps(r) = r / scale_divisor feeds every MetaConv2d; "exact" uses eps(T), "nearest"
        # the eps of the nearest trained resolution (SAN proxy inference).
        self.scale_divisor = scale_divisor
        self.scale_policy = "exact"
        # Width-slimmable models (US-Net, MutualNet): any width in [width_range[0], width_range[1]].
        self.width_range = tuple(width_range) if width_range is not None else None
        if self.width_range is not None and not 0 < self.width_range[0] <= self.width_range[1] <= 1.0:
            raise ValueError(f"width_range must satisfy 0 < min <= max <= 1, got {width_range}")
        # Resizable networks: a StageResize per stage (``stage_resizers``, set by the family) and the
        # factor list L; the operating point's ``scales`` picks one factor per stage.
        self.scale_factors = tuple(float(f) for f in scale_factors) if scale_factors is not None else None
        if self.scale_factors is not None and not all(0 < f <= 1.0 for f in self.scale_factors):
            raise ValueError(f"scale factors must lie in (0, 1], got {list(scale_factors)}")
        self.stage_resizers: nn.ModuleList | None = None
        self._switchable: list[SwitchableBatchNorm2d] | None = None
        self._meta: list[MetaConv2d] | None = None

    # --- operating point ---
    @property
    def trained_operating_points(self) -> tuple[OperatingPoint, ...]:
        return tuple(OperatingPoint(r) for r in self.train_resolutions)

    def adaptive_layers(self) -> list[AdaptiveLayer]:
        """Every layer that applies the operating point (flexres.nn.adaptive), in module order."""
        if getattr(self, "_adaptive", None) is None:
            self._adaptive = adaptive_layers(self)
        return self._adaptive

    def switchable_bns(self) -> list[SwitchableBatchNorm2d]:
        if self._switchable is None:
            self._switchable = [m for m in self.modules() if isinstance(m, SwitchableBatchNorm2d)]
        return self._switchable

    def activation_quantizers(self) -> list[LQQuantizer]:
        """LQ-Nets activation quantizers with one basis per trained resolution (none in a full-precision model)."""
        if getattr(self, "_act_quant", None) is None:
            self._act_quant = [
                m for m in self.modules() if isinstance(m, LQQuantizer) and not m.signed and m.basis.shape[0] > 1
            ]
        return self._act_quant

    def use_quantization(self, w_bits: int, a_bits: int, activation_bases: str) -> ConvFactory | None:
        """The body's conv factory for LQ-Nets ``w_bits`` / ``a_bits`` (None: full precision). The first conv and the
        classifier stay full precision, as in LQ-Nets."""
        if activation_bases not in ("shared", "private"):
            raise ValueError(
                f"activation_bases must be 'shared' (the authors' code) or 'private' (one per resolution), "
                f"got {activation_bases!r}"
            )
        if w_bits == FULL_PRECISION and a_bits == FULL_PRECISION:
            return None
        n = len(self.train_resolutions) if activation_bases == "private" else 1
        return quantized_conv_factory(w_bits, a_bits, n)

    def calibratable_bns(self) -> list[nn.Module]:
        """Every BN whose statistics can be re-estimated per operating point."""
        return [m for m in self.modules() if isinstance(m, (SwitchableBatchNorm2d, SlimmableBatchNorm2d))]

    def resolve(self, op: OperatingPoint) -> OperatingPoint:
        """``op`` with its per-stage scales spelled out (all 1.0 when it names none) on a Resizable network."""
        if self.scale_factors is None or op.scales is not None:
            return op
        return OperatingPoint(op.resolution, op.width, self.stage_scales(op))

    def is_calibrated(self, op: OperatingPoint | int) -> bool:
        op = self.resolve(OperatingPoint.coerce(op))
        bns = self.calibratable_bns()
        return bool(bns) and all(bn.calibration_key(op) in bn.calibrated for bn in bns)

    def clear_calibration(self) -> None:
        for bn in self.calibratable_bns():
            bn.calibrated.clear()

    @contextmanager
    def measuring_cost(self) -> Iterator[AdaptiveModel]:
        """Eval mode where uncalibrated slimmable BNs run on placeholder statistics and untrained LQ-Nets quantizers
        pass their input through: for MACs and latency only (a trained model, the only one worth timing, quantizes)."""
        was_training = self.training
        bns = [m for m in self.modules() if isinstance(m, SlimmableBatchNorm2d)]
        self.eval()
        for bn in bns:
            bn.placeholder_statistics = True
        try:
            with passing_uninitialized(self):
                yield self
        finally:
            for bn in bns:
                bn.placeholder_statistics = False
            self.train(was_training)

    def meta_convs(self) -> list[MetaConv2d]:
        if self._meta is None:
            self._meta = [m for m in self.modules() if isinstance(m, MetaConv2d)]
        return self._meta

    def scale_resolution(self, resolution: int, scale_policy: str | None = None) -> int:
        """The resolution whose scale encoding generates the weights when serving ``resolution``."""
        if (scale_policy or self.scale_policy) == "nearest":
            return self.train_resolutions[nearest_index(resolution, self.train_resolutions)]
        return resolution

    def set_operating_point(
        self, op: OperatingPoint | int, bn_policy: str | None = None, scale_policy: str | None = None
    ) -> AdaptiveModel:
        """Switch to ``op`` (an OperatingPoint or a resolution). Cheap: no re-allocation.

        bn_policy serves untrained resolutions (nearest / interpolate / calibrate); scale_policy
        (SAN models only) picks the scale encoding: "exact" eps(T) or "nearest" eps(S(T)).
        """
        op = OperatingPoint.coerce(op)
        policy = bn_policy or self.bn_policy
        if policy not in BN_POLICIES:
            raise ValueError(f"unknown bn_policy {policy!r}; choose one of {', '.join(BN_POLICIES)}")
        scale = scale_policy or self.scale_policy
        if scale not in SCALE_POLICIES:
            raise ValueError(f"unknown scale_policy {scale!r}; choose one of {', '.join(SCALE_POLICIES)}")
        if (
            self.scale_divisor is not None
            and policy == "calibrate"
            and scale != "exact"
            and op.resolution not in self.train_resolutions
        ):
            raise ValueError(
                "bn_policy 'calibrate' re-estimates statistics under the weights generated at eps(T), so it "
                "needs scale_policy 'exact' (SAN ideal inference)"
            )
        self._check_operating_point(op)
        eps = (
            self.scale_resolution(op.resolution, scale) / self.scale_divisor if self.scale_divisor is not None else None
        )
        setting = PointSetting(self.resolve(op), self.stage_scales(op), tuple(self.train_resolutions), policy, eps)
        fell_back = False
        for layer in self.adaptive_layers():
            fell_back |= layer.apply_point(setting)
        if fell_back:
            note(
                f"{op.resolution} px is outside the trained range "
                f"[{min(self.train_resolutions)}, {max(self.train_resolutions)}]: "
                "bn_policy 'interpolate' serves it with the nearest trained BN"
            )
        self.operating_point = op
        self.bn_policy = policy
        self.scale_policy = scale
        return self

    @property
    def num_stages(self) -> int:
        return len(self.stage_resizers) if self.stage_resizers is not None else 0

    def stage_scales(self, op: OperatingPoint) -> tuple[float, ...]:
        """The per-stage factors of ``op`` (all 1.0 when it names none)."""
        return op.scales if op.scales is not None else (1.0,) * self.num_stages

    def _check_operating_point(self, op: OperatingPoint) -> None:
        if op.scales is not None:
            if self.scale_factors is None:
                raise ValueError(f"{type(self).__name__} has no per-stage scales; got {op}")
            if len(op.scales) != self.num_stages:
                raise ValueError(f"{op} gives {len(op.scales)} scales; this model has {self.num_stages} stages")
            lo, hi = min(self.scale_factors), max(self.scale_factors)
            bad = [f for f in op.scales if not lo - 1e-9 <= f <= hi + 1e-9]
            if bad:
                raise ValueError(f"scales {bad} lie outside the trained factors [{lo:g}, {hi:g}]")
        if self.width_range is None:
            if op.width != 1.0:
                raise ValueError(f"{type(self).__name__} adapts resolution only; got {op}")
        elif not self.width_range[0] - 1e-9 <= op.width <= self.width_range[1] + 1e-9:
            raise ValueError(f"width {op.width:g} is outside this model's width range {list(self.width_range)}")

    @contextmanager
    def at(
        self,
        op: OperatingPoint | int | None = None,
        *,
        bn_policy: str | None = None,
        scale_policy: str | None = None,
        **fields: Any,
    ) -> Iterator[AdaptiveModel]:
        """Context manager: ``with model.at(96): ...`` or ``with model.at(resolution=96, bn_policy="nearest")``."""
        if op is None:
            op = OperatingPoint(**fields)
        elif fields:
            raise TypeError("pass either an operating point or its fields, not both")
        previous = (self.operating_point, self.bn_policy, self.scale_policy)
        self.set_operating_point(op, bn_policy, scale_policy)
        try:
            yield self
        finally:
            self.set_operating_point(*previous)

    def use_channel_rounding(self, rule: str, **arch: Any) -> None:
        """Width-slimmable families: every layer rounds channels by ``rule``; ``arch`` (with the rule) is recorded
        in ``model.arch`` by the registry, so a checkpoint rebuilds exactly this network even when defaults change."""
        set_rounding(self, rule)
        self.arch_defaults = {"channel_rounding": rule, **arch}

    def layer_factories(
        self,
        meta_conv: bool = False,
        slimmable: bool = False,
        slim_divisor: int = 8,
        norm_layer: NormFactory | None = None,
        conv_layer: ConvFactory | None = None,
    ) -> tuple[NormFactory, ConvFactory]:
        """(norm, conv) factories: a BN per trained resolution with plain or SAN convs, or width-slimmable layers;
        ``norm_layer`` / ``conv_layer``, when given, instead (any layer, adaptive ones through flexres.nn.adaptive)."""
        if slimmable:
            norm, conv = (
                partial(SlimmableBatchNorm2d, divisor=slim_divisor),
                conv_factory(slimmable_divisor=slim_divisor),
            )
        else:
            norm, conv = partial(SwitchableBatchNorm2d, resolutions=self.train_resolutions), conv_factory(meta_conv)
        return norm_layer or norm, conv_layer or conv

    # --- forward ---
    def feature_blocks(self) -> list[tuple[int | None, Callable[[Tensor], Tensor]]]:
        """The body as a sequence of (stage whose StageResize runs before this block, or None; block).

        ``forward_features`` runs them in order; the prefix-tree evaluation of Resizable configurations
        (``flexres.models.config_tree``) cuts them at the resizes, so every configuration sharing a prefix
        of factors shares that prefix's computation."""
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> Tensor:
        for stage, block in self.feature_blocks():
            if stage is not None and self.stage_resizers is not None:
                x = self.stage_resizers[stage](x)
            x = block(x)
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        r = self.operating_point.resolution
        if x.dim() != 4 or x.shape[-1] != r or x.shape[-2] != r:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not match the operating point {self.operating_point} "
                f"(expected N x C x {r} x {r}); call model.set_operating_point({x.shape[-1]}) first"
            )
        return self.forward_head(self.forward_features(x))


class FeatureSequenceModel(AdaptiveModel):
    """A family whose body is ``self.features`` (a sequence of blocks) and head ``self.classifier``
    (MobileNets): blocks run in order, with each stage's StageResize before its ``resize_at`` block."""

    resize_at: dict[int, int]

    def feature_blocks(self) -> list[tuple[int | None, Callable[[Tensor], Tensor]]]:
        return [(self.resize_at.get(b), layer) for b, layer in enumerate(self.features)]

    def forward_head(self, x: Tensor) -> Tensor:
        return self.classifier(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def load_single_bn_weights(model: AdaptiveModel, state_dict: dict[str, Tensor]) -> None:
    """Load a plain (one-BN) state dict, e.g. torchvision's ``resnet18`` weights, into every BN set.

    ``layer1.0.bn1.weight`` goes to ``layer1.0.bn1.bns.<i>.weight`` for every trained resolution,
    the usual starting point for fine-tuning a pretrained network into a switchable one.
    """
    own = model.state_dict()
    expanded: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        targets = [t for t in (f"{prefix}.bns.{i}.{leaf}" for i in range(len(own))) if t in own]
        if key in own:
            expanded[key] = value
        elif targets:
            expanded.update({t: value for t in targets})
        else:
            raise KeyError(f"{key} matches no parameter or buffer of {type(model).__name__}")
    missing = sorted(set(own) - set(expanded))
    if missing:
        raise KeyError(f"state dict lacks {len(missing)} entries of the model, e.g. {', '.join(missing[:4])}")
    model.load_state_dict(expanded)
