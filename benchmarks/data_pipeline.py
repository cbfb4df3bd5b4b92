"""Training-data throughput of one CPU loader worker (issue 30): images/s from JPEG to the tensors a step takes.

    OMP_NUM_THREADS=1 python -m benchmarks data_pipeline --out benchmarks/results/gpu/data_pipeline.json

Per resolution set S and file size (the data's own JPEGs, and the same re-encoded at ImageNet's typical 500 x 375),
one process (a loader worker is one single-threaded process) reads --images training JPEGs from
disk (no decoded cache), decodes them, takes one random-resized crop with flip and resizes it either to every
resolution of S ("cpu", what the worker sends today) or to the largest only ("device": the rest are made on the
training device, data.resize_on: device). Then the workers an RS-Net step needs: the images/s it consumes (from a
published step speed, --reference-img-s at 224 px, scaled by the step's pixels: sum of (r/224)^2 over S) divided by
one worker's images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from _common import IMAGENETTE, data_path
from PIL import Image

from flexres.data import MultiResolutionCrop, load_rgb

SETS = {"RS-Net S = 224 ... 96": [224, 192, 160, 128, 96], "I-Net 224": [224]}
# ImageNet's training JPEGs average about 400 x 350 px (most are 500 x 375 or 375 x 500); imagenette-224's are
# 224 x 224, so each is also measured re-encoded at 500 x 375 (quality 90), which costs what an ImageNet decode costs.
IMAGENET_SIZE = (500, 375)
# timm's benchmark.py, ResNet-50 training with AMP and channels_last on one A100: about 2,600 img/s
# (huggingface/pytorch-image-models issue 1491). An H100 is faster, so the workers below are a lower bound for it.
REFERENCE = 2600.0


def worker_rate(files: list[Path], resolutions: list[int], on_device: bool) -> float:
    crop = MultiResolutionCrop(resolutions, on_device=on_device)
    torch.manual_seed(0)
    start = time.perf_counter()
    for f in files:
        crop(load_rgb(str(f)))
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=data_path, default=IMAGENETTE)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--reference-img-s", type=float, default=REFERENCE, help="a ResNet-50 step's images/s at 224 px")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.set_num_threads(1)
    files = sorted((a.data / "train").rglob("*.JPEG"))
    files = [
        files[i] for i in torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[: a.images].tolist()
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        large = []
        for i, f in enumerate(files):  # the same images at ImageNet's typical size
            large.append(Path(tmp) / f"{i}.JPEG")
            Image.open(f).convert("RGB").resize(IMAGENET_SIZE, Image.BICUBIC).save(large[-1], quality=90)
        for size, chosen in (("as stored", files), (f"{IMAGENET_SIZE[0]} x {IMAGENET_SIZE[1]}", large)):
            worker_rate(chosen[:20], [224], False)  # warm the file cache and the libraries
            for name, s in SETS.items():
                step_img_s = a.reference_img_s / sum((r / 224) ** 2 for r in s)  # a step at S costs its pixels
                for where in ("cpu", "device") if len(s) > 1 else ("cpu",):
                    rate = worker_rate(chosen, s, where == "device")
                    rows.append(
                        {
                            "jpeg": size,
                            "set": name,
                            "resolutions": s,
                            "resize_on": where,
                            "img_s_per_worker": round(rate, 1),
                            "step_img_s": round(step_img_s),
                            "workers_needed": round(step_img_s / rate, 1),
                        }
                    )
                    print(rows[-1], flush=True)
    report = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "images": len(files),
        "data": "imagenette-224 train JPEGs (224 x 224), and the same re-encoded at 500 x 375",
        "reference_img_s_224": a.reference_img_s,
        "rows": rows,
    }
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
