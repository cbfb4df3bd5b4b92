"""How many images fit in memory at one operating point: batch sizes for evaluation and BN calibration.

A fully convolutional network runs at any resolution, but its activations grow with the square of it:
a batch of 256 that is harmless at 112 px asks for tens of GB at 2000 px. ``fit_batch_size`` shrinks the
batch to what the device can hold, and names the resolution when not even one image fits.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import FlexresError
from ..models import AdaptiveModel
from ..operating_point import OperatingPoint

__all__ = [
    "PROBE_RESOLUTION",
    "ResolutionTooLargeError",
    "activation_bytes_per_image",
    "available_memory_bytes",
    "fit_batch_size",
    "input_bytes_per_image",
]

# Small enough that the probe forward costs milliseconds even for a large model, large enough that every
# stride of the usual backbones (32 in total) still leaves a feature map to measure.
PROBE_RESOLUTION = 64
# A layer's input and its output are alive at once, plus a temporary of about the same size (a BN's
# normalised copy, a conv's unfolded input or workspace) and, inside a residual block, the identity kept
# for the sum: four times the largest tensor bounds that without modelling every kernel's allocations.
# Three is not enough: measured on the CPU at 448 px, ResNet-50's bottlenecks peak at 3.9x per image
# (ResNet-18 2x, MobileNetV2 2.2x, its expansion layers being the largest tensors).
SAFETY_FACTOR = 4
GB = 1e9


class ResolutionTooLargeError(FlexresError, ValueError):
    """Not even one image fits in memory at the requested resolution; the message says how much it needs."""


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):  # several outputs of one module are alive together
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


def input_bytes_per_image(resolution: int) -> int:
    """The normalised float32 input of one image (3 x r x r)."""
    return 3 * resolution * resolution * 4


@torch.no_grad()
def activation_bytes_per_image(model: AdaptiveModel, op: OperatingPoint | int) -> int:
    """Estimated peak activation memory (bytes) of one image in an inference forward pass at ``op``.

    One forward pass of a single image at ``PROBE_RESOLUTION`` (or at ``op``'s own resolution when that is
    smaller), with ``op``'s width and scales, records the largest tensor a module outputs (or the input,
    if larger); activations of a convolutional network grow with the pixel count, so that is scaled by
    (resolution / probe)^2 and multiplied by ``SAFETY_FACTOR``. The model's state (operating point, BN
    policy, train/eval mode) is left as it was.
    """
    op = OperatingPoint.coerce(op)
    probe = min(PROBE_RESOLUTION, op.resolution)
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, probe, probe, device=device)  # float32, as normalize_batch feeds the model
    largest = _tensor_bytes(x)

    def record(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal largest
        largest = max(largest, _tensor_bytes(output))

    handles = [m.register_forward_hook(record) for m in model.modules()]
    try:
        # measuring_cost: uncalibrated slimmable BNs would otherwise refuse to run; "nearest" serves any
        # resolution from trained statistics without calibrating. Neither changes tensor sizes.
        with model.measuring_cost(), model.at(OperatingPoint(probe, op.width, op.scales), bn_policy="nearest"):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return math.ceil(SAFETY_FACTOR * largest * (op.resolution / probe) ** 2)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _cgroup_available() -> int | None:
    """Bytes left under this process's cgroup memory limit, if one is set (containers).

    MemAvailable describes the whole host, so inside a container with a lower limit it promises memory
    the kernel's OOM killer will not grant. Reclaimable page cache (inactive_file) counts as available.
    """
    for limit_file, usage_file, stat_file, inactive_key in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    ):
        root = Path("/sys/fs/cgroup")
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if limit is None or usage is None or limit >= 1 << 60:  # v1 reports "no limit" as a huge number
            continue
        inactive = 0
        try:
            for line in (root / stat_file).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive_key and value.strip().isdigit():
                    inactive = int(value)
        except OSError:
            pass
        return max(0, limit - usage + inactive)
    return None


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows) or the names are unknown
        return None


def available_memory_bytes(device: str | torch.device) -> int:
    """Free memory (bytes) for tensors on ``device``.

    CUDA: the driver's free memory plus what PyTorch's caching allocator holds but does not use (it hands
    that out again before asking the driver). Elsewhere (CPU; MPS shares host memory): MemAvailable from
    /proc/meminfo, capped by a cgroup memory limit when one applies, else the total physical memory.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    found = [v for v in (_host_available(), _cgroup_available()) if v is not None]
    # Nothing to go by: do not limit the batch, which is how evaluation behaved before this check.
    return min(found) if found else 1 << 62


def fit_batch_size(
    model: AdaptiveModel,
    op: OperatingPoint | int,
    requested: int,
    device: str | torch.device,
    images_bytes_per_image: int = 0,
    budget_fraction: float = 0.5,
) -> int:
    """The largest batch size <= ``requested`` whose estimated memory fits ``budget_fraction`` of what
    ``device`` has free.

    Per image: the activations (``activation_bytes_per_image``), the float32 input batch (3 r^2 x 4 bytes)
    and ``images_bytes_per_image`` more that the caller keeps alongside (e.g. the uint8 batch the loader
    produced). The fraction leaves room for what the estimate does not see: allocator fragmentation,
    convolution workspaces, other processes. Raises ResolutionTooLargeError when not even one image fits.
    """
    if requested < 1:
        raise ValueError(f"batch size must be at least 1, got {requested}")
    if not 0 < budget_fraction <= 1:
        raise ValueError(f"budget_fraction must lie in (0, 1], got {budget_fraction}")
    op = OperatingPoint.coerce(op)
    per_image = activation_bytes_per_image(model, op) + input_bytes_per_image(op.resolution) + images_bytes_per_image
    available = available_memory_bytes(device)
    budget = int(available * budget_fraction)
    fits = budget // per_image
    if fits < 1:
        where = f" (operating point {op})" if op != OperatingPoint(op.resolution) else ""
        raise ResolutionTooLargeError(
            f"{op.resolution} px{where} is too large for {torch.device(device)}: "
            f"one image needs about {per_image / GB:.1f} GB, "
            f"but only {available / GB:.1f} GB is available (and {budget_fraction:.0%} of that, {budget / GB:.1f} GB, "
            f"is the budget); use a smaller resolution or a device with more memory"
        )
    return int(min(requested, fits))
