"""Serving at real cost (issue 26): the real-scale EfficientNet-Lite0 RS-Net's points under each backend.

    python benchmarks/serve_realscale.py --run runs/realscale/RS-Net \\
        --out benchmarks/results/serving/realscale_latency_per_backend.json

(1) Model latency per point, batch 1 and 8, for torch (the adaptive model in eager PyTorch), ort (ONNX Runtime
    session of the static, BN-folded model) and ort int8 (static QDQ, calibrated on 128 training images at the point's
    own resolution): the median of flexres.analysis.latency.time_call, on random inputs, with --threads threads.
(2) Accuracy of ort fp32 and ort int8 at every point on --val-images images of the val split (the run's eval
    transform), so the cost of int8 is read next to its speed.
(3) --int8-calibration: int8 calibrated per resolution (each point's ranges from 128 training images at its own
    resolution) vs one calibration shared by all resolutions (every activation's range the union of the points' ranges,
    as min/max calibration on all their images at once): top-1 per point (the graphs are the same, so is their speed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader, Subset

from flexres.data import EvalTransform, ImageFolderDataset, normalize_batch
from flexres.engine.checkpoint import load_checkpoint
from flexres.engine.config import resolve_data_root
from flexres.serving.inference import time_batch
from flexres.serving.points import PointOptions, load_points

BACKENDS = {
    "torch": PointOptions(backend="torch"),
    "ort": PointOptions(backend="ort"),
    "ort-int8": PointOptions(backend="ort", int8=True),
}


def accuracy(points, meta, val: ImageFolderDataset, pick: list[int]) -> dict[str, float]:
    norm = meta.get("normalization", {})
    out = {}
    for p in points.points:
        val.transform = EvalTransform(p.resolution, p.crop_fraction, p.interpolation)
        hits = n = 0
        for x, y in DataLoader(Subset(val, pick), batch_size=50):
            z = p.run(normalize_batch(x, norm["mean"], norm["std"]))
            hits += int((z.argmax(1) == y).sum())
            n += len(y)
        out[p.name] = round(100.0 * hits / n, 2)
    return out


def int8_calibration(run: Path, meta: dict, val: ImageFolderDataset, pick: list[int], threads: int, work: Path) -> dict:
    """Top-1 of per-resolution vs shared int8 ranges at every point of the run's ort float files (RUN/serving)."""
    from flexres.deploy.export import calibration_batches
    from flexres.deploy.runtime import merge_ranges, onnx_session, quantize_int8, session_runner

    floats = load_points(run, PointOptions(backend="ort", threads=threads))
    work.mkdir(parents=True, exist_ok=True)
    fp32 = {
        p.name: next(f for f in sorted((run / "serving").glob(f"{p.name}_*.onnx")) if not f.stem.endswith("_int8"))
        for p in floats.points
    }  # the float files load_points exported (or found) for the ort backend
    own = {}
    for p in floats.points:  # per resolution: each point calibrated at its own resolution, its ranges kept
        own[p.name] = work / f"{p.name}_ranges.json"
        own[p.name].unlink(missing_ok=True)
        quantize_int8(
            fp32[p.name], work / f"{p.name}_own.onnx", calibration_batches(p.resolution, meta, None), ranges=own[p.name]
        )
    shared = merge_ranges(list(own.values()), work / "shared_ranges.json")
    out = {}
    for kind in ("own", "shared"):
        served = []
        for p in floats.points:
            path = work / f"{p.name}_{kind}.onnx"
            if kind == "shared":
                quantize_int8(fp32[p.name], path, ranges=shared)
            served.append(
                SimpleNamespace(
                    name=p.name,
                    resolution=p.resolution,
                    crop_fraction=p.crop_fraction,
                    interpolation=p.interpolation,
                    run=session_runner(onnx_session(path, threads)),
                )
            )
        top1 = accuracy(SimpleNamespace(points=served), meta, val, pick)
        out["per_resolution" if kind == "own" else "shared"] = {"top1": top1}
        print(kind, out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-images", type=int, default=1000)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS))
    ap.add_argument("--int8-calibration", action="store_true", help="only (3): per-resolution vs shared int8 ranges")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _, meta = load_checkpoint(a.run)
    val = ImageFolderDataset(
        Path(resolve_data_root(meta["config"]["data"]["root"])) / "val", cache=True, progress=False
    )
    pick = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[: a.val_images].tolist()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": str(date.today()),
        "machine": f"{platform.node()} ({os.cpu_count()} cores, torch {torch.__version__})",
        "threads": a.threads,
        "run": str(a.run),
        "val_images": len(pick),
        "backends": {},
    }
    if a.int8_calibration:
        with tempfile.TemporaryDirectory() as work:  # the int8 files and range caches: only their top-1 is kept
            report["int8_calibration"] = int8_calibration(a.run, meta, val, pick, a.threads, Path(work))
        a.out.write_text(json.dumps(report, indent=2) + "\n")
        return
    for name in a.backends:
        t0 = time.time()
        points = load_points(a.run, PointOptions(**{**BACKENDS[name].__dict__, "threads": a.threads}))
        build_s = round(time.time() - t0, 1)
        lat = {
            p.name: {
                "batch1_ms": round(time_batch(points, p.name, 1), 2),
                "batch8_ms": round(time_batch(points, p.name, 8), 2),
            }
            for p in points.points
        }
        acc = accuracy(points, meta, val, pick) if name != "torch" else {}
        report["backends"][name] = {
            "start_s": build_s,
            "latency": lat,
            "top1": acc,
            "macs": {p.name: p.macs for p in points.points},
        }
        print(name, json.dumps(report["backends"][name]), flush=True)
        a.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
