"""Render BENCHMARKS.md section 6 tables from the fair-protocol reports kept in benchmarks/results/.

Each report is the report.json that benchmarks/mutualnet_imagenette.py writes (query tables of the adaptive
runs, the I-Nets' top-1 and MACs); the name says the schedule: mutualnet_fair_e<epochs>_lr<lr>.json.

    python benchmarks/mutualnet_fair_summary.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from flexres.analysis.table import pareto_front, select
from flexres.engine.evaluate import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def load(results: Path) -> dict[tuple[int, float], dict]:
    reports = {}
    for f in sorted(results.glob("mutualnet_fair_e*_lr*.json")):
        m = re.fullmatch(r"mutualnet_fair_e(\d+)_lr([\d.]+)\.json", f.name)
        if m:
            reports[(int(m.group(1)), float(m.group(2)))] = json.loads(f.read_text())
    return reports


def point(row: dict) -> str:
    return f"{row['top1']:.1f} (w {row['width']:g}, {row['resolution']} px, {row['macs'] / 1e6:.1f} M)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    reports = load(args.results)
    if not reports:
        raise SystemExit(f"no mutualnet_fair_e*_lr*.json in {args.results}")

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

    for (epochs, lr), rep in sorted(reports.items()):
        print(f"\nMutualNet's accuracy-vs-MACs frontier, {epochs} epochs at lr {lr:g} (of {len(rep['tables']['MutualNet'])} points):\n")
        front = pareto_front(rep["tables"]["MutualNet"])
        print(markdown_table(["MMACs", "width", "px", "top-1"],
                             [[f"{r['macs'] / 1e6:.2f}", f"{r['width']:g}", str(r["resolution"]), f"{r['top1']:.1f}"] for r in front]))
        walls = ", ".join(f"{k} {v:.0f}" for k, v in rep["wall_s"].items())
        print(f"\n({rep['date']}; {rep['machine']}; wall s: {walls})")


if __name__ == "__main__":
    main()
