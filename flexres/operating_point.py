"""The operating point: everything that selects one concrete sub-network of an adaptive model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OperatingPoint:
    """One concrete configuration of an adaptive network.

    resolution: input side in pixels (square).
    width: channel multiplier (MutualNet / US-Net); 1.0 for every other method.
    scales: per-stage feature-map factors (Resizable networks); None elsewhere.
    """

    resolution: int
    width: float = 1.0
    scales: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or isinstance(self.resolution, bool) or self.resolution <= 0:
            raise ValueError(f"OperatingPoint.resolution must be a positive int, got {self.resolution!r}")
        if not 0.0 < float(self.width) <= 1.0:
            raise ValueError(f"OperatingPoint.width must be in (0, 1], got {self.width!r}")
        if self.scales is not None:
            object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    @classmethod
    def coerce(cls, value: OperatingPoint | int) -> OperatingPoint:
        if isinstance(value, OperatingPoint):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(resolution=value)
        raise TypeError(f"expected an OperatingPoint or an int resolution, got {value!r}")

    def __str__(self) -> str:
        parts = [f"{self.resolution}px"]
        if self.width != 1.0:
            parts.append(f"w{self.width:g}")
        if self.scales is not None:
            parts.append("s" + "-".join(f"{s:g}" for s in self.scales))
        return "@".join(parts)
