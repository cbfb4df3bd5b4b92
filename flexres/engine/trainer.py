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
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .. import __version__
from ..data import ImageFolderDataset, MultiResolutionCrop, collate_skipping, normalize_batch, split_dir
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..methods import Method, create_method
from ..models import AdaptiveModel, create_model
from .checkpoint import CHECKPOINT, load_into, load_training_state, save_checkpoint
from .config import ConfigError
from .evaluate import calibrate, evaluate

# Keys that may change between a run and its resume without changing the result.
_RESUME_FREE = {("train", "progress"), ("train", "eval_every"), ("train", "device"), ("data", "root"), ("data", "num_workers"),
                ("data", "cache")}


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
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_model_and_method(cfg: dict[str, Any], num_classes: int) -> tuple[AdaptiveModel, Method]:
    mcfg, meth = cfg["model"], cfg["method"]
    method = create_method(meth["name"], resolutions=meth["resolutions"], label_smoothing=cfg["train"]["label_smoothing"],
                           **meth["kwargs"])
    kwargs = dict(mcfg["kwargs"])
    if hasattr(method, "width_range"):  # slimmable recipes: the model serves the widths the method trains
        kwargs.setdefault("width_range", list(method.width_range))
    model = create_model(mcfg["name"], num_classes=num_classes, train_resolutions=list(method.resolutions),
                         width_mult=mcfg["width_mult"], **kwargs)
    return model, method


def build_optimizer(cfg: dict[str, Any], model: nn.Module, method: nn.Module) -> torch.optim.Optimizer:
    t = cfg["train"]
    groups = [{"params": list(model.parameters()), "weight_decay": t["weight_decay"]}]
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


def epoch_loaders(dataset, seed: int, epoch: int, gen: torch.Generator, rank: int, world: int, accumulate: int,
                  micro_batch: int, workers: int, pin: bool) -> list[DataLoader]:
    """One loader per micro-batch this process runs in a step.

    A single replica shuffles with ``gen``; several replicas (processes x accumulate_steps) each read
    the shard DistributedSampler gives virtual rank ``rank * accumulate + k``, so one process that
    accumulates k micro-batches reads exactly what k processes would.
    """
    common = dict(batch_size=micro_batch, num_workers=workers, collate_fn=collate_skipping, drop_last=True, pin_memory=pin,
                  generator=gen)
    replicas = world * accumulate
    if replicas == 1:
        return [DataLoader(dataset, shuffle=True, **common)]
    loaders = []
    for k in range(accumulate):
        sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank * accumulate + k, shuffle=True, seed=seed,
                                     drop_last=True)
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


def train(cfg: dict[str, Any], out_dir: str | Path, resume: bool = False, stop_after_epochs: int | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train as ``cfg`` says into ``out_dir``; returns the last epoch's metrics.

    stop_after_epochs: end this process after that many epochs (the run continues with ``resume``).
    """
    out_dir = Path(out_dir)
    t, d = cfg["train"], cfg["data"]
    if d["root"] is None:
        raise ValueError("no data: set data.root in the config or pass --data DIR")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        # Long timeout: rank 0 evaluates and writes checkpoints while the others wait at a barrier.
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=2))
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    is_main = rank == 0
    device = resolve_device(t["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Exact resume on GPUs needs deterministic kernels; they cost some speed, so it is a choice.
        torch.backends.cudnn.benchmark = not t["deterministic"]
        torch.backends.cudnn.deterministic = t["deterministic"]
    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise FileExistsError(f"{out_dir} already holds a run ({ckpt_path}); pass --resume to continue it or choose another --out")
    if resume and not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")

    seed_everything(t["seed"])
    train_ds = ImageFolderDataset(split_dir(d["root"], d["train_split"]), cache=d["cache"],
                                  skip_unreadable=d["skip_unreadable"], progress=t["progress"] and is_main)
    if train_ds.unreadable:
        log(f"skipping {len(train_ds.unreadable)} unreadable training images, e.g. {train_ds.unreadable[0]}")
    val_ds = None
    if t["eval_every"] and (Path(d["root"]) / d["val_split"]).is_dir():
        val_ds = ImageFolderDataset(split_dir(d["root"], d["val_split"]), cache=d["cache"],
                                    skip_unreadable=d["skip_unreadable"], progress=False)
    num_classes = cfg["model"]["num_classes"] or len(train_ds.classes)
    if num_classes != len(train_ds.classes):
        raise ValueError(f"model.num_classes={num_classes} but {train_ds.root} has {len(train_ds.classes)} classes")
    model, method = build_model_and_method(cfg, num_classes)
    if t["init_from"] and not resume:  # start from trained weights, e.g. to fine-tune a Resizable-NAS pick
        meta = load_into(model, t["init_from"])
        log(f"initialised the model from {t['init_from']} (epoch {meta.get('epoch')})")
    train_ds.transform = MultiResolutionCrop(method.resolutions, d["scale"], d["ratio"], hflip=d["hflip"])
    model.to(device)
    method.to(device)
    # NHWC is faster on CPUs too (oneDNN): 1.3x for ResNet-18 x0.25, 1.4-1.6x for MobileNetV2 (BENCHMARKS.md).
    channels_last = t["channels_last"]
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if t["sync_bn"] and model.width_range is not None:
        raise ConfigError("train.sync_bn: slimmable models normalise with per-batch statistics of their own layer "
                          "(SlimmableBatchNorm2d) and cannot be synchronised; leave sync_bn off")
    if distributed and t["sync_bn"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # converts the BNs inside every SwitchableBatchNorm2d
    optimizer = build_optimizer(cfg, model, method)
    step_module: nn.Module = TrainStep(model, method)
    if t["compile"]:
        step_module = CompileOrFallback(step_module, log)
    if distributed:
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = t["amp"] and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    # Data-parallel replicas: the processes times the micro-batches each accumulates. One optimiser step
    # sees train.batch_size images whatever the split, so a run on 1 device with accumulate_steps=8 takes
    # the same steps as one on 8 devices.
    accumulate = int(t["accumulate_steps"])
    replicas = world * accumulate
    if t["batch_size"] % replicas:
        raise ValueError(f"train.batch_size={t['batch_size']} must divide by processes x accumulate_steps = {replicas}")
    micro_batch = t["batch_size"] // replicas
    steps_per_epoch = (len(train_ds) // replicas) // micro_batch  # what each DistributedSampler(drop_last) yields
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {t['batch_size']} is larger than the training set ({len(train_ds)} images)")
    total_steps = steps_per_epoch * t["epochs"]
    warmup_steps = int(round(t["warmup_epochs"] * steps_per_epoch))

    start_epoch = 0
    if resume:
        meta = load_training_state(ckpt_path, model, method, optimizer)
        diffs = _config_differences(meta.get("config", {}), cfg)
        if diffs:
            raise ValueError(f"--resume: the config differs from the run in {out_dir}: " + "; ".join(diffs))
        start_epoch = int(meta["epoch"])
        scaler.load_state_dict(meta.get("grad_scaler") or {})
        log(f"resuming {out_dir} after epoch {start_epoch}")
    metrics_path = out_dir / "metrics.jsonl"
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        if resume and metrics_path.exists():  # drop epochs the checkpoint does not contain
            kept = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln).get("epoch", 0) <= start_epoch]
            metrics_path.write_text("".join(k + "\n" for k in kept))
        elif not resume and metrics_path.exists():
            metrics_path.unlink()
    sidecar_base = {
        "flexres_version": __version__, "method": {"name": method.name, "resolutions": list(method.resolutions),
                                                   **cfg["method"]["kwargs"]},
        "classes": train_ds.classes, "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "crop_fraction": d["crop_fraction"], "config": cfg,
    }

    last: dict[str, Any] = {}
    end_epoch = t["epochs"] if stop_after_epochs is None else min(t["epochs"], start_epoch + stop_after_epochs)
    for epoch in range(start_epoch, end_epoch):
        # Everything random in an epoch derives from (seed, epoch): a resumed run replays it exactly.
        epoch_seed = t["seed"] * 100003 + epoch + rank * 7919  # each DDP rank its own augmentation stream
        seed_everything(epoch_seed)
        gen = torch.Generator().manual_seed(epoch_seed)
        loaders = epoch_loaders(train_ds, t["seed"], epoch, gen, rank, world, accumulate, micro_batch, d["num_workers"],
                                device.type == "cuda")
        step_module.train()
        sums: dict[str, float] = defaultdict(float)
        correct: dict[int, int] = defaultdict(int)
        seen, skipped, t0 = 0, [], time.time()
        bar = tqdm(zip(*loaders), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{t['epochs']}",
                   disable=not (t["progress"] and is_main), leave=False)
        for i, micro_batches in enumerate(bar):
            step = epoch * steps_per_epoch + i
            lr = lr_at(step, total_steps, warmup_steps, t["lr"])
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            for k, batch in enumerate(micro_batches):
                skipped += batch["skipped"]
                sync = nullcontext() if not distributed or k == len(micro_batches) - 1 else step_module.no_sync()
                if batch["inputs"] is None:
                    # Every image of this micro-batch was unreadable: a zero loss over all parameters keeps
                    # DDP's gradient all-reduce in step with the other ranks.
                    with sync:
                        sum(p.reshape(-1)[0] * 0.0 for p in step_module.parameters()).backward()
                    continue
                # Operating points a method samples come from this generator: the same on every rank and
                # micro-batch of a step, so all replicas train the same sub-networks.
                method.rng.manual_seed(t["seed"] * 1_000_003 + step)
                method.progress = step / total_steps
                labels = batch["labels"].to(device, non_blocking=True)
                inputs = tuple(normalize_batch(x.to(device, non_blocking=True)) for x in batch["inputs"])
                if channels_last:
                    inputs = tuple(x.contiguous(memory_format=torch.channels_last) for x in inputs)
                with sync:
                    with torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext():
                        loss, terms, logits = step_module(inputs, labels)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, step {i}: lower train.lr?")
                    scaler.scale(loss / accumulate).backward()
                n = labels.shape[0]
                seen += n
                sums["loss"] += loss.item() * n
                for name, v in terms.items():
                    sums[name] += v.item() * n
                for r, z in logits.items():
                    correct[r] += int((z.argmax(1) == labels).sum())
            scaler.step(optimizer)
            scaler.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4f}")
        bar.close()
        elapsed = time.time() - t0
        if distributed:  # metrics over every rank
            keys, res_keys = sorted(sums), sorted(correct)
            packed = torch.tensor([sums[k] for k in keys] + [correct[r] for r in res_keys] + [seen], dtype=torch.float64,
                                  device=device)
            dist.all_reduce(packed)
            sums = dict(zip(keys, packed[: len(keys)].tolist()))
            correct = {r: int(c) for r, c in zip(res_keys, packed[len(keys):-1].tolist())}
            seen = int(packed[-1])
        last = {
            "epoch": epoch + 1, "lr": lr, "images": seen, "seconds": round(elapsed, 2),
            "images_per_s": round(seen / max(elapsed, 1e-9), 1),
            **{f"loss_{k}" if k != "loss" else "loss": round(v / max(seen, 1), 5) for k, v in sums.items()},
            "train_top1": {str(r): round(100.0 * c / max(seen, 1), 2) for r, c in sorted(correct.items(), reverse=True)},
            **method.log_values(),
        }
        unreadable = sorted(set(skipped) | set(train_ds.unreadable))
        if unreadable:
            last["skipped_unreadable"] = len(unreadable)
            log(f"epoch {epoch + 1}: skipped {len(unreadable)} unreadable images, e.g. {unreadable[0]}")
        if is_main and val_ds is not None and ((epoch + 1) % t["eval_every"] == 0 or epoch + 1 == t["epochs"]):
            if model.width_range is not None:  # slimmable: post-statistics BN for the full width, from current weights
                model.clear_calibration()
                calibrate(model, train_ds, list(method.resolutions), min(cfg["eval"]["calibration_images"], 1000),
                          cfg["eval"]["batch_size"], d["scale"], d["ratio"], seed=t["seed"])
            res = evaluate(model, val_ds, list(method.resolutions), crop_fraction=d["crop_fraction"],
                           batch_size=cfg["eval"]["batch_size"])
            model.clear_calibration()
            last["val_top1"] = {str(r): round(v["top1"], 2) for r, v in res.items()}
        if is_main:
            save_checkpoint(out_dir, model, dict(sidecar_base, epoch=epoch + 1, metrics=last,
                                                 grad_scaler=scaler.state_dict() if use_amp else None), method, optimizer)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            log(json.dumps(last))
        if distributed:
            dist.barrier()
    return last
