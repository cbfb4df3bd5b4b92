"""The ``flexres`` command: train, eval, demo."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .engine.checkpoint import (
    CALIBRATION,
    CheckpointMismatchError,
    clear_calibration,
    load_checkpoint,
    resolve_checkpoint,
    save_calibration,
)
from .engine.config import ConfigError, load_config, make_config
from .engine.evaluate import calibrate, evaluate, format_table, hit_miss_matrix
from .models.base import SAN_MODES, SCALE_POLICIES
from .nn.switchable_bn import BN_POLICIES
from .operating_point import OperatingPoint


def _train(args: argparse.Namespace) -> int:
    from .engine.trainer import train

    cfg = load_config(args.config, args.set)
    if args.data:
        cfg["data"]["root"] = args.data
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    train(cfg, out, resume=args.resume, stop_after_epochs=args.stop_after_epochs)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run saved in {out}")
    return 0


def evaluate_runs(runs: list[str], data: str, resolutions: list[int] | None, bn_policy: str, calibration_images: int | None = None,
                  batch_size: int = 256, split: str = "val", progress: bool = True, scale_policy: str | None = None,
                  workers: int = 0, latency: bool = False, save: bool = False, width: float = 1.0) -> dict[str, Any]:
    """Evaluate each run at each resolution; returns a JSON-ready report (see ``flexres eval --json``)."""
    from .analysis import count_macs, count_params, measure_latency, meta_weight_ratios
    from .data import ImageFolderDataset, split_dir

    val = ImageFolderDataset(split_dir(data, split), cache="auto", progress=progress)
    train_ds = None
    report: dict[str, Any] = {"data": str(data), "bn_policy": bn_policy, "scale_policy": scale_policy, "runs": {}}
    own_resolution: dict[int, Any] = {}  # single-resolution runs (I-Nets): correctness at their own resolution
    for run in runs:
        model, meta = load_checkpoint(run)
        classes = meta.get("classes")
        if classes and classes != val.classes:
            diff = next((f"{a!r} vs {b!r}" for a, b in zip(classes, val.classes) if a != b), "")
            raise CheckpointMismatchError(f"{run} was trained on {len(classes)} classes but {val.root} has "
                                          f"{len(val.classes)}{'; first difference: ' + diff if diff else ''}")
        res_list = resolutions or meta.get("config", {}).get("eval", {}).get("resolutions") or list(model.train_resolutions)
        cfg = meta.get("config") or make_config()
        ckpt = resolve_checkpoint(run)
        slimmable = model.width_range is not None
        if bn_policy == "calibrate" or slimmable:  # slimmable models always need post-statistics BN
            train_ds = train_ds or ImageFolderDataset(split_dir(data, cfg["data"]["train_split"]), progress=progress)
            points = [OperatingPoint(r, width) for r in res_list if slimmable or r not in model.train_resolutions]
            ensure_calibrated(model, meta, ckpt, train_ds, points, calibration_images or cfg["eval"]["calibration_images"],
                              batch_size, cfg, str(data), workers)
        results = evaluate(model, val, res_list, bn_policy, batch_size, meta.get("crop_fraction", 0.875), progress=progress,
                           scale_policy=scale_policy, workers=workers, width=width)
        label = Path(run).name if Path(run).is_dir() else Path(run).parent.name
        if label in report["runs"]:  # two runs with one folder name: tell them apart by their parent
            label = str(Path(ckpt.parent.parent.name) / ckpt.parent.name)
        if len(model.train_resolutions) == 1 and model.train_resolutions[0] in results:
            own_resolution[model.train_resolutions[0]] = results[model.train_resolutions[0]]["correct"]
        report["runs"][label] = {
            "checkpoint": str(ckpt), "train_resolutions": list(model.train_resolutions),
            "method": meta.get("method", {}), "epoch": meta.get("epoch"), "params": count_params(model),
            "results": {str(r): {"top1": round(v["top1"], 2), "top5": round(v["top5"], 2), "n": v["n"], "bn": v["bn"],
                                 "macs": count_macs(model, OperatingPoint(r, width)),
                                 "latency_ms": round(measure_latency(model, OperatingPoint(r, width)), 3) if latency else None}
                        for r, v in results.items()},
            "hit_miss": _json_matrix(hit_miss_matrix({r: v["correct"] for r, v in results.items() if r in model.train_resolutions})),
        }
        ratios = meta_weight_ratios(model)
        if ratios:  # SAN App. B
            report["runs"][label]["meta_weight_ratio"] = {"mean": round(sum(ratios.values()) / len(ratios), 4),
                                                          "per_layer": {k: round(v, 4) for k, v in ratios.items()}}
        if save:  # kept with the run: `flexres predict --max-macs` picks the most accurate point from it
            name = f"eval_{bn_policy}" + (f"_{scale_policy}" if scale_policy else "") + ".json"
            (ckpt.parent / name).write_text(json.dumps({"data": str(data), "split": split, **report["runs"][label]}, indent=2) + "\n")
    if len(own_resolution) > 1:  # RS-Nets Table 1, "individual" block: each I-Net at its own resolution
        report["hit_miss_individual"] = _json_matrix(hit_miss_matrix(dict(sorted(own_resolution.items(), reverse=True))))
    return report


def ensure_calibrated(model, meta: dict[str, Any], ckpt: Path, train_ds, points: list, num_images: int, batch_size: int,
                      cfg: dict[str, Any], data: str, workers: int = 0) -> None:
    """Calibrate the points not yet in the run's cache and save the cache with the run."""
    if meta.get("calibration", {}).get("num_images") not in (None, num_images):
        clear_calibration(model)  # computed from another number of images: not what was asked for
    new = calibrate(model, train_ds, points, num_images, batch_size, cfg["data"]["scale"], cfg["data"]["ratio"], workers=workers)
    if new:
        save_calibration(model, ckpt.parent / CALIBRATION, {"num_images": num_images, "data": data,
                                                              "checkpoint_digest": meta["checkpoint_digest"]})
        meta["calibration"] = {"num_images": num_images}


def _json_matrix(m: dict[int, dict[int, float]]) -> dict[str, dict[str, float]]:
    return {str(j): {str(i): round(p, 2) for i, p in row.items()} for j, row in m.items()}


def _format_hit_miss(hm: dict[str, dict[str, float]], title: str) -> str:
    res = list(hm)
    return format_table(["wrong at \\ right at"] + res, [[j] + [("-" if i == j else f"{hm[j][i]:.1f}") for i in res] for j in res],
                        title=title)


def format_report(report: dict[str, Any]) -> str:
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
    policy = f"bn_policy={report['bn_policy']}" + (f", scale_policy={report['scale_policy']}" if report.get("scale_policy") else "")
    out = [format_table(header, rows, title=f"top-1 % (* trained resolution; unseen ones served by {policy})")]
    first = next(iter(runs.values()))
    out.append("")
    out.append(format_table(["resolution"] + [str(r) for r in all_res],
                            [["MMACs"] + [f"{first['results'][str(r)]['macs'] / 1e6:.1f}" if str(r) in first["results"] else ""
                                          for r in all_res]],
                            title=f"cost of {next(iter(runs))}: {first['params'] / 1e6:.3f} M params deployed"))
    for label, run in runs.items():
        if len(run["hit_miss"]) > 1:
            out += ["", _format_hit_miss(run["hit_miss"], f"{label}: % of val images right at one resolution and wrong at another "
                                                          "(RS-Nets Table 1)")]
    for label, run in runs.items():
        if "meta_weight_ratio" in run:
            r = run["meta_weight_ratio"]["per_layer"]
            out += ["", f"{label}: SAN meta weights, mean|A| / mean|B| per layer (App. B): mean {run['meta_weight_ratio']['mean']:.3f}, "
                        f"min {min(r.values()):.3f} ({min(r, key=r.get)}), max {max(r.values()):.3f} ({max(r, key=r.get)})"]
    if "hit_miss_individual" in report:
        out += ["", _format_hit_miss(report["hit_miss_individual"], "single-resolution runs, each at its own resolution: "
                                                                    "% right at one and wrong at another (RS-Nets Table 1)")]
    return "\n".join(out)


def _eval(args: argparse.Namespace) -> int:
    bn, scale = args.bn, args.scale
    if args.san_mode:
        if bn or scale:
            raise ValueError("--san-mode sets --bn and --scale itself; give one or the other")
        bn, scale = SAN_MODES[args.san_mode]["bn_policy"], SAN_MODES[args.san_mode]["scale_policy"]
    report = evaluate_runs(args.runs, args.data, args.resolutions, bn or "interpolate", args.calibration_images, args.batch_size,
                           args.split, scale_policy=scale, workers=args.workers, latency=args.latency, save=True, width=args.width)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def scale_configurations(model, spec: str | None, seed: int = 0) -> list[tuple[float, ...] | None]:
    """Resizable-NAS: 'all' configurations of the model's factor list, or a seeded sample of N; [None] otherwise."""
    import itertools

    if spec is None:
        return [None]
    if model.scale_factors is None:
        raise ValueError("--scales needs a resizable model")
    every = list(itertools.product(model.scale_factors, repeat=model.num_stages))
    if spec == "all":
        return every
    n = int(spec)
    pick = torch.randperm(len(every), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [every[i] for i in sorted(pick)]


def build_table(run: str, data: str | None, widths: list[float], resolutions: list[int] | None, latency: bool = False,
                bn_policy: str = "interpolate", calibration_images: int | None = None, batch_size: int = 256,
                workers: int = 0, progress: bool = True, scales: str | None = None) -> list[dict[str, Any]]:
    """Accuracy, MACs, params (and latency) of every (width, resolution[, scaling configuration]);
    slimmable models get post-statistics BN."""
    from .analysis import count_macs, count_params, measure_latency
    from .data import ImageFolderDataset, split_dir

    model, meta = load_checkpoint(run)
    cfg = meta.get("config") or make_config()
    data = data or cfg["data"]["root"]
    if not data:
        raise ValueError("no data: pass --data DIR")
    if model.width_range is None and widths != [1.0]:
        raise ValueError(f"{run} is not width-slimmable: use --widths 1.0")
    res_list = resolutions or cfg["eval"]["resolutions"] or list(model.train_resolutions)
    ckpt = resolve_checkpoint(run)
    val = ImageFolderDataset(split_dir(data, cfg["data"]["val_split"]), cache="auto", progress=progress)
    train_ds = ImageFolderDataset(split_dir(data, cfg["data"]["train_split"]), progress=progress)
    n = calibration_images or cfg["eval"]["calibration_images"]
    rows = []
    for w, sc in itertools.product(widths, scale_configurations(model, scales)):
        # Post-statistics BN for slimmable models; with bn_policy calibrate, every untrained resolution and
        # (Resizable) every scaling configuration gets its own statistics.
        points = [OperatingPoint(r, w, sc) for r in res_list
                  if model.width_range or (bn_policy == "calibrate" and (r not in model.train_resolutions or sc is not None))]
        if points:
            ensure_calibrated(model, meta, ckpt, train_ds, points, n, batch_size, cfg, str(data), workers)
        results = evaluate(model, val, res_list, bn_policy, batch_size, meta.get("crop_fraction", 0.875), workers=workers, width=w,
                           scales=sc)
        for r, v in results.items():
            op = OperatingPoint(r, w, sc)
            rows.append({"width": w, "resolution": r, "scales": list(sc) if sc else None, "top1": round(v["top1"], 2),
                         "top5": round(v["top5"], 2), "macs": count_macs(model, op), "params": count_params(model, op),
                         "latency_ms": round(measure_latency(model, op), 3) if latency else None})
        if progress:
            tag = f"width {w:g}" + (f", scales {sc}" if sc else "")
            print(f"{tag}: " + ", ".join(f"{r}px {v['top1']:.1f}%" for r, v in results.items()), flush=True)
    return rows


def _table(args: argparse.Namespace) -> int:
    from .analysis.table import parse_range, write_table

    rows = build_table(args.run, args.data, parse_range(args.widths), args.resolutions, args.latency, args.bn,
                       args.calibration_images, args.batch_size, args.workers, scales=args.scales)
    run_dir = resolve_checkpoint(args.run).parent
    files = write_table(rows, run_dir, {"data": args.data, "bn_policy": args.bn, "latency_batch": 1})
    print((run_dir / "table.md").read_text())
    print("wrote " + ", ".join(map(str, files)))
    return 0


def _select(args: argparse.Namespace) -> int:
    from .analysis.table import read_table, select
    from .deploy.predict import parse_count

    row = select(read_table(resolve_checkpoint(args.run).parent), parse_count(args.max_macs) if args.max_macs else None,
                 args.max_latency_ms)
    lat = f", {row['latency_ms']:.2f} ms" if row.get("latency_ms") is not None else ""
    where = f"width {row['width']:g} at {row['resolution']} px" + (f", scales {row['scales']}" if row.get("scales") else "")
    print(f"{where}: top-1 {row['top1']:.2f}% (top-5 {row['top5']:.2f}%), "
          f"{row['macs'] / 1e6:.1f} MMACs, {row['params'] / 1e6:.3f} M params{lat}")
    if args.json:
        print(json.dumps(row))
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from .analysis.adapt import adapt_report
    from .data import ImageFolderDataset, split_dir
    from .deploy.predict import parse_count
    from .engine.checkpoint import save_tensors

    model, meta = load_checkpoint(args.run)
    if model.scale_factors is None:
        raise ValueError(f"{args.run} is not a resizable model: Resizable-Adapt routes between scaling configurations")
    cfg = meta.get("config") or make_config()
    data = args.data or cfg["data"]["root"]
    configs = [c for c in scale_configurations(model, args.configs) if c is not None]
    train_ds = ImageFolderDataset(split_dir(data, cfg["data"]["train_split"]), progress=False)
    pick = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(0))[: args.label_images].tolist()
    val = ImageFolderDataset(split_dir(data, cfg["data"]["val_split"]), cache="auto", progress=False)
    resolution = args.resolution or model.train_resolutions[0]
    rep = adapt_report(model, _SubsetView(train_ds, pick), val, resolution, configs, parse_count(args.max_macs), args.epochs)
    run_dir = resolve_checkpoint(args.run).parent
    router = rep.pop("router")
    rep.pop("chosen_macs")
    save_tensors(run_dir / "adapt_router.safetensors", router.state_dict(), {k: v for k, v in rep.items()})
    (run_dir / "adapt.json").write_text(json.dumps(rep, indent=2) + "\n")
    a, n = rep["adapt"], rep["nas"]
    print(f"Resizable-Adapt under {rep['budget_macs'] / 1e6:.1f} MMACs ({rep['candidates']} candidate configurations, router trained "
          f"on {rep['train_images']} images):")
    print(f"  adapt : top-1 {a['top1']:.2f}%  mean {a['mean_macs'] / 1e6:.1f} MMACs per image (max {a['max_macs'] / 1e6:.1f}), "
          f"{a['configs_used']} configurations used; + probe pass {rep['probe_macs'] / 1e6:.1f} MMACs")
    print(f"  NAS   : top-1 {n['top1']:.2f}%  {n['macs'] / 1e6:.1f} MMACs, scales {n['scales']}")
    print(f"  oracle: top-1 {rep['oracle_top1']:.2f}% (the best candidate per image)")
    return 0


class _SubsetView(torch.utils.data.Dataset):
    """A subset of an ImageFolderDataset that still exposes (and forwards) ``transform``."""

    def __init__(self, base, indices: list[int]) -> None:
        self.base, self.indices = base, indices

    @property
    def transform(self):
        return self.base.transform

    @transform.setter
    def transform(self, value) -> None:
        self.base.transform = value

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]


def _export(args: argparse.Namespace) -> int:
    from .deploy import export
    from .operating_point import OperatingPoint

    model, meta = load_checkpoint(args.run)
    op = OperatingPoint(args.resolution, args.width, tuple(args.scales) if args.scales else None)
    ckpt = resolve_checkpoint(args.run)
    if model.width_range is not None and not model.is_calibrated(op):  # post-statistics BN for this point
        from .data import ImageFolderDataset, split_dir

        cfg = meta.get("config") or make_config()
        data = args.data or cfg["data"]["root"]
        if not data or not Path(data).is_dir():
            raise ValueError(f"{op} of this slimmable model needs post-statistics BN from training images: pass --data DIR")
        train_ds = ImageFolderDataset(split_dir(data, cfg["data"]["train_split"]), progress=False)
        ensure_calibrated(model, meta, ckpt, train_ds, [op], cfg["eval"]["calibration_images"], 256, cfg, str(data))
    ext = ".onnx" if args.format == "onnx" else ".pt"
    tag = (f"{op.resolution}" + (f"_w{op.width:g}" if op.width != 1.0 else "")
           + ("_s" + "-".join(f"{f:g}" for f in op.scales) if op.scales else ""))
    out = Path(args.out) if args.out else ckpt.parent / "export" / f"{model.arch['name']}_{tag}{ext}"
    info = export(model, meta, op, args.format, out, args.bn, args.scale, not args.no_fold_bn, args.data)
    print(f"wrote {out} and {out}.json: {info['macs'] / 1e6:.1f} MMACs, {info['params'] / 1e6:.3f} M params, "
          f"max |difference| to the adaptive model {info['parity_max_abs_diff']:.1e} on {info['parity_images']} real images")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .deploy.predict import load_predictor, parse_count, predict_files

    max_macs = parse_count(args.max_macs) if args.max_macs else None
    if args.width != 1.0 and args.resolution is None:
        raise ValueError("--width goes with --resolution (a budget picks both)")
    predictor = load_predictor(args.model, args.resolution, max_macs, args.max_latency_ms, args.bn, args.width)
    results = predict_files(predictor, args.images, args.topk)
    if args.json:
        print(json.dumps({"model": predictor.description, "resolution": predictor.resolution, "predictions": results}, indent=2))
    else:
        print(f"model: {predictor.description}")
        for r in results:
            if "error" in r:
                print(f"{r['file']}: error: {r['error']}", file=sys.stderr)
            else:
                print(f"{r['file']}: " + ", ".join(f"{c} {p:.3f}" for c, p in r["top"]))
    return 1 if any("error" in r for r in results) else 0


def _report(args: argparse.Namespace) -> int:
    from .deploy.report import write_report

    report = evaluate_runs(args.runs, args.data, args.resolutions, args.bn, progress=False, latency=args.latency)
    models = {label: load_checkpoint(run)[0] for label, run in zip(report["runs"], args.runs)}
    index = write_report(report, models, args.out)
    print(f"wrote {index} (open it in a browser)")
    return 0


def sample_data_dir() -> Path:
    return Path(__file__).parent / "sample_data" / "imagenette-tiny"


def _demo(args: argparse.Namespace) -> int:
    from .engine.trainer import train

    data = sample_data_dir()
    out = Path(args.out)
    cfg = make_config({
        "model": {"name": "resnet18", "width_mult": 0.25},
        "method": {"name": "rsnet", "resolutions": [96, 80, 64, 48], "kwargs": {"mred": "full"}},
        "data": {"root": str(data), "cache": True, "num_workers": 0},
        "train": {"epochs": args.epochs, "batch_size": 20, "lr": 0.02, "nesterov": True, "weight_decay": 5e-4,
                  "warmup_epochs": 2, "eval_every": 0, "progress": False},
    })
    print(f"flexres demo: RS-Net (ResNet-18 x0.25, full MRED) on {data} (10 classes, 100 train / 100 val images)")
    t0 = time.time()
    if (out / "checkpoint.safetensors").exists():
        print(f"{out} already holds a run: evaluating it (delete it to train again)")
    else:
        train(cfg, out, log=lambda s: print("  " + s[:160]))
    print(f"trained in {time.time() - t0:.0f} s; evaluating at trained, between and outside resolutions")
    report = evaluate_runs([str(out)], str(data), [112, 96, 88, 80, 72, 64, 56, 48, 40], "interpolate", progress=False)
    print(format_report(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexres", description="Resolution-adaptive image classifiers.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML recipe")
    t.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    t.add_argument("--data", help="ImageFolder root with train/ and val/ (overrides data.root)")
    t.add_argument("--out", help="run directory (default runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. epochs=5")
    t.add_argument("--stop-after-epochs", type=int, help="end this process after N epochs (continue later with --resume)")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate runs at any list of resolutions")
    e.add_argument("runs", nargs="+", help="run directories or checkpoint files")
    e.add_argument("--data", required=True, help="ImageFolder root (its val/ split is used)")
    e.add_argument("--split", default="val")
    e.add_argument("--resolutions", type=int, nargs="+", help="test resolutions (default: the run's eval.resolutions)")
    e.add_argument("--bn", choices=BN_POLICIES, help="BN policy for untrained resolutions (default interpolate)")
    e.add_argument("--scale", choices=SCALE_POLICIES, help="SAN models: weights from eps(T) ('exact', default) or from the "
                   "nearest trained resolution's eps ('nearest')")
    e.add_argument("--san-mode", choices=list(SAN_MODES), help="SAN inference: proxy = --bn nearest --scale nearest; ideal = "
                   "--bn calibrate --scale exact; data-free = --bn interpolate --scale exact")
    e.add_argument("--workers", type=int, default=0, help="data-loading processes (for sets too large to cache in memory)")
    e.add_argument("--width", type=float, default=1.0, help="slimmable models: the width to evaluate")
    e.add_argument("--calibration-images", type=int, help="images for --bn calibrate (default eval.calibration_images)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--latency", action="store_true", help="also measure batch-1 latency on this machine")
    e.add_argument("--json", help="also write the report as JSON")
    e.set_defaults(func=_eval)

    tb = sub.add_parser("table", help="accuracy, MACs, params (and latency) of every operating point")
    tb.add_argument("run")
    tb.add_argument("--data", help="ImageFolder root (default: the run's data.root)")
    tb.add_argument("--widths", default="1.0", help="START:STOP:STEP or one value, e.g. 0.25:1.0:0.05")
    tb.add_argument("--resolutions", type=int, nargs="+")
    tb.add_argument("--latency", action="store_true", help="also measure batch-1 latency on this machine")
    tb.add_argument("--bn", choices=BN_POLICIES, default="interpolate", help="resolution-switchable models: BN policy")
    tb.add_argument("--scales", help="resizable models (Resizable-NAS): 'all' scaling configurations, or N sampled (seeded)")
    tb.add_argument("--calibration-images", type=int)
    tb.add_argument("--batch-size", type=int, default=256)
    tb.add_argument("--workers", type=int, default=0)
    tb.set_defaults(func=_table)

    sl = sub.add_parser("select", help="the best operating point under a budget, from the run's table")
    sl.add_argument("run")
    sel = sl.add_mutually_exclusive_group(required=True)
    sel.add_argument("--max-macs", help="e.g. 150M")
    sel.add_argument("--max-latency-ms", type=float)
    sl.add_argument("--json", action="store_true")
    sl.set_defaults(func=_select)

    ad = sub.add_parser("adapt", help="Resizable-Adapt: a per-image choice of scaling configuration under a MACs budget")
    ad.add_argument("run")
    ad.add_argument("--data", help="ImageFolder root (default: the run's data.root)")
    ad.add_argument("--max-macs", required=True, help="no image may cost more, e.g. 25M")
    ad.add_argument("--configs", default="all", help="'all' scaling configurations, or N sampled (seeded)")
    ad.add_argument("--label-images", type=int, default=2000, help="training images labelled with their best configuration")
    ad.add_argument("--epochs", type=int, default=30, help="router training epochs")
    ad.add_argument("--resolution", type=int)
    ad.set_defaults(func=_adapt)

    x = sub.add_parser("export", help="export one operating point as a static ONNX or TorchScript model")
    x.add_argument("run", help="run directory or checkpoint")
    x.add_argument("--resolution", type=int, required=True)
    x.add_argument("--width", type=float, default=1.0)
    x.add_argument("--scales", type=float, nargs="+")
    x.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    x.add_argument("--out", help="output file (default RUN/export/<arch>_<res>.onnx|.pt)")
    x.add_argument("--bn", choices=BN_POLICIES, help="BN policy when the resolution was not trained (default interpolate)")
    x.add_argument("--scale", choices=SCALE_POLICIES, help="SAN models: eps(T) ('exact') or the nearest trained eps")
    x.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm2d layers instead of folding them into the convs")
    x.add_argument("--data", help="images for the parity check (default: the bundled sample)")
    x.set_defaults(func=_export)

    pr = sub.add_parser("predict", help="classify image files")
    pr.add_argument("model", help="run directory, checkpoint, or an exported .onnx / .pt file")
    pr.add_argument("images", nargs="+")
    budget = pr.add_mutually_exclusive_group()
    budget.add_argument("--resolution", type=int)
    budget.add_argument("--max-macs", help="budget in MACs, e.g. 150M")
    budget.add_argument("--max-latency-ms", type=float, help="budget in milliseconds (batch 1, measured here)")
    pr.add_argument("--width", type=float, default=1.0, help="slimmable models: the width to run at with --resolution")
    pr.add_argument("--bn", choices=BN_POLICIES, default="interpolate")
    pr.add_argument("--topk", type=int, default=5)
    pr.add_argument("--json", action="store_true", help="print JSON instead of text")
    pr.set_defaults(func=_predict)

    rp = sub.add_parser("report", help="plots (accuracy vs cost, train x test heatmap, BN statistics) and an HTML page")
    rp.add_argument("runs", nargs="+")
    rp.add_argument("--data", required=True, help="ImageFolder root to evaluate on (val split)")
    rp.add_argument("--out", required=True, help="output folder")
    rp.add_argument("--resolutions", type=int, nargs="+")
    rp.add_argument("--bn", choices=BN_POLICIES, default="interpolate")
    rp.add_argument("--latency", action="store_true", help="also plot accuracy vs measured latency")
    rp.set_defaults(func=_report)

    d = sub.add_parser("demo", help="train and evaluate a small RS-Net on the bundled sample images (CPU, minutes)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int, default=60)
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointMismatchError, FileNotFoundError, FileExistsError, ValueError, LookupError) as e:
        print(f"flexres {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001
        from .data import UnreadableImageError

        if isinstance(e, UnreadableImageError):
            print(f"flexres {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
