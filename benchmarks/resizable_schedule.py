"""Schedule length for Resizable networks (issue 12): the fair-sampling network and the network trained alone at the
full configuration, each at two schedule lengths, on the 3,000 val images at the config's resolution (160 px).

    python benchmarks/resizable_schedule.py --runs runs/bench_resizable160_e10 runs/bench_resizable160 \\
        --out benchmarks/results/resizable/160px_schedule.json

Each run directory holds ``fair`` and ``fixed-1-1-1-1`` (benchmarks/resizable_imagenette.py --train-only ...).
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

from _common import IMAGENETTE, data_path

from flexres.data import ImageFolderDataset
from flexres.engine.checkpoint import load_checkpoint
from flexres.engine.evaluate import evaluate, markdown_table

ROOT = Path(__file__).resolve().parents[1]
UNIFORM = [(1.0,) * 4, (0.85,) * 4, (0.65,) * 4, (0.45,) * 4]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, nargs="+", required=True)
    p.add_argument("--data", type=data_path, default=IMAGENETTE)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    val = ImageFolderDataset(args.data / "val", cache=True, progress=False)
    result = {"date": str(date.today()), "runs": {}}
    rows = []
    for run in args.runs:
        fair, meta = load_checkpoint(run / "fair")
        alone, _ = load_checkpoint(run / "fixed-1-1-1-1")
        res = fair.train_resolutions[0]
        epochs = meta["config"]["train"]["epochs"]
        fair_acc = {
            "-".join(f"{f:g}" for f in sc): evaluate(fair, val, [res], scales=sc)[res]["top1"] for sc in UNIFORM
        }
        alone_acc = evaluate(alone, val, [res], scales=UNIFORM[0])[res]["top1"]
        result["runs"][str(run)] = {"epochs": epochs, "fair": fair_acc, "trained_alone_1": alone_acc}
        rows.append(
            [
                str(epochs),
                f"{alone_acc:.1f}",
                f"{fair_acc['1-1-1-1']:.1f}",
                f"{fair_acc['1-1-1-1'] - alone_acc:+.1f}",
                *(f"{fair_acc[k]:.1f}" for k in ("0.85-0.85-0.85-0.85", "0.65-0.65-0.65-0.65", "0.45-0.45-0.45-0.45")),
            ]
        )
    print(
        markdown_table(
            ["epochs", "trained alone (1.0)", "fair sub-network (1.0)", "gap", "fair 0.85", "fair 0.65", "fair 0.45"],
            rows,
        )
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
