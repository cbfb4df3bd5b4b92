"""Training-step speed in NCHW (contiguous) vs NHWC (channels_last) on this machine.

Why `train.channels_last` defaults to true on CPUs too: one training step (forward, backward, SGD) of
the protocol models at 112 px, batch 128, timed interleaved (contiguous, channels_last, repeat) so
drift hits both alike. Inputs are random tensors: speed does not depend on the pixels.

    python benchmarks/memory_format.py [--batch 128] [--repeats 6] [--out runs/bench_memory_format]
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

import flexres
from flexres import OperatingPoint
from flexres.engine.evaluate import markdown_table

MODELS = [  # (label, registry name, width_mult, kwargs, operating point)
    ("resnet18 x0.25", "resnet18", 0.25, {}, OperatingPoint(112)),
    ("san_resnet18 x0.25", "san_resnet18", 0.25, {}, OperatingPoint(112)),
    ("mobilenet_v2 x0.25", "mobilenet_v2", 0.25, {}, OperatingPoint(112)),
    ("mobilenet_v2 x0.5", "mobilenet_v2", 0.5, {}, OperatingPoint(112)),
    ("us_mobilenet_v2 x0.25 @ width 0.6", "us_mobilenet_v2", 0.25, {"slim_divisor": 4}, OperatingPoint(112, 0.6)),
    ("resizable_resnet18 x0.25 @ 0.65 x4", "resizable_resnet18", 0.25, {}, OperatingPoint(112, scales=(0.65,) * 4)),
]


def stepper(name: str, width: float, kwargs: dict, op: OperatingPoint, batch: int, channels_last: bool):
    torch.manual_seed(0)
    model = flexres.create_model(name, num_classes=10, train_resolutions=[112], width_mult=width, **kwargs).train()
    x, y = torch.randn(batch, 3, op.resolution, op.resolution), torch.randint(0, 10, (batch,))
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        model.set_operating_point(op)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--out", type=Path, default=Path("runs/bench_memory_format"))
    args = p.parse_args()
    rows, results = [], {}
    for label, name, width, kwargs, op in MODELS:
        steps = {
            fmt: stepper(name, width, kwargs, op, args.batch, fmt == "channels_last")
            for fmt in ("contiguous", "channels_last")
        }
        for fn in steps.values():  # warm-up: oneDNN picks its kernels on the first calls
            fn()
            fn()
        times = {fmt: [] for fmt in steps}
        for _ in range(args.repeats):
            for fmt, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                times[fmt].append(time.perf_counter() - t0)
        ips = {fmt: args.batch / statistics.median(t) for fmt, t in times.items()}
        results[label] = ips
        rows.append(
            [
                label,
                f"{ips['contiguous']:.0f}",
                f"{ips['channels_last']:.0f}",
                f"{ips['channels_last'] / ips['contiguous']:.2f}",
            ]
        )
        print(rows[-1], flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    md = [
        f"Date {date.today()}; {machine}; batch {args.batch}; median of {args.repeats} interleaved steps.",
        "",
        markdown_table(["model @ 112 px", "contiguous img/s", "channels_last img/s", "speed-up"], rows),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(
        json.dumps({"date": str(date.today()), "machine": machine, "img_per_s": results}, indent=2)
    )
    (args.out / "report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
