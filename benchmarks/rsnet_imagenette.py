"""RS-Nets on the Imagenette protocol (../shared/PROTOCOL.md): I-Nets, parallel, RS-Net (full MRED).

Trains every run (skipping finished ones, resuming interrupted ones), then evaluates each at the
test resolutions T under the BN policies, and writes a JSON report and Markdown tables.

    python benchmarks/rsnet_imagenette.py [--data DIR] [--out runs/bench_rsnet] [--seeds 0 1 2]
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

ROOT = Path(__file__).resolve().parents[1]
S = [112, 96, 80, 64, 48]
T = [128, 112, 104, 96, 88, 80, 72, 64, 56, 48, 40]


def run_specs(which: list[str]) -> list[tuple[str, str, list[str]]]:
    specs = [(f"I-{r}", "imagenette_individual_r18.yaml", [f"method.resolutions=[{r}]"]) for r in S]
    specs += [("parallel", "imagenette_parallel_r18.yaml", []), ("RS-Net", "imagenette_rsnet_r18.yaml", [])]
    # The papers' summed loss (Eq. 2) at the protocol's learning rate, for comparison with the configs' mean.
    specs += [
        ("parallel-sum", "imagenette_parallel_r18.yaml", ["method.kwargs={reduction: sum}"]),
        ("RS-Net-sum", "imagenette_rsnet_r18.yaml", ["method.kwargs={mred: full, reduction: sum}"]),
    ]
    return [s for s in specs if not which or s[0] in which]


def train_all(args: argparse.Namespace, seed: int) -> dict[str, float]:
    walls = {}
    for label, config, sets in run_specs(args.runs):
        out = Path(args.out) / f"seed{seed}" / label
        cfg = load_config(ROOT / "configs" / config, sets + [f"seed={seed}", f"epochs={args.epochs}", "progress=false"])
        cfg["data"]["root"] = str(args.data)
        wall_file = out / "wall_seconds.json"
        sidecar = out / SIDECAR
        if sidecar.exists() and json.loads(sidecar.read_text())["epoch"] >= args.epochs:
            walls[label] = json.loads(wall_file.read_text())["seconds"] if wall_file.exists() else float("nan")
            continue
        t0 = time.time()
        print(f"== training {label} (seed {seed}) -> {out}", flush=True)
        train(
            cfg, out, resume=(out / "checkpoint.safetensors").exists(), log=lambda s: print("  " + s[:200], flush=True)
        )
        walls[label] = round(time.time() - t0, 1)
        wall_file.write_text(json.dumps({"seconds": walls[label]}))
    return walls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=data_path, default=IMAGENETTE)
    p.add_argument("--out", default="runs/bench_rsnet")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--runs", nargs="*", default=[], help="subset of run labels (I-112 ... parallel RS-Net parallel-sum RS-Net-sum)"
    )
    p.add_argument("--skip-calibrate", action="store_true")
    p.add_argument("--policies", nargs="+", help="BN policies to evaluate (default interpolate nearest calibrate)")
    p.add_argument("--test-resolutions", type=int, nargs="+", default=T)
    p.add_argument(
        "--reuse",
        type=Path,
        help="an earlier report.json: a seed's evaluation is taken from it when it covers "
        "every requested run and test resolution under that policy",
    )
    p.add_argument("--render", type=Path, metavar="REPORT_JSON", help="only re-render a report.json into its report.md")
    args = p.parse_args()
    if args.render:
        return render_only(args.render)
    prior = json.loads(args.reuse.read_text())["seeds"] if args.reuse else {}
    if not args.data.is_dir():
        raise SystemExit(f"no data at {args.data}; pass --data DIR (an ImageFolder root with train/ and val/)")
    torch.set_num_threads(torch.get_num_threads())
    report = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "data": str(args.data),
        "epochs": args.epochs,
        "test_resolutions": args.test_resolutions,
        "seeds": {},
    }
    for seed in args.seeds:
        walls = train_all(args, seed)
        runs = [str(Path(args.out) / f"seed{seed}" / label) for label, _, _ in run_specs(args.runs)]
        per_seed = {"wall_s": walls}
        policies = args.policies or ["interpolate", "nearest"] + ([] if args.skip_calibrate else ["calibrate"])
        for policy in policies:
            labels = [Path(r).name for r in runs]
            done = prior.get(str(seed), {}).get(policy, {})
            covered = all(
                lb in done and all(str(r) in done[lb]["results"] for r in args.test_resolutions) for lb in labels
            )
            if covered and evaluated_after(args.reuse, runs):
                per_seed[policy] = {lb: done[lb] for lb in labels}
                if "hit_miss_individual" in prior[str(seed)]:
                    per_seed["hit_miss_individual"] = prior[str(seed)]["hit_miss_individual"]
                print(f"seed {seed}, bn_policy={policy}: evaluation taken from {args.reuse}", flush=True)
                continue
            rep = api.evaluate(runs, str(args.data), args.test_resolutions, policy, calibration_images=2000)
            per_seed[policy] = rep["runs"]
            if "hit_miss_individual" in rep:
                per_seed["hit_miss_individual"] = rep["hit_miss_individual"]
            print(f"evaluated seed {seed} with bn_policy={policy}", flush=True)
        report["seeds"][str(seed)] = per_seed
        out_json = Path(args.out) / "report.json"
        out_json.write_text(json.dumps(report, indent=2))
    md = render(report)
    (Path(args.out) / "report.md").write_text(md)
    print(md)


def render(report: dict) -> str:
    T = report.get("test_resolutions", globals()["T"])  # noqa: N806
    lines = [f"Date {report['date']}; machine: {report['machine']}; data {report['data']}; {report['epochs']} epochs."]
    seeds = list(report["seeds"])
    for policy in ("interpolate", "nearest", "calibrate"):
        if policy not in report["seeds"][seeds[0]]:
            continue
        labels = list(report["seeds"][seeds[0]][policy])
        rows = []
        for label in labels:
            vals = {r: [report["seeds"][s][policy][label]["results"][str(r)]["top1"] for s in seeds] for r in T}
            train_res = report["seeds"][seeds[0]][policy][label]["train_resolutions"]
            cells = []
            for r in T:
                m = statistics.mean(vals[r])
                txt = f"{m:.1f}" + (f" ± {statistics.stdev(vals[r]):.1f}" if len(seeds) > 1 else "")
                cells.append(f"**{txt}**" if len(train_res) == 1 and r in train_res else txt)
            mean_s = statistics.mean(statistics.mean(vals[r]) for r in S if r in vals)
            wall = statistics.mean(report["seeds"][s]["wall_s"].get(label, float("nan")) for s in seeds)
            rows.append([label] + cells + [f"{mean_s:.2f}", f"{wall:.0f}"])
        n_images = report["seeds"][seeds[0]][policy][labels[0]]["results"][str(T[0])]["n"]
        lines += [
            "",
            f"Top-1 % on {n_images} val images, "
            f"unseen resolutions served by bn_policy={policy} (I-Nets have one BN set), seeds {', '.join(seeds)}:",
            "",
        ]
        lines.append(markdown_table(["run"] + [str(r) for r in T] + ["mean over S", "train wall s"], rows))
    paired = paired_gaps(report, seeds)
    if paired:
        lines += [
            "",
            "Each multi-resolution run minus the I-Net of a resolution, at that resolution, seed by seed "
            "(the RS-Nets claim: above every I-Net at its own resolution):",
            "",
        ]
        lines.append(markdown_table(["run", "resolution"] + [f"seed {s}" for s in seeds] + ["mean ± std"], paired))
    rs = report["seeds"][seeds[0]].get("interpolate", {}).get("RS-Net")
    if rs:
        lines += [
            "",
            "RS-Net hit/miss (% right at column resolution, wrong at row resolution; RS-Nets Table 1), seed "
            f"{seeds[0]}:",
            "",
        ]
        hm = rs["hit_miss"]
        lines.append(
            markdown_table(
                ["wrong at \\ right at"] + [str(r) for r in S],
                [[str(j)] + ["-" if i == j else f"{hm[str(j)][str(i)]:.1f}" for i in S] for j in S],
            )
        )
    individual = report["seeds"][seeds[0]].get("hit_miss_individual")
    if individual:
        lines += [
            "",
            f"I-Nets, each at its own resolution (the 'individual' block of RS-Nets Table 1), seed {seeds[0]}:",
            "",
        ]
        lines.append(
            markdown_table(
                ["wrong at \\ right at"] + [str(r) for r in S],
                [[str(j)] + ["-" if i == j else f"{individual[str(j)][str(i)]:.1f}" for i in S] for j in S],
            )
        )
    return "\n".join(lines) + "\n"


def paired_gaps(report: dict, seeds: list[str]) -> list[list[str]]:
    """Rows of (run, resolution, the gap in each seed, mean ± std) for every non-I-Net run in every seed."""
    runs = [report["seeds"][s].get("interpolate", {}) for s in seeds]
    if not runs[0]:
        return []
    rows = []
    for label in runs[0]:
        if label.startswith("I-") or not all(label in r for r in runs):
            continue
        for res in S:
            inet = f"I-{res}"
            if not all(inet in r for r in runs):
                continue
            rows.append(gap_row(label, res, [r[label] for r in runs], [r[inet] for r in runs]))
    return rows


def render_only(path: Path) -> None:
    report = json.loads(path.read_text())
    md = render(report)
    path.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
