"""Throughput on this machine (issue: scale and speed), measured in one run.

- loader only: images/s of the multi-resolution train pipeline (one crop -> every resolution), with the
  decoded-image cache and without it (JPEG decode each time), for 0 and 1 worker processes;
- model only: images/s of a training step (forward, backward, SGD step) of every recipe on the
  Imagenette-protocol model (resnet18 x0.25 or san_resnet18 x0.25, S = {112, 96, 80, 64, 48}, batch 128),
  on real batches already in memory;
- the ratio of one multi-resolution step to the sum of the single-resolution steps of the same model,
  timed interleaved (single 112, ..., single 48, multi, repeat) so drift hits both alike.

    python benchmarks/throughput.py [--data DIR] [--batch 128] [--repeats 8]
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
from _common import IMAGENETTE, data_path
from torch.utils.data import DataLoader, Subset

import flexres
from flexres.data import (
    ImageFolderDataset,
    MultiResolutionCrop,
    collate_skipping,
    normalize_batch,
)
from flexres.engine.evaluate import markdown_table
from flexres.methods import create_method

ROOT = Path(__file__).resolve().parents[1]
S = [112, 96, 80, 64, 48]


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def loader_throughput(root: Path, cache: bool, workers: int, images: int, batch: int) -> float:
    ds = ImageFolderDataset(root, transform=MultiResolutionCrop(S), progress=False)
    ds = Subset(ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:images].tolist())
    if cache:  # decode once up front, as data.cache=true does; the decode time is not counted
        decoded = [flexres.data.load_rgb(ds.dataset.samples[i][0]) for i in ds.indices]
        ds = _Decoded(decoded, [ds.dataset.samples[i][1] for i in ds.indices], ds.dataset.transform)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate_skipping, shuffle=True)
    t0 = time.perf_counter()
    n = sum(b["labels"].shape[0] for b in loader)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=data_path, default=IMAGENETTE)
    p.add_argument("--out", type=Path, default=Path("runs/bench_throughput"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--loader-images", type=int, default=1536)
    p.add_argument(
        "--memory-format",
        choices=["channels_last", "contiguous"],
        default="channels_last",
        help="of the model and its batches (channels_last: train.channels_last's default)",
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_root = args.data / "train"
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)

    loader = {}
    for cache in (True, False):
        for workers in (0, 1):
            key = f"{'cached' if cache else 'decode each time'}, {workers} worker{'s' if workers != 1 else ''}"
            loader[key] = loader_throughput(train_root, cache, workers, args.loader_images, args.batch)
            print("loader", key, round(loader[key], 1), flush=True)

    ds = ImageFolderDataset(train_root, transform=MultiResolutionCrop(S), progress=False)
    batches = []
    for b in DataLoader(
        Subset(ds, list(range(0, len(ds), max(1, len(ds) // (3 * args.batch))))[: 3 * args.batch]),
        batch_size=args.batch,
        collate_fn=collate_skipping,
    ):
        inputs = tuple(normalize_batch(x).contiguous(memory_format=memory_format) for x in b["inputs"])
        batches.append((inputs, b["labels"]))

    def stepper(arch: str, method_name: str, resolutions: list[int]):
        model = flexres.create_model(arch, num_classes=10, train_resolutions=S, width_mult=0.25).train()
        model.to(memory_format=memory_format)
        method = create_method(method_name, resolutions=resolutions)
        opt = torch.optim.SGD(list(model.parameters()) + list(method.parameters()), lr=0.01, momentum=0.9)
        idx = [S.index(r) for r in method.resolutions]
        state = {"i": 0}

        def step() -> None:
            inputs, labels = batches[state["i"] % len(batches)]
            state["i"] += 1
            out = method(model, tuple(inputs[j] for j in idx), labels)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()

        return step

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    results, ratios = {}, {}
    for arch, multi in (("resnet18", ["parallel", "rsnet"]), ("san_resnet18", ["san"])):
        singles = {r: stepper(arch, "individual", [r]) for r in S}
        multis = {m: stepper(arch, m, S) for m in multi}
        for fn in [*singles.values(), *multis.values()]:
            fn()  # warm-up
        times: dict[str, list[float]] = {f"individual {r}": [] for r in S} | {m: [] for m in multi}
        for _ in range(args.repeats):
            for r, fn in singles.items():
                times[f"individual {r}"].append(timed(fn))
            for m, fn in multis.items():
                times[m].append(timed(fn))
        med = {k: statistics.median(v) for k, v in times.items()}
        single_sum = sum(med[f"individual {r}"] for r in S)
        for k, v in med.items():
            results[f"{arch} / {k}"] = {"step_s": v, "images_per_s": args.batch / v}
        for m in multi:
            ratios[f"{arch} / {m}"] = med[m] / single_sum
        print(arch, {k: round(v, 4) for k, v in med.items()}, flush=True)

    report = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "batch": args.batch,
        "memory_format": args.memory_format,
        "loader_images_per_s": loader,
        "model": results,
        "multi_over_sum_of_singles": ratios,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"Date {report['date']}; {report['machine']}; batch {args.batch}; "
        f"medians of {args.repeats} interleaved repeats.",
        "",
        "Loader only (multi-resolution pipeline, 5 resolutions per image):",
        "",
        markdown_table(["pipeline", "images/s"], [[k, f"{v:.0f}"] for k, v in loader.items()]),
        "",
        "Model only (one training step: forward, backward, SGD step; images/s = batch / step time):",
        "",
        markdown_table(
            ["model / recipe", "step (s)", "images/s"],
            [[k, f"{v['step_s']:.3f}", f"{v['images_per_s']:.0f}"] for k, v in results.items()],
        ),
        "",
        "Multi-resolution step / sum of the five single-resolution steps (target <= 1.05):",
        "",
        markdown_table(["model / recipe", "ratio"], [[k, f"{v:.3f}"] for k, v in ratios.items()]),
    ]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
