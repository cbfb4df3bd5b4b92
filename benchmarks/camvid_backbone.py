"""CamVid from a pretrained backbone vs from scratch (RS-Nets App. B, issue 29): the same runs (I-Nets and RS-Net)
trained on one schedule from two starts, side by side: mIoU per resolution (mean ± std over seeds), the RS-Net's gain
over each I-Net at its own resolution and what the pretrained start adds to each network at its own resolution, both
paired by seed. Reads the JSON files ``camvid_seg.py --seed N --json ...`` wrote for each start and seed.

    python -m benchmarks camvid_seg --out runs/cv_pre --seed 0 --train-only --set model.width_mult=0.25 epochs=30 \\
        model.backbone_from=runs/imagenette_rsnet
    python -m benchmarks camvid_seg --out runs/cv_scratch --seed 0 --train-only --set model.width_mult=0.25 epochs=30
    python -m benchmarks camvid_seg --out runs/cv_pre --seed 0 --json pretrained_seed0.json
    python -m benchmarks camvid_seg --out runs/cv_scratch --seed 0 --json scratch_seed0.json
    python -m benchmarks camvid_backbone pretrained=pretrained_seed0.json,... scratch=scratch_seed0.json,...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import mean_std

from flexres.engine.evaluate import markdown_table


def start(text: str) -> tuple[str, list[dict]]:
    """``NAME=FILE[,FILE...]``: one start, one evaluation file per seed."""
    name, _, paths = text.partition("=")
    if not paths:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=FILE[,FILE...] (e.g. scratch=seed0.json,seed1.json)")
    return name, [json.loads(Path(p).read_text()) for p in paths.split(",")]


def miou(seeds: list[dict], policy: str, label: str, res: str) -> list[float]:
    return [s["policies"][policy][label][res]["miou"] for s in seeds]


def paired(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def tables(starts: list[tuple[str, list[dict]]], policy: str) -> str:
    for name, seeds in starts:
        if [s["seed"] for s in seeds] != [s["seed"] for s in starts[0][1]]:
            got = [s["seed"] for s in seeds]
            raise SystemExit(f"{name}: seeds {got} differ from {starts[0][0]}'s: the gains are paired by seed")
    first = starts[0][1][0]["policies"][policy]
    labels = list(first)
    resolutions = list(next(iter(first.values())))
    n = len(starts[0][1])
    macs = ", ".join(f"{r}: {next(iter(first.values()))[r]['macs'] / 1e9:.2f}" for r in resolutions)
    rows = [
        [label, name] + [mean_std(miou(seeds, policy, label, r)) for r in resolutions]
        for label in labels
        for name, seeds in starts
    ]
    out = [
        f"mIoU, BN {policy}, {n} seed{'s' * (n > 1)} (GMACs per image: {macs}):",
        "",
        markdown_table(["run", "start", *resolutions], rows),
    ]
    own = [(label, label[2:]) for label in labels if label.startswith("I-")]
    gains = [
        [r] + [mean_std(paired(miou(s, policy, "RS-Net", r), miou(s, policy, label, r)), "+.1f") for _, s in starts]
        for label, r in own
    ]
    header = ["resolution", *(f"RS-Net - I-Net, {name}" for name, _ in starts)]
    out += ["", "RS-Net minus the I-Net at its own resolution (mIoU, paired by seed):", ""]
    out += [markdown_table(header, gains)]
    if len(starts) == 2:
        (a, sa), (b, sb) = starts
        lift = [
            [label, r, mean_std(paired(miou(sa, policy, label, r), miou(sb, policy, label, r)), "+.1f")]
            for label, r in own + [("RS-Net", r) for _, r in own]
        ]
        out += ["", f"{a} minus {b}, each network at its own resolution (mIoU, paired by seed):", ""]
        out += [markdown_table(["run", "resolution", f"{a} - {b}"], lift)]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("starts", nargs="+", type=start, metavar="NAME=FILE[,FILE...]")
    p.add_argument("--policy", default="interpolate", choices=["interpolate", "calibrate"])
    args = p.parse_args()
    print(tables(args.starts, args.policy))


if __name__ == "__main__":
    main()
