"""The operating points a server offers: from a run (every trained resolution, plus the Pareto points of its query
table or saved evaluations) or from exported static models (one point per file); each runs in eager PyTorch or as an
ONNX Runtime session of its static, BN-folded model (float or int8)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..analysis import count_macs
from ..deploy.export import EXPORTED_SUFFIXES
from ..deploy.predict import load_predictor
from ..engine.checkpoint import load_checkpoint, resolve_checkpoint
from ..engine.run import RunInfo
from ..operating_point import OperatingPoint, measured_points, pareto_front

BACKENDS = ("torch", "ort")


@dataclass(frozen=True)
class PointOptions:
    """How a run's points are chosen and run (picklable: the inference process loads the same)."""

    bn_policy: str | None = None  # for untrained resolutions; None: the table's, else interpolate
    backend: str = "torch"  # "torch": the adaptive model, switched per batch; "ort": one ONNX Runtime session per point
    int8: bool = False  # ort only: int8 sessions, calibrated per resolution on the run's training images
    points: tuple[str, ...] | None = (
        None  # serve only these ("224px", or a resolution "224"); None: every trained + Pareto
    )
    data: str | None = None  # int8 calibration images (default: the data the run was trained on)
    threads: int | None = None  # ort intra-op threads (default: the usable cores)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.int8 and self.backend != "ort":
            raise ValueError("int8 points run in ONNX Runtime: use backend 'ort'")


def default_backend() -> str:
    """ort when onnxruntime is installed (3-7x faster than eager PyTorch at batch 1 here, BENCHMARKS.md section 3)."""
    import importlib.util

    return "ort" if importlib.util.find_spec("onnxruntime") is not None else "torch"


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
    why: str = ""  # why it is served: "trained", "Pareto point of the query table", "asked for", "exported file"
    backend: str = "torch"

    @property
    def resolution(self) -> int:
        return self.op.resolution

    @property
    def name(self) -> str:
        return self.op.name

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "resolution": self.op.resolution,
            "width": self.op.width,
            "scales": list(self.op.scales) if self.op.scales else None,
            "macs": self.macs,
            "expected_top1": self.top1,
            "why": self.why,
            "backend": self.backend,
        }


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
        return sorted(
            self.points, key=lambda p: (p.top1 if p.top1 is not None else float("-inf"), p.macs), reverse=True
        )

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


def _candidates(
    model, run_dir: Path, bn_policy: str | None
) -> tuple[list[tuple[OperatingPoint, int, float | None, str]], str, str]:
    """(op, MACs, expected top-1, why) for every point worth serving, the BN policy, and where accuracies came from.

    Every trained resolution is served: accuracy ties (two resolutions at the same top-1) must never drop one the run
    was trained at. The Pareto points of the query table (widths, scales, untrained resolutions) are added to them."""
    found: dict[OperatingPoint, tuple[int, float | None, str]] = {}
    measured = measured_points(run_dir)
    policy = bn_policy or measured.bn_policy or "interpolate"
    rows = [r if "macs" in r else {**r, "macs": count_macs(model, OperatingPoint.of_row(r))} for r in measured.rows]
    why = "Pareto point of the query table" if measured.source == "table" else "Pareto point of `flexres eval`"
    for r in pareto_front(rows):
        found[OperatingPoint.of_row(r)] = (int(r["macs"]), r["top1"], why)
    for r in model.train_resolutions:
        op = OperatingPoint(r)
        if model.width_range is not None and op not in found:
            continue  # a slimmable model's points are its table's (each needs post-statistics BN)
        macs, top1, why = found.get(op, (count_macs(model, op), measured.top1(op), "trained"))
        found[op] = (macs, top1, "trained" if why == "trained" else f"trained; {why}")
    return [(op, macs, top1, why) for op, (macs, top1, why) in found.items()], policy, measured.source


def _pick(candidates: list, names: Sequence[str] | None, run_dir: Path, model) -> list:
    """The candidates named by ``names`` ("224px", "160px w0.5", or a bare resolution "224", trained or not)."""
    if not names:
        return candidates
    by_point = {c[0]: c for c in candidates}
    picked = []
    for n in names:
        op = OperatingPoint.parse(n)
        if op in by_point:
            picked.append((*by_point[op][:3], "asked for"))
        elif op == OperatingPoint(op.resolution):  # an untrained resolution the BN policy serves
            picked.append((op, count_macs(model, op), None, "asked for"))
        else:
            raise ValueError(
                f"{run_dir}: no operating point {n!r} to serve; known: {', '.join(o.name for o in by_point)}"
            )
    return picked


def _onnx_runner(model, meta: dict[str, Any], run_dir: Path, op: OperatingPoint, policy: str, options: PointOptions):
    """An ONNX Runtime session of ``op``'s static model, exported (and checked) once into RUN/serving/ and reused
    while the checkpoint is unchanged, so the server and its inference process share the files."""
    from ..deploy.export import export
    from ..deploy.runtime import onnx_session, session_runner

    path = run_dir / "serving" / f"{op.file_tag}_{policy}{'_int8' if options.int8 else ''}.onnx"
    info_file = Path(str(path) + ".json")
    ckpt = resolve_checkpoint(run_dir)
    fresh = path.is_file() and info_file.is_file() and path.stat().st_mtime > ckpt.stat().st_mtime
    if not fresh:
        try:
            export(model, meta, op, "onnx", path, bn_policy=policy, int8=options.int8, data=options.data)
        except (RuntimeError, NotImplementedError) as e:  # what ONNX cannot express: the torch backend still serves it
            raise ValueError(
                f"{run_dir}: {op} could not be exported to ONNX ({type(e).__name__}: {str(e)[:200]}); "
                "serve it with --backend torch"
            ) from e
    return session_runner(onnx_session(path, options.threads))


def points_from_run(target: str | Path, options: PointOptions | str | None = None) -> PointSet:
    """A run's points (``_candidates``, or those ``options.points`` names), run by ``options.backend``."""
    options = options if isinstance(options, PointOptions) else PointOptions(bn_policy=options)
    model, meta = load_checkpoint(target)
    model.eval()
    run_dir = resolve_checkpoint(target).parent
    info = RunInfo.from_meta(meta)
    pre = info.preprocessing
    common = {
        "crop_fraction": pre.crop_fraction,
        "mean": pre.mean,
        "std": pre.std,
        "interpolation": pre.interpolation,
        "backend": options.backend + ("-int8" if options.int8 else ""),
    }
    candidates, policy, source = _candidates(model, run_dir, options.bn_policy)
    found = _pick(candidates, options.points, run_dir, model)
    missing = [op for op, _, _, _ in found if model.width_range is not None and not model.is_calibrated(op)]
    if missing:
        raise ValueError(
            f"{run_dir}: {missing[0]} has no post-statistics BN; build the query table first with "
            f"`flexres table {run_dir} --data DIR`"
        )
    points = []
    for op, macs, top1, why in found:
        run = (
            _onnx_runner(model, meta, run_dir, op, policy, options)
            if options.backend == "ort"
            else _run_at(model, op, policy)
        )
        points.append(ServingPoint(op, int(macs), top1, run, why=why, **common))
    return PointSet(points, info.classes, info.class_names, f"{run_dir.name} ({model.arch['name']})", source)


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
        points.append(
            ServingPoint(
                op,
                int(info["macs"]),
                info.get("top1"),
                pred.run,
                pred.crop_fraction,
                pred.mean,
                pred.std,
                pred.interpolation,
                why="exported file",
                backend=("ort" if Path(f).suffix == ".onnx" else "torchscript") + ("-int8" if info.get("int8") else ""),
            )
        )
    seen = [p.name for p in points]
    if len(set(seen)) != len(seen):
        raise ValueError(f"two exported files have the same operating point: {seen}")
    return PointSet(points, classes or [], names or [], ", ".join(Path(f).name for f in files), "exported")


def load_points(targets: str | Path | Sequence[str | Path], options: PointOptions | str | None = None) -> PointSet:
    """A run directory or checkpoint, or one or more exported model files (``options``: a PointOptions, or for
    a run the BN policy alone)."""
    targets = [targets] if isinstance(targets, (str, Path)) else list(targets)
    if not targets:
        raise ValueError("nothing to serve: give a run directory, a checkpoint or exported model files")
    exported = [Path(t).suffix in EXPORTED_SUFFIXES for t in targets]
    if all(exported):
        return points_from_exports(targets)
    if len(targets) > 1:
        raise ValueError(
            "serve one run (a directory or checkpoint) or several exported files, not a mix: "
            f"{[str(t) for t in targets]}"
        )
    return points_from_run(targets[0], options)
