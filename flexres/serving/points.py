"""The operating points a server offers: from a run (its query table, else its saved evaluations, else its
trained resolutions) or from exported static models (one point per file)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..analysis import count_macs
from ..analysis.table import TABLE, pareto_front
from ..deploy.predict import known_accuracy, load_predictor
from ..engine.checkpoint import load_checkpoint, resolve_checkpoint
from ..operating_point import OperatingPoint

EXPORTED_SUFFIXES = (".onnx", ".pt", ".ts")


@dataclass
class ServingPoint:
    """One operating point the server can run: what it is, what it costs, how accurate it is expected to be."""

    op: OperatingPoint
    macs: int
    top1: float | None  # expected top-1 % (query table or `flexres eval`); None when never measured
    run: Callable[[Tensor], Tensor] = field(repr=False)  # normalised N x 3 x R x R batch -> logits
    crop_fraction: float = 0.875
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    @property
    def resolution(self) -> int:
        return self.op.resolution

    @property
    def name(self) -> str:
        """A short, unique label: '112px', '160px w0.5', '160px s0.45-1-1-1'."""
        return (f"{self.op.resolution}px" + (f" w{self.op.width:g}" if self.op.width != 1.0 else "")
                + (" s" + "-".join(f"{f:g}" for f in self.op.scales) if self.op.scales else ""))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "resolution": self.op.resolution, "width": self.op.width,
                "scales": list(self.op.scales) if self.op.scales else None, "macs": self.macs, "expected_top1": self.top1}


@dataclass
class PointSet:
    """The points of one served model, cheapest first, with the class names they share."""

    points: list[ServingPoint]
    classes: list[str]
    names: list[str]
    description: str
    source: str  # "table", "eval", "trained" or "exported"

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError(f"{self.description}: no operating point to serve")
        self.points.sort(key=lambda p: (p.macs, p.resolution))

    def named(self, name: str) -> ServingPoint:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"no operating point named {name!r}; served: {[p.name for p in self.points]}")

    def by_preference(self) -> list[ServingPoint]:
        """Most accurate first; where accuracy was never measured, the costlier point is assumed the better one."""
        return sorted(self.points, key=lambda p: (p.top1 if p.top1 is not None else float("-inf"), p.macs), reverse=True)

    @property
    def resolutions(self) -> list[int]:
        return sorted({p.resolution for p in self.points}, reverse=True)


def _run_at(model, op: OperatingPoint, bn_policy: str) -> Callable[[Tensor], Tensor]:
    @torch.inference_mode()
    def run(x: Tensor) -> Tensor:
        # Switching re-points the BNs (and widths / stage resizers): microseconds, so it happens per batch
        # on the one model in memory instead of keeping one network per point.
        model.set_operating_point(op, bn_policy=bn_policy)
        return model(x)
    return run


def points_from_run(target: str | Path, bn_policy: str | None = None) -> PointSet:
    """A run's points: the Pareto frontier of its query table (`flexres table`), else of the resolutions
    `flexres eval` measured, else its trained resolutions (accuracy unknown)."""
    model, meta = load_checkpoint(target)
    model.eval()
    run_dir = resolve_checkpoint(target).parent
    norm = meta.get("normalization", {})
    common = {"crop_fraction": meta.get("crop_fraction", 0.875), "mean": norm.get("mean", (0.485, 0.456, 0.406)),
              "std": norm.get("std", (0.229, 0.224, 0.225)), "interpolation": meta.get("interpolation", "bilinear")}
    table_file = run_dir / TABLE
    if table_file.is_file():
        table = json.loads(table_file.read_text())
        policy = bn_policy or table.get("bn_policy") or "interpolate"
        rows, source = pareto_front(table["rows"]), "table"
        found = [(OperatingPoint(r["resolution"], r["width"], tuple(r["scales"]) if r.get("scales") else None), r["macs"], r["top1"])
                 for r in rows]
    else:
        policy = bn_policy or "interpolate"
        acc = known_accuracy(run_dir)
        if acc:
            rows = pareto_front([{"resolution": r, "top1": a, "macs": count_macs(model, r)} for r, a in acc.items()])
            found = [(OperatingPoint(r["resolution"]), r["macs"], r["top1"]) for r in rows]
            source = "eval"
        else:
            found = [(OperatingPoint(r), count_macs(model, r), None) for r in model.train_resolutions]
            source = "trained"
    missing = [op for op, _, _ in found if model.width_range is not None and not model.is_calibrated(op)]
    if missing:
        raise ValueError(f"{run_dir}: {missing[0]} has no post-statistics BN; build the query table first with "
                         f"`flexres table {run_dir} --data DIR`")
    points = [ServingPoint(op, int(macs), top1, _run_at(model, op, policy), **common) for op, macs, top1 in found]
    classes = meta.get("classes") or []
    return PointSet(points, classes, meta.get("class_names") or classes, f"{run_dir.name} ({model.arch['name']})", source)


def points_from_exports(files: Sequence[str | Path]) -> PointSet:
    """One point per exported static model (ONNX or TorchScript, each with its ``.json``)."""
    points, classes, names = [], None, None
    for f in files:
        info_file = Path(str(f) + ".json")
        if not info_file.is_file():
            raise FileNotFoundError(f"{f}: an exported model needs its {info_file.name} (written by `flexres export`)")
        info = json.loads(info_file.read_text())
        pred = load_predictor(str(f))
        if classes is not None and pred.classes != classes:
            raise ValueError(f"{f} has other classes than {files[0]}: serve exports of one run together")
        classes, names = pred.classes, pred.names
        o = info["operating_point"]
        op = OperatingPoint(o["resolution"], o.get("width", 1.0), tuple(o["scales"]) if o.get("scales") else None)
        points.append(ServingPoint(op, int(info["macs"]), info.get("top1"), pred.run, pred.crop_fraction, pred.mean, pred.std,
                                       pred.interpolation))
    seen = [p.name for p in points]
    if len(set(seen)) != len(seen):
        raise ValueError(f"two exported files have the same operating point: {seen}")
    return PointSet(points, classes or [], names or [], ", ".join(Path(f).name for f in files), "exported")


def load_points(targets: str | Path | Sequence[str | Path], bn_policy: str | None = None) -> PointSet:
    """A run directory or checkpoint, or one or more exported model files."""
    targets = [targets] if isinstance(targets, (str, Path)) else list(targets)
    if not targets:
        raise ValueError("nothing to serve: give a run directory, a checkpoint or exported model files")
    exported = [Path(t).suffix in EXPORTED_SUFFIXES for t in targets]
    if all(exported):
        return points_from_exports(targets)
    if len(targets) > 1:
        raise ValueError("serve one run (a directory or checkpoint) or several exported files, not a mix: "
                         f"{[str(t) for t in targets]}")
    return points_from_run(targets[0], bn_policy)
