"""The public workflow: one function per ``flexres`` command, each returning JSON-ready Python objects.

The CLI only parses arguments, calls these and prints what they return, so a notebook gets exactly what
the command line shows (``flexres eval --json`` writes ``evaluate(...)``'s dict). Heavy imports
(matplotlib, onnxruntime) stay inside the functions that need them.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .analysis import count_macs, count_params, meta_weight_ratios
from .analysis.table import mark_pareto, read_table, scale_configurations, write_table
from .data import ImageFolderDataset, SubsetView, sample_data_dir, split_dir
from .deploy.export import EXPORTED_SUFFIXES, FORMAT_SUFFIX
from .deploy.latency import measure_latency
from .deploy.predict import parse_count
from .engine.checkpoint import (
    CheckpointMismatchError,
    load_checkpoint,
    load_tensors,
    resolve_checkpoint,
    save_tensors,
)
from .engine.config import DEFAULTS, apply_overrides, load_config, make_config
from .engine.evaluate import evaluate as evaluate_model
from .engine.evaluate import evaluate_configurations, format_table, hit_miss_matrix
from .engine.run import Run, RunInfo
from .engine.trainer import saved_progress
from .engine.trainer import train as train_run
from .errors import ConfigError
from .models.base import SAN_MODES
from .notes import note
from .operating_point import OperatingPoint, best_within

__all__ = [
    "adapt",
    "demo",
    "evaluate",
    "export",
    "format_eval_report",
    "format_selection",
    "predict",
    "report",
    "select",
    "serve",
    "shards",
    "table",
    "train",
]


def train(
    config: str | Path | dict[str, Any],
    out: str | Path | None = None,
    *,
    data: str | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    stop_after_epochs: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train a recipe (a YAML file or a config dict) into ``out`` (default ``runs/<config name>``); returns the
    last epoch's metrics. ``overrides`` are ``key=value`` strings as ``--set`` takes them."""
    if isinstance(config, dict):
        cfg = apply_overrides(make_config(config), list(overrides))
        name = "run"
    else:
        cfg, name = load_config(config, list(overrides)), Path(config).stem
    if data:
        cfg["data"]["root"] = str(data)
    out = Path(out) if out else Path("runs") / name
    metrics = train_run(cfg, out, resume=resume, stop_after_epochs=stop_after_epochs, log=log)
    return {"run": str(out), **metrics}


def _metadata(run: str | Path) -> dict[str, Any]:
    """A checkpoint's flexres metadata alone, without reading its tensors."""
    ckpt = resolve_checkpoint(run)
    try:
        with safe_open(str(ckpt), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("flexres", "{}"))
    except Exception:  # noqa: BLE001 - not readable this way: the full reader names what is wrong with the file
        return load_tensors(ckpt)[1]


def _recorded_data(runs: Sequence[str | Path]) -> str:
    """The data root the runs were trained on (their config's ``data.root``), for a command given no data. Checked
    before anything is read: an error naming the run when one records none, two runs name different roots (one report,
    one data set), or the folder is gone (moved, or a relative path read from another directory)."""
    roots = []
    for run in runs:
        root = RunInfo.from_meta(_metadata(run)).data_root
        if not root:
            raise ConfigError(f"{run} records no data root (data.root): pass data (--data DIR, an ImageFolder root)")
        roots.append((run, root))
    first, root = roots[0]
    for run, other in roots[1:]:
        if Path(other).resolve() != Path(root).resolve():
            raise ConfigError(
                f"{run} was trained on {other} but {first} on {root}: pass data (--data DIR) to evaluate "
                "them on one set"
            )
    if not Path(root).is_dir():
        raise ConfigError(
            f"{first} was trained on {root}, which is not a folder here: pass data (--data DIR, an ImageFolder root)"
        )
    return str(root)


def _count(value: float | str | None) -> float | None:
    """A MACs budget as a number or as the CLI takes it: "150M", "1.2G", "3e8" (flexres.deploy.predict.parse_count)."""
    return parse_count(value) if isinstance(value, str) else value


def _json_matrix(m: dict[int, dict[int, float]]) -> dict[str, dict[str, float]]:
    return {str(j): {str(i): round(p, 2) for i, p in row.items()} for j, row in m.items()}


def _label(path: str | Path, ckpt: Path, taken) -> str:
    """A run's name in a report: its folder; two runs with one folder name are told apart by their parent."""
    label = Path(path).name if Path(path).is_dir() else Path(path).parent.name
    return str(Path(ckpt.parent.parent.name) / ckpt.parent.name) if label in taken else label


def _per_class_top1(correct: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, float]:
    out = {}
    for k, name in enumerate(names):
        mask = labels == k
        if mask.any():
            out[name] = round(100.0 * float(correct[mask].float().mean()), 2)
    return out


def evaluate(
    runs: str | Path | Sequence[str | Path],
    data: str | Path | None = None,
    resolutions: Sequence[int] | None = None,
    bn_policy: str | None = None,
    *,
    scale_policy: str | None = None,
    san_mode: str | None = None,
    width: float = 1.0,
    calibration_images: int | None = None,
    batch_size: int = 256,
    split: str = "val",
    workers: int = 0,
    latency: bool = False,
    save: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate each run at each resolution (default: the run's ``eval.resolutions``).

    Returns ``{"data", "bn_policy", "scale_policy", "runs": {label: {"results": {resolution: {"top1", "top5",
    "n", "bn", "macs", "latency_ms", "per_class_top1"}}, "hit_miss", ...}}}``, the JSON ``flexres eval --json``
    writes. ``bn_policy`` None: each run's ``eval.bn_policy`` (``_run_bn_policy``); the report's ``bn_policy`` then
    names the policies used, and each run's entry its own. ``san_mode`` (proxy / ideal / data-free) sets both policies
    for SAN models. With ``save`` each run keeps its evaluation (``eval_<policy>.json``), from which ``predict`` picks
    points under a budget. ``data`` None: the data root the runs were trained on (all of them the same one).
    """
    if san_mode:
        if scale_policy or bn_policy not in (None, "interpolate"):
            raise ConfigError("san_mode sets bn_policy and scale_policy itself; give one or the other")
        bn_policy, scale_policy = SAN_MODES[san_mode]["bn_policy"], SAN_MODES[san_mode]["scale_policy"]
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    if data is None and runs:
        data = _recorded_data(runs)
    if runs and RunInfo.from_meta(_metadata(runs[0])).task == "segmentation":
        return _evaluate_segmentation(runs, data, resolutions, bn_policy, split, save, progress)
    val = ImageFolderDataset(split_dir(data, split), cache="auto", progress=progress)
    labels = torch.tensor([y for _, y in val.samples])
    train_ds = None
    report: dict[str, Any] = {"data": str(data), "bn_policy": bn_policy, "scale_policy": scale_policy, "runs": {}}
    own_resolution: dict[int, Any] = {}  # single-resolution runs (I-Nets): correctness at their own resolution
    policies = []
    for path in runs:
        run = Run.open(path)
        model = run.model
        model.to(memory_format=torch.channels_last)  # evaluation runs NHWC: 3x faster than NCHW for EfficientNet-Lite0
        policy = run.bn_policy(bn_policy)
        policies.append(policy)
        classes = run.info.classes
        if classes and classes != val.classes:
            diff = next((f"{a!r} vs {b!r}" for a, b in zip(classes, val.classes) if a != b), "")
            raise CheckpointMismatchError(
                f"{path} was trained on {len(classes)} classes but {val.root} has "
                f"{len(val.classes)}{'; first difference: ' + diff if diff else ''}"
            )
        res_list = run.eval_resolutions(resolutions)
        cfg = run.config()
        ckpt = run.checkpoint
        slimmable = model.width_range is not None
        if policy == "calibrate" or slimmable:  # slimmable models always need post-statistics BN
            train_ds = train_ds or ImageFolderDataset(split_dir(data, cfg["data"]["train_split"]), progress=progress)
            points = [OperatingPoint(r, width) for r in res_list if slimmable or r not in model.train_resolutions]
            num = calibration_images or cfg["eval"]["calibration_images"]
            scale, ratio = cfg["data"]["scale"], cfg["data"]["ratio"]
            run.calibrate(train_ds, points, num, batch_size, scale, ratio, str(data), workers, note=note)
        pre = run.info.preprocessing
        results = evaluate_model(
            model,
            val,
            res_list,
            policy,
            batch_size,
            pre.crop_fraction,
            progress=progress,
            scale_policy=scale_policy,
            workers=workers,
            width=width,
            note=note,
            interpolation=pre.interpolation,
            mean=pre.mean,
            std=pre.std,
        )
        label = _label(path, ckpt, report["runs"])
        if len(model.train_resolutions) == 1 and model.train_resolutions[0] in results:
            own_resolution[model.train_resolutions[0]] = results[model.train_resolutions[0]]["correct"]
        names = run.info.class_names or val.classes
        report["runs"][label] = {
            **run.summary(),
            "bn_policy": policy,
            "params": count_params(model),
            "results": {
                str(r): {
                    "top1": round(v["top1"], 2),
                    "top5": round(v["top5"], 2),
                    "n": v["n"],
                    "bn": v["bn"],
                    "macs": count_macs(model, OperatingPoint(r, width)),
                    "latency_ms": round(measure_latency(model, OperatingPoint(r, width)), 3) if latency else None,
                    "per_class_top1": _per_class_top1(v["correct"], labels, names),
                }
                for r, v in results.items()
            },
            "hit_miss": _json_matrix(
                hit_miss_matrix({r: v["correct"] for r, v in results.items() if r in model.train_resolutions})
            ),
        }
        ratios = meta_weight_ratios(model)
        if ratios:  # SAN App. B
            report["runs"][label]["meta_weight_ratio"] = {
                "mean": round(sum(ratios.values()) / len(ratios), 4),
                "per_layer": {k: round(v, 4) for k, v in ratios.items()},
            }
        if save:  # kept with the run: `flexres predict --max-macs` picks the most accurate point from it
            name = f"eval_{policy}" + (f"_{scale_policy}" if scale_policy else "") + ".json"
            (ckpt.parent / name).write_text(
                json.dumps({"data": str(data), "split": split, **report["runs"][label]}, indent=2) + "\n"
            )
    if len(own_resolution) > 1:  # RS-Nets Table 1, "individual" block: each I-Net at its own resolution
        report["hit_miss_individual"] = _json_matrix(
            hit_miss_matrix(dict(sorted(own_resolution.items(), reverse=True)))
        )
    report["bn_policy"] = "/".join(dict.fromkeys(policies)) or bn_policy
    return report


def _evaluate_segmentation(
    runs: list,
    data: str | Path,
    resolutions: Sequence[int] | None,
    bn_policy: str | None,
    split: str,
    save: bool,
    progress: bool,
) -> dict[str, Any]:
    """``evaluate`` for segmentation runs: pixel accuracy, mean class accuracy, mIoU and per-class IoU (RS-Nets
    Table 7) at each resolution (the short side), with the MACs of an image of the split's aspect."""
    from .data.segmentation import SegmentationDataset
    from .engine.evaluate import evaluate_segmentation

    val = SegmentationDataset(split_dir(data, split), cache=True)
    h, w = val[0][0].shape[-2:]
    aspect = max(h, w) / min(h, w)
    report: dict[str, Any] = {
        "data": str(data),
        "bn_policy": bn_policy,
        "scale_policy": None,
        "task": "segmentation",
        "runs": {},
    }
    policies = []
    for path in runs:
        run = Run.open(path)
        model = run.model
        policy = run.bn_policy(bn_policy)
        policies.append(policy)
        if run.info.task != "segmentation":
            raise ConfigError(f"{path} is a classifier: evaluate segmentation and classification runs separately")
        if run.info.classes and run.info.classes != val.classes:
            raise CheckpointMismatchError(
                f"{path} was trained on classes {run.info.classes} but {val.root.parent} has {val.classes}"
            )
        res_list = run.eval_resolutions(resolutions)
        ckpt = run.checkpoint
        if policy == "calibrate":  # statistics at each untrained resolution from training crops, as for classifiers
            cfg = run.config()
            train_ds = SegmentationDataset(split_dir(data, cfg["data"]["train_split"]), cache=True)
            points = [OperatingPoint(r) for r in res_list if r not in model.train_resolutions]
            num = cfg["eval"]["calibration_images"]
            run.calibrate(
                train_ds, points, num, 16, cfg["data"]["seg_scale"], cfg["data"]["ratio"], str(data), note=note
            )
        pre = run.info.preprocessing
        results = evaluate_segmentation(model, val, res_list, policy, progress=progress, mean=pre.mean, std=pre.std)
        label = _label(path, ckpt, report["runs"])
        report["runs"][label] = {
            **run.summary(),
            "bn_policy": policy,
            "params": count_params(model),
            "results": {
                str(r): {
                    **{k: round(v[k], 2) for k in ("pixel_acc", "mean_acc", "miou")},
                    "per_class_iou": v["per_class_iou"],
                    "n": v["n"],
                    "bn": v["bn"],
                    "macs": count_macs(model, r, aspect),
                }
                for r, v in results.items()
            },
        }
        if save:
            name = f"eval_{policy}.json"
            (ckpt.parent / name).write_text(
                json.dumps({"data": str(data), "split": split, **report["runs"][label]}, indent=2) + "\n"
            )
    report["bn_policy"] = "/".join(dict.fromkeys(policies)) or bn_policy
    return report


def _cost_table(runs: dict[str, Any], all_res: list[int], per: str = "") -> str:
    """MMACs at each resolution and deployed parameters of the report's first run."""
    label, first = next(iter(runs.items()))
    macs = [f"{first['results'][str(r)]['macs'] / 1e6:.1f}" if str(r) in first["results"] else "" for r in all_res]
    title = f"cost of {label}{per}: {first['params'] / 1e6:.3f} M params deployed"
    return format_table(["resolution"] + [str(r) for r in all_res], [["MMACs", *macs]], title=title)


def _format_segmentation_report(report: dict[str, Any]) -> str:
    runs = report["runs"]
    all_res = sorted({int(r) for run in runs.values() for r in run["results"]}, reverse=True)
    out = []
    for key, title in (
        ("miou", "mean IoU %"),
        ("pixel_acc", "pixel accuracy %"),
        ("mean_acc", "mean class accuracy %"),
    ):
        rows = [
            [label]
            + [
                f"{run['results'][str(r)][key]:.1f}{'*' if r in run['train_resolutions'] else ''}"
                if str(r) in run["results"]
                else ""
                for r in all_res
            ]
            for label, run in runs.items()
        ]
        note_ = f"* trained resolution, the short side; unseen ones served by bn_policy={report['bn_policy']}"
        out += [format_table(["run"] + [str(r) for r in all_res], rows, title=f"{title} ({note_})"), ""]
    out.append(_cost_table(runs, all_res, " per image"))
    return "\n".join(out)


def _format_hit_miss(hm: dict[str, dict[str, float]], title: str) -> str:
    res = list(hm)
    return format_table(
        ["wrong at \\ right at"] + res,
        [[j] + [("-" if i == j else f"{hm[j][i]:.1f}") for i in res] for j in res],
        title=title,
    )


def format_eval_report(report: dict[str, Any]) -> str:
    """The text ``flexres eval`` prints for an ``evaluate`` report: top-1 matrix, costs, hit/miss matrices (for
    segmentation: mIoU, pixel accuracy and mean class accuracy matrices and costs)."""
    if report.get("task") == "segmentation":
        return _format_segmentation_report(report)
    runs = report["runs"]
    all_res = sorted({int(r) for run in runs.values() for r in run["results"]}, reverse=True)
    header = ["run"] + [str(r) for r in all_res] + ["mean over S"]
    rows = []
    for label, run in runs.items():
        cells: list[Any] = []
        for r in all_res:
            v = run["results"].get(str(r))
            mark = "*" if r in run["train_resolutions"] else ""
            cells.append(f"{v['top1']:.1f}{mark}" if v else "")
        s = [run["results"][str(r)]["top1"] for r in run["train_resolutions"] if str(r) in run["results"]]
        cells.append(f"{sum(s) / len(s):.2f}" if s else "")
        rows.append([label] + cells)
    policy = f"bn_policy={report['bn_policy']}" + (
        f", scale_policy={report['scale_policy']}" if report.get("scale_policy") else ""
    )
    out = [format_table(header, rows, title=f"top-1 % (* trained resolution; unseen ones served by {policy})")]
    out.append("")
    out.append(_cost_table(runs, all_res))
    for label, run in runs.items():
        if len(run["hit_miss"]) > 1:
            out += [
                "",
                _format_hit_miss(
                    run["hit_miss"],
                    f"{label}: % of val images right at one resolution and wrong at another (RS-Nets Table 1)",
                ),
            ]
    for label, run in runs.items():
        if "meta_weight_ratio" in run:
            r = run["meta_weight_ratio"]["per_layer"]
            out += [
                "",
                f"{label}: SAN meta weights, mean|A| / mean|B| per layer (App. B): "
                f"mean {run['meta_weight_ratio']['mean']:.3f}, "
                f"min {min(r.values()):.3f} ({min(r, key=r.get)}), max {max(r.values()):.3f} ({max(r, key=r.get)})",
            ]
    if "hit_miss_individual" in report:
        out += [
            "",
            _format_hit_miss(
                report["hit_miss_individual"],
                "single-resolution runs, each at its own resolution: "
                "% right at one and wrong at another (RS-Nets Table 1)",
            ),
        ]
    return "\n".join(out)


def table(
    run: str | Path,
    data: str | Path | None = None,
    widths: Sequence[float] = (1.0,),
    resolutions: Sequence[int] | None = None,
    *,
    scales: str | None = None,
    bn_policy: str | None = None,
    latency: bool = False,
    calibration_images: int | None = None,
    batch_size: int = 256,
    workers: int = 0,
    write: bool = True,
    progress: Callable[[str], None] | None = None,
    tree: bool = True,
) -> list[dict[str, Any]]:
    """The query table (MutualNet Sec. 3.4, Resizable-NAS): accuracy, MACs, params (and latency) of every
    (width, resolution[, scaling configuration]); slimmable models get post-statistics BN. With ``write``
    the run keeps it (``table.json`` / ``.csv`` / ``.md``) for ``select`` and ``predict``. ``scales``:
    'all' configurations of a Resizable network or N sampled (seeded), evaluated as a prefix tree (shared stages
    once; ``tree=False`` runs each configuration on its own, same results, several times slower). ``progress``
    gets one line per row group. ``bn_policy`` None: the run's ``eval.bn_policy``.
    """
    opened = Run.open(run)
    model, cfg = opened.model, opened.config()
    bn_policy = opened.bn_policy(bn_policy)
    pre = opened.info.preprocessing
    data = data or _recorded_data([run])
    widths = list(widths)
    if model.width_range is None and widths != [1.0]:
        raise ConfigError(f"{run} is not width-slimmable: use widths [1.0]")
    res_list = opened.eval_resolutions(resolutions)
    ckpt = opened.checkpoint
    val = ImageFolderDataset(split_dir(data, cfg["data"]["val_split"]), cache="auto")
    configs = scale_configurations(model.scale_factors, model.num_stages, scales)
    rows = []

    def add_rows(w: float, sc: tuple[float, ...] | None, results: dict[int, dict[str, Any]]) -> None:
        for r, v in results.items():
            op = OperatingPoint(r, w, sc)
            rows.append(
                {
                    "width": w,
                    "resolution": r,
                    "scales": list(sc) if sc else None,
                    "top1": round(v["top1"], 2),
                    "top5": round(v["top5"], 2),
                    "macs": count_macs(model, op),
                    "params": count_params(model, op),
                    "latency_ms": round(measure_latency(model, op), 3) if latency else None,
                }
            )
        if progress:
            tag = f"width {w:g}" + (f", scales {sc}" if sc else "")
            progress(f"{tag}: " + ", ".join(f"{r}px {v['top1']:.1f}%" for r, v in results.items()))

    if tree and configs != [None] and bn_policy != "calibrate" and model.width_range is None:
        # Resizable: every configuration at once, shared stages computed once (flexres.models.config_tree).
        per_res = {
            r: evaluate_configurations(
                model,
                val,
                r,
                configs,
                bn_policy,
                batch_size=min(batch_size, 64),
                crop_fraction=pre.crop_fraction,
                workers=workers,
            )
            for r in res_list
        }
        for sc in configs:
            add_rows(1.0, sc, {r: per_res[r][sc] for r in res_list})
    else:
        # Post-statistics BN for slimmable models; with bn_policy calibrate, every untrained resolution and
        # (Resizable) every scaling configuration gets its own statistics. All calibrated (and saved) at once.
        points = [
            OperatingPoint(r, w, sc)
            for w, sc in itertools.product(widths, configs)
            for r in res_list
            if model.width_range or (bn_policy == "calibrate" and (r not in model.train_resolutions or sc is not None))
        ]
        if points:
            train_ds = ImageFolderDataset(split_dir(data, cfg["data"]["train_split"]))
            num = calibration_images or cfg["eval"]["calibration_images"]
            scale, ratio = cfg["data"]["scale"], cfg["data"]["ratio"]
            opened.calibrate(train_ds, points, num, batch_size, scale, ratio, str(data), workers, note=note)
        for w, sc in itertools.product(widths, configs):
            add_rows(
                w,
                sc,
                evaluate_model(
                    model,
                    val,
                    res_list,
                    bn_policy,
                    batch_size,
                    pre.crop_fraction,
                    workers=workers,
                    width=w,
                    scales=sc,
                    note=note,
                    interpolation=pre.interpolation,
                    mean=pre.mean,
                    std=pre.std,
                ),
            )
    mark_pareto(rows)
    if write:
        write_table(rows, ckpt.parent, {"data": str(data), "bn_policy": bn_policy, "latency_batch": 1})
    return rows


def select(run: str | Path, max_macs: float | str | None = None, max_latency_ms: float | None = None) -> dict[str, Any]:
    """The most accurate operating point of the run's query table (built by ``table``) within the budget; ``max_macs``
    a number or as the CLI takes it ("150M")."""
    return best_within(read_table(resolve_checkpoint(run).parent), _count(max_macs), max_latency_ms)


def format_selection(row: dict[str, Any]) -> str:
    lat = f", {row['latency_ms']:.2f} ms" if row.get("latency_ms") is not None else ""
    where = f"width {row['width']:g} at {row['resolution']} px" + (
        f", scales {row['scales']}" if row.get("scales") else ""
    )
    return (
        f"{where}: top-1 {row['top1']:.2f}% (top-5 {row['top5']:.2f}%), "
        f"{row['macs'] / 1e6:.1f} MMACs, {row['params'] / 1e6:.3f} M params{lat}"
    )


def adapt(
    run: str | Path,
    max_macs: float | str,
    data: str | Path | None = None,
    configs: str = "all",
    label_images: int = 2000,
    epochs: int = 30,
    resolution: int | None = None,
) -> dict[str, Any]:
    """Resizable-Adapt: train a router that picks a scaling configuration per image under ``max_macs``, and
    compare it with the best single configuration (NAS). The run keeps the router and ``adapt.json``. ``max_macs``: a
    number or as the CLI takes it ("25M"); ``data`` None: the run's data root."""
    from .analysis.adapt import adapt_report

    max_macs = _count(max_macs)
    opened = Run.open(run)
    model, cfg = opened.model, opened.config()
    if model.scale_factors is None:
        raise ConfigError(f"{run} is not a resizable model: Resizable-Adapt routes between scaling configurations")
    data = data or _recorded_data([run])
    candidates = [c for c in scale_configurations(model.scale_factors, model.num_stages, configs) if c is not None]
    train_ds = ImageFolderDataset(split_dir(data, cfg["data"]["train_split"]))
    pick = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(0))[:label_images].tolist()
    val = ImageFolderDataset(split_dir(data, cfg["data"]["val_split"]), cache="auto")
    rep = adapt_report(
        model, SubsetView(train_ds, pick), val, resolution or model.train_resolutions[0], candidates, max_macs, epochs
    )
    run_dir = resolve_checkpoint(run).parent
    router = rep.pop("router")
    rep.pop("chosen_macs")
    save_tensors(run_dir / "adapt_router.safetensors", router.state_dict(), dict(rep))
    (run_dir / "adapt.json").write_text(json.dumps(rep, indent=2) + "\n")
    return rep


def export(
    run: str | Path,
    resolution: int,
    width: float = 1.0,
    scales: Sequence[float] | None = None,
    format: str = "onnx",
    out: str | Path | None = None,
    *,
    bn_policy: str | None = None,
    scale_policy: str | None = None,
    fold_bn: bool = True,
    data: str | Path | None = None,
    int8: bool = False,
    int8_ranges: str | Path | None = None,
) -> dict[str, Any]:
    """Write one operating point as a static ONNX or TorchScript model (plus ``<file>.json``), checked against
    the adaptive model on real images; returns that JSON with ``path`` added. ``format="packed"`` writes the whole
    quantized model (every resolution) with its LQ-Nets weights as bit-packed codes, loadable by every command.
    Slimmable models get post-statistics BN from ``data``'s training images first, when the run has none for the point.
    ``bn_policy`` None: the run's ``eval.bn_policy``. ``int8``: the ONNX file quantized by ONNX Runtime, calibrated on
    the run's (or ``data``'s) training images at this resolution; ``int8_ranges``: an activation-range file, used when
    it exists (one calibration shared by resolutions: ``flexres.deploy.runtime.merge_ranges``), else written with this
    resolution's ranges."""
    from .deploy import export as export_static

    if format == "packed":
        from .deploy.export import export_packed

        path = Path(out) if out else resolve_checkpoint(run).parent / "export" / "packed.safetensors"
        return {"path": str(path), **export_packed(run, path, data)}
    opened = Run.open(run)
    model, meta, ckpt = opened.model, opened.meta, opened.checkpoint
    bn_policy = opened.bn_policy(bn_policy)
    op = OperatingPoint(resolution, width, tuple(scales) if scales else None)
    if model.width_range is not None and not model.is_calibrated(op):  # post-statistics BN for this point
        cfg = opened.config()
        root = data or cfg["data"]["root"]
        if not root or not Path(root).is_dir():
            raise ConfigError(
                f"{op} of this slimmable model needs post-statistics BN from training images: pass data (a folder)"
            )
        train_ds = ImageFolderDataset(split_dir(root, cfg["data"]["train_split"]))
        num = cfg["eval"]["calibration_images"]
        opened.calibrate(train_ds, [op], num, 256, cfg["data"]["scale"], cfg["data"]["ratio"], str(root), note=note)
    ext = FORMAT_SUFFIX.get(format, ".pt")
    path = (
        Path(out)
        if out
        else ckpt.parent
        / "export"
        / f"{model.arch['name'].replace(':', '-')}_{op.file_tag}{'_int8' if int8 else ''}{ext}"
    )
    info = export_static(
        model, meta, op, format, path, bn_policy, scale_policy, fold_bn, data, int8=int8, int8_ranges=int8_ranges
    )
    return {"path": str(path), **info}


def predict(
    model: str | Path,
    images: Sequence[str | Path],
    resolution: int | None = None,
    *,
    max_macs: float | str | None = None,
    max_latency_ms: float | None = None,
    width: float = 1.0,
    bn_policy: str | None = None,
    topk: int = 5,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Classify image files with a run (at ``resolution``, or the best point under a budget) or an exported
    model. Returns ``{"model", "resolution", "predictions": [{"file", "top": [{"label", "class", "name",
    "probability"}, ...]} or {"file", "error"}]}``: one bad file does not stop the others. A segmentation run writes
    a colour mask and an overlay PNG per image into ``out`` (default ./segmentation) instead: predictions are then
    ``{"file", "mask", "overlay", "classes": {name: % of the image}}``. ``bn_policy`` None: the run's
    ``eval.bn_policy``. ``max_macs``: a number or as the CLI takes it ("150M")."""
    from .deploy.predict import load_predictor, predict_files, segment_files

    max_macs = _count(max_macs)
    if Path(model).suffix not in EXPORTED_SUFFIXES:
        opened = Run.open(model)
        bn_policy = opened.bn_policy(bn_policy)
        if opened.info.task == "segmentation":
            r = resolution or opened.model.train_resolutions[0]
            out = Path(out or "segmentation")
            files = [str(f) for f in images]
            return {
                "model": f"{Path(model).name} at {r} px (short side)",
                "resolution": r,
                "predictions": segment_files(opened.model, opened.meta, files, r, out, bn_policy),
            }
    if width != 1.0 and resolution is None:
        raise ConfigError("width goes with resolution (a budget picks both)")
    # an exported model was exported at one BN policy: bn_policy does not apply to it
    predictor = load_predictor(
        str(model), resolution, max_macs, max_latency_ms, bn_policy or DEFAULTS["eval"]["bn_policy"], width
    )
    results = predict_files(predictor, [str(f) for f in images], topk)
    return {"model": predictor.description, "resolution": predictor.resolution, "predictions": results}


def serve(
    targets: str | Path | Sequence[str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    target_p95_ms: float | None = None,
    resolution: int | None = None,
    max_batch: int = 8,
    max_wait_ms: float = 2.0,
    max_queue: int = 256,
    max_upload_mb: float = 20.0,
    max_pixels: float = 40e6,
    bn_policy: str | None = None,
    inference: str = "process",
    batch_timeout_s: float = 30.0,
    backend: str | None = None,
    int8: bool = False,
    points: Sequence[str] | None = None,
    threads: int | None = None,
    data: str | Path | None = None,
    max_refusals_per_s: float | None = 1000.0,
    log: Callable[[str], None] = print,
) -> None:
    """Serve a run (its query table's Pareto points, else its evaluated or trained resolutions) or exported models
    over HTTP until interrupted: ``POST /predict``, ``POST /predict/all``, ``GET /health``, ``/points``, ``/metrics``
    and a page at ``/``. With ``target_p95_ms`` the server lowers the operating point as its queue grows and raises
    it as the queue drains; without, requests get ``resolution`` (default: the most accurate point) unless they ask.
    ``inference="process"`` runs the batches in a child process (see :mod:`flexres.serving.inference`), ``"thread"``
    on a thread of the server's process. A child that answers no batch within ``batch_timeout_s`` is killed and replaced
    (the new child's start-up is not counted); that batch is answered 503. ``backend``: "ort" (the default when
    onnxruntime is installed) runs each point as an ONNX Runtime session of its static model, exported and checked once
    into RUN/serving/; "torch" runs the adaptive model. ``int8`` serves int8 sessions calibrated per resolution (on the
    run's training images, or ``data``'s). ``points`` names the points to serve ("224px", "160"); default: every trained
    resolution plus the query table's (or evaluation's) Pareto points. ``threads``: intra-op threads of each session."""
    import uvicorn

    from .serving import ServeOptions, ServingEngine, load_points
    from .serving.app import create_app
    from .serving.inference import ProcessInference

    if inference not in ("process", "thread"):
        raise ConfigError(f"inference must be 'process' or 'thread', got {inference!r}")
    from .serving.points import PointOptions, default_backend

    options = ServeOptions(
        target_p95_ms, resolution, max_batch, max_wait_ms, max_queue, max_refusals_per_s=max_refusals_per_s or None
    )
    point_options = PointOptions(
        bn_policy,
        backend or default_backend(),
        int8,
        tuple(str(p) for p in points) if points else None,
        str(data) if data else None,
        threads,
    )
    points = load_points(targets, point_options)
    runner = (
        ProcessInference(targets, point_options, batch_timeout_s=batch_timeout_s) if inference == "process" else None
    )
    engine = ServingEngine(points, options, inference=runner)
    app = create_app(engine=engine, max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=int(max_pixels))
    info = engine.describe()
    log(
        f"serving {info['model']} on http://{host}:{port} ({info['mode']}"
        + (f", p95 target {target_p95_ms:g} ms" if target_p95_ms else "")
        + f"); {len(info['points'])} operating points:"
    )
    for pt in info["points"]:
        acc = f"top-1 {pt['expected_top1']:.1f}%" if pt["expected_top1"] is not None else "accuracy not measured"
        log(
            f"  {pt['name']:>20}  {pt['macs'] / 1e6:7.1f} MMACs  {pt['latency_ms_batch1']:6.2f} ms  "
            f"{acc}  [{pt['backend']}; {pt['why']}]"
        )
    uvicorn.run(app, host=host, port=port, log_level="warning")


def report(
    runs: str | Path | Sequence[str | Path],
    data: str | Path,
    out: str | Path,
    resolutions: Sequence[int] | None = None,
    bn_policy: str | None = None,
    latency: bool = False,
) -> Path:
    """Plots (accuracy vs cost, train x test heatmap, BN statistics) and an HTML page in ``out``; returns its
    index.html. ``bn_policy`` None: each run's ``eval.bn_policy``."""
    from .analysis.report import write_report

    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    rep = evaluate(runs, data, resolutions, bn_policy, latency=latency)
    loaded = {label: load_checkpoint(run) for label, run in zip(rep["runs"], runs)}
    extra = []
    if rep.get("task") == "segmentation":  # one validation image segmented at every evaluated resolution, per run
        from .analysis.report import plot_segmentation_examples
        from .deploy.predict import segment_files

        image = sorted((Path(data) / "val" / "images").iterdir())[0]
        Path(out).mkdir(parents=True, exist_ok=True)
        for label, (model, meta) in loaded.items():
            res = sorted((int(r) for r in rep["runs"][label]["results"]), reverse=True)
            figure = plot_segmentation_examples(model, meta, image, res, label, Path(out), segment_files)
            extra.append((f"Segmentation at every resolution: {label}", figure))
    return write_report(rep, {label: m for label, (m, _) in loaded.items()}, out, extra)


def shards(data: str | Path, out: str | Path, images_per_shard: int = 1000) -> dict[str, int]:
    """Pack every split of the ImageFolder root ``data`` (``train/``, ``val/``, ... each ``<class>/<image>``) into tar
    shards under ``out`` (``out/<split>/shard-000000.tar`` ...), for file systems slow at many small files. ``out``
    is then a data root like ``data``: training and evaluation read shards and folders alike. Returns the number of
    shards per split."""
    from .data.shards import write_shards

    splits = sorted(p for p in Path(data).iterdir() if p.is_dir())
    if not splits:
        raise ConfigError(f"{data} has no split folders (expected {data}/train/<class>/<image>)")
    return {p.name: len(write_shards(p, Path(out) / p.name, images_per_shard)) for p in splits}


def demo(out: str | Path = "runs/demo", epochs: int = 60, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a small RS-Net (ResNet-18 x0.25, full MRED) on the bundled sample and evaluate it at trained,
    between and outside resolutions; returns the ``evaluate`` report. A finished run already in ``out`` is reused, and
    an interrupted one continued, each said in the log."""
    data = sample_data_dir()
    out = Path(out)
    cfg = make_config(
        {
            "model": {"name": "resnet18", "width_mult": 0.25},
            "method": {"name": "rsnet", "resolutions": [96, 80, 64, 48], "kwargs": {"mred": "full"}},
            "data": {"root": str(data), "cache": True, "num_workers": 0},
            "train": {
                "epochs": epochs,
                "batch_size": 20,
                "lr": 0.02,
                "nesterov": True,
                "weight_decay": 5e-4,
                "warmup_epochs": 2,
                "eval_every": 0,
                "progress": False,
            },
        }
    )
    log(f"flexres demo: RS-Net (ResNet-18 x0.25, full MRED) on {data} (10 classes, 100 train / 100 val images)")
    progress = saved_progress(out)
    if progress is not None and progress[0] >= progress[1]:
        # A second `flexres demo` must not pass the first one's run off as freshly trained (in 0 s).
        log(
            f"reusing the finished run in {out} "
            f"(trained for {progress[0]} epoch{'s' * (progress[0] != 1)}; delete it or pass "
            "--out to train again)"
        )
    else:
        t0 = time.time()
        train_run(cfg, out, resume=progress is not None, log=log)  # an interrupted demo continues ("resuming ...")
        log(f"trained in {time.time() - t0:.0f} s; the run is in {out}")
    log("evaluating at trained, between and outside resolutions")
    return evaluate([str(out)], str(data), [112, 96, 88, 80, 72, 64, 56, 48, 40], "interpolate")
