"""flexres at GPU scale (issue 30), one script, one table, under 10 minutes on one GPU.

    python -m benchmarks gpu_scale --out benchmarks/results/gpu/scale.json            # $FLEXRES_DATA/imagenette-224
    torchrun --nproc-per-node N benchmarks/gpu_scale.py --only model ...               # several GPUs, model-only rows

Rows (RS-Net ResNet-50, S = 224, 192, 160, 128, 96, full MRED, AMP, channels_last, batch --batch per resolution):
  model       the training step alone on random inputs already on the GPU: the ceiling for any pipeline
  cached      decoded images in memory (data.cache: true), --workers loader processes, crops resized on the CPU
  stream-cpu  JPEGs read and decoded by --workers processes each step (no cache), crops resized to every S on the CPU
  stream-dev  the same, each crop resized to 224 only and to the rest of S on the GPU (data.resize_on: device)
  lq22        the quantized RS-Net (LQ-Nets 2/2 weights and activations), model only, the quantizer as it is now
              (one fused step per call, no read-back to the host)
  lq22-compiled  the same with compile_quantizers (the quantizer step through torch.compile: fused kernels)
  lq22-sync   the same with the quantizer's forward as it was before issue 30 (its equations step by step, a read-back
              to the host per layer and step), to show what the fused step buys; target: lq22 >= 50 % of the model row
Images/s counts images per step (each trained at all five resolutions), after --warmup steps, over --steps steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist
from _common import IMAGENETTE, data_path
from torch.utils.data import DataLoader

from flexres.data import ImageFolderDataset, MultiResolutionCrop, collate_skipping, normalize_batch, resize_batch
from flexres.engine.config import make_config
from flexres.engine.trainer import TrainStep, build_model_and_method
from flexres.nn.quantize import LQQuantizer, compile_quantizers, least_squares_basis, quantization_levels, quantize_with

S = [224, 192, 160, 128, 96]
ROWS = ["model", "cached", "stream-cpu", "stream-dev", "lq22", "lq22-compiled", "lq22-sync"]


def build(quantized: bool, device: torch.device, compiled: bool = False):
    kwargs = {"w_bits": 2, "a_bits": 2, "activation_bases": "shared"} if quantized else {}
    cfg = make_config(
        {
            "model": {"name": "resnet50", "kwargs": kwargs},
            "method": {"name": "rsnet", "resolutions": S, "kwargs": {"mred": "full"}},
        }
    )
    model, method = build_model_and_method(cfg, num_classes=1000, pretrained=False)
    if compiled:
        compile_quantizers(model)
    model.to(device, memory_format=torch.channels_last)
    step = TrainStep(model, method).to(device)
    if dist.is_initialized():
        step = torch.nn.parallel.DistributedDataParallel(step, device_ids=[device.index])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return step, opt


def timed_steps(step, opt, batches, warmup: int, steps: int, device: torch.device) -> float:
    """Images/s of ``steps`` training steps after ``warmup``; ``batches`` yields (inputs tuple, labels) on
    ``device``."""
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    it = iter(batches)
    for k in range(warmup + steps):
        if k == warmup:
            sync(device)
            start, seen = time.perf_counter(), 0
        inputs, labels = next(it)
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            loss = step(inputs, labels)[0]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if k >= warmup:
            seen += labels.shape[0]
    sync(device)
    return seen / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batches(batch: int, device: torch.device):
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    inputs = tuple(
        torch.nn.functional.interpolate(x, size=(r, r), mode="bilinear", antialias=True).contiguous(
            memory_format=torch.channels_last
        )
        for r in S
    )
    labels = torch.randint(0, 1000, (batch,), device=device)
    while True:
        yield inputs, labels


def loader_batches(ds, batch: int, workers: int, on_device: bool, device: torch.device):
    ds.transform = MultiResolutionCrop(S, on_device=on_device)
    loader = DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate_skipping,
        drop_last=True,
        pin_memory=True,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    while True:
        for b in loader:
            xs = tuple(x.to(device, non_blocking=True) for x in b["inputs"])  # uint8 over the bus
            if on_device:
                xs = resize_batch(xs[0], S)
            yield (
                tuple(normalize_batch(x).contiguous(memory_format=torch.channels_last) for x in xs),
                (b["labels"] % 1000).to(device, non_blocking=True),
            )


def legacy_forward(self: LQQuantizer, x: torch.Tensor) -> torch.Tensor:
    """The quantizer's forward before issue 30: it reads the fitted flag and the clip's top back to the host."""
    if not self.enabled:
        return x
    i = self.index
    if not bool(self.initialized[i]):
        with torch.no_grad():
            self.basis[i] = self._initial_basis(self.grouped(x.detach().float()))
            self.initialized[i] = True
    flat = self.grouped(x.detach().float())
    basis = self.basis[i].clone()
    q, codes = quantize_with(flat, basis, self.signed)
    if self.training:
        with torch.no_grad():
            self.basis[i] = self.momentum * basis + (1 - self.momentum) * least_squares_basis(
                flat, codes, basis, self.signed
            )
    q = q.reshape(x.shape).to(x.dtype)
    u = x if self.signed else x.clamp(0.0, float(quantization_levels(basis, False).max()))
    return q + (u - u.detach())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=data_path, default=IMAGENETTE)
    p.add_argument("--batch", type=int, default=64, help="images per step and GPU")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--only", nargs="+", choices=ROWS)
    p.add_argument("--out", type=Path)
    p.add_argument("--device", default="cuda", help="cuda; cpu only to check the script itself (tiny --batch)")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_scale measures a CUDA device; none is available here")
    if "LOCAL_RANK" in os.environ:
        dist.init_process_group("nccl")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda", torch.cuda.current_device()) if a.device == "cuda" else torch.device(a.device)
    torch.backends.cudnn.benchmark = True
    rows: dict[str, float] = {}
    wanted = a.only or ROWS
    world = dist.get_world_size() if dist.is_initialized() else 1
    for name in wanted:
        t0 = time.time()
        step, opt = build(name.startswith("lq22"), device, compiled=name == "lq22-compiled")
        if name == "model" or name.startswith("lq22"):
            original = LQQuantizer.forward
            if name == "lq22-sync":
                LQQuantizer.forward = legacy_forward
            try:
                rate = timed_steps(step, opt, random_batches(a.batch, device), a.warmup, a.steps, device)
            finally:
                LQQuantizer.forward = original
        else:
            ds = ImageFolderDataset(a.data / "train", cache=name == "cached", progress=False)
            rate = timed_steps(
                step,
                opt,
                loader_batches(ds, a.batch, a.workers, name == "stream-dev", device),
                a.warmup,
                a.steps,
                device,
            )
        rows[name] = float(f"{rate * world:.4g}")  # 4 significant figures: a slow CPU check must not round to 0
        print(f"{name:11s} {rows[name]:8.1f} img/s  ({time.time() - t0:.0f} s)", flush=True)
        del step, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "model" in rows:
        print("\n| row | img/s | of the model-only step |\n|---|---|---|")
        for name, v in rows.items():
            print(f"| {name} | {v:.0f} | {100 * v / rows['model']:.0f} % |")
    if not dist.is_initialized() or dist.get_rank() == 0:
        report = {
            "date": str(date.today()),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (cpu)",
            "gpus": world,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "batch": a.batch,
            "workers": a.workers,
            "resolutions": S,
            "img_s": rows,
        }
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(report, indent=2) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
