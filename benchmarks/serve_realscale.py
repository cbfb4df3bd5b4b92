"""Serving at real cost (issue 26): the real-scale EfficientNet-Lite0 RS-Net's points under each backend.

    python benchmarks/serve_realscale.py --run runs/realscale/RS-Net --out benchmarks/results/serve_realscale.json

(1) Model latency per point, batch 1 and 8, for torch (the adaptive model in eager PyTorch), ort (ONNX Runtime
    session of the static, BN-folded model) and ort int8 (static QDQ, calibrated on 128 training images at the point's
    own resolution): the median of flexres.analysis.latency.time_call, on random inputs, with --threads threads.
(2) Accuracy of ort fp32 and ort int8 at every point on --val-images images of the val split (the run's eval
    transform), so the cost of int8 is read next to its speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from flexres.data import EvalTransform, ImageFolderDataset, normalize_batch
from flexres.engine.checkpoint import load_checkpoint
from flexres.engine.config import resolve_data_root
from flexres.serving.inference import time_batch
from flexres.serving.points import PointOptions, load_points

BACKENDS = {"torch": PointOptions(backend="torch"), "ort": PointOptions(backend="ort"), "ort-int8": PointOptions(backend="ort", int8=True)}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-images", type=int, default=1000)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _, meta = load_checkpoint(a.run)
    val = ImageFolderDataset(Path(resolve_data_root(meta["config"]["data"]["root"])) / "val", cache=True, progress=False)
    pick = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[: a.val_images].tolist()
    report = {"date": str(date.today()), "machine": f"{platform.node()} ({os.cpu_count()} cores, torch {torch.__version__})",
              "threads": a.threads, "run": str(a.run), "val_images": len(pick), "backends": {}}
    for name in a.backends:
        t0 = time.time()
        points = load_points(a.run, PointOptions(**{**BACKENDS[name].__dict__, "threads": a.threads}))
        build_s = round(time.time() - t0, 1)
        lat = {p.name: {"batch1_ms": round(time_batch(points, p.name, 1), 2), "batch8_ms": round(time_batch(points, p.name, 8), 2)}
               for p in points.points}
        acc = accuracy(points, meta, val, pick) if name != "torch" else {}
        report["backends"][name] = {"start_s": build_s, "latency": lat, "top1": acc,
                                    "macs": {p.name: p.macs for p in points.points}}
        print(name, json.dumps(report["backends"][name]), flush=True)
        a.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
