"""Resolution-switchable segmentation on CamVid (RS-Nets App. B / Table 7, issue 14): I-Nets at each training
resolution against the RS-Net, at trained and unseen resolutions, with BN interpolation and calibration.

    python benchmarks/camvid_seg.py --out runs/bench_camvid --train-only    # 3 I-Nets + RS-Net,
                                                                            # configs/camvid_rsnet_seg_r18.yaml
    python benchmarks/camvid_seg.py --out runs/bench_camvid --json benchmarks/results/camvid/seg_seed0.json   # evaluate
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch
from _common import CAMVID, add_run_options, data_path, train_once

from flexres import api
from flexres.engine.config import load_config
from flexres.engine.evaluate import markdown_table

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "camvid_rsnet_seg_r18.yaml"


def specs(out: Path, seed: int, extra: list[str]) -> dict[str, tuple[Path, list[str]]]:
    cfg = load_config(CONFIG)
    base = [f"seed={seed}", "progress=false", *extra]
    inet = ["method.name=individual", "method.kwargs={}"]
    s = {
        f"I-{r}": (out / f"seed{seed}" / f"I-{r}", base + inet + [f"method.resolutions=[{r}]"])
        for r in cfg["method"]["resolutions"]
    }
    s["RS-Net"] = (out / f"seed{seed}" / "RS-Net", base)
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=data_path, default=CAMVID)
    p.add_argument("--out", type=Path, default=Path("runs/bench_camvid"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-only", action="store_true")
    add_run_options(p)
    p.add_argument(
        "--json", type=Path, help="the evaluation's JSON (default: benchmarks/results/camvid/seg_seed<seed>.json)"
    )
    args = p.parse_args()
    runs = specs(args.out, args.seed, args.set)
    if args.train_only:
        for label, (out, sets) in runs.items():
            if args.only and label not in args.only:
                continue
            cfg = load_config(CONFIG, sets)
            cfg["data"]["root"] = str(args.data)
            train_once(label, cfg, out, cfg["train"]["epochs"])
        return
    res = load_config(CONFIG)["eval"]["resolutions"]
    result = {
        "date": str(date.today()),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "seed": args.seed,
        "policies": {},
    }
    lines = []
    for policy in ("interpolate", "calibrate"):
        rep = api.evaluate([str(d) for d, _ in runs.values()], args.data, res, policy)
        result["policies"][policy] = {label: rep["runs"][key]["results"] for label, key in zip(runs, rep["runs"])}
        for metric in ("miou", "pixel_acc", "mean_acc"):
            rows = [
                [label] + [f"{rep['runs'][key]['results'][str(r)][metric]:.1f}" for r in res]
                for label, key in zip(runs, rep["runs"])
            ]
            lines += [f"{metric}, BN {policy}:", "", markdown_table(["run", *map(str, res)], rows), ""]
    print("\n".join(lines))
    if args.json is None:
        args.json = ROOT / "benchmarks" / "results" / "camvid" / f"seg_seed{args.seed}.json"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
