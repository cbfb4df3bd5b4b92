"""CamVid I-Nets vs RS-Net over seeds (issue 14): mean ± std of mIoU, pixel and mean-class accuracy at every
resolution, from the JSON files ``camvid_seg.py --seed N --json ...`` wrote.

    python benchmarks/camvid_seg_seeds.py benchmarks/results/camvid/seg_seed{0,1,2}.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import mean_std as cell

from flexres.engine.evaluate import markdown_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path)
    args = p.parse_args()
    seeds = [json.loads(f.read_text()) for f in args.results]
    for policy in seeds[0]["policies"]:
        runs = seeds[0]["policies"][policy]
        first = next(iter(runs.values()))
        resolutions = list(first)
        macs = [f"{first[r]['macs'] / 1e9:.2f}" for r in resolutions]
        print(
            f"BN {policy}, {len(seeds)} seeds "
            f"(GMACs per image: {', '.join(f'{r}: {m}' for r, m in zip(resolutions, macs))}):\n"
        )
        for metric in ("miou", "pixel_acc", "mean_acc"):
            rows = [
                [label] + [cell([s["policies"][policy][label][r][metric] for s in seeds]) for r in resolutions]
                for label in runs
            ]
            print(f"{metric}:\n\n{markdown_table(['run', *resolutions], rows)}\n")
        rows = []
        for label in (label for label in runs if label.startswith("I-")):  # each I-Net at its own resolution
            r = label[2:]
            gaps = [s["policies"][policy]["RS-Net"][r]["miou"] - s["policies"][policy][label][r]["miou"] for s in seeds]
            rows.append([r, *(f"{g:+.1f}" for g in gaps), cell(gaps)])
        header = ["resolution", *(f"seed {s['seed']}" for s in seeds), "mean ± std"]
        print(f"RS-Net minus the I-Net at its own resolution (mIoU):\n\n{markdown_table(header, rows)}\n")


if __name__ == "__main__":
    main()
