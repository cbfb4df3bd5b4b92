"""Seeds of the headline MutualNet pair: the full network (w 1, 112 px) vs the I-Net of the same network.

Evaluates the seed runs trained by ``mutualnet_imagenette.py --seed N --train-only ...`` on the val split
and writes mean +- std with the per-seed values.

    python benchmarks/mutualnet_seeds.py --runs MutualNet=runs/a/MutualNet,runs/b/MutualNet I-Net=runs/c/I-w1-112,...
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import date
from pathlib import Path

from flexres import api

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="LABEL=RUN,RUN,...")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "imagenette-224"))
    p.add_argument("--resolution", type=int, default=112)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mutualnet_fair_seeds.json")
    args = p.parse_args()
    report = {"date": str(date.today()), "resolution": args.resolution, "groups": {}}
    for spec in args.runs:
        label, runs = spec.split("=", 1)
        top1 = []
        for run in runs.split(","):
            rep = api.evaluate(run, args.data, [args.resolution])
            top1.append(next(iter(rep["runs"].values()))["results"][str(args.resolution)]["top1"])
        report["groups"][label] = {"runs": runs.split(","), "top1": top1, "mean": round(statistics.mean(top1), 2),
                                   "std": round(statistics.stdev(top1), 2) if len(top1) > 1 else None}
        print(f"{label}: " + ", ".join(f"{v:.1f}" for v in top1) + f"  mean {report['groups'][label]['mean']:.2f}"
              + (f" +- {report['groups'][label]['std']:.2f}" if len(top1) > 1 else ""))
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
