"""Render BENCHMARKS.md section 6 tables from the fair-protocol reports kept in benchmarks/results/mutualnet/.

Each report is the report.json that benchmarks/mutualnet_imagenette.py writes (query tables of the adaptive
runs, the I-Nets' top-1 and MACs); the name says the schedule: fair_e<epochs>_lr<lr>.json.

    python benchmarks/mutualnet_fair_summary.py [--results benchmarks/results/mutualnet]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from flexres.engine.evaluate import markdown_table
from flexres.operating_point import best_within as select
from flexres.operating_point import pareto_front

ROOT = Path(__file__).resolve().parents[1]


def load(results: Path) -> dict[tuple[int, float], dict]:
    reports = {}
    for f in sorted(results.glob("fair_e*_lr*.json")):
        m = re.fullmatch(r"fair_e(\d+)_lr([\d.]+)\.json", f.name)
        if m:
            reports[(int(m.group(1)), float(m.group(2)))] = json.loads(f.read_text())
    return reports


def point(row: dict) -> str:
    return f"{row['top1']:.1f} (w {row['width']:g}, {row['resolution']} px, {row['macs'] / 1e6:.1f} M)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "mutualnet")
    args = p.parse_args()
    reports = load(args.results)
    if not reports:
        raise SystemExit(f"no fair_e*_lr*.json in {args.results}")

    rows = []  # each I-Net against each adaptive network's best point within its MACs, per schedule
    for (epochs, lr), rep in sorted(reports.items()):
        for inet in rep["inets"]:
            row = [f"{epochs} ep, lr {lr:g}", inet["label"], f"{inet['macs'] / 1e6:.1f}", f"{inet['top1']:.1f}"]
            for method in ("MutualNet", "US-Net"):
                table = rep["tables"].get(method)
                if table is None:
                    row.append("not run")
                    continue
                try:
                    best = select(table, max_macs=inet["macs"])
                    row.append(f"{point(best)}, {best['top1'] - inet['top1']:+.1f}")
                except ValueError:
                    row.append("no point that cheap")
            rows.append(row)
    print("Each I-Net against the best point of each adaptive network costing no more (top-1 %, then the gap):\n")
    print(markdown_table(["schedule", "I-Net", "MMACs", "I-Net top-1", "MutualNet", "US-Net"], rows))

    best_rows = []  # each at its best lr of the sweep (PROTOCOL.md, "Fair comparisons")
    for epochs in sorted({e for e, _ in reports}):
        sweep = {lr: rep for (e, lr), rep in reports.items() if e == epochs}
        for label in sorted({i["label"] for rep in sweep.values() for i in rep["inets"]}):
            inets = {lr: i for lr, rep in sweep.items() for i in rep["inets"] if i["label"] == label}
            lr_i, inet = max(inets.items(), key=lambda kv: kv[1]["top1"])
            picks = {}
            for lr, rep in sweep.items():
                try:
                    picks[lr] = select(rep["tables"]["MutualNet"], max_macs=inet["macs"])
                except ValueError:
                    pass
            lr_m, best = max(picks.items(), key=lambda kv: kv[1]["top1"])
            best_rows.append(
                [
                    str(epochs),
                    label,
                    f"{inet['top1']:.1f} (lr {lr_i:g}; sweep: "
                    + ", ".join(f"{lr:g}: {i['top1']:.1f}" for lr, i in sorted(inets.items()))
                    + ")",
                    f"{point(best)} (lr {lr_m:g})",
                    f"{best['top1'] - inet['top1']:+.1f}",
                ]
            )
    print("\nEach at its best lr of the sweep {0.1, 0.05} (only the lrs each was trained at):\n")
    print(markdown_table(["epochs", "I-Net", "I-Net top-1", "MutualNet within its MACs", "gap"], best_rows))

    for (epochs, lr), rep in sorted(reports.items()):
        print(
            f"\nMutualNet's accuracy-vs-MACs frontier, {epochs} epochs at lr {lr:g} "
            f"(of {len(rep['tables']['MutualNet'])} points):\n"
        )
        front = pareto_front(rep["tables"]["MutualNet"])
        print(
            markdown_table(
                ["MMACs", "width", "px", "top-1"],
                [
                    [f"{r['macs'] / 1e6:.2f}", f"{r['width']:g}", str(r["resolution"]), f"{r['top1']:.1f}"]
                    for r in front
                ],
            )
        )
        walls = ", ".join(f"{k} {v:.0f}" for k, v in rep["wall_s"].items())
        print(f"\n({rep['date']}; {rep['machine']}; wall s: {walls})")


if __name__ == "__main__":
    main()
