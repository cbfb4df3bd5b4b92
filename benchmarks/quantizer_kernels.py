"""The LQ quantizer's cost in kernels: operators dispatched per quantizer call and per 2/2 RS-Net step, and CPU step
time.

    python -m benchmarks quantizer_kernels --out benchmarks/results/gpu/quantizer_kernels.json

On a GPU each dispatched operator is at least one kernel launch (about 5 us of host time each), so the count is what
makes a quantized step wait on the host. Counted with a TorchDispatchMode, which sees the operators that run after
autograd and decomposition (views, which launch nothing, left out): forward and backward of one training step. Rows: one
2-bit activation quantizer (one basis, a 64 x 64 x 28 x 28 input) and one 2-bit weight quantizer (a 256 x 256 x 3 x 3
conv), each as a training call (QEM update and backward) and an eval call; then the RS-Net ResNet-50 step with five
resolutions (batch 2, at S / 4 = 56 ... 24 to keep the CPU time short; the count does not depend on the size), fp32 and
LQ 2/2. The step time is measured on this machine's CPU at the same sizes (median of --repeats steps after one warm-up);
with --compiled also for the 2/2 step with its quantizers through torch.compile (compile_quantizers; its kernels are
not operators, so no count).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import Counter
from datetime import date
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flexres.engine.config import make_config
from flexres.engine.trainer import TrainStep, build_model_and_method
from flexres.nn.quantize import LQQuantizer, compile_quantizers

S = [224, 192, 160, 128, 96]
SMALL = [r // 4 for r in S]  # the operator count does not depend on the size; the CPU time stays short


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:  # a view only changes metadata: no kernel
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count(fn) -> Counter[str]:
    with CountOps() as mode:
        fn()
    return mode.ops


def quantizer_calls() -> dict[str, int]:
    torch.manual_seed(0)
    rows = {}
    for kind, signed, groups, shape in (
        ("activation", False, 1, (64, 64, 28, 28)),
        ("weight", True, 256, (256, 256, 3, 3)),
    ):
        quant = LQQuantizer(2, signed=signed, groups=groups).train()
        x = torch.randn(shape)
        quant(x if signed else x.relu())  # fits the basis: the counts below are of a fitted quantizer
        xg = (x if signed else x.relu()).requires_grad_()
        rows[f"{kind} quantizer, training (forward + backward)"] = sum(
            count(lambda: quant(xg).sum().backward()).values()
        )
        quant.eval()
        with torch.no_grad():
            rows[f"{kind} quantizer, eval"] = sum(count(lambda: quant(x)).values())
    return rows


def build_step(quantized: bool, compiled: bool = False):
    kwargs = {"w_bits": 2, "a_bits": 2, "activation_bases": "shared"} if quantized else {}
    cfg = make_config(
        {
            "model": {"name": "resnet50", "kwargs": kwargs},
            "method": {"name": "rsnet", "resolutions": SMALL, "kwargs": {"mred": "full"}},
        }
    )
    model, method = build_model_and_method(cfg, num_classes=1000, pretrained=False)
    if compiled:
        compile_quantizers(model)
    step = TrainStep(model, method).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def run(inputs, labels):
        loss = step(inputs, labels)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


def step_rows(repeats: int, compiled: bool) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    inputs = tuple(torch.randn(2, 3, r, r) for r in SMALL)
    labels = torch.randint(0, 1000, (2,))
    rows = {}
    variants = [("fp32 RS-Net step", False, False), ("LQ 2/2 RS-Net step", True, False)]
    variants += [("LQ 2/2 RS-Net step, quantizers compiled", True, True)] if compiled else []
    for name, quantized, compile_step in variants:
        run = build_step(quantized, compile_step)
        run(inputs, labels)  # fits the bases, allocates the optimizer state, compiles
        # a compiled kernel is not an operator: the count would leave it out, so it is not taken for that row
        ops = None if compile_step else sum(count(lambda: run(inputs, labels)).values())
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(inputs, labels)
            times.append(time.perf_counter() - t0)
        rows[name] = {"ops": ops, "cpu_ms": round(1000 * statistics.median(times), 1)}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compiled", action="store_true", help="also the 2/2 step with compile_quantizers (CPU time only)")
    p.add_argument("--label", default="", help="a name for this measurement in the JSON (e.g. the commit)")
    p.add_argument("--out", type=Path, help="JSON file; an existing one gets this --label added")
    a = p.parse_args()
    report = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "ops_per_call": quantizer_calls(),
        "steps": step_rows(a.repeats, a.compiled),
    }
    for name, n in report["ops_per_call"].items():
        print(f"{name:50s} {n:6d} ops")
    for name, row in report["steps"].items():
        print(f"{name:50s} {row['ops'] or '':>6} ops  {row['cpu_ms']:8.1f} ms")
    if a.out:
        everything = json.loads(a.out.read_text()) if a.out.exists() else {}
        everything[a.label or "now"] = report
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(everything, indent=2) + "\n")


if __name__ == "__main__":
    main()
