"""SAN on the Imagenette protocol (../shared/PROTOCOL.md) against RS-Net and the I-Nets.

Trains SAN (san_resnet18 x0.25, S = {112, 96, 80, 64, 48}, eps(r) = r / 160), then evaluates it at
every test resolution under SAN's three inference modes (proxy, ideal, data-free ideal) next to the
I-Nets and RS-Net that benchmarks/rsnet_imagenette.py trained (same seed, same data), and reports
the App. B ratio mean|A| / mean|B| per layer.

    python benchmarks/san_imagenette.py [--data DIR] [--out runs/bench_san] [--rsnet-runs runs/bench_rsnet] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from _common import IMAGENETTE, data_path, evaluated_after, gap_row

from flexres import api
from flexres.engine.checkpoint import SIDECAR
from flexres.engine.config import load_config
from flexres.engine.evaluate import markdown_table
from flexres.engine.trainer import train
from flexres.models import SAN_MODES

ROOT = Path(__file__).resolve().parents[1]
S = [112, 96, 80, 64, 48]
T = [128, 112, 104, 96, 88, 80, 72, 64, 56, 48, 40]
BASELINES = ["I-112", "I-96", "I-80", "I-64", "I-48", "RS-Net"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=data_path, default=IMAGENETTE)
    p.add_argument("--out", default="runs/bench_san")
    p.add_argument("--rsnet-runs", default="runs/bench_rsnet", help="where rsnet_imagenette.py left its runs")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch", type=int, help="override the batch size (e.g. for a smoke test on a tiny set)")
    p.add_argument(
        "--reuse",
        type=Path,
        help="an earlier report.json: a seed's SAN evaluation is taken from it when it has every mode",
    )
    args = p.parse_args()
    reused = json.loads(args.reuse.read_text())["seeds"] if args.reuse else {}
    if not args.data.is_dir():
        raise SystemExit(f"no data at {args.data}; pass --data DIR (an ImageFolder root with train/ and val/)")
    report = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "data": str(args.data),
        "epochs": args.epochs,
        "seeds": {},
    }
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}" / "SAN"
        cfg = load_config(
            ROOT / "configs" / "imagenette_san_r18.yaml",
            [f"seed={seed}", f"epochs={args.epochs}", "progress=false"]
            + ([f"batch_size={args.batch}"] if args.batch else []),
        )
        cfg["data"]["root"] = str(args.data)
        wall_file = out / "wall_seconds.json"
        sidecar = out / SIDECAR
        if not (sidecar.exists() and json.loads(sidecar.read_text())["epoch"] >= args.epochs):
            t0 = time.time()
            print(f"== training SAN (seed {seed}) -> {out}", flush=True)
            train(
                cfg,
                out,
                resume=(out / "checkpoint.safetensors").exists(),
                log=lambda s: print("  " + s[:200], flush=True),
            )
            wall_file.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
        per_seed = {"wall_s": json.loads(wall_file.read_text())["seconds"] if wall_file.exists() else None}
        for mode, policies in SAN_MODES.items():
            done = reused.get(str(seed), {}).get(mode)
            if done and evaluated_after(args.reuse, [out]) and all(str(r) in done["results"] for r in T):
                per_seed[mode] = done
                print(f"SAN seed {seed}, {mode}: evaluation taken from {args.reuse}", flush=True)
                continue
            rep = api.evaluate(
                [str(out)],
                str(args.data),
                T,
                policies["bn_policy"],
                calibration_images=2000,
                scale_policy=policies["scale_policy"],
            )
            per_seed[mode] = rep["runs"]["SAN"]
            print(f"evaluated SAN seed {seed}: {mode}", flush=True)
        # The I-Nets and RS-Net of the same seed: their evaluation from rsnet_imagenette.py when it has one for T.
        prior = Path(args.rsnet_runs) / "report.json"
        prior_runs = (
            json.loads(prior.read_text())["seeds"].get(str(seed), {}).get("interpolate", {}) if prior.exists() else {}
        )
        if all(b in prior_runs and all(str(r) in prior_runs[b]["results"] for r in T) for b in BASELINES):
            per_seed["baselines"] = {b: prior_runs[b] for b in BASELINES}
        else:
            baselines = [
                str(Path(args.rsnet_runs) / f"seed{seed}" / b)
                for b in BASELINES
                if (Path(args.rsnet_runs) / f"seed{seed}" / b).is_dir()
            ]
            if baselines:
                per_seed["baselines"] = api.evaluate(baselines, str(args.data), T, "interpolate")["runs"]
        report["seeds"][str(seed)] = per_seed
        (Path(args.out) / "report.json").write_text(json.dumps(report, indent=2))
    md = render(report)
    (Path(args.out) / "report.md").write_text(md)
    print(md)


def render(report: dict) -> str:
    seeds = list(report["seeds"])
    lines = [
        f"Date {report['date']}; machine: {report['machine']}; data {report['data']}; {report['epochs']} epochs; "
        f"seeds {', '.join(seeds)}.",
        "",
        "Top-1 % on the val images. I-Nets and RS-Net: unseen resolutions by BN interpolation. SAN rows: its three "
        "inference modes (proxy = eps and BN of the nearest trained resolution; "
        "ideal = eps(T) + BN re-calibrated at T on "
        "2000 training images; data-free = eps(T) + BN interpolated).",
        "",
    ]

    def cell(values: list[float]) -> str:
        return f"{statistics.mean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")

    rows = []
    first = report["seeds"][seeds[0]]
    for label in first.get("baselines", {}):
        vals = {r: [report["seeds"][s]["baselines"][label]["results"][str(r)]["top1"] for s in seeds] for r in T}
        rows.append(
            [label] + [cell(vals[r]) for r in T] + [f"{statistics.mean(statistics.mean(vals[r]) for r in S):.2f}"]
        )
    for mode in SAN_MODES:
        vals = {r: [report["seeds"][s][mode]["results"][str(r)]["top1"] for s in seeds] for r in T}
        rows.append(
            [f"SAN ({mode})"]
            + [cell(vals[r]) for r in T]
            + [f"{statistics.mean(statistics.mean(vals[r]) for r in S):.2f}"]
        )
    lines.append(markdown_table(["run"] + [str(r) for r in T] + ["mean over S"], rows))
    if all("baselines" in report["seeds"][s] for s in seeds):
        gaps_rows = []
        # SAN: any mode (all three are the same at a trained resolution)
        runs = {
            "RS-Net": [report["seeds"][s]["baselines"].get("RS-Net") for s in seeds],
            "SAN": [report["seeds"][s]["proxy"] for s in seeds],
        }
        for label, per_seed in runs.items():
            for res in S:
                inets = [report["seeds"][s]["baselines"].get(f"I-{res}") for s in seeds]
                if None in per_seed or None in inets:
                    continue
                gaps_rows.append(gap_row(label, res, per_seed, inets))
        lines += [
            "",
            "Minus the I-Net of each training resolution, at that resolution, seed by seed (SAN's claim: above "
            "every I-Net):",
            "",
            markdown_table(["run", "resolution"] + [f"seed {s}" for s in seeds] + ["mean ± std"], gaps_rows),
        ]
    walls = [report["seeds"][s]["wall_s"] for s in seeds if report["seeds"][s]["wall_s"]]
    if walls:
        lines += ["", f"SAN training wall time: {statistics.mean(walls):.0f} s."]
    ratios = first["proxy"].get("meta_weight_ratio")
    if ratios:
        per = ratios["per_layer"]
        lines += [
            "",
            f"SAN App. B, mean|A| / mean|B| per layer (seed {seeds[0]}): mean {ratios['mean']:.3f}",
            "",
            markdown_table(["layer", "ratio"], [[k, f"{v:.3f}"] for k, v in per.items()]),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
