"""Quantized RS-Nets on the Imagenette protocol (RS-Nets Table 3, issue 13): LQ-Nets 2/32 and 2/2, I-Nets at each
resolution of S against the RS-Net, plus the storage table (five packed I-Nets vs one packed RS-Net vs fp32) and the
packed file's accuracy against the training-time model's.

    python benchmarks/lq_imagenette.py --out runs/bench_lq --train-only 2/32          # 6 runs (5 I-Nets + RS-Net)
    python benchmarks/lq_imagenette.py --out runs/bench_lq --train-only 2/2
    python benchmarks/lq_imagenette.py --out runs/bench_lq --json benchmarks/results/lq/2-32_2-2_seed0.json   # evaluate
    python benchmarks/lq_imagenette.py --seeds-table benchmarks/results/lq/2-32_seed{0,1,2}.json

Model: configs/imagenette_lq_rsnet_r18.yaml (--config; configs/imagenette_lq22_preact_rsnet_r18.yaml is LQ-Nets'
pre-activation network with its recipe, for 2/2) at ResNet-18 x0.25 (--width; x0.25 is the fp32 protocol's width,
section 1 of BENCHMARKS.md, and 2-bit training still learns there), seed with --seed. --only LABEL... trains a subset
(one process per core: OMP_NUM_THREADS=1 each). --only RS-Net-private trains a seventh run, the RS-Net with one
activation basis per resolution (the authors share one); the evaluation adds it as a column when it is there.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from datetime import date
from pathlib import Path

import torch
import yaml
from _common import IMAGENETTE, add_run_options, data_path, train_once

from flexres import api
from flexres.engine.config import load_config
from flexres.engine.evaluate import markdown_table

ROOT = Path(__file__).resolve().parents[1]
S = [112, 96, 80, 64, 48]
BITS = {"2/32": (2, 32), "2/2": (2, 2)}
PRIVATE = "RS-Net-private"
STANDARD = [f"I-{r}" for r in S] + ["RS-Net"]  # the runs of Table 3; PRIVATE is trained only when --only names it


def runs(out: Path, setting: str, seed: int, extra: list[str] = ()) -> dict[str, tuple[Path, list[str]]]:
    w, a = BITS[setting]
    tag = setting.replace("/", "-")
    base = [
        f"model.kwargs={{w_bits: {w}, a_bits: {a}, activation_bases: shared}}",
        f"seed={seed}",
        "progress=false",
        *extra,
    ]
    specs = {
        f"I-{r}": (
            out / tag / f"seed{seed}" / f"I-{r}",
            base + ["method.name=individual", f"method.resolutions=[{r}]", "method.kwargs={}"],
        )
        for r in S
    }
    specs["RS-Net"] = (out / tag / f"seed{seed}" / "RS-Net", base)
    # One activation basis per resolution, like BN (issue 13's extension).
    specs[PRIVATE] = (out / tag / f"seed{seed}" / PRIVATE, base + ["model.kwargs.activation_bases=private"])
    return specs


def run_width(run: Path) -> float | None:
    """The width a run was trained at (its config.yaml), None before it started."""
    cfg = run / "config.yaml"
    return float(yaml.safe_load(cfg.read_text())["model"]["width_mult"]) if cfg.exists() else None


def train_seconds(run: Path) -> float:
    """The epochs' summed wall seconds (metrics.jsonl): a resumed run's total, not the last process's."""
    return round(
        sum(json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()), 1
    )


def seeds_table(reports: list[dict]) -> str:
    """Per setting: I-Net and RS-Net top-1 at each resolution of S over the seeds evaluated (mean ± std), and the
    RS-Net's gain over the I-Net seed by seed (RS-Nets Table 3's gain column)."""
    lines = []
    for setting in sorted({k for rep in reports for k in rep["settings"]}):
        seeds = [(rep["seed"], rep["settings"][setting]["top1"]) for rep in reports if setting in rep["settings"]]
        rows = []
        for r in S:
            inet = [t[f"I-{r}"][str(r)] for _, t in seeds]
            rs = [t["RS-Net"][str(r)] for _, t in seeds]
            gains = [b - a for a, b in zip(inet, rs)]
            rows.append([str(r), spread(inet), spread(rs)] + [f"{g:+.1f}" for g in gains] + [spread(gains, "+")])
        head = ["resolution", "I-Net", "RS-Net"] + [f"gain seed {s}" for s, _ in seeds] + ["gain mean ± std"]
        lines += [f"W/A {setting}, {len(seeds)} seed(s):", "", markdown_table(head, rows), ""]
    return "\n".join(lines)


def spread(values: list[float], sign: str = "") -> str:
    return f"{statistics.mean(values):{sign}.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=data_path, help="default: $FLEXRES_DATA/imagenette-224")
    p.add_argument("--out", type=Path, default=Path("runs/bench_lq"))
    p.add_argument(
        "--config",
        type=Path,
        default=ROOT / "configs" / "imagenette_lq_rsnet_r18.yaml",
        help="the RS-Net's config; the I-Nets are the same at one resolution",
    )
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-only", nargs="+", choices=list(BITS))
    add_run_options(p)
    p.add_argument("--settings", nargs="+", choices=list(BITS), default=list(BITS), help="settings to evaluate")
    p.add_argument(
        "--json", type=Path, help="the evaluation's JSON (default: benchmarks/results/lq/<settings>_seed<seed>.json)"
    )
    p.add_argument(
        "--seeds-table", nargs="+", type=Path, metavar="JSON", help="print the tables over seeds of these evaluations"
    )
    args = p.parse_args()
    if args.seeds_table:
        print(seeds_table([json.loads(f.read_text()) for f in args.seeds_table]))
        return
    args.data = args.data or data_path(IMAGENETTE)  # only here: the tables over seeds read no images
    if args.train_only:
        for setting in args.train_only:
            for label, (out, sets) in runs(args.out, setting, args.seed, args.set).items():
                if label not in (args.only or STANDARD):
                    continue
                if run_width(out) not in (None, args.width):  # the run folders do not name the width
                    raise SystemExit(
                        f"{out} was trained at width {run_width(out)}, not --width {args.width}: use another --out"
                    )
                cfg = load_config(args.config, sets + [f"model.width_mult={args.width}"])
                cfg["data"]["root"] = str(args.data)
                train_once(f"{setting} {label}", cfg, out, cfg["train"]["epochs"])
        return
    result = {
        "date": str(date.today()),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "seed": args.seed,
        "settings": {},
    }
    lines = []
    for setting in args.settings:
        specs = {
            k: v for k, v in runs(args.out, setting, args.seed).items() if (v[0] / "checkpoint.safetensors").exists()
        }
        if not all(k in specs for k in STANDARD):
            continue
        widths = {run_width(d) for d, _ in specs.values()}
        if len(widths) > 1:
            raise SystemExit(f"the {setting} runs under {args.out} were trained at different widths: {sorted(widths)}")
        rep = api.evaluate([str(d) for d, _ in specs.values()], args.data, S)
        top1 = {
            label: {r: rep["runs"][key]["results"][str(r)]["top1"] for r in S} for label, key in zip(specs, rep["runs"])
        }
        packed = {
            label: api.export(d, 0, format="packed", out=d / "packed.safetensors", data=args.data)
            for label, (d, _) in specs.items()
        }
        packed_rs = api.evaluate(str(specs["RS-Net"][0] / "packed.safetensors"), args.data, S)["runs"]
        packed_top1 = {r: next(iter(packed_rs.values()))["results"][str(r)]["top1"] for r in S}
        result["settings"][setting] = {
            "width": widths.pop(),
            "top1": top1,
            "packed_rsnet_top1": packed_top1,
            "bytes": {k: v["bytes"] for k, v in packed.items()},
            "quantized_weights": {k: v["quantized_weights"] for k, v in packed.items()},
            "parity_max_abs_diff": {k: v["parity_max_abs_diff"] for k, v in packed.items()},
            "fp32_tensor_bytes": packed["RS-Net"]["fp32_tensor_bytes"],
            "train_seconds": {k: train_seconds(d) for k, (d, _) in specs.items()},
        }
        rows = [
            [
                str(r),
                f"{top1[f'I-{r}'][r]:.1f}",
                f"{top1['RS-Net'][r]:.1f}",
                f"{top1['RS-Net'][r] - top1[f'I-{r}'][r]:+.1f}",
                f"{packed_top1[r]:.1f}",
            ]
            + ([f"{top1[PRIVATE][r]:.1f}"] if PRIVATE in top1 else [])
            for r in S
        ]
        head = ["resolution", "I-Net", "RS-Net", "gain", "RS-Net packed file"] + (
            ["RS-Net, private bases"] if PRIVATE in top1 else []
        )
        lines += [f"W/A {setting}:", "", markdown_table(head, rows), ""]
        w_bits = BITS[setting][0]
        inets = sum(packed[f"I-{r}"]["bytes"] for r in S)
        codes = {k: v["quantized_weights"] * w_bits // 8 for k, v in packed.items()}
        storage = [
            ["five packed I-Nets", f"{inets:,}", f"{sum(codes[f'I-{r}'] for r in S):,}"],
            ["one packed RS-Net", f"{packed['RS-Net']['bytes']:,}", f"{codes['RS-Net']:,}"],
            ["fp32 tensors of the RS-Net", f"{packed['RS-Net']['fp32_tensor_bytes']:,}", ""],
        ]
        if PRIVATE in packed:
            storage.insert(
                2, ["one packed RS-Net, private bases", f"{packed[PRIVATE]['bytes']:,}", f"{codes[PRIVATE]:,}"]
            )
        lines += [
            markdown_table(["what", "bytes", f"of which {w_bits}-bit weight codes"], storage),
            "",
            "packed file vs training-time model, max |logit diff|: "
            + ", ".join(f"{k} {v['parity_max_abs_diff']:.1e}" for k, v in packed.items()),
            "",
        ]
    print("\n".join(lines))
    if args.json is None:  # e.g. lq/2-2_seed0.json for --settings 2/2 --seed 0
        tag = "_".join(s.replace("/", "-") for s in args.settings)
        args.json = ROOT / "benchmarks" / "results" / "lq" / f"{tag}_seed{args.seed}.json"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
