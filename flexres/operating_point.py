"""Operating points: what selects one concrete sub-network of an adaptive model, its one name, and the decisions
made over a run's points (the Pareto front, the best point under a budget, which points a run has measured).

Every layer decides these here: the query table (analysis), predict and export (deploy) and the server (serving).
Only the standard library is used, so any layer may import it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE = "table.json"  # the query table `flexres table` writes into a run
EVALS = "eval_*.json"  # the evaluations `flexres eval` saves into a run


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

    @property
    def name(self) -> str:
        """The one label of a point, in messages, the server's API and file names: '112px', '160px w0.5',
        '160px s0.45-1-1-1'."""
        return (
            f"{self.resolution}px"
            + (f" w{self.width:g}" if self.width != 1.0 else "")
            + (" s" + "-".join(f"{s:g}" for s in self.scales) if self.scales is not None else "")
        )

    @property
    def file_tag(self) -> str:
        """The name as a file-name part: '160px_w0.5'."""
        return self.name.replace(" ", "_")

    @classmethod
    def parse(cls, text: str | int) -> OperatingPoint:
        """The inverse of ``name``; a bare resolution ('224' or 224) is also accepted."""
        m = re.fullmatch(r"(\d+)(?:px)?(?:[ _]w([\d.]+))?(?:[ _]s([\d.]+(?:-[\d.]+)*))?", str(text).strip())
        if not m:
            raise ValueError(
                f"{text!r} is not an operating point (e.g. '224px', '160px w0.5', '160px s0.5-1-1-1', '224')"
            )
        res, width, scales = m.groups()
        return cls(
            int(res), float(width) if width else 1.0, tuple(float(f) for f in scales.split("-")) if scales else None
        )

    @classmethod
    def of_row(cls, row: dict[str, Any]) -> OperatingPoint:
        """The point of a query-table row (resolution, width, scales)."""
        return cls(
            int(row["resolution"]), float(row.get("width", 1.0)), tuple(row["scales"]) if row.get("scales") else None
        )

    def __str__(self) -> str:
        return self.name


def pareto_front(rows: list[dict[str, Any]], cost: str = "macs") -> list[dict[str, Any]]:
    """Rows no other row beats: none is at most as costly and strictly more accurate (or cheaper and as accurate)."""
    front, best = [], float("-inf")
    for row in sorted(rows, key=lambda r: (r[cost], -r["top1"])):
        if row["top1"] > best:
            front.append(row)
            best = row["top1"]
    return front


def best_within(
    rows: list[dict[str, Any]], max_macs: float | None = None, max_latency_ms: float | None = None
) -> dict[str, Any]:
    """The most accurate point within the budget (a point of the Pareto frontier)."""
    if (max_macs is None) == (max_latency_ms is None):
        raise ValueError("give exactly one budget: max_macs or max_latency_ms")
    cost, budget = ("macs", max_macs) if max_macs is not None else ("latency_ms", max_latency_ms)
    if cost == "latency_ms" and any(r.get("latency_ms") is None for r in rows):
        raise ValueError("the table has no latency column; build it with `flexres table RUN --latency`")
    front = pareto_front(rows, cost)
    fits = [r for r in front if r[cost] <= budget]
    if not fits:
        cheapest = front[0]
        shown = f"{budget / 1e6:.1f} MMACs" if cost == "macs" else f"{budget:g} ms"
        have = f"{cheapest['macs'] / 1e6:.1f} MMACs" if cost == "macs" else f"{cheapest['latency_ms']:.2f} ms"
        raise ValueError(
            f"no operating point fits a budget of {shown}: the cheapest in the table, width {cheapest['width']:g} at "
            f"{cheapest['resolution']} px, costs {have}"
        )
    return max(fits, key=lambda r: (r["top1"], -r[cost]))


def evaluated_accuracy(run_dir: str | Path) -> dict[int, float]:
    """top-1 per resolution from the evaluations ``flexres eval`` saved in the run (the best BN policy of each)."""
    acc: dict[int, float] = {}
    for f in sorted(Path(run_dir).glob(EVALS)):
        for r, v in json.loads(f.read_text()).get("results", {}).items():
            acc[int(r)] = max(acc.get(int(r), 0.0), v["top1"])
    return acc


@dataclass(frozen=True)
class MeasuredPoints:
    """What a run knows about its points' accuracy, from the best source it has: its query table (``flexres table``:
    every width / scale / resolution with MACs), else its saved evaluations (``flexres eval``: full-width
    resolutions), else nothing (``source`` 'trained': only its trained resolutions are known)."""

    source: str  # "table", "eval" or "trained"
    rows: list[dict[str, Any]]  # table rows, or {"resolution", "width": 1.0, "scales": None, "top1"} per evaluation
    bn_policy: str | None = None  # the table's

    def top1(self, op: OperatingPoint) -> float | None:
        for r in self.rows:
            if OperatingPoint.of_row(r) == op:
                return r["top1"]
        return None


def measured_points(run_dir: str | Path) -> MeasuredPoints:
    table = Path(run_dir) / TABLE
    if table.is_file():
        t = json.loads(table.read_text())
        return MeasuredPoints("table", t["rows"], t.get("bn_policy"))
    acc = evaluated_accuracy(run_dir)
    if acc:
        return MeasuredPoints(
            "eval", [{"resolution": r, "width": 1.0, "scales": None, "top1": a} for r, a in acc.items()]
        )
    return MeasuredPoints("trained", [])
