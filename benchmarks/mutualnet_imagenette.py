"""MutualNet vs US-Net vs I-Nets on the Imagenette protocol (MobileNetV2 base width 0.25, widths [0.25, 1.0] of it).

Trains MutualNet (resolutions {112, 96, 80, 64}) and US-Net (112 only) with the sandwich rule, and
I-Nets (plain MobileNetV2 trained at one width x resolution each); builds each adaptive run's query
table (post-statistics BN per point), plots accuracy vs MACs (PNG) and tables the best point of each
method at a series of MACs budgets.

    python benchmarks/mutualnet_imagenette.py [--data DIR] [--out runs/bench_mutualnet] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from _common import IMAGENETTE, data_path, train_once  # noqa: E402

from flexres import api  # noqa: E402
from flexres.engine.config import load_config  # noqa: E402
from flexres.engine.evaluate import markdown_table  # noqa: E402
from flexres.operating_point import best_within as select  # noqa: E402
from flexres.operating_point import pareto_front  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INETS = [(1.0, 112), (0.75, 96), (0.5, 80), (0.35, 64)]  # (width of the base, resolution)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=data_path, default=IMAGENETTE)
    p.add_argument("--out", type=Path, default=Path("runs/bench_mutualnet"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--widths", default="0.25:1.0:0.05")
    p.add_argument("--calibration-images", type=int, default=2000)
    p.add_argument(
        "--lr",
        type=float,
        help="peak lr of every run, method and control (a point of an lr sweep); default the configs' 0.1",
    )
    p.add_argument("--seed", type=int, default=0, help="train.seed of every run")
    p.add_argument("--inet-lr", type=float, help="train the I-Nets at this lr instead of the sandwich configs' lr")
    p.add_argument("--batch", type=int, help="override the batch size (e.g. for a smoke test on a tiny set)")
    p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="runs to leave out (e.g. I-w0.75-96): not trained, not in the report",
    )
    p.add_argument(
        "--train-only",
        nargs="+",
        metavar="LABEL",
        help="only train these runs (MutualNet, US-Net, I-w1-112, ...) and exit: to spread them over processes",
    )
    args = p.parse_args()
    if not (args.data / "train").is_dir():
        raise SystemExit(f"no data at {args.data}; pass --data DIR")
    from flexres.cli import parse_range

    sets = [f"epochs={args.epochs}", "progress=false", f"eval.calibration_images={args.calibration_images}"]
    sets += [f"batch_size={args.batch}"] if args.batch else []
    sets += [f"lr={args.lr}"] if args.lr else []
    sets += [f"seed={args.seed}"] if args.seed else []
    configs = {
        "MutualNet": load_config(ROOT / "configs" / "imagenette_mutualnet_mbv2.yaml", sets),
        "US-Net": load_config(ROOT / "configs" / "imagenette_usnet_mbv2.yaml", sets),
    }
    base_width = configs["MutualNet"]["model"]["width_mult"]
    for w, r in INETS:  # plain MobileNetV2 at (width of the base) x base, trained at one resolution
        cfg = load_config(ROOT / "configs" / "imagenette_mutualnet_mbv2.yaml", sets)
        cfg["model"] = {
            **cfg["model"],
            "name": "mobilenet_v2",
            "width_mult": base_width * w,
            "num_classes": None,
            "kwargs": {},
        }
        cfg["method"] = {"name": "individual", "resolutions": [r], "kwargs": {}}
        # The controls keep the sandwich configs' schedule (lr 0.1, 2-epoch warm-up, wd 4e-5): same schedule for
        # method and control (PROTOCOL.md, "Fair comparisons"). --inet-lr gives them another lr (a sweep point).
        if args.inet_lr is not None:
            cfg["train"]["lr"] = args.inet_lr
        configs[f"I-w{w:g}-{r}"] = cfg
    configs = {label: cfg for label, cfg in configs.items() if label not in args.skip}
    for cfg in configs.values():
        cfg["data"]["root"] = str(args.data)
    if args.train_only:
        unknown = set(args.train_only) - set(configs)
        if unknown:
            raise SystemExit(f"unknown run(s) {sorted(unknown)}; known: {list(configs)}")
        for label in args.train_only:
            train_once(label, configs[label], args.out / label, args.epochs)
        return
    walls = {label: train_once(label, cfg, args.out / label, args.epochs) for label, cfg in configs.items()}
    tables = {
        label: api.table(
            str(args.out / label),
            str(args.data),
            parse_range(args.widths),
            configs[label]["method"]["resolutions"],
            calibration_images=args.calibration_images,
        )
        for label in ("MutualNet", "US-Net")
        if label in configs
    }
    inet_rows = []
    for w, r in INETS:
        label = f"I-w{w:g}-{r}"
        if label in args.skip:
            continue
        rep = api.evaluate([str(args.out / label)], str(args.data), [r], "interpolate")["runs"][label]
        inet_rows.append(
            {
                "label": label,
                "width": w,
                "resolution": r,
                "top1": rep["results"][str(r)]["top1"],
                "macs": rep["results"][str(r)]["macs"],
            }
        )
    report = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "epochs": args.epochs,
        "wall_s": walls,
        "tables": tables,
        "inets": inet_rows,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in tables.items():
        front = pareto_front(rows)
        ax.plot(
            [r["macs"] / 1e6 for r in front],
            [r["top1"] for r in front],
            marker="o",
            ms=3,
            label=f"{label} (Pareto frontier)",
        )
    ax.scatter(
        [r["macs"] / 1e6 for r in inet_rows], [r["top1"] for r in inet_rows], color="black", marker="x", label="I-Nets"
    )
    ax.set_xlabel("MMACs per image")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Imagenette, MobileNetV2 (base width {base_width:g}): accuracy vs MACs")
    fig.tight_layout()
    fig.savefig(args.out / "accuracy_vs_macs.png", dpi=110)

    all_macs = sorted(r["macs"] for rows in tables.values() for r in rows)
    budgets = [all_macs[int(q * (len(all_macs) - 1))] for q in (0.05, 0.2, 0.4, 0.6, 0.8, 1.0)]
    rows = []
    for b in budgets:
        row = [f"{b / 1e6:.1f}"]
        for table in tables.values():
            try:
                s = select(table, max_macs=b)
                row.append(f"{s['top1']:.1f} (w {s['width']:g}, {s['resolution']} px)")
            except ValueError:
                row.append("-")
        fits = [r for r in inet_rows if r["macs"] <= b]
        best = max(fits, key=lambda r: r["top1"]) if fits else None
        row.append(f"{best['top1']:.1f} ({best['label']})" if best else "-")
        rows.append(row)
    matched = []  # each I-Net against the adaptive networks' best point costing no more than it
    for r in inet_rows:
        row = [r["label"], f"{r['macs'] / 1e6:.1f}", f"{r['top1']:.1f}"]
        for table in tables.values():
            try:
                s = select(table, max_macs=r["macs"])
                row.append(f"{s['top1']:.1f} (w {s['width']:g}, {s['resolution']} px, {s['macs'] / 1e6:.1f} M)")
            except ValueError:
                row.append("-")
        matched.append(row)
    md = [
        f"Date {report['date']}; {report['machine']}; {args.epochs} epochs; wall s: "
        + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()),
        "",
        "Best top-1 under each MACs budget (the operating point `flexres select` picks):",
        "",
        markdown_table(["budget (MMACs)"] + list(tables) + ["best I-Net"], rows),
        "",
        "Each I-Net (width of the base, resolution) against the best adaptive point within its MACs:",
        "",
        markdown_table(["I-Net", "MMACs", "I-Net top-1"] + [f"{k} (point)" for k in tables], matched),
    ]
    (args.out / "report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
