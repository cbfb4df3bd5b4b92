"""SwitchableBatchNorm2d: a private BatchNorm per trained resolution (RS-Nets Eq. 3).

Serving a resolution that was never trained is a *BN policy*:

- ``nearest``: the BN of the nearest trained resolution (ties go to the larger one);
- ``interpolate``: gamma, beta, running mean and running var each linearly interpolated in
  resolution between the two neighbouring trained BNs (RS-Nets 4.3, SAN App. H Eq. 1);
- ``calibrate``: statistics re-estimated at that resolution on training images, with the affine
  parameters of the nearest trained BN (SAN "ideal", MutualNet post-statistics BN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..operating_point import OperatingPoint
from .adaptive import AdaptiveLayer, PointSetting
from .stage_resize import factor_key

# Calibrated statistics are stored per key: an input resolution, or (resolution, factors of stages 0..k) for a
# scale-aware BN of a Resizable network's stage k.
CalibrationKey = int | tuple[int, tuple[float, ...]]
BN_POLICIES = ("nearest", "interpolate", "calibrate")


@dataclass(frozen=True)
class BNChoice:
    """How one resolution is served: a trained BN, a blend of two, or calibrated statistics."""

    kind: str  # "trained" | "interpolate" | "calibrated"
    index: int  # the trained BN used (for "interpolate": the lower neighbour)
    upper: int = -1  # "interpolate" only: the upper neighbour
    t: float = 0.0  # "interpolate" only: weight of the upper neighbour
    fell_back: bool = False  # interpolate asked outside the trained range -> nearest


def nearest_index(resolution: int, trained: tuple[int, ...]) -> int:
    # Ties go to the larger resolution: it saw more detail, and SAN's S(T) rounds up on ties.
    return min(range(len(trained)), key=lambda i: (abs(trained[i] - resolution), -trained[i]))


def plan_bn(
    resolution: int, trained: tuple[int, ...], policy: str, calibrated: frozenset[int] = frozenset()
) -> BNChoice:
    """Decide how ``resolution`` is served under ``policy`` given the trained resolutions."""
    if policy not in BN_POLICIES:
        raise ValueError(f"unknown bn_policy {policy!r}; choose one of {', '.join(BN_POLICIES)}")
    if policy == "calibrate" and resolution in calibrated:
        return BNChoice("calibrated", nearest_index(resolution, trained))
    if resolution in trained:
        return BNChoice("trained", trained.index(resolution))
    if policy == "nearest":
        return BNChoice("trained", nearest_index(resolution, trained))
    if policy == "calibrate":
        raise LookupError(
            f"resolution {resolution} has no calibrated BN statistics; run "
            "flexres.calibrate_bn(model, loader, resolutions=[...]) first (or use bn_policy='interpolate'/'nearest')"
        )
    below = [i for i, r in enumerate(trained) if r < resolution]
    above = [i for i, r in enumerate(trained) if r > resolution]
    if not below or not above:
        return BNChoice("trained", nearest_index(resolution, trained), fell_back=True)
    lo = max(below, key=lambda i: trained[i])
    hi = min(above, key=lambda i: trained[i])
    t = (resolution - trained[lo]) / (trained[hi] - trained[lo])
    return BNChoice("interpolate", lo, upper=hi, t=t)


class _MomentAccumulator:
    """Exact per-channel mean and unbiased variance over every pixel of every calibration batch.

    across_ranks: under torchrun, sum the moments of every rank (each rank passing its own images).
    """

    def __init__(self, across_ranks: bool = False) -> None:
        self.across_ranks = across_ranks
        self.count = 0
        self.sum: Tensor | None = None
        self.sum_sq: Tensor | None = None

    def update(self, x: Tensor) -> None:
        x64 = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
        s, sq = x64.sum(1), (x64 * x64).sum(1)
        self.sum = s if self.sum is None else self.sum + s
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq
        self.count += x64.shape[1]

    def result(self) -> tuple[Tensor, Tensor]:
        if (
            self.across_ranks
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and self.sum is not None
        ):
            # Calibration under torchrun: every rank saw its own images; the statistics are over all of them.
            packed = torch.cat([self.sum, self.sum_sq, self.sum.new_tensor([float(self.count)])])
            torch.distributed.all_reduce(packed)
            c = self.sum.numel()
            self.sum, self.sum_sq, self.count = packed[:c], packed[c : 2 * c], int(packed[-1].item())
        if self.count < 2:
            raise RuntimeError("BN calibration saw fewer than 2 values per channel; give it more images")
        mean = self.sum / self.count
        var = (self.sum_sq - self.count * mean * mean) / (self.count - 1)
        return mean, var.clamp_min(0)


class SwitchableBatchNorm2d(nn.Module, AdaptiveLayer):
    """A private ``nn.BatchNorm2d`` per trained resolution; ``bns[i]`` belongs to ``resolutions[i]``."""

    def __init__(
        self,
        num_features: int,
        resolutions: tuple[int, ...] | list[int],
        eps: float = 1e-5,
        momentum: float | None = 0.1,
    ):
        super().__init__()
        if not resolutions:
            raise ValueError("SwitchableBatchNorm2d needs at least one trained resolution")
        if len(set(resolutions)) != len(resolutions):
            raise ValueError(f"duplicate trained resolutions: {list(resolutions)}")
        self.num_features = num_features
        self.resolutions = tuple(int(r) for r in resolutions)
        self.bns = nn.ModuleList(nn.BatchNorm2d(num_features, eps=eps, momentum=momentum) for _ in self.resolutions)
        # Calibrated statistics live outside the state_dict: they belong to a run's evaluation,
        # are saved beside the checkpoint, and a model must load without them.
        self.calibrated: dict[CalibrationKey, tuple[Tensor, Tensor]] = {}
        self._choice = BNChoice("trained", 0)
        self._resolution = self.resolutions[0]
        self._calibration_key: CalibrationKey = self._resolution
        self._accumulator: _MomentAccumulator | None = None
        # Resizable networks: the stage whose scaling factor (not the input resolution) keys this BN.
        self.scale_stage: int | None = None

    @property
    def eps(self) -> float:
        return self.bns[0].eps

    def select(
        self, resolution: int, policy: str = "interpolate", calibration_key: CalibrationKey | None = None
    ) -> BNChoice:
        """Serve ``resolution`` (a trained key: the input resolution, or a scale-aware BN's factor key) by
        ``policy``. ``calibration_key`` names the calibrated statistics ``policy="calibrate"`` looks up
        (default: ``resolution``; a scale-aware BN's depends on the whole configuration up to its stage)."""
        key = resolution if calibration_key is None else calibration_key
        if policy == "calibrate" and key in self.calibrated:
            self._choice = BNChoice("calibrated", nearest_index(resolution, self.resolutions))
        else:
            self._choice = plan_bn(resolution, self.resolutions, policy)
        self._resolution, self._calibration_key = resolution, key
        return self._choice

    def selected_parameters(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(weight, bias, running_mean, running_var) of the BN serving the current resolution."""
        c = self._choice
        bn = self.bns[c.index]
        if c.kind == "trained":
            return bn.weight, bn.bias, bn.running_mean, bn.running_var
        if c.kind == "calibrated":
            mean, var = self.calibrated[self._calibration_key]
            return bn.weight, bn.bias, mean.to(bn.running_mean), var.to(bn.running_var)
        up = self.bns[c.upper]
        return (
            torch.lerp(bn.weight, up.weight, c.t),
            torch.lerp(bn.bias, up.bias, c.t),
            torch.lerp(bn.running_mean, up.running_mean, c.t),
            torch.lerp(bn.running_var, up.running_var, c.t),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self._accumulator is not None:
            # Calibration: normalise with the batch's own statistics (as BN does in training) so the
            # layers below see what they saw in training, and accumulate exact moments.
            self._accumulator.update(x)
            bn = self.bns[nearest_index(self._resolution, self.resolutions)]
            return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, self.eps)
        if self._choice.kind == "trained":
            return self.bns[self._choice.index](x)
        if self.training:
            raise RuntimeError(
                f"resolution {self._resolution} is not a trained resolution of this SwitchableBatchNorm2d "
                f"(trained: {list(self.resolutions)}); train only at trained resolutions"
            )
        w, b, mean, var = self.selected_parameters()
        return F.batch_norm(x, mean, var, w, b, False, 0.0, self.eps)

    def apply_point(self, setting: PointSetting) -> bool:
        key = setting.op.resolution if self.scale_stage is None else factor_key(setting.scales[self.scale_stage])
        return self.select(key, setting.bn_policy, self.calibration_key(setting.op)).fell_back

    def to_static(self) -> nn.Module:
        return self.to_batchnorm()

    def materialize_into(self, target: nn.Module) -> None:
        """The BN serving the current point becomes the only BN set of ``target`` (a one-resolution model's)."""
        bn, dst = self.to_batchnorm(), target.bns[0]
        for attr in ("weight", "bias", "running_mean", "running_var"):
            getattr(dst, attr).copy_(getattr(bn, attr))

    # --- calibration (driven by flexres.nn.calibrate_bn) ---
    def calibration_key(self, op: OperatingPoint) -> CalibrationKey:
        """Under which key statistics calibrated at ``op`` (scales resolved) are stored: the resolution, or for a
        scale-aware BN the resolution and the factors of every stage up to its own, which its input depends on."""
        if self.scale_stage is None:
            return int(op.resolution)
        if op.scales is None:
            raise ValueError(
                f"a scale-aware BN (stage {self.scale_stage}) needs the operating point's per-stage scales, got {op}"
            )
        return (int(op.resolution), tuple(float(f) for f in op.scales[: self.scale_stage + 1]))

    @staticmethod
    def key_to_str(key: CalibrationKey) -> str:
        if isinstance(key, tuple):
            return f"{key[0]}@s" + "-".join(repr(f) for f in key[1])  # repr: exact floats survive the round trip
        return str(key)

    @staticmethod
    def key_from_str(text: str) -> CalibrationKey:
        if "@s" in text:
            r, scales = text.split("@s")
            return (int(r), tuple(float(f) for f in scales.split("-")))
        return int(text)

    def begin_calibration(self, key: CalibrationKey, across_ranks: bool = False) -> None:
        # The affine parameters while calibrating are those selected for the operating point (calibrate_bn
        # selects it with bn_policy "nearest" first); only the key of the statistics is new.
        self._calibration_key = key
        self._accumulator = _MomentAccumulator(across_ranks)

    def end_calibration(self) -> None:
        if self._accumulator is None:
            raise RuntimeError("end_calibration() without begin_calibration()")
        mean, var = self._accumulator.result()
        ref = self.bns[0].running_mean
        self.calibrated[self._calibration_key] = (mean.to(ref), var.to(ref))
        self._accumulator = None

    def abort_calibration(self) -> None:
        self._accumulator = None

    def to_batchnorm(self) -> nn.BatchNorm2d:
        """The BN serving the current resolution as a plain, independent ``nn.BatchNorm2d``."""
        w, b, mean, var = (t.detach().clone() for t in self.selected_parameters())
        bn = nn.BatchNorm2d(self.num_features, eps=self.eps, momentum=self.bns[0].momentum)
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        return bn.to(w.device).eval()

    def extra_repr(self) -> str:
        return f"{self.num_features}, resolutions={list(self.resolutions)}"
