"""`flexres table RUN --scales all` on a Resizable run: the prefix tree vs each configuration on its own.

Times the query table of every scaling configuration (4^4 = 256 for L = (0.45, 0.65, 0.85, 1.0)) on the
val split evaluated as a prefix tree, and the one-by-one evaluation of a seeded sample of configurations
(all 256 one by one take most of an hour on 2 cores); checks that the sampled configurations' accuracies
are identical both ways and writes the figures as JSON.

    python benchmarks/config_tree_speed.py RUN [--data DIR] [--one-by-one 16]
        [--out FILE]   # default: benchmarks/results/resizable/config_tree_speed_<resolution>px.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
from _common import IMAGENETTE, data_path

from flexres import api
from flexres.data import ImageFolderDataset

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--data", type=data_path, default=IMAGENETTE)
    p.add_argument("--resolution", type=int, help="default: the run's training resolution")
    p.add_argument("--one-by-one", type=int, default=16, help="configurations evaluated one by one (a seeded sample)")
    p.add_argument(
        "--out", type=Path, help="default: benchmarks/results/resizable/config_tree_speed_<resolution>px.json"
    )
    args = p.parse_args()
    model, _ = api.load_checkpoint(args.run)
    res = [args.resolution or model.train_resolutions[0]]
    api.table(
        args.run, args.data, resolutions=res, scales="1", write=False
    )  # warm caches (decoded images) for both timings

    t0 = time.perf_counter()
    tree = api.table(args.run, args.data, resolutions=res, scales="all", write=False)
    tree_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    flat = api.table(args.run, args.data, resolutions=res, scales=str(args.one_by_one), write=False, tree=False)
    flat_s = time.perf_counter() - t0

    by_scales = {tuple(r["scales"]): r for r in tree}
    same = all(
        by_scales[tuple(r["scales"])]["top1"] == r["top1"] and by_scales[tuple(r["scales"])]["top5"] == r["top5"]
        for r in flat
    )
    images = len(ImageFolderDataset(Path(args.data) / "val"))
    report = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "run": args.run,
        "resolution": res[0],
        "val_images": images,
        "tree": {
            "configurations": len(tree),
            "seconds": round(tree_s, 1),
            "image_configurations_per_s": round(len(tree) * images / tree_s),
        },
        "one_by_one": {
            "configurations": len(flat),
            "seconds": round(flat_s, 1),
            "image_configurations_per_s": round(len(flat) * images / flat_s),
            "projected_seconds_for_all": round(flat_s / len(flat) * len(tree)),
        },
        "identical_accuracies": same,
        "top1_range": [min(r["top1"] for r in tree), max(r["top1"] for r in tree)],
    }
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / "resizable" / f"config_tree_speed_{res[0]}px.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
