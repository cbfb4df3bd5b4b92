"""One training loop for every recipe: the method decides the operating points and the losses."""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors import safe_open
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..data import ImageFolderDataset, KeyedSampler, collate_skipping, normalize_batch, read_class_names, resize_batch
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError
from ..methods import Method, create_method
from ..models import AdaptiveModel, create_model
from ..nn.quantize import compile_quantizers
from ..version import __version__
from .checkpoint import CHECKPOINT, load_backbone, load_into, load_training_state, save_checkpoint
from .config import check_names, resolve_data_root
from .tasks import Task, get_task

# Keys that may change between a run and its resume without changing the result.
_RESUME_FREE = {
    ("train", "progress"),
    ("train", "eval_every"),
    ("train", "device"),
    ("data", "root"),
    ("data", "num_workers"),
    ("data", "cache"),
    ("data", "class_names"),
    ("data", "prefetch_factor"),
}


class TrainStep(nn.Module):
    """Model + method as one module, so DistributedDataParallel sees one forward per step."""

    def __init__(self, model: AdaptiveModel, method: Method) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, inputs: tuple[Tensor, ...], labels: Tensor):
        out = self.method(self.model, inputs, labels)
        return out.loss, out.terms, out.logits


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if dist.is_available() and dist.is_initialized() and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, warmup: int, peak: float, milestones: list[int] | None = None) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to zero at ``total``; with ``milestones``
    (steps), a step schedule instead: divided by 10 at each (LQ-Nets: epochs 30, 60, 85, 95, 105 of 120)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if milestones:
        return peak * 0.1 ** sum(step >= m for m in milestones)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(1.0, progress)))


def model_preprocessing(model: AdaptiveModel) -> dict[str, Any]:
    """Mean, std, eval crop fraction and resize interpolation: the source's (a timm / torchvision model's pretrained
    config), else ImageNet's with bilinear resizing."""
    pre = getattr(model, "preprocessing", None) or {}
    return {
        "mean": list(pre.get("mean", IMAGENET_MEAN)),
        "std": list(pre.get("std", IMAGENET_STD)),
        "crop_fraction": float(pre.get("crop_fraction", 0.875)),
        "interpolation": pre.get("interpolation", "bilinear"),
    }


HEADS = ("new", "pretrained_rows")


def build_model_and_method(
    cfg: dict[str, Any], num_classes: int, pretrained: bool = True, class_folders: list[str] | None = None
) -> tuple[AdaptiveModel, Method]:
    """``class_folders``: the data's class folder names, for ``model.head: pretrained_rows`` (ImageNet wnids)."""
    mcfg, meth = cfg["model"], cfg["method"]
    head = mcfg.get("head", "new")
    if head not in HEADS:
        raise ConfigError(f"model.head must be one of {', '.join(HEADS)}, got {head!r}")
    rows = None
    if head == "pretrained_rows" and pretrained:
        if not isinstance(mcfg["pretrained"], str) or class_folders is None:
            raise ConfigError(
                "model.head: pretrained_rows takes rows of a local pretrained classifier: set model.pretrained "
                "to a weights file or package, and train on class folders named by ImageNet wnids"
            )
        from ..models.pretrained import imagenet_rows

        rows = imagenet_rows(class_folders)
    method = create_method(
        meth["name"], resolutions=meth["resolutions"], label_smoothing=cfg["train"]["label_smoothing"], **meth["kwargs"]
    )
    kwargs = dict(mcfg["kwargs"])
    if hasattr(method, "width_range"):  # slimmable recipes: the model serves the widths the method trains
        kwargs.setdefault("width_range", list(method.width_range))
    model = create_model(
        mcfg["name"],
        num_classes=num_classes,
        train_resolutions=list(method.resolutions),
        width_mult=mcfg["width_mult"],
        pretrained=mcfg["pretrained"] if pretrained else None,
        **({"pretrained_rows": rows} if rows is not None else {}),
        **kwargs,
    )
    return model, method


def build_optimizer(cfg: dict[str, Any], model: nn.Module, method: nn.Module) -> torch.optim.Optimizer:
    t = cfg["train"]
    params = list(model.parameters())
    if t.get("weight_decay_on", "all") == "weights":  # conv and linear weights; not BN affine, biases, scalars
        decayed = [p for p in params if p.ndim >= 2]
        groups = [
            {"params": decayed, "weight_decay": t["weight_decay"]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": params, "weight_decay": t["weight_decay"]}]
    method_params = list(method.parameters())
    if method_params:  # the method's own scores (alpha) are not regularised
        groups.append({"params": method_params, "weight_decay": 0.0})
    if t["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=t["lr"], momentum=t["momentum"], nesterov=t["nesterov"])
    if t["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=t["lr"])
    raise ValueError(f"unknown optimizer {t['optimizer']!r} (sgd or adamw)")


class CompileOrFallback(nn.Module):
    """torch.compile where it works here; the eager module (with a note) where it does not.

    torch.compile is lazy: a missing compiler or backend only shows at the first call, so that call
    is the one guarded."""

    def __init__(self, module: nn.Module, log: Callable[[str], None]) -> None:
        super().__init__()
        self.module, self.log = module, log
        self.compiled: Callable | None = None
        self.failed = False
        try:
            self.compiled = torch.compile(module)
        except Exception as e:  # noqa: BLE001 - any failure falls back to eager
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self.failed, self.compiled = True, None
        self.log(f"torch.compile unavailable ({type(e).__name__}: {e}); training eagerly")

    def forward(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001
                self._fail(e)
        return self.module(*args)


def run_loaders(
    dataset, seed: int, rank: int, world: int, accumulate: int, micro_batch: int, workers: int, pin: bool, prefetch: int
) -> list[DataLoader]:
    """One loader per micro-batch, made once for the whole run (data.persistent_workers): KeyedSamplers give each
    epoch its order and each sample the seed of its augmentation, so the workers can live across epochs."""
    replicas = world * accumulate
    samplers = [
        KeyedSampler(
            len(dataset),
            seed,
            None
            if replicas == 1
            else DistributedSampler(
                dataset, num_replicas=replicas, rank=rank * accumulate + k, shuffle=True, seed=seed, drop_last=True
            ),
        )
        for k in range(accumulate)
    ]
    return [
        DataLoader(
            dataset,
            batch_size=micro_batch,
            sampler=s,
            num_workers=workers,
            collate_fn=collate_skipping,
            drop_last=True,
            pin_memory=pin,
            persistent_workers=workers > 0,
            prefetch_factor=prefetch if workers > 0 else None,
        )
        for s in samplers
    ]


def epoch_loaders(
    dataset,
    seed: int,
    epoch: int,
    gen: torch.Generator,
    rank: int,
    world: int,
    accumulate: int,
    micro_batch: int,
    workers: int,
    pin: bool,
) -> list[DataLoader]:
    """One loader per micro-batch this process runs in a step.

    A single replica shuffles with ``gen``; several replicas (processes x accumulate_steps) each read
    the shard DistributedSampler gives virtual rank ``rank * accumulate + k``, so one process that
    accumulates k micro-batches reads exactly what k processes would.
    """
    common = dict(
        batch_size=micro_batch,
        num_workers=workers,
        collate_fn=collate_skipping,
        drop_last=True,
        pin_memory=pin,
        generator=gen,
    )
    replicas = world * accumulate
    if replicas == 1:
        return [DataLoader(dataset, shuffle=True, **common)]
    loaders = []
    for k in range(accumulate):
        sampler = DistributedSampler(
            dataset, num_replicas=replicas, rank=rank * accumulate + k, shuffle=True, seed=seed, drop_last=True
        )
        sampler.set_epoch(epoch)
        loaders.append(DataLoader(dataset, sampler=sampler, **common))
    return loaders


def _config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    diffs = []
    for section, values in current.items():
        for key, value in values.items():
            if (section, key) in _RESUME_FREE or key not in saved.get(section, {}):
                continue  # free to change, or a key newer than the run (its default applies)
            old = saved.get(section, {}).get(key)
            if old != value:
                diffs.append(f"{section}.{key}: {old!r} -> {value!r}")
    return diffs


@dataclass
class Processes:
    """Where this process stands in a (possibly torchrun) job."""

    distributed: bool
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class StepPlan:
    """How the epoch is cut into optimiser steps of train.batch_size images."""

    accumulate: int
    micro_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


@dataclass
class Trainee:
    """Everything a step touches."""

    model: AdaptiveModel
    method: Method
    optimizer: torch.optim.Optimizer
    step_module: nn.Module
    scaler: torch.amp.GradScaler
    use_amp: bool
    channels_last: bool
    mean: list[float]
    std: list[float]


@dataclass
class EpochTotals:
    """Sums over one epoch's images (this process's, until reduced over ranks)."""

    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    correct: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    seen: int = 0
    skipped: list[str] = field(default_factory=list)
    lr: float = 0.0


def start_processes(t: dict[str, Any]) -> Processes:
    """Join the torchrun job when there is one and pick the device."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        # Long timeout: rank 0 evaluates and writes checkpoints while the others wait at a barrier.
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=2))
    device = resolve_device(t["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Exact resume on GPUs needs deterministic kernels; they cost some speed, so it is a choice.
        torch.backends.cudnn.benchmark = not t["deterministic"]
        torch.backends.cudnn.deterministic = t["deterministic"]
    return Processes(
        distributed, dist.get_rank() if distributed else 0, dist.get_world_size() if distributed else 1, device
    )


def class_names(d: dict[str, Any], folders: list[str]) -> list[str] | None:
    """data.class_names (a list, or the path of a classes.tsv) or the classes.tsv at the data root, in label order."""
    given = d.get("class_names")
    if isinstance(given, list):
        if len(given) != len(folders):
            raise ConfigError(
                f"data.class_names names {len(given)} classes but {d['root']} has {len(folders)} class folders"
            )
        return [str(n) for n in given]
    if given and not Path(given).is_file():
        raise ConfigError(f"data.class_names: no such file {given}")
    return read_class_names(given or d["root"], folders)


def build_trainee(
    cfg: dict[str, Any],
    num_classes: int,
    procs: Processes,
    resume: bool,
    log: Callable[[str], None],
    class_folders: list[str] | None = None,
) -> Trainee:
    """Model, method, optimiser and the module a step calls (compiled, DDP-wrapped as configured)."""
    t = cfg["train"]
    # a resumed run has its own weights
    model, method = build_model_and_method(cfg, num_classes, pretrained=not resume, class_folders=class_folders)
    if t["init_from"] and not resume:  # start from trained weights, e.g. to fine-tune a Resizable-NAS pick
        meta = load_into(model, t["init_from"])
        log(f"initialised the model from {t['init_from']} (epoch {meta.get('epoch')})")
    backbone = cfg["model"].get("backbone_from")
    if backbone and not resume:  # a segmenter's encoder from a classifier (RS-Nets App. B: ImageNet-pretrained)
        if getattr(model, "task", "classification") != "segmentation":
            raise ConfigError(
                "model.backbone_from initialises a segmenter's encoder; for a classifier use train.init_from"
            )
        got = load_backbone(model, resolve_data_root(backbone))
        log(
            f"backbone from {backbone}: {got['loaded']} tensors; fresh: {', '.join(got['fresh'])}; unused from the "
            f"source: {', '.join(got['unused']) or 'none'}"
        )
    model.to(procs.device)
    method.to(procs.device)
    # NHWC is faster on CPUs too (oneDNN): 1.3x for ResNet-18 x0.25, 1.4-1.6x for MobileNetV2 (BENCHMARKS.md).
    if t["channels_last"]:
        model.to(memory_format=torch.channels_last)
    if t["compile_quantizers"]:
        log(f"train.compile_quantizers: {compile_quantizers(model)} quantizers compiled at their first call")
    if t["sync_bn"] and model.width_range is not None:
        raise ConfigError(
            "train.sync_bn: slimmable models normalise with per-batch statistics of their own layer "
            "(SlimmableBatchNorm2d) and cannot be synchronised; leave sync_bn off"
        )
    if procs.distributed and t["sync_bn"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # converts the BNs inside every SwitchableBatchNorm2d
    optimizer = build_optimizer(cfg, model, method)
    step_module: nn.Module = TrainStep(model, method)
    if t["compile"]:
        step_module = CompileOrFallback(step_module, log)
    if procs.distributed:
        device = procs.device
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    use_amp = t["amp"] and procs.device.type == "cuda"
    pre = model_preprocessing(model)
    return Trainee(
        model,
        method,
        optimizer,
        step_module,
        torch.amp.GradScaler("cuda", enabled=use_amp),
        use_amp,
        t["channels_last"],
        pre["mean"],
        pre["std"],
    )


def plan_steps(t: dict[str, Any], num_images: int, world: int) -> StepPlan:
    # Data-parallel replicas: the processes times the micro-batches each accumulates. One optimiser step
    # sees train.batch_size images whatever the split, so a run on 1 device with accumulate_steps=8 takes
    # the same steps as one on 8 devices.
    accumulate = int(t["accumulate_steps"])
    replicas = world * accumulate
    if t["batch_size"] % replicas:
        raise ValueError(f"train.batch_size={t['batch_size']} must divide by processes x accumulate_steps = {replicas}")
    micro_batch = t["batch_size"] // replicas
    steps_per_epoch = (num_images // replicas) // micro_batch  # what each DistributedSampler(drop_last) yields
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {t['batch_size']} is larger than the training set ({num_images} images)")
    total = steps_per_epoch * t["epochs"]
    return StepPlan(accumulate, micro_batch, steps_per_epoch, total, int(round(t["warmup_epochs"] * steps_per_epoch)))


def restore(cfg: dict[str, Any], out_dir: Path, trainee: Trainee, log: Callable[[str], None]) -> int:
    """Load the run's last checkpoint into ``trainee`` (weights, method, optimiser, scaler); returns its epoch."""
    meta = load_training_state(out_dir / CHECKPOINT, trainee.model, trainee.method, trainee.optimizer)
    diffs = _config_differences(meta.get("config", {}), cfg)
    if diffs:
        raise ValueError(f"--resume: the config differs from the run in {out_dir}: " + "; ".join(diffs))
    trainee.scaler.load_state_dict(meta.get("grad_scaler") or {})
    log(f"resuming {out_dir} after epoch {int(meta['epoch'])}")
    return int(meta["epoch"])


def prepare_run_dir(cfg: dict[str, Any], out_dir: Path, resume: bool, start_epoch: int) -> Path:
    """Write config.yaml; keep only the metrics of epochs the checkpoint holds. Returns metrics.jsonl's path."""
    metrics_path = out_dir / "metrics.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if resume and metrics_path.exists():  # drop epochs the checkpoint does not contain
        kept = [
            ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln).get("epoch", 0) <= start_epoch
        ]
        metrics_path.write_text("".join(k + "\n" for k in kept))
    elif not resume and metrics_path.exists():
        metrics_path.unlink()
    return metrics_path


def freeze_bn_statistics(model: nn.Module) -> None:
    """Every BatchNorm normalises with its running statistics and keeps them (its affine parameters still train)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def run_epoch(
    epoch: int,
    cfg: dict[str, Any],
    train_ds: ImageFolderDataset,
    trainee: Trainee,
    plan: StepPlan,
    procs: Processes,
    loaders: list[DataLoader] | None = None,
) -> EpochTotals:
    """One epoch of optimiser steps; everything random derives from (seed, epoch), so a resumed run replays it.
    ``loaders``: the run's persistent loaders (run_loaders), else this epoch's are made here."""
    t, d = cfg["train"], cfg["data"]
    epoch_seed = t["seed"] * 100003 + epoch + procs.rank * 7919  # each DDP rank its own augmentation stream
    seed_everything(epoch_seed)
    if loaders is not None:
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
    else:
        gen = torch.Generator().manual_seed(epoch_seed)
        loaders = epoch_loaders(
            train_ds,
            t["seed"],
            epoch,
            gen,
            procs.rank,
            procs.world,
            plan.accumulate,
            plan.micro_batch,
            d["num_workers"],
            procs.device.type == "cuda",
        )
    trainee.step_module.train()
    if t.get("bn_stats", "update") == "frozen":
        freeze_bn_statistics(trainee.model)
    totals = EpochTotals()
    bar = tqdm(
        zip(*loaders),
        total=plan.steps_per_epoch,
        desc=f"epoch {epoch + 1}/{t['epochs']}",
        disable=not (t["progress"] and procs.is_main),
        leave=False,
    )
    for i, micro_batches in enumerate(bar):
        step = epoch * plan.steps_per_epoch + i
        totals.lr = lr_at(
            step,
            plan.total_steps,
            plan.warmup_steps,
            t["lr"],
            [int(e * plan.steps_per_epoch) for e in t["lr_milestones"]] if t["lr_milestones"] else None,
        )
        for g in trainee.optimizer.param_groups:
            g["lr"] = totals.lr
        trainee.optimizer.zero_grad(set_to_none=True)
        loss = None
        for k, batch in enumerate(micro_batches):
            last_micro = k == len(micro_batches) - 1
            micro_loss = train_micro_batch(batch, step, i, epoch, last_micro, cfg, trainee, plan, procs, totals)
            loss = micro_loss if micro_loss is not None else loss
        trainee.scaler.step(trainee.optimizer)
        trainee.scaler.update()
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{totals.lr:.4f}")
    bar.close()
    return totals


def train_micro_batch(
    batch: dict[str, Any],
    step: int,
    i: int,
    epoch: int,
    last_micro: bool,
    cfg: dict[str, Any],
    trainee: Trainee,
    plan: StepPlan,
    procs: Processes,
    totals: EpochTotals,
) -> float | None:
    """Forward and backward of one micro-batch (gradients accumulate); adds its loss terms to ``totals``."""
    t, method, step_module = cfg["train"], trainee.method, trainee.step_module
    totals.skipped += batch["skipped"]
    sync = nullcontext() if not procs.distributed or last_micro else step_module.no_sync()
    if batch["inputs"] is None:
        # Every image of this micro-batch was unreadable: a zero loss over all parameters keeps
        # DDP's gradient all-reduce in step with the other ranks.
        with sync:
            sum(p.reshape(-1)[0] * 0.0 for p in step_module.parameters()).backward()
        return None
    # Operating points a method samples come from this generator: the same on every rank and
    # micro-batch of a step, so all replicas train the same sub-networks.
    method.rng.manual_seed(t["seed"] * 1_000_003 + step)
    method.progress = step / plan.total_steps
    device = procs.device
    labels = batch["labels"].to(device, non_blocking=True)
    inputs = tuple(x.to(device, non_blocking=True) for x in batch["inputs"])
    if cfg["data"]["resize_on"] == "device" and labels.dim() == 1:  # one crop at the largest resolution came
        inputs = resize_batch(inputs[0], method.resolutions)
    inputs = tuple(normalize_batch(x, trainee.mean, trainee.std) for x in inputs)
    if trainee.channels_last:
        inputs = tuple(x.contiguous(memory_format=torch.channels_last) for x in inputs)
    with sync:
        with torch.autocast("cuda", dtype=torch.float16) if trainee.use_amp else nullcontext():
            loss, terms, logits = step_module(inputs, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, step {i}: lower train.lr?")
        trainee.scaler.scale(loss / plan.accumulate).backward()
    n = labels.shape[0]
    totals.seen += n
    totals.sums["loss"] += loss.item() * n
    for name, v in terms.items():
        totals.sums[name] += v.item() * n
    task = get_task(cfg["data"]["task"])
    for r, z in logits.items():
        totals.correct[r] += task.correct(z, labels, method)
    return loss.item()


def reduce_over_ranks(totals: EpochTotals, procs: Processes) -> None:
    """Epoch metrics over every rank's images (in place)."""
    if not procs.distributed:
        return
    keys, res_keys = sorted(totals.sums), sorted(totals.correct)
    packed = torch.tensor(
        [totals.sums[k] for k in keys] + [totals.correct[r] for r in res_keys] + [totals.seen],
        dtype=torch.float64,
        device=procs.device,
    )
    dist.all_reduce(packed)
    totals.sums = dict(zip(keys, packed[: len(keys)].tolist()))
    totals.correct = {r: int(c) for r, c in zip(res_keys, packed[len(keys) : -1].tolist())}
    totals.seen = int(packed[-1])


def epoch_metrics(epoch: int, totals: EpochTotals, elapsed: float, method: Method, task: Task) -> dict[str, Any]:
    seen = max(totals.seen, 1)
    return {
        "epoch": epoch + 1,
        "lr": totals.lr,
        "images": totals.seen,
        "seconds": round(elapsed, 2),
        "images_per_s": round(totals.seen / max(elapsed, 1e-9), 1),
        **{f"loss_{k}" if k != "loss" else "loss": round(v / seen, 5) for k, v in totals.sums.items()},
        "task": task.name,
        task.train_metric: {
            str(r): round(100.0 * c / seen, 2) for r, c in sorted(totals.correct.items(), reverse=True)
        },
        **method.log_values(),
    }


def epoch_line(m: dict[str, Any], total_epochs: int, seconds_left: float) -> str:
    """The one line a person reads per epoch; metrics.jsonl keeps everything."""
    task = get_task(m.get("task", "classification"))
    terms = [f"{k[5:]} {v:.3f}" for k, v in m.items() if k.startswith("loss_")]
    loss = (f"loss {m['loss']:.3f}" if "loss" in m else "no readable images") + (
        f" ({', '.join(terms)})" if terms else ""
    )
    train = " ".join(f"{r}px {v:.1f}" for r, v in m[task.train_metric].items())
    val = (
        f"  val {task.val_label} " + " ".join(f"{r}px {v:.1f}" for r, v in m[task.val_metric].items())
        if task.val_metric in m
        else ""
    )
    eta = f"{int(seconds_left // 60)}m{int(seconds_left % 60):02d}s" if seconds_left >= 60 else f"{seconds_left:.0f}s"
    return (
        f"epoch {m['epoch']}/{total_epochs}  {loss}  train {task.train_label} {train}{val}  lr {m['lr']:.4g}  "
        f"{m['images_per_s']:.0f} img/s  ETA {eta}"
    )


def _saved_metadata(run_dir: str | Path) -> dict[str, Any]:
    """The metadata of the run's checkpoint alone (no tensors read); empty when it holds no readable checkpoint."""
    try:
        with safe_open(str(Path(run_dir) / CHECKPOINT), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("flexres", "{}"))
    except Exception:  # noqa: BLE001 - missing or unreadable: whoever loads it for real reports why
        return {}


def saved_progress(run_dir: str | Path) -> tuple[int, int] | None:
    """(epochs done, epochs planned) of the run in ``run_dir``; None when it holds no readable training checkpoint."""
    meta = _saved_metadata(run_dir)
    try:
        return int(meta["epoch"]), int(meta["config"]["train"]["epochs"])
    except (KeyError, TypeError, ValueError):
        return None


def _finished(cfg: dict[str, Any], out_dir: Path) -> dict[str, Any] | None:
    """The metadata of the run in ``out_dir`` when it was trained with ``cfg`` and has done all its epochs; else None,
    and ``restore`` reports an unreadable checkpoint or a changed config in full, as for any resume."""
    saved = _saved_metadata(out_dir)
    old = saved.get("config") or {}
    if "epoch" not in saved or not old:
        return None
    data = cfg["data"]
    if data.get("crop_fraction") is None:  # resolved from the model later: the run recorded the value it resolved
        data = {**data, "crop_fraction": old.get("data", {}).get("crop_fraction")}
    if _config_differences(old, {**cfg, "data": data}) or int(saved["epoch"]) < cfg["train"]["epochs"]:
        return None
    return saved


def train(
    cfg: dict[str, Any],
    out_dir: str | Path,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train as ``cfg`` says into ``out_dir``; returns the last epoch's metrics.

    ``log`` gets one readable line per epoch (``epoch_line``) and the notes of the run; the full metrics go to
    ``metrics.jsonl``. stop_after_epochs: end this process after that many epochs (continue with ``resume``).
    """
    out_dir = Path(out_dir)
    t, d = cfg["train"], cfg["data"]
    check_names(cfg)  # before the datasets, which take minutes to read on real data
    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise FileExistsError(
            f"{out_dir} already holds a run ({ckpt_path}); pass --resume to continue it or choose another --out"
        )
    if resume and not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    finished = _finished(cfg, out_dir) if resume else None
    if finished is not None:
        # Say so at once: going on would read the data and build the model to train no epoch at all.
        log(f"{out_dir} is finished ({finished['epoch']} of {t['epochs']} epochs); nothing to resume")
        return dict(finished.get("metrics") or {})
    if d["root"] is None:
        raise ConfigError("no data: set data.root in the config or pass --data DIR")
    d["root"] = resolve_data_root(d["root"])  # recorded expanded, so the run says which folder it read
    procs = start_processes(t)
    seed_everything(t["seed"])
    task = get_task(d["task"])
    train_ds, val_ds = task.datasets(d, t, t["progress"] and procs.is_main, log)
    num_classes = cfg["model"]["num_classes"] or len(train_ds.classes)
    if num_classes != len(train_ds.classes):
        raise ValueError(f"model.num_classes={num_classes} but {train_ds.root} has {len(train_ds.classes)} classes")
    trainee = build_trainee(cfg, num_classes, procs, resume, log, class_folders=train_ds.classes)
    model, method = trainee.model, trainee.method
    if d["crop_fraction"] is None:  # resolved here, so the run's config.yaml and sidecar say what was used
        d["crop_fraction"] = model_preprocessing(model)["crop_fraction"]
    names = task.prepare(cfg, model, method, train_ds)
    plan = plan_steps(t, len(train_ds), procs.world)
    start_epoch = restore(cfg, out_dir, trainee, log) if resume else 0
    metrics_path = prepare_run_dir(cfg, out_dir, resume, start_epoch) if procs.is_main else out_dir / "metrics.jsonl"
    sidecar_base = {
        "flexres_version": __version__,
        "method": {"name": method.name, "resolutions": list(method.resolutions), **cfg["method"]["kwargs"]},
        "classes": train_ds.classes,
        "class_names": names,
        "normalization": {"mean": trainee.mean, "std": trainee.std},
        "crop_fraction": d["crop_fraction"],
        "interpolation": model_preprocessing(model)["interpolation"],
        "config": cfg,
        **task.record(train_ds),
    }
    last: dict[str, Any] = {}
    end_epoch = t["epochs"] if stop_after_epochs is None else min(t["epochs"], start_epoch + stop_after_epochs)
    started = time.time()
    loaders = None
    if d["persistent_workers"]:
        loaders = run_loaders(
            train_ds,
            t["seed"],
            procs.rank,
            procs.world,
            plan.accumulate,
            plan.micro_batch,
            d["num_workers"],
            procs.device.type == "cuda",
            d["prefetch_factor"],
        )
    for epoch in range(start_epoch, end_epoch):
        t0 = time.time()
        totals = run_epoch(epoch, cfg, train_ds, trainee, plan, procs, loaders)
        elapsed = time.time() - t0
        reduce_over_ranks(totals, procs)
        last = epoch_metrics(epoch, totals, elapsed, method, task)
        unreadable = sorted(set(totals.skipped) | set(train_ds.unreadable))
        if unreadable:
            last["skipped_unreadable"] = len(unreadable)
            log(f"epoch {epoch + 1}: skipped {len(unreadable)} unreadable images, e.g. {unreadable[0]}")
        if procs.is_main and val_ds is not None and ((epoch + 1) % t["eval_every"] == 0 or epoch + 1 == t["epochs"]):
            last[task.val_metric] = task.validate(cfg, model, method, train_ds, val_ds, model_preprocessing(model))
        if procs.is_main:
            save_checkpoint(
                out_dir,
                model,
                dict(
                    sidecar_base,
                    epoch=epoch + 1,
                    metrics=last,
                    grad_scaler=trainee.scaler.state_dict() if trainee.use_amp else None,
                ),
                method,
                trainee.optimizer,
            )
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            per_epoch = (time.time() - started) / (epoch + 1 - start_epoch)
            log(epoch_line(last, t["epochs"], per_epoch * (t["epochs"] - epoch - 1)))
        if procs.distributed:
            dist.barrier()
    return last
