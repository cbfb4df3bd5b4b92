"""Seeds of a comparison: groups of runs (one per seed) evaluated at one point, with each group's mean +- std. Used for
MutualNet vs its I-Net (a point of the adaptive network vs the network trained alone at that width and resolution) and
for Resizable-Aug vs a network trained alone (resolution 160; resizable runs are evaluated at all factors 1.0).

Evaluates the seed runs trained by ``mutualnet_imagenette.py --seed N --train-only ...`` on the val split
and writes mean +- std with the per-seed values.

    python benchmarks/seeds.py --runs MutualNet=runs/a/MutualNet,runs/b/MutualNet I-Net=runs/c/I-w1-112,...
    python benchmarks/seeds.py --width 0.5 --resolution 80 --calibration-images 2000 --runs ... --out ...

``--width`` applies to the runs whose model has a width range (MutualNet, US-Net); an I-Net runs at its own width.
``--calibration-images`` re-estimates BN statistics at the point first (post-statistics BN, as the query tables).
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import date
from pathlib import Path

from _common import IMAGENETTE, data_path

from flexres import api
from flexres.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="LABEL=RUN,RUN,...")
    p.add_argument("--data", type=data_path, default=IMAGENETTE)
    p.add_argument("--resolution", type=int, default=112)
    p.add_argument("--width", type=float, default=1.0, help="width of the slimmable runs (I-Nets keep their own)")
    p.add_argument("--calibration-images", type=int, help="post-statistics BN on this many training images first")
    p.add_argument("--out", type=Path, required=True, help="the JSON to write (benchmarks/results/...)")
    args = p.parse_args()
    report = {
        "date": str(date.today()),
        "resolution": args.resolution,
        "width": args.width,
        "calibration_images": args.calibration_images,
        "groups": {},
    }
    for spec in args.runs:
        label, runs = spec.split("=", 1)
        top1 = []
        for run in runs.split(","):
            slimmable = load_checkpoint(run)[0].width_range is not None
            rep = api.evaluate(
                run,
                args.data,
                [args.resolution],
                width=args.width if slimmable else 1.0,
                calibration_images=args.calibration_images,
            )
            top1.append(next(iter(rep["runs"].values()))["results"][str(args.resolution)]["top1"])
        report["groups"][label] = {
            "runs": runs.split(","),
            "top1": top1,
            "mean": round(statistics.mean(top1), 2),
            "std": round(statistics.stdev(top1), 2) if len(top1) > 1 else None,
        }
        print(
            f"{label}: "
            + ", ".join(f"{v:.1f}" for v in top1)
            + f"  mean {report['groups'][label]['mean']:.2f}"
            + (f" +- {report['groups'][label]['std']:.2f}" if len(top1) > 1 else "")
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
