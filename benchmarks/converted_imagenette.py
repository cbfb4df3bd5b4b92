"""Converted and pretrained models on the Imagenette protocol (issue 15).

(a) Fine-tuning: the I-Net trained at 112 px (configs/imagenette_individual_r18.yaml, the user's "pretrained" model)
    made switchable over S = {112, 96, 80, 64, 48} (every BN starts from its one BN, train.init_from) and fine-tuned as
    an RS-Net for 5 epochs (configs/imagenette_finetune_rsnet_r18.yaml), against the RS-Net trained from scratch for
    the whole protocol (configs/imagenette_rsnet_r18.yaml) and the unconverted I-Net, at every test resolution.
(b) A timm architecture: timm:mobilenetv3_small_050 as an RS-Net (configs/imagenette_rsnet_timm_mbv3.yaml) against
    its own I-Nets at each resolution of S.

    python benchmarks/converted_imagenette.py --out runs/bench_converted --train-only finetune     # (a)'s two runs
    python benchmarks/converted_imagenette.py --out runs/bench_converted --train-only timm         # (b)'s six runs
    python benchmarks/converted_imagenette.py --out runs/bench_converted --rsnet runs/serve_rsnet   # evaluate, report

Runs that exist are reused; --rsnet points at an RS-Net from scratch trained elsewhere (same config).
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch
from _common import IMAGENETTE, data_path, train_once

from flexres import api
from flexres.engine.config import load_config
from flexres.engine.evaluate import markdown_table

ROOT = Path(__file__).resolve().parents[1]
S = [112, 96, 80, 64, 48]
T = [128, 112, 104, 96, 88, 80, 72, 64, 56, 48, 40]


def specs(out: Path, rsnet: Path | None) -> dict[str, dict]:
    """label -> config, overrides, run directory, group."""
    s = {
        "I-112": {"config": "imagenette_individual_r18.yaml", "sets": [], "group": "finetune"},
        "RS-Net fine-tuned (5 ep)": {
            "config": "imagenette_finetune_rsnet_r18.yaml",
            "sets": [f"train.init_from={out / 'I-112'}"],
            "group": "finetune",
            "after": "I-112",
        },
        "RS-Net from scratch (20 ep)": {"config": "imagenette_rsnet_r18.yaml", "sets": [], "group": "finetune"},
        "timm mbv3 RS-Net": {"config": "imagenette_rsnet_timm_mbv3.yaml", "sets": [], "group": "timm"},
    }
    s.update(
        {
            f"timm mbv3 I-{r}": {
                "config": "imagenette_rsnet_timm_mbv3.yaml",
                "sets": ["method.name=individual", f"method.resolutions=[{r}]", "method.kwargs={}"],
                "group": "timm",
            }
            for r in S
        }
    )
    for label, spec in s.items():
        spec["dir"] = out / label.replace(" ", "_").replace("(", "").replace(")", "")
    if rsnet is not None:
        s["RS-Net from scratch (20 ep)"]["dir"] = rsnet
    s["RS-Net fine-tuned (5 ep)"]["sets"] = [f"train.init_from={s['I-112']['dir']}"]
    return s


def cpu_seconds(run: Path) -> float:
    """Training time: the sum of the epochs' wall seconds in metrics.jsonl."""
    return sum(
        json.loads(line).get("seconds", 0.0)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=data_path, default=IMAGENETTE)
    p.add_argument("--out", type=Path, default=Path("runs/bench_converted"))
    p.add_argument("--rsnet", type=Path, help="an RS-Net from scratch trained with configs/imagenette_rsnet_r18.yaml")
    p.add_argument("--train-only", nargs="+", choices=["finetune", "timm"])
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "converted" / "imagenette.json")
    args = p.parse_args()
    runs = specs(args.out, args.rsnet)
    if args.train_only:
        for label, spec in runs.items():
            if spec["group"] in args.train_only and not (args.rsnet and label.startswith("RS-Net from scratch")):
                cfg = load_config(ROOT / "configs" / spec["config"], spec["sets"] + ["progress=false"])
                cfg["data"]["root"] = str(args.data)
                train_once(label, cfg, spec["dir"], cfg["train"]["epochs"])
        return
    have = {label: spec for label, spec in runs.items() if (spec["dir"] / "checkpoint.safetensors").exists()}
    rep = api.evaluate([str(s["dir"]) for s in have.values()], args.data, T, "interpolate")
    results = {}
    for (label, spec), key in zip(have.items(), rep["runs"]):
        r = rep["runs"][key]
        results[label] = {
            "top1": {str(t): round(r["results"][str(t)]["top1"], 2) for t in T},
            "macs": {str(t): r["results"][str(t)].get("macs") for t in T},
            "train_seconds": round(cpu_seconds(spec["dir"]), 1),
            "config": spec["config"],
            "sets": spec["sets"],
        }
    header = ["run", *map(str, T), "mean over S", "train s"]
    rows = []
    for label, r in results.items():
        mean_s = sum(r["top1"][str(t)] for t in S) / len(S)
        rows.append([label, *(f"{r['top1'][str(t)]:.1f}" for t in T), f"{mean_s:.2f}", f"{r['train_seconds']:.0f}"])
    text = (
        f"Date {date.today()}; {platform.machine()}, torch {torch.__version__}; "
        f"top-1 % on the {rep.get('images', 3000)} val "
        "images, BN interpolation between trained resolutions (the nearest BN outside)\n\n"
        + markdown_table(header, rows)
    )
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"date": str(date.today()), "machine": platform.machine(), "resolutions": T, "runs": results}, indent=1
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
