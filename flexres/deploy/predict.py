"""Classify image files with an adaptive run (at a chosen or budget-selected operating point) or an exported model."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..analysis import count_macs
from ..analysis.table import read_table
from ..data import EvalTransform, UnreadableImageError, load_rgb, normalize_batch
from ..engine.checkpoint import load_checkpoint, resolve_checkpoint
from ..engine.run import RunInfo
from ..operating_point import TABLE, OperatingPoint, best_within, evaluated_accuracy
from .export import EXPORTED_SUFFIXES
from .latency import measure_latency


def parse_count(text: str) -> float:
    """'150M' -> 1.5e8, '1.2G' -> 1.2e9, '3e8' -> 3e8."""
    t = text.strip().upper()
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(t[-1:], 1.0)
    try:
        return float(t[:-1] if scale != 1.0 else t) * scale
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a count (e.g. 150M, 1.2G)") from None


@dataclass
class Predictor:
    """A callable from a normalised batch to logits, with what it needs to preprocess images."""

    run: Callable[[Tensor], Tensor]
    resolution: int
    classes: list[str]  # the class folders (e.g. WordNet ids), in label order
    names: list[str]  # what a person calls each class (classes.tsv), in label order; the folder when unknown
    mean: list[float]
    std: list[float]
    crop_fraction: float
    description: str
    interpolation: str = "bilinear"  # the eval resize the weights expect (their pretrained config's)


def candidate_resolutions(model, meta: dict[str, Any]) -> list[int]:
    evals = RunInfo.from_meta(meta).eval_resolutions or ()
    return sorted(set(model.train_resolutions) | set(evals), reverse=True)


def choose_resolution(
    model,
    meta: dict[str, Any],
    run_dir: Path,
    max_macs: float | None,
    max_latency_ms: float | None,
    batch_size: int = 1,
) -> tuple[int, str]:
    """The best resolution under the budget: most accurate where ``flexres eval`` results exist, else the largest."""
    acc = evaluated_accuracy(run_dir)
    rows = []
    for r in candidate_resolutions(model, meta):
        cost_ok = True
        macs = count_macs(model, r)
        if max_macs is not None and macs > max_macs:
            cost_ok = False
        lat = None
        if cost_ok and max_latency_ms is not None:
            lat = measure_latency(model, r, batch_size)
            cost_ok = lat <= max_latency_ms
        if cost_ok:
            rows.append((acc.get(r, -1.0), r, macs, lat))
    if not rows:
        budget = f"{max_macs / 1e6:.1f} MMACs" if max_macs is not None else f"{max_latency_ms} ms"
        cheapest = min(candidate_resolutions(model, meta))
        raise ValueError(
            f"no operating point fits the budget of {budget}; the cheapest, {cheapest} px, costs "
            f"{count_macs(model, cheapest) / 1e6:.1f} MMACs"
        )
    best = max(rows)
    how = (
        f"top-1 {best[0]:.1f}% (flexres eval)"
        if best[0] >= 0
        else "largest resolution within budget (no eval results saved)"
    )
    lat = f", {best[3]:.2f} ms" if best[3] is not None else ""
    return best[1], f"{best[1]} px: {best[2] / 1e6:.1f} MMACs{lat}; {how}"


def load_predictor(
    target: str,
    resolution: int | None = None,
    max_macs: float | None = None,
    max_latency_ms: float | None = None,
    bn_policy: str = "interpolate",
    width: float = 1.0,
) -> Predictor:
    path = Path(target)
    if path.suffix in EXPORTED_SUFFIXES:
        info = json.loads(Path(str(path) + ".json").read_text())
        r = info["operating_point"]["resolution"]
        if resolution not in (None, r) or max_macs is not None or max_latency_ms is not None:
            raise ValueError(f"{path} is a static model exported at {r} px: it takes no other resolution or budget")
        pre = info["preprocessing"]
        if path.suffix == ".onnx":
            from .runtime import onnx_session, session_runner

            run = session_runner(onnx_session(path))
        else:
            from .export import torchscript_quietly

            with torchscript_quietly():
                module = torch.jit.load(str(path))
            run = lambda x: module(x)  # noqa: E731
        classes = info.get("classes") or []
        return Predictor(
            run,
            r,
            classes,
            info.get("class_names") or classes,
            pre["mean"],
            pre["std"],
            r / pre["resize_short_side"],
            f"{path.name} (static, {r} px)",
            pre.get("interpolation", "bilinear"),
        )
    model, meta = load_checkpoint(target)
    run_dir = resolve_checkpoint(target).parent
    how, scales = "given", None
    if resolution is None:
        if max_macs is None and max_latency_ms is None:
            resolution, how = model.train_resolutions[0], "largest trained resolution"
        elif (run_dir / TABLE).is_file():  # the query table built by `flexres table`
            row = best_within(read_table(run_dir), max_macs, max_latency_ms)
            resolution, width, scales = row["resolution"], row["width"], row.get("scales")
            how = (
                f"{resolution} px, width {width:g}"
                + (f", scales {scales}" if scales else "")
                + f": {row['macs'] / 1e6:.1f} MMACs; top-1 {row['top1']:.1f}% (flexres table)"
            )
        else:
            resolution, how = choose_resolution(model, meta, run_dir, max_macs, max_latency_ms)
    op = OperatingPoint(resolution, width, tuple(scales) if scales else None)
    if model.width_range is not None and not model.is_calibrated(op):
        raise ValueError(
            f"{op} has no post-statistics BN in {run_dir}; compute it with `flexres table {run_dir} --data DIR` "
            f"or `flexres eval {run_dir} --data DIR --width {width:g} --resolutions {resolution}`"
        )
    model.set_operating_point(op, bn_policy=bn_policy)
    info = RunInfo.from_meta(meta)
    pre = info.preprocessing
    return Predictor(
        model,
        resolution,
        info.classes,
        info.class_names,
        pre.mean,
        pre.std,
        pre.crop_fraction,
        f"{run_dir.name} at {how}",
        pre.interpolation,
    )


def file_error(path: str, e: Exception) -> str:
    """Why one input file gave no prediction. An unreadable image is named with the decoder's reason alone: the advice
    ``load_rgb`` adds for training sets (data.skip_unreadable) does not apply to the files given to predict, each of
    which is reported on its own anyway."""
    if not Path(path).exists():
        return f"no such file: {path}"
    if isinstance(e, UnreadableImageError) and e.__cause__ is not None:
        return f"cannot read image {path}: {e.__cause__}"
    return str(e)


@torch.no_grad()
def predict_files(predictor: Predictor, files: list[str], topk: int = 5) -> list[dict[str, Any]]:
    """One entry per file: {"file", "top": [{"label", "class" (folder), "name", "probability"}, ...]} or {"file",
    "error"}."""
    transform = EvalTransform(predictor.resolution, predictor.crop_fraction, predictor.interpolation)
    out = []
    for f in files:
        try:
            x = normalize_batch(transform(load_rgb(f))[None], predictor.mean, predictor.std)
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
            out.append({"file": f, "error": file_error(f, e)})
            continue
        probs = torch.softmax(predictor.run(x).float(), dim=1)[0]
        out.append({"file": f, "top": top_classes(probs, predictor.classes, predictor.names, topk)})
    return out


def top_classes(probs: Tensor, classes: list[str], names: list[str], topk: int = 5) -> list[dict[str, Any]]:
    """The ``topk`` most probable classes of one image's probabilities: [{"label", "class", "name", "probability"}]."""
    p, idx = probs.topk(min(topk, probs.numel()))
    top = []
    for q, i in zip(p.tolist(), idx.tolist()):
        folder = classes[i] if i < len(classes) else str(i)
        name = names[i] if i < len(names) else folder
        top.append({"label": i, "class": folder, "name": name, "probability": round(q, 4)})
    return top


@torch.no_grad()
def segment_files(
    model,
    meta: dict[str, Any],
    files: list[str],
    resolution: int,
    out_dir: str | Path,
    bn_policy: str = "interpolate",
    alpha: float = 0.5,
) -> list[dict[str, Any]]:
    """Segment image files with a segmentation run at ``resolution`` (the short side): for each, ``<stem>_mask.png``
    (class colours from classes.tsv) and ``<stem>_overlay.png`` (the mask over the image) in ``out_dir``, and the share
    of the image each class covers. One bad file does not stop the others."""
    from PIL import Image

    from ..data.segmentation import SegmentationEvalTransform, colorize

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = RunInfo.from_meta(meta)
    names, colors = info.class_names, info.class_colors
    model.eval().set_operating_point(resolution, bn_policy=bn_policy)
    results = []
    for f in files:
        try:
            img = load_rgb(f)
        except Exception as e:  # noqa: BLE001 - reported per file
            results.append({"file": f, "error": file_error(f, e)})
            continue
        x, _ = SegmentationEvalTransform(resolution)(img, torch.zeros(1, 1, 1, dtype=torch.uint8))
        x = info.preprocessing.normalize(x[None])
        logits = torch.nn.functional.interpolate(
            model(x).float(), size=img.shape[-2:], mode="bilinear", align_corners=False
        )
        pred = logits.argmax(1)[0]
        mask = colorize(pred, colors, info.ignore_index)
        overlay = (alpha * mask.float() + (1 - alpha) * img.float()).round().to(torch.uint8)
        stem = Path(f).stem
        paths = {"mask": out_dir / f"{stem}_mask.png", "overlay": out_dir / f"{stem}_overlay.png"}
        Image.fromarray(mask.permute(1, 2, 0).numpy()).save(paths["mask"])
        Image.fromarray(overlay.permute(1, 2, 0).numpy()).save(paths["overlay"])
        share = torch.bincount(pred.flatten(), minlength=len(names)).float() / pred.numel()
        results.append(
            {
                "file": f,
                "mask": str(paths["mask"]),
                "overlay": str(paths["overlay"]),
                "classes": {n: round(100 * float(s), 2) for n, s in zip(names, share) if s > 0},
            }
        )
    return results
