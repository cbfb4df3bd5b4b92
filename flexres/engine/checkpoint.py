"""Checkpoints: safetensors weights + a JSON sidecar, written atomically, checked on load.

A run directory holds ``checkpoint.safetensors`` (tensors: ``model.*``, ``method.*``, ``optimizer.*``;
its metadata carries the sidecar, so the one file is self-describing and written in one atomic
rename), ``checkpoint.json`` (the same sidecar, for people), and optionally
``bn_calibration.safetensors`` (calibrated BN statistics per resolution). No pickle is ever loaded.
Loading refuses a checkpoint whose ``checkpoint.json`` says something else than its embedded copy
(see ``check_sidecar``): the embedded copy is what gets loaded, so an edited sidecar would mislead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..errors import CheckpointMismatchError, MissingFileError  # CheckpointMismatchError: also imported from here
from ..models import AdaptiveModel, create_model
from ..notes import note
from .packed import PACKED, unpack_state

CHECKPOINT = "checkpoint.safetensors"
SIDECAR = "checkpoint.json"
CALIBRATION = "bn_calibration.safetensors"
FORMAT_VERSION = 1
# Metadata kept out of the sidecar: the optimiser's hyper-parameters and scalar state are for resuming,
# not for people.
EMBEDDED_ONLY = ("optimizer",)


def _create_temporary(path: Path) -> tuple[str, int]:
    """A new empty file next to ``path`` and its mode: 0o666 less the umask, as open() gives every other file of the
    run (tempfile.mkstemp would give 0600)."""
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # another writer drew the same name
            continue
        return tmp, os.stat(tmp).st_mode & 0o777


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temporary(path)
    try:
        write(tmp)
        # safetensors' save_file makes its file 0600 whatever it replaces: give it the umask's mode back, which the
        # rename keeps.
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"flexres": json.dumps(metadata)}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_tensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("flexres", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is not a checkpoint
        raise CheckpointMismatchError(f"{path} is not a readable safetensors checkpoint: {e}") from e
    return tensors, meta


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    # NaN (a diverged loss in "metrics") round-trips through JSON as NaN, which equals nothing.
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, bool) != isinstance(b, bool):  # true must not pass for the 1 it compares equal to
        return False
    return a == b


def _differences(embedded: Any, sidecar: Any, path: str) -> list[tuple[str, Any, Any]]:
    """(dotted path, embedded value, sidecar value) for every leaf where the two differ."""
    if isinstance(embedded, dict) and isinstance(sidecar, dict):
        out = []
        for key in sorted(set(embedded) | set(sidecar), key=str):
            out += _differences(embedded.get(key, _MISSING), sidecar.get(key, _MISSING), f"{path}.{key}")
        return out
    if isinstance(embedded, list) and isinstance(sidecar, list) and len(embedded) == len(sidecar):
        return [d for i, (e, c) in enumerate(zip(embedded, sidecar)) for d in _differences(e, c, f"{path}[{i}]")]
    if embedded is _MISSING or sidecar is _MISSING or not _same(embedded, sidecar):
        return [(path, embedded, sidecar)]
    return []


def _show(value: Any, limit: int = 60) -> str:
    text = "(absent)" if value is _MISSING else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sidecar_path(checkpoint: str | Path) -> Path | None:
    """The JSON sidecar ``save_checkpoint`` writes next to ``checkpoint``; None for a file of another name,
    whose neighbouring ``checkpoint.json`` (if any) describes a different file."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent / SIDECAR if checkpoint.name == CHECKPOINT else None


def check_sidecar(checkpoint: str | Path, meta: dict[str, Any]) -> None:
    """Raise CheckpointMismatchError if ``checkpoint``'s JSON sidecar disagrees with its embedded metadata ``meta``.

    ``save_checkpoint`` writes the sidecar as the embedded metadata less ``EMBEDDED_ONLY`` (``optimizer``),
    so the sidecar is a subset. The rule: every top-level key both carry must hold the same value. A
    top-level key only one side has is ignored: the embedded ``optimizer`` by design, and a field dropped
    from (or a note added to) the sidecar says nothing false about what loads, just as a missing sidecar
    says nothing. Values are compared whole: inside them (``arch.kwargs``, ``config``, ...) a key present
    on one side only is a difference, since e.g. ``arch.kwargs`` without ``width_mult`` means the default
    width. Differences are named by dotted path (``arch.kwargs.width_mult``, ``metrics[0].top1``).
    """
    checkpoint = Path(checkpoint)
    side = sidecar_path(checkpoint)
    if side is None or not side.is_file():
        return
    try:
        written = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointMismatchError(
            f"{side} (the sidecar of {checkpoint}) is not readable JSON: {e}. Delete it to load "
            f"{checkpoint} alone; its metadata is embedded"
        ) from e
    if not isinstance(written, dict):
        raise CheckpointMismatchError(
            f"{side} (the sidecar of {checkpoint}) holds a JSON {type(written).__name__}, "
            "not an object. Delete it to load the checkpoint alone; its metadata is embedded"
        )
    diffs = [d for key in sorted(set(meta) & set(written)) for d in _differences(meta[key], written[key], key)]
    if not diffs:
        return
    limit = 8
    lines = [f"{p}: {checkpoint.name} has {_show(e)}, {side.name} has {_show(c)}" for p, e, c in diffs[:limit]]
    if len(diffs) > limit:
        lines.append(f"(and {len(diffs) - limit} more differences)")
    raise CheckpointMismatchError(
        f"{side} disagrees with the metadata embedded in {checkpoint} on {_describe({p for p, _, _ in diffs})}:\n  - "
        + "\n  - ".join(lines)
        + f"\nThe embedded copy is what would load: editing {side.name} changes nothing about the model. "
        f"Restore {side.name} or delete it (the checkpoint loads without it); "
        "to change the model, train or convert one."
    )


def _identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def read_checkpoint(checkpoint: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``load_tensors`` of a checkpoint file, then ``check_sidecar``."""
    before = _identity(checkpoint)
    tensors, meta = load_tensors(checkpoint)
    try:
        check_sidecar(checkpoint, meta)
    except CheckpointMismatchError:
        # save_checkpoint replaced the checkpoint while it was read (a training run saving as it goes):
        # the tensors and metadata read belong together, and the sidecar belongs to the newer file.
        if checkpoint.exists() and _identity(checkpoint) != before:
            return tensors, meta
        raise
    return tensors, meta


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def resolve_checkpoint(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
    if not p.is_file():
        raise MissingFileError(f"no checkpoint at {p} (give a run directory or a .safetensors file)")
    return p


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in state["state"].items():
        for key, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
    state = optimizer.state_dict()
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            per_param.setdefault(int(idx), {})[name] = value
    for key, value in info.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    groups = state["param_groups"]
    saved_groups = info.get("param_groups", [])
    if len(saved_groups) != len(groups):
        raise CheckpointMismatchError(f"optimizer has {len(groups)} parameter groups, checkpoint {len(saved_groups)}")
    for g, saved in zip(groups, saved_groups):
        g.update(saved)
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    # Buffers are saved contiguous: give each its parameter's layout (channels_last) again, so a resumed
    # run steps with the same kernels, and the same rounding, as one that never stopped.
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for name, v in st.items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    st[name] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def save_checkpoint(
    run_dir: str | Path,
    model: AdaptiveModel,
    sidecar: dict[str, Any],
    method: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    run_dir = Path(run_dir)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if method is not None:
        tensors.update({f"method.{k}": v for k, v in method.state_dict().items()})
    meta = dict(
        sidecar, format_version=FORMAT_VERSION, arch=model.arch, train_resolutions=list(model.train_resolutions)
    )
    if optimizer is not None:
        opt_tensors, opt_info = _optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
        meta["optimizer"] = opt_info
    path = run_dir / CHECKPOINT
    # Until the new sidecar is written, the old one would contradict the new checkpoint and make it
    # unloadable (check_sidecar) should the process die in between: move it out of the way, and back if
    # writing the checkpoint fails, since the old checkpoint then stays.
    side = run_dir / SIDECAR
    previous_side = side.read_bytes() if side.is_file() else None
    previous_ckpt = _identity(path) if path.is_file() else None
    if previous_side is not None:
        side.unlink()
    try:
        save_tensors(path, tensors, meta)
    except BaseException:
        kept = _identity(path) if path.is_file() else None
        if previous_side is not None and kept == previous_ckpt and not side.exists():
            _atomic_write(side, lambda tmp: Path(tmp).write_bytes(previous_side))
        raise
    stale = run_dir / CALIBRATION
    if stale.exists():  # statistics calibrated for the previous weights
        stale.unlink()
    human = {k: v for k, v in meta.items() if k not in EMBEDDED_ONLY}
    _atomic_write(side, lambda tmp: Path(tmp).write_text(json.dumps(human, indent=2) + "\n"))
    return path


def _describe(keys: set[str], limit: int = 6) -> str:
    ks = sorted(keys)
    more = f" (and {len(ks) - limit} more)" if len(ks) > limit else ""
    return ", ".join(ks[:limit]) + more


def load_model_state(model: AdaptiveModel, tensors: dict[str, Tensor], meta: dict[str, Any], source: str) -> None:
    """Load ``model.*`` tensors into ``model`` or raise CheckpointMismatchError naming what differs."""
    arch = meta.get("arch", {})
    problems = []
    model_arch = getattr(model, "arch", {"name": type(model).__name__})
    if arch.get("name") and arch.get("name") != model_arch.get("name"):
        problems.append(f"architecture: checkpoint is {arch.get('name')!r}, model is {model_arch.get('name')!r}")
    saved_res = meta.get("train_resolutions")
    if saved_res is not None and tuple(saved_res) != tuple(model.train_resolutions):
        problems.append(f"trained resolutions: checkpoint has {saved_res}, model has {list(model.train_resolutions)}")
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    own = model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing:
        problems.append(f"keys missing from the checkpoint: {_describe(missing)}")
    if unexpected:
        problems.append(f"keys the model does not have: {_describe(unexpected)}")
    shapes = {k for k in set(own) & set(state) if own[k].shape != state[k].shape}
    if shapes:
        k = sorted(shapes)[0]
        problems.append(
            f"shape mismatch in {len(shapes)} tensors, e.g. {k}: checkpoint {tuple(state[k].shape)}, "
            f"model {tuple(own[k].shape)}"
        )
    if problems:
        raise CheckpointMismatchError(f"checkpoint {source} does not fit the model:\n  - " + "\n  - ".join(problems))
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[AdaptiveModel, dict[str, Any]]:
    """Rebuild the model a checkpoint (or run directory) describes and load its weights and BN calibration."""
    ckpt = resolve_checkpoint(path)
    tensors, meta = read_checkpoint(ckpt)
    if meta.get("format") == PACKED:  # `flexres export --format packed`: LQ-Nets codes, unpacked to their levels
        tensors = unpack_state(tensors, meta["packed"])
    if "arch" not in meta:
        raise CheckpointMismatchError(f"{ckpt} has no flexres metadata ('arch' missing); was it written by flexres?")
    model = create_model(meta["arch"]["name"], **meta["arch"]["kwargs"])
    unrecorded = {k: v for k, v in getattr(model, "arch_defaults", {}).items() if k not in meta["arch"]["kwargs"]}
    if unrecorded:  # written before these options existed: today's defaults apply, which may not be what it trained
        note(
            f"{ckpt} records no {', '.join(unrecorded)}: built with today's defaults "
            f"({', '.join(f'{k}={v!r}' for k, v in unrecorded.items())}); "
            "a width-slimmable run trained before 2026-12 needs "
            "model.kwargs channel_rounding: legacy, slim_head: true (MobileNets)"
        )
    load_model_state(model, tensors, meta, str(ckpt))
    meta["checkpoint_digest"] = file_digest(ckpt)
    calib = ckpt.parent / CALIBRATION
    if calib.is_file():
        _, cal_meta = load_tensors(calib)
        if cal_meta.get("checkpoint_digest") == meta["checkpoint_digest"]:
            load_calibration(model, calib)
            meta["calibration"] = cal_meta
        else:
            note(
                f"ignoring {calib}: it was calibrated for other weights than {ckpt}; "
                "it will be recalibrated where needed"
            )
    model.set_operating_point(model.train_resolutions[0])
    return model.to(map_location).eval(), meta


def load_into(model: AdaptiveModel, path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's weights into an existing model (checked); returns the sidecar.

    A network trained at one resolution loads into the same architecture switchable over several: every
    resolution's BN starts from its one BN (``train.init_from`` an I-Net to fine-tune it into an RS-Net)."""
    ckpt = resolve_checkpoint(path)
    tensors, meta = read_checkpoint(ckpt)
    saved_res = meta.get("train_resolutions") or []
    if len(saved_res) == 1 and len(model.train_resolutions) > 1:
        n = len(model.train_resolutions)
        tensors = {k: v for k, v in tensors.items() if ".bns.0." not in k} | {
            k.replace(".bns.0.", f".bns.{i}."): v for k, v in tensors.items() if ".bns.0." in k for i in range(n)
        }
        meta = {**meta, "train_resolutions": list(model.train_resolutions)}
        note(f"{ckpt} was trained at {saved_res[0]} px only: each of the {n} resolutions' BNs starts from its BN")
    load_model_state(model, tensors, meta, str(ckpt))
    return meta


# A classification ResNet's layer names -> a segmenter's backbone (flexres.models.segmentation): the stem is renamed,
# the stages keep theirs, the classifier has no counterpart.
_BACKBONE_RENAMES = (("conv1.", "stem_conv."), ("bn1.", "stem_bn."))
_BACKBONE_PARTS = ("stem_conv.", "stem_bn.", "layer1.", "layer2.", "layer3.", "layer4.")


def load_backbone(model: AdaptiveModel, source: str | Path) -> dict[str, Any]:
    """Initialise a segmenter's encoder from a classifier; its decoder stays fresh. ``source``: a flexres run or
    checkpoint of the same backbone family (its switchable BNs too: each of the segmenter's resolutions takes the BN of
    the source's nearest trained resolution), or a weights file of the torchvision / timm ResNet layout (one BN each).
    Every backbone tensor must be filled with the right shape, or CheckpointMismatchError names it; returns what was
    loaded, what stays fresh and what of the source went unused."""
    from ..nn.switchable_bn import nearest_index

    path = Path(source)
    if path.suffix in (".safetensors", ".pt", ".pth", ".bin") and not (path.parent / SIDECAR).exists():
        from ..models.pretrained import read_state_dict

        state, resolutions = read_state_dict(path), None
    else:
        tensors, meta = read_checkpoint(resolve_checkpoint(path))
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        resolutions = meta.get("train_resolutions")
    renamed = {}
    for k, v in state.items():
        for old, new in _BACKBONE_RENAMES:
            if k.startswith(old):
                k = new + k[len(old) :]
        renamed[k] = v
    own = model.state_dict()
    targets = [k for k in own if k.startswith(_BACKBONE_PARTS)]
    loaded, used, problems = {}, set(), []
    for k in targets:
        key = k
        if (
            ".bns." in k
        ):  # a switchable BN of the segmenter: from the source's BN of the nearest resolution, or its one BN
            head, rest = k.split(".bns.", 1)
            index, tail = rest.split(".", 1)
            r = model.train_resolutions[int(index)]
            key = (
                f"{head}.bns.{nearest_index(r, tuple(resolutions))}.{tail}"
                if resolutions and f"{head}.bns.0.{tail}" in renamed
                else f"{head}.{tail}"
            )
        if key not in renamed:
            problems.append(f"{k} (looked for {key})")
            continue
        if renamed[key].shape != own[k].shape:
            problems.append(f"{k}: source {tuple(renamed[key].shape)}, model {tuple(own[k].shape)}")
            continue
        loaded[k] = renamed[key]
        used.add(key)
    if problems:
        raise CheckpointMismatchError(
            f"{source} cannot initialise this backbone: {len(problems)} tensors missing or "
            f"reshaped, e.g. {problems[0]}" + (f"; {problems[1]}" if len(problems) > 1 else "")
        )
    model.load_state_dict(loaded, strict=False)
    fresh = sorted({k.split(".")[0] for k in own if k not in loaded})
    unused = sorted(k for k in renamed if k not in used and not k.endswith("num_batches_tracked"))
    return {"loaded": len(loaded), "fresh": fresh, "unused": unused}


def load_training_state(
    path: str | Path, model: AdaptiveModel, method: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    ckpt = resolve_checkpoint(path)
    tensors, meta = read_checkpoint(ckpt)
    load_model_state(model, tensors, meta, str(ckpt))
    method_state = {k[len("method.") :]: v for k, v in tensors.items() if k.startswith("method.")}
    method.load_state_dict(method_state, strict=True)
    if "optimizer" not in meta:
        raise CheckpointMismatchError(f"{ckpt} holds no optimizer state, so training cannot resume exactly from it")
    _load_optimizer(optimizer, tensors, meta["optimizer"])
    return meta


# --- calibrated BN statistics ---
def calibration_tensors(model: AdaptiveModel) -> dict[str, Tensor]:
    """``<operating point>/<module>.running_mean|var`` for every calibrated BN statistic."""
    out = {}
    for name, m in model.named_modules():
        if not hasattr(m, "calibrated"):
            continue
        for key, (mean, var) in m.calibrated.items():
            out[f"{m.key_to_str(key)}/{name}.running_mean"] = mean
            out[f"{m.key_to_str(key)}/{name}.running_var"] = var
    return out


def save_calibration(model: AdaptiveModel, path: str | Path, info: dict[str, Any]) -> None:
    """Save every calibrated operating point; ``info`` should carry the checkpoint's digest and num_images."""
    save_tensors(path, calibration_tensors(model), info)


def clear_calibration(model: AdaptiveModel) -> None:
    model.clear_calibration()


def load_calibration(model: AdaptiveModel, path: str | Path) -> dict[str, Any]:
    tensors, meta = load_tensors(path)
    modules = dict(model.named_modules())
    pending: dict[tuple[str, Any], dict[str, Tensor]] = {}
    for key, value in tensors.items():
        point, rest = key.split("/", 1)
        name, stat = rest.rsplit(".", 1)
        module = modules.get(name)
        if module is None or not hasattr(module, "calibrated"):
            raise CheckpointMismatchError(f"{path}: calibration key {key} names no calibratable BN of the model")
        pending.setdefault((name, module.key_from_str(point)), {})[stat] = value
    stale = 0
    for (name, point), stats in pending.items():
        if set(stats) != {"running_mean", "running_var"}:
            raise CheckpointMismatchError(f"{path}: {name} at {point} lacks running_mean or running_var")
        module = modules[name]
        expected = module.channels_at(point[1]) if hasattr(module, "channels_at") else module.num_features
        if stats["running_mean"].numel() != expected:  # computed for other channel counts (e.g. another rounding rule)
            stale += 1
            continue
        module.calibrated[point] = (stats["running_mean"], stats["running_var"])
    if stale:
        note(
            f"ignoring {stale} calibrated statistics in {path} whose channel counts do not fit the model; "
            "they are recalibrated where needed"
        )
    return meta
