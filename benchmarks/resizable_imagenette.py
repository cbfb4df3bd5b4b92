"""Resizable networks on the Imagenette protocol (resizable_resnet18 x0.25 at 112 px, L = (0.45, 0.65, 0.85, 1.0)).

(a) sub-networks of one fair-sampling run vs networks trained alone at the same configuration (Table 1);
(b) fair vs random sampling over all 256 configurations (Table 11);
(c) Resizable-Aug (fair sampling for 2/3 of the epochs, then all 1.0) vs plain training (Table 2);
(d) Resizable-Adapt vs the best single configuration (NAS) at equal budgets (Fig. 3d).

    python benchmarks/resizable_imagenette.py [--data DIR] [--out runs/bench_resizable] [--epochs 20]
"""

from __future__ import annotations

import argparse
import platform
import statistics
from datetime import date
from pathlib import Path

import torch
from _common import train_once

from flexres.analysis.adapt import adapt_report
from flexres.cli import _SubsetView, build_table
from flexres.data import ImageFolderDataset
from flexres.engine.checkpoint import load_checkpoint
from flexres.engine.config import load_config
from flexres.engine.evaluate import evaluate, markdown_table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenette-224"
FIXED = [(1.0,) * 4, (0.85,) * 4, (0.65,) * 4, (0.45,) * 4]


def base_config(data: Path, epochs: int, batch: int | None) -> dict:
    sets = [f"epochs={epochs}", "progress=false"] + ([f"batch_size={batch}"] if batch else [])
    cfg = load_config(ROOT / "configs" / "imagenette_resizable_r18.yaml", sets)
    cfg["data"]["root"] = str(data)
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=Path("runs/bench_resizable"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int)
    p.add_argument("--configs", default="all", help="configurations in the tables: 'all' (256) or N sampled")
    p.add_argument("--label-images", type=int, default=2000)
    p.add_argument("--train-only", nargs="+", metavar="LABEL",
                   help="only train these runs (fair, random, aug, fixed-1-1-1-1, ...) and exit: to spread them over processes")
    args = p.parse_args()
    runs = {
        "fair": {"sampling": "fair"},
        "random": {"sampling": "random"},
        "aug": {"sampling": "fair", "target_scales": [1.0] * 4, "finetune_from": 2 / 3},
        **{f"fixed-{'-'.join(f'{f:g}' for f in sc)}": {"sampling": "fixed", "target_scales": list(sc)} for sc in FIXED},
    }
    if args.train_only:
        unknown = set(args.train_only) - set(runs)
        if unknown:
            raise SystemExit(f"unknown run(s) {sorted(unknown)}; known: {list(runs)}")
        runs = {label: runs[label] for label in args.train_only}
    walls = {}
    for label, kwargs in runs.items():
        cfg = base_config(args.data, args.epochs, args.batch)
        cfg["method"]["kwargs"] = {**cfg["method"]["kwargs"], **kwargs}
        walls[label] = train_once(label, cfg, args.out / label, args.epochs)
    if args.train_only:
        return

    tables = {k: build_table(str(args.out / k), str(args.data), [1.0], [112], scales=args.configs, progress=False)
              for k in ("fair", "random")}
    if args.configs != "all":  # the four fixed configurations must be in the table for (a)
        for k, t in tables.items():
            have = {tuple(r["scales"]) for r in t}
            missing = [sc for sc in FIXED if sc not in have]
            if missing:
                model, _ = load_checkpoint(args.out / k)
                from flexres.analysis import count_macs
                from flexres.operating_point import OperatingPoint

                val0 = ImageFolderDataset(args.data / "val", cache="auto", progress=False)
                for sc in missing:
                    t.append({"scales": list(sc), "top1": evaluate(model, val0, [112], scales=sc)[112]["top1"],
                              "macs": count_macs(model, OperatingPoint(112, scales=sc))})
    val = ImageFolderDataset(args.data / "val", cache="auto", progress=False)
    per_fixed = {}  # each network trained alone, evaluated at its own configuration
    for sc in FIXED:
        model, _ = load_checkpoint(args.out / f"fixed-{'-'.join(f'{f:g}' for f in sc)}")
        per_fixed[sc] = evaluate(model, val, [112], scales=sc)[112]["top1"]
    aug_top1 = evaluate(load_checkpoint(args.out / "aug")[0], val, [112], scales=(1.0,) * 4)[112]["top1"]

    def at(table, sc, key="top1"):
        return next((r[key] for r in table if tuple(r["scales"]) == sc), float("nan"))

    lines = [f"Date {date.today()}; {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"{args.epochs} epochs; "
             "wall s: " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()), "",
             "(a) Sub-networks of the fair-sampling run vs networks trained alone at that configuration (top-1 %):", "",
             markdown_table(["configuration", "MMACs", "trained alone", "resizable (fair) sub-network", "gain"],
                            [["-".join(f"{f:g}" for f in sc), f"{at(tables['fair'], sc, 'macs') / 1e6:.1f}", f"{per_fixed[sc]:.1f}",
                              f"{at(tables['fair'], sc):.1f}", f"{at(tables['fair'], sc) - per_fixed[sc]:+.1f}"] for sc in FIXED]), ""]
    summary = []
    for k, t in tables.items():
        accs = [r["top1"] for r in t]
        summary.append([k, str(len(accs)), f"{statistics.mean(accs):.2f}", f"{min(accs):.1f}", f"{max(accs):.1f}"])
    lines += ["(b) Fair vs random sampling, over the evaluated configurations:", "",
              markdown_table(["sampling", "configurations", "mean top-1", "min", "max"], summary), "",
              f"(c) Resizable-Aug at all 1.0: {aug_top1:.1f}% vs plain training (fixed all 1.0): {per_fixed[(1.0,) * 4]:.1f}%.", ""]

    model, _ = load_checkpoint(args.out / "fair")
    train_ds = ImageFolderDataset(args.data / "train", progress=False)
    pick = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(0))[: args.label_images].tolist()
    configs = [tuple(r["scales"]) for r in tables["fair"]]
    macs = sorted(r["macs"] for r in tables["fair"])
    adapt_rows = []
    for q in (0.25, 0.5, 0.75):
        budget = macs[int(q * (len(macs) - 1))]
        rep = adapt_report(model, _SubsetView(train_ds, pick), val, 112, configs, budget)
        adapt_rows.append([f"{budget / 1e6:.1f}", f"{rep['adapt']['top1']:.1f}", f"{rep['adapt']['mean_macs'] / 1e6:.1f}",
                           f"{rep['nas']['top1']:.1f}", f"{rep['nas']['macs'] / 1e6:.1f}", f"{rep['oracle_top1']:.1f}"])
    lines += ["(d) Resizable-Adapt vs NAS (best single configuration under the same budget, picked on the labelled training images):",
              "", markdown_table(["budget (MMACs)", "Adapt top-1", "Adapt mean MMACs", "NAS top-1", "NAS MMACs", "oracle"], adapt_rows)]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
