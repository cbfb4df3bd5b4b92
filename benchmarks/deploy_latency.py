"""Deployment costs on this machine (issue: deploy).

(a) switching resolution inside one adaptive model vs loading the I-Net checkpoint for that resolution;
(b) latency per resolution of the adaptive model, the same sub-network as plain layers (static, BN kept),
    the static model with BN folded, and that model in ONNX Runtime; batch 1 and batch 32.

    python benchmarks/deploy_latency.py [--rsnet-runs runs/bench_rsnet/seed0] [--out runs/bench_deploy]

Uses the runs of benchmarks/rsnet_imagenette.py (RS-Net and I-Nets) when present, else fresh models of the
same architecture (weights do not change latency).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import onnxruntime as ort
import torch

import flexres
from flexres.analysis import count_macs, time_call
from flexres.deploy import to_static
from flexres.engine.checkpoint import load_checkpoint, save_checkpoint
from flexres.engine.evaluate import markdown_table

S = [112, 96, 80, 64, 48]


def load_or_create(path: Path, resolutions: list[int]):
    if (path / "checkpoint.safetensors").exists():
        return load_checkpoint(path)[0]
    return flexres.create_model("resnet18", num_classes=10, train_resolutions=resolutions, width_mult=0.25).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rsnet-runs", type=Path, default=Path("runs/bench_rsnet/seed0"))
    p.add_argument("--out", type=Path, default=Path("runs/bench_deploy"))
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    rsnet = load_or_create(args.rsnet_runs / "RS-Net", S)

    # (a) switching vs loading
    inet_dirs = {}
    for r in S:
        d = args.rsnet_runs / f"I-{r}"
        if not (d / "checkpoint.safetensors").exists():
            d = args.out / f"I-{r}"
            save_checkpoint(d, load_or_create(d, [r]), {"epoch": 0})
        inet_dirs[r] = d
    switch_us = []
    for _ in range(200):
        for r in S:
            t0 = time.perf_counter()
            rsnet.set_operating_point(r)
            switch_us.append((time.perf_counter() - t0) * 1e6)
    load_ms = []
    for _ in range(5):
        for r in S:
            t0 = time.perf_counter()
            load_checkpoint(inet_dirs[r])
            load_ms.append((time.perf_counter() - t0) * 1e3)
    sw, ld = statistics.median(switch_us), statistics.median(load_ms)
    part_a = {"switch_us": round(sw, 1), "load_ms": round(ld, 2), "ratio": round(ld * 1000 / sw, 0)}

    # (b) latency per resolution
    rows = {}
    for batch in (1, 32):
        for r in S:
            x = torch.randn(batch, 3, r, r)
            rsnet.set_operating_point(r)
            plain = to_static(rsnet, r, fold_bn=False)
            folded = to_static(rsnet, r)
            onnx_path = args.out / f"rsnet_{r}.onnx"
            torch.onnx.export(
                folded,
                (x[:1],),
                str(onnx_path),
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                dynamo=True,
                verbose=False,
            )
            sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            xn = x.numpy()
            rows[(batch, r)] = {
                "macs": count_macs(rsnet, r),
                "adaptive": time_call(lambda: rsnet(x), 5, args.repeats),
                "plain": time_call(lambda: plain(x), 5, args.repeats),
                "folded": time_call(lambda: folded(x), 5, args.repeats),
                "onnxruntime": time_call(lambda: sess.run(None, {"image": xn}), 5, args.repeats),
            }
            print(batch, r, {k: round(v, 3) for k, v in rows[(batch, r)].items()}, flush=True)
    report = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}",
        "switching": part_a,
        "latency_ms": {f"{b}x{r}": v for (b, r), v in rows.items()},
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"Date {report['date']}; {report['machine']}.",
        "",
        f"(a) switching the RS-Net to another resolution: median {sw:.1f} us; "
        "loading that resolution's I-Net checkpoint: "
        f"median {ld:.2f} ms; loading costs {ld * 1000 / sw:.0f}x the switch.",
        "",
        "(b) median latency (ms) per forward, ResNet-18 x0.25, 10 classes:",
        "",
    ]
    table = [
        [
            str(b),
            str(r),
            f"{v['macs'] / 1e6:.1f}",
            f"{v['adaptive']:.2f}",
            f"{v['plain']:.2f}",
            f"{v['folded']:.2f}",
            f"{v['onnxruntime']:.2f}",
            f"{v['adaptive'] / v['plain']:.2f}",
        ]
        for (b, r), v in rows.items()
    ]
    lines.append(
        markdown_table(
            [
                "batch",
                "resolution",
                "MMACs",
                "adaptive (switchable BN)",
                "static, plain Conv/BN/Linear",
                "static, BN folded",
                "ONNX Runtime (folded)",
                "adaptive / plain",
            ],
            table,
        )
    )
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
