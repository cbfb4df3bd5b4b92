"""CamVid from a pretrained backbone vs from scratch (RS-Nets App. B, issue 29): the same runs (I-Nets and RS-Net)
trained on one schedule from two starts, side by side: mIoU per resolution and the RS-Net's gain over each I-Net at its
own resolution, for each start. Reads the JSON files ``camvid_seg.py --json ...`` wrote for each start.

    python -m benchmarks camvid_seg --out runs/cv_pre --train-only --set model.width_mult=0.25 epochs=30 \\
        model.backbone_from=runs/imagenette_rsnet
    python -m benchmarks camvid_seg --out runs/cv_scratch --train-only --set model.width_mult=0.25 epochs=30
    python -m benchmarks camvid_seg --out runs/cv_pre --json benchmarks/results/camvid/backbone_pretrained.json
    python -m benchmarks camvid_seg --out runs/cv_scratch --json benchmarks/results/camvid/backbone_scratch.json
    python -m benchmarks camvid_backbone pretrained=benchmarks/results/camvid/backbone_pretrained.json \\
        scratch=benchmarks/results/camvid/backbone_scratch.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flexres.engine.evaluate import markdown_table


def start(text: str) -> tuple[str, dict]:
    name, _, path = text.partition("=")
    if not path:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=FILE (e.g. scratch=results.json)")
    return name, json.loads(Path(path).read_text())


def tables(starts: list[tuple[str, dict]], policy: str) -> str:
    first = starts[0][1]["policies"][policy]
    labels = list(first)
    resolutions = list(next(iter(first.values())))
    macs = ", ".join(f"{r}: {next(iter(first.values()))[r]['macs'] / 1e9:.2f}" for r in resolutions)
    rows = [
        [label, name] + [f"{rep['policies'][policy][label][r]['miou']:.1f}" for r in resolutions]
        for label in labels
        for name, rep in starts
    ]
    out = [f"mIoU, BN {policy} (GMACs per image: {macs}):", "", markdown_table(["run", "start", *resolutions], rows)]
    gains = []
    for label in (label for label in labels if label.startswith("I-")):
        r = label[2:]
        gains.append(
            [r]
            + [
                f"{rep['policies'][policy]['RS-Net'][r]['miou'] - rep['policies'][policy][label][r]['miou']:+.1f}"
                for _, rep in starts
            ]
        )
    header = ["resolution", *(f"RS-Net - I-Net, {name}" for name, _ in starts)]
    out += ["", "RS-Net minus the I-Net at its own resolution (mIoU):", "", markdown_table(header, gains), ""]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("starts", nargs="+", type=start, metavar="NAME=FILE")
    p.add_argument("--policy", default="interpolate", choices=["interpolate", "calibrate"])
    args = p.parse_args()
    print(tables(args.starts, args.policy))


if __name__ == "__main__":
    main()
